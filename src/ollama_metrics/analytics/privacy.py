"""What of a prompt may be stored: capture levels, size caps and redaction.

Applied to every text of a record before it is queued, so nothing unredacted ever reaches a
queue, a store or a log. Order: cap (bounds the work), capture level, then redaction. Levels:
`full` keeps texts up to `max_text` characters, `truncated` up to `truncate_chars`, `metadata`
no text, name or option at all (counts, sizes, timings, model, endpoint and status only).

Built-in redactions replace, with a bracketed tag: e-mail addresses, API keys and tokens (OpenAI-,
GitHub-, Slack-, AWS-, Google-style keys, JWTs, bearer tokens, `key=value` secrets) and payment
card numbers (13-19 digits that pass the Luhn check). User patterns replace their whole match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .settings import AnalyticsConfig

_SECRET = "[REDACTED_SECRET]"
TRUNCATED = " …[truncated]"  # ends every text that was cut
_MARGIN = 256  # longer than any built-in secret pattern matches
# (guards, pattern, replacement). A pattern only runs when one of its guards occurs in the text
# (lower-cased for the case-insensitive ones): a substring test is C-speed, a regex pass over a
# long reply is not, and ordinary text contains none of these.
Rule = tuple[tuple[str, ...], re.Pattern[str], "str | Callable[[re.Match[str]], str]"]
_BUILTIN: list[Rule] = [
    (("@",), re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
     "[REDACTED_EMAIL]"),
    (("eyj",), re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
     _SECRET),
    (("sk-", "pk-", "rk-"), re.compile(r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_]{16,}"),
     _SECRET),
    (("gh", "github_pat_"),
     re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}"), _SECRET),
    (("xox",), re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), _SECRET),
    (("akia", "asia"), re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), _SECRET),
    (("aiza",), re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), _SECRET),
    (("bearer",), re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}=*"), "Bearer " + _SECRET),
    (("key", "secret", "token", "passw"),
     re.compile(r"(?i)\b(api[_-]?key|secret|token|passw(?:or)?d)(\s*[:=]\s*)[\"']?[^\s\"',;]{6,}"),
     r"\1\2" + _SECRET),
]
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_DIGITS = re.compile(r"\d{4}")  # no card number without four digits in a row


def _luhn(digits: str) -> bool:
    total = 0
    for n, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if n % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return "[REDACTED_CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group(0)


@dataclass
class Privacy:
    """Applies one configuration's capture level, caps and redaction to texts."""

    capture: str = "full"
    truncate_chars: int = 200
    max_text: int = 65_536
    redact: bool = True
    patterns: tuple[re.Pattern[str], ...] = ()
    max_messages: int = 100  # kept of a conversation: the first and the last half of them
    max_record_bytes: int = 1 << 20  # the whole record, JSON-encoded
    _rules: list[Rule] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.redact:
            self._rules.extend(_BUILTIN)
        self._rules.extend(((), p, "[REDACTED]") for p in self.patterns)

    @classmethod
    def from_settings(cls, settings: AnalyticsConfig) -> Privacy:
        return cls(settings.capture, settings.truncate_chars, settings.max_text,
                   settings.redact, settings.redact_patterns, settings.max_messages,
                   settings.max_record_kb * 1024)

    @property
    def keeps_text(self) -> bool:
        """Whether texts, names and options are kept at all (`metadata` keeps none of them)."""
        return self.capture != "metadata"

    @property
    def limit(self) -> int:
        """Characters kept of one text at this capture level."""
        return self.truncate_chars if self.capture == "truncated" else self.max_text

    @property
    def decisive_chars(self) -> int:
        """Characters of a text that decide everything kept of it (its stored form, whether it
        was cut, its share of the record): a longer text can be cut here first, unchanged."""
        return self.limit + _MARGIN + 1

    def text(self, value: str | None, limit: int | None = None) -> tuple[str | None, bool]:
        """The storable form of one text (at most `limit` characters, never more than the
        level's), and whether it was cut."""
        if value is None or not self.keeps_text:
            return None, False
        return self.clip(value, self.limit if limit is None else min(limit, self.limit))

    def clip(self, value: str, limit: int) -> tuple[str, bool]:
        """`value` redacted and cut to `limit` characters whatever the level, and whether it
        was cut."""
        # Redact a little past the cut first, so a secret straddling it is not half kept.
        scrubbed = self.scrub(value[: limit + _MARGIN])
        if len(scrubbed) <= limit and len(value) <= limit + _MARGIN:
            return scrubbed, False
        return scrubbed[:limit] + TRUNCATED, True

    def scrub(self, value: str) -> str:
        """Redaction alone, whatever the level and length."""
        lowered = value.lower()
        for guards, pattern, replacement in self._rules:
            if not guards or any(g in lowered for g in guards):
                value = pattern.sub(replacement, value)
        if self.redact and _DIGITS.search(value):
            value = _CARD.sub(_card, value)
        return value
