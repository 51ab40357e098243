"""Full-text search: what a record's index holds, and what a user's search text means.

Both halves live here because they must agree. The index of a record holds two texts: what was
asked (the system prompt, every message of any role with its thinking and tool-call arguments,
the prompt) and what was answered (the reply, its thinking, its tool-call arguments). Scripts
written without spaces (Chinese, Japanese, Korean, Thai…) are indexed as overlapping pairs of
characters, `日本語` as `日本 本語`; a search text gets the same treatment, and its pairs must be
adjacent, so any run of two or more such characters is found wherever it occurs.

A search text is literal words, all of which must occur; punctuation inside a word is kept as
the user meant it (`gpt-4`, `don't`, `C++`, `user@example.com` search for their parts side by
side, as the index holds them). Operators used on purpose:

    "exact phrase"   the words side by side
    a OR b           either (binds looser than the implied AND)
    -word, NOT word  exclude (alone, with nothing to exclude from, it is the word itself)
    stem*            words starting with stem (at least MIN_PREFIX_STEM characters; a shorter
                     stem is the word itself)

`parse` turns the text into a Search once; `fts5()` and `tsquery()` write it in SQLite's and
PostgreSQL's syntax, quoting every word, so no text typed is a syntax error. Only the search
budget (query.check_search) refuses a text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

MIN_PREFIX_STEM = 2

# Letters of scripts written without spaces between words: Thai, Lao, Myanmar, Hangul Jamo,
# Khmer, CJK punctuation-free ranges (kana, bopomofo, Hangul, Han and its extensions,
# compatibility ideographs, halfwidth kana).
_UNSPACED = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u3040-\u30ff\u3100-\u318f"
    "\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
    "\U00020000-\U0003134f]+")
_QUOTED_OR_WORD = re.compile(r'(-?)"([^"]*)"?|(\S+)')


def spaced(text: str) -> str:
    """`text` with every run of unspaced-script letters written as its overlapping pairs,
    set apart by spaces (a single letter stands alone)."""
    # isascii() reads a flag of the string: most texts skip the scan.
    if text.isascii() or not _UNSPACED.search(text):
        return text
    return _UNSPACED.sub(_pairs, text)


def _pairs(run: re.Match[str]) -> str:
    s = run.group()
    if len(s) == 1:
        return f" {s} "
    return " " + " ".join(s[n:n + 2] for n in range(len(s) - 1)) + " "


# --- what is indexed -------------------------------------------------------------------------

def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value (keys of objects included: argument names are words)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield str(value)


def _call_texts(calls: Any) -> Iterator[str]:
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                yield function["name"]
            yield from _strings(function.get("arguments"))


def asked_text(prompt: str | None, messages: Any, system: str | None) -> str:
    """The indexed text of what was asked: the system prompt, then each message (content,
    thinking, tool calls) of any role, then the prompt unless a message already holds it."""
    texts = [system] if system else []
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict):
            continue
        for key in ("content", "thinking"):
            if isinstance(m.get(key), str) and m[key]:
                texts.append(m[key])
        texts.extend(_call_texts(m.get("tool_calls")))
    if prompt and prompt not in texts:
        texts.append(prompt)
    return spaced("\n".join(texts))


def answered_text(response: str | None, thinking: str | None, tool_calls: Any) -> str:
    """The indexed text of the answer: the reply, its thinking and its tool calls."""
    texts = [t for t in (response, thinking) if t]
    texts.extend(_call_texts(tool_calls))
    return spaced("\n".join(texts))


def _decoded(value: str | bytes | None) -> Any:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def asked_text_sql(prompt: str | None, messages: str | None, system: str | None) -> str:
    """asked_text over the stored columns (messages as JSON text), for SQLite's index statements."""
    return asked_text(prompt, _decoded(messages), system)


def answered_text_sql(response: str | None, thinking: str | None, tool_calls: str | None
                      ) -> str:
    return answered_text(response, thinking, _decoded(tool_calls))


# --- what a search text means ----------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    text: str  # as typed, without its operator marks
    prefix: bool = False
    negated: bool = False


@dataclass(frozen=True)
class Search:
    """Alternatives (OR), each a list of terms that must all match (negated ones must not)."""

    groups: tuple[tuple[Term, ...], ...]

    def fts5(self) -> str | None:
        """The search as an FTS5 MATCH expression; None when nothing in it can be searched
        for (it then matches nothing)."""
        alternatives = []
        for group in self.groups:
            wanted = " AND ".join(_fts5_term(t) for t in group if not t.negated)
            unwanted = "".join(f" NOT {_fts5_term(t)}" for t in group if t.negated)
            alternatives.append(f"({wanted}){unwanted}")
        return " OR ".join(alternatives) or None

    def tsquery(self, params: list[Any]) -> str | None:
        """The search as a PostgreSQL tsquery expression; its values go to `params` (bound,
        never in the SQL). None when nothing in it can be searched for."""
        alternatives = []
        for group in self.groups:
            parts = []
            for t in group:
                parts.append(("!!" if t.negated else "") + _tsquery_term(t, params))
            alternatives.append(f"({' && '.join(parts)})")
        return " || ".join(alternatives) or None


def _searchable(text: str) -> bool:
    """Whether `text` holds a letter or digit: both tokenizers drop everything else."""
    return any(unicodedata.category(c)[0] in "LN" for c in text)


def _fts5_term(t: Term) -> str:
    phrase = '"' + spaced(t.text).replace('"', '""') + '"'
    return f"{phrase} *" if t.prefix else phrase


def _tsquery_term(t: Term, params: list[Any]) -> str:
    text = spaced(t.text).replace("\x00", "\ufffd")
    if t.prefix:  # one quoted lexeme with a prefix mark, in to_tsquery's own quoting
        params.append("'" + text.replace("\\", "\\\\").replace("'", "''") + "':*")
        return "to_tsquery('simple', %s)"
    params.append(text)
    return "phraseto_tsquery('simple', %s)"


def _term(text: str, negated: bool, quoted: bool) -> Term | None:
    prefix = False
    if not quoted and text.endswith("*"):
        stem = text.rstrip("*")
        if sum(1 for c in stem if unicodedata.category(c)[0] in "LN") >= MIN_PREFIX_STEM:
            text, prefix = stem, True
    if not _searchable(text):
        return None
    return Term(text, prefix=prefix, negated=negated)


def parse(text: str) -> Search:
    """The meaning of a search text (see the module docstring); never fails."""
    items = [(m.group(3), False, False) if m.group(3) is not None
             else (m.group(2), bool(m.group(1)), True)
             for m in _QUOTED_OR_WORD.finditer(text)]
    groups: list[list[Term]] = [[]]
    negate_next = False
    for n, (raw, minus, quoted) in enumerate(items):
        more = n + 1 < len(items)
        if not quoted and more:
            if raw in ("OR", "AND") and groups[-1]:
                if raw == "OR":
                    groups.append([])
                continue
            if raw == "NOT":
                negate_next = True
                continue
        if not quoted and raw.startswith("-") and len(raw) > 1:
            raw, minus = raw[1:], True
        term = _term(raw, minus or negate_next, quoted)
        negate_next = False
        if term is not None:
            groups[-1].append(term)
    kept = []
    for group in groups:
        if group and all(t.negated for t in group):  # nothing to exclude from: literal words
            group = [Term(t.text, t.prefix) for t in group]
        if group:
            kept.append(tuple(group))
    return Search(tuple(kept))
