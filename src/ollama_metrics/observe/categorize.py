"""Prompt categories: a cheap keyword classifier onto the original proxy's bounded set.

The set is closed (CATEGORIES) so it can be a Prometheus label. Only the start of the prompt is
read: intent is stated early, and a long document pasted after it should not cost time or sway
the verdict. Order matters: debugging beats writing code, which beats a plain question.
"""

from __future__ import annotations

import re

CATEGORIES = (
    "summarize",
    "translate",
    "explain",
    "code_write",
    "code_debug",
    "question",
    "creative",
    "analyze",
    "help",
    "list",
    "empty",
    "other",
)

_HEAD = 600  # characters of the prompt that are read

# (category, pattern, triggers): the pattern can only match where one of its triggers occurs as
# a substring, so a rule with none in the text is skipped without running its regex. `in` on a
# str is a C scan, about a hundred times cheaper than a regex search over the same 600
# characters; tests/test_categorize.py checks every trigger list against its pattern.
_SPECS: list[tuple[str, str, tuple[str, ...]]] = [
    ("summarize", r"\b(summari[sz]e|summary|tl;?dr|sum up|key points|condense)\b",
     ("summar", "tl", "sum up", "key points", "condense")),
    ("translate", r"\b(translate|translation|in (english|french|spanish|german|chinese|"
                  r"japanese|italian|portuguese|russian|korean))\b",
     ("translat", "english", "french", "spanish", "german", "chinese", "japanese", "italian",
      "portuguese", "russian", "korean")),
    ("code_debug", r"\b(debug|traceback|stack ?trace|exception|error|bug|fix (this|my|the)|"
                   r"doesn'?t work|not working|fails?|crash(es|ing)?|segfault)\b",
     ("bug", "traceback", "stack", "exception", "error", "fix ", "doesn", "not working", "fail",
      "crash", "segfault")),
    ("code_write", r"\b(write|create|implement|generate|build|make) (a |an |the |me a )?"
                   r"(\w+ )?(function|class|script|program|code|method|module|query|regex|"
                   r"api|endpoint|test)s?\b|```|\bdef |\bfunction\(|#include|\bimport \w",
     ("write ", "create ", "implement ", "generate ", "build ", "make ", "```", "def ",
      "function(", "#include", "import ")),
    ("explain", r"\b(explain|what does .{0,40} mean|describe how|how does|why does|"
                r"eli5|walk me through)\b",
     ("explain", "what does", "describe how", "how does", "why does", "eli5",
      "walk me through")),
    ("analyze", r"\b(analy[sz]e|analysis|compare|comparison|evaluate|assess|review|"
                r"pros and cons|critique)\b",
     ("analy", "compar", "evaluate", "assess", "review", "pros and cons", "critique")),
    ("creative", r"\b(write|compose) (a |an |me a )?(\w+ )?(story|poem|song|haiku|lyrics|"
                 r"limerick|essay|novel|script|joke)\b|\b(story|poem|haiku|once upon)\b",
     ("story", "poem", "song", "haiku", "lyrics", "limerick", "essay", "novel", "script", "joke",
      "once upon")),
    ("list", r"\b(list|enumerate|name (some|a few|\d+)|give me \d+|top \d+)\b",
     ("list", "enumerate", "name ", "give me ", "top ")),
    ("help", r"\b(help|assist|how (do|can|should) i|can you|could you|guide|tutorial)\b",
     ("help", "assist", "how ", "can you", "could you", "guide", "tutorial")),
]
_RULES: list[tuple[str, re.Pattern[str], tuple[str, ...]]] = [
    (name, re.compile(pattern), triggers) for name, pattern, triggers in _SPECS
]
_QUESTION = re.compile(r"^(what|who|when|where|which|why|how|is|are|does|do|can|should|will)\b")


def categorize(prompt: str) -> str:
    """One of CATEGORIES for the prompt text; `empty` for no text, `other` when nothing fits."""
    head = prompt[:_HEAD].strip().lower()
    if not head:
        return "empty"
    for name, pattern, triggers in _RULES:
        for trigger in triggers:
            if trigger in head:
                if pattern.search(head):
                    return name
                break  # the pattern was tried: the next rule
    if head.endswith("?") or _QUESTION.match(head):
        return "question"
    return "other"
