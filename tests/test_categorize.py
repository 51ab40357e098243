"""The prompt classifier: its verdicts, and the trigger lists that let it skip a rule's regex.

Each rule's regex runs only when one of its triggers occurs in the text, so a trigger list that
misses a way the regex can match would change a verdict silently. These tests hold every list to
its pattern: texts built from each pattern's own words, in every rule's place, must get the same
category as a classifier that runs every regex.
"""

from __future__ import annotations

import random
import re

import pytest

from ollama_metrics.observe import categorize as module
from ollama_metrics.observe.categorize import CATEGORIES, categorize


def _every_regex(prompt: str) -> str:
    """The classifier without triggers: the verdict the triggers must not change."""
    head = prompt[: module._HEAD].strip().lower()
    if not head:
        return "empty"
    for name, pattern, _ in module._RULES:
        if pattern.search(head):
            return name
    if head.endswith("?") or module._QUESTION.match(head):
        return "question"
    return "other"


# Words and phrases each pattern can match on, and ones that look close but do not.
MATCHING = [
    "summarise", "summarize", "summary", "tl;dr", "tldr", "sum up", "key points", "condense",
    "translate", "translation", "in english", "in french", "in korean", "in japanese",
    "debug", "traceback", "stack trace", "stacktrace", "exception", "error", "bug",
    "fix this", "fix my", "fix the", "doesn't work", "doesnt work", "not working", "fail",
    "fails", "crash", "crashes", "crashing", "segfault",
    "write a function", "create the class", "implement me a python script", "generate tests",
    "build an api", "make a regex", "```", "def f", "function(x)", "#include <x>", "import os",
    "explain", "what does this word mean", "describe how", "how does", "why does", "eli5",
    "walk me through",
    "analyse", "analyze", "analysis", "compare", "comparison", "evaluate", "assess", "review",
    "pros and cons", "critique",
    "write a story", "compose me a short poem", "song", "haiku", "lyrics", "limerick", "essay",
    "novel", "script", "joke", "story", "poem", "once upon",
    "list", "enumerate", "name some", "name a few", "name 5", "give me 3", "top 10",
    "help", "assist", "how do i", "how can i", "how should i", "can you", "could you", "guide",
    "tutorial",
]
NEAR = [
    "summa", "translator", "inenglish", "debugger", "errors", "bugs", "fixes", "listing",
    "helpful", "reviewer", "scripted", "songs", "jokes", "top ten", "name them", "give me some",
    "how\tdoes", "what does it", "make", "write", "the", "a", "in", "?", "is", "why", "how",
    "deff", "functional", "import", "#includes", "once", "upon", "walk me", "sum", "key",
]


@pytest.mark.parametrize("words", MATCHING)
def test_each_matching_phrase_alone_gets_the_verdict_of_every_regex(words: str) -> None:
    for text in (words, f"Please {words} now.", f"{words.upper()}!", f"x {words} y?"):
        assert categorize(text) == _every_regex(text), text


def test_random_texts_of_pattern_words_get_the_verdict_of_every_regex() -> None:
    rng = random.Random(15)
    pool = MATCHING + NEAR + ["the", "a", "sky", "blue", "python", "data", "1", "42", ",", "."]
    for _ in range(20_000):
        text = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice(("?", "", ".", "\n"))
        assert categorize(text) == _every_regex(text), text


def test_every_rule_has_triggers_that_its_own_phrases_contain() -> None:
    # A trigger list that a rule's own matching phrase does not contain is one the random test
    # could miss: check each phrase that one rule's regex matches carries one of its triggers.
    for name, pattern, triggers in module._RULES:
        for words in MATCHING:
            if pattern.search(words):
                assert any(t in words for t in triggers), (name, words)


@pytest.mark.parametrize(("prompt", "category"), [
    ("", "empty"),
    ("   ", "empty"),
    ("Why is the sky blue?", "question"),
    ("Summarize this article: ...", "summarize"),
    ("Translate 'hello' into French", "translate"),
    ("My code crashes with a traceback", "code_debug"),
    ("Write a Python function that sorts a list", "code_write"),
    ("Explain recursion", "explain"),
    ("Compare Rust and Go", "analyze"),
    ("Write a poem about autumn", "creative"),
    ("List the planets", "list"),
    ("Can you help me plan a trip", "help"),
    ("Hello there", "other"),
    ("x" * 700 + " summarize", "other"),  # past the 600 characters read
])
def test_verdicts(prompt: str, category: str) -> None:
    assert categorize(prompt) == category
    assert category in CATEGORIES


def test_rules_cover_every_category_but_the_fallbacks() -> None:
    named = {name for name, _, _ in module._RULES}
    assert named | {"question", "empty", "other"} == set(CATEGORIES)
    assert all(isinstance(p, re.Pattern) for _, p, _ in module._RULES)
