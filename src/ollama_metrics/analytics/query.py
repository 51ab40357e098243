"""What a search asks for: one validated Query, built from typed values (`query`: the CLI's
options) or parsed from HTTP parameters (`parse`, which reads the strings and calls `query`).

Every store answers the same Query. Bad input raises BadQuery with a reason a user can act on;
the API turns it into a 400 and the CLI into a usage error. Values are never interpolated into
SQL: stores bind them as parameters.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..observe.categorize import CATEGORIES
from ..ollama.names import normalize_model

MAX_LIMIT = 1000
# Times are unix seconds from 1970 to the end of year 9999: finite, and far from overflowing
# when a range or a bucket is computed from them.
MAX_TIME = 253_402_300_799.0
DEFAULT_LIMIT = 100

# A full-text search's size, checked on the text as given, before any store sees it. Each term
# is one more index walk merged into the search (and, for a prefix, one more prefix scan): 32
# terms and 512 characters are far more than a person types, and few enough that the worst
# allowed search stays within the deadline on a large store. A prefix term needs a stem of
# MIN_PREFIX_STEM characters: a shorter one (`k*`) would stand for a large part of the
# vocabulary, so it is read as the word itself (fulltext.parse). What the text means is
# fulltext's: every text within these caps is a valid search.
MAX_SEARCH_CHARS = 512
MAX_SEARCH_TERMS = 32
_OPERATORS = frozenset({"AND", "OR", "NOT"})
_WORD = re.compile(r"\w+")

# Filter values for `status`: the stored outcomes, `error` for both kinds of error (as the metric's
# label counts them), and `ok`, the stored word for success before migration 6, for old scripts.
STATUSES: dict[str, tuple[str, ...]] = {
    "success": ("success",),
    "ok": ("success",),
    "error": ("error", "upstream_error"),
    "upstream_error": ("upstream_error",),
    "cancelled": ("cancelled",),
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadQuery(ValueError):
    """A query parameter has a value that cannot be searched for; the message says why."""


@dataclass(frozen=True)
class Query:
    start_time: float | None = None
    end_time: float | None = None
    model: str | None = None
    text: str | None = None  # full-text search over every text (see fulltext)
    category: str | None = None
    status: str | None = None  # a key of STATUSES
    endpoint: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    cursor: int | None = None  # continue after this position (from a previous page)
    order: str = "time"  # "time": newest first; "rank": best full-text match first

    @property
    def outcomes(self) -> tuple[str, ...] | None:
        return STATUSES[self.status] if self.status else None

    def next_page(self, cursor: int) -> Query:
        return replace(self, cursor=cursor, offset=0)


@dataclass(frozen=True)
class Page:
    records: list[dict[str, object]]
    next_cursor: int | None  # pass back as `cursor` for the next page; None at the end


def parse_since(value: str, now: float | None = None) -> float:
    """`90s`, `15m`, `1h`, `7d`, `2w` (or plain seconds) ago, as epoch seconds."""
    m = _DURATION.match(value)
    if not m:
        raise BadQuery(f"since: expected a duration like 15m, 1h or 7d, got {value!r}")
    seconds = float(m.group(1)) * _UNIT[m.group(2) or "s"]
    now = time.time() if now is None else now
    if seconds > now:  # an infinite or merely very long duration alike
        raise BadQuery(f"since: reaches back before 1970 (at most {int(now)}s), got {value!r}")
    return now - seconds


def _number(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise BadQuery(f"{name}: expected unix seconds, got {raw!r}") from None


def _int(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadQuery(f"{name}: expected a whole number, got {raw!r}") from None


def check_search(text: str) -> None:
    """Raise BadQuery unless full-text `text` is within the search budget: at most
    MAX_SEARCH_CHARS characters and MAX_SEARCH_TERMS words (operators not counted)."""
    if len(text) > MAX_SEARCH_CHARS:
        raise BadQuery(f"prompt_search: at most {MAX_SEARCH_CHARS} characters, got {len(text)}")
    terms = sum(1 for word in _WORD.findall(text) if word not in _OPERATORS)
    if terms > MAX_SEARCH_TERMS:
        raise BadQuery(f"prompt_search: at most {MAX_SEARCH_TERMS} terms, got {terms}")


def _model(name: str | None) -> str | None:
    """A model filter as the records spell it: `fast` finds `fast:latest` (ollama.names)."""
    name = (name or "").strip()
    return normalize_model(name) if name else None


def query(*, start_time: float | None = None, end_time: float | None = None,
          since: str | None = None, model: str | None = None, text: str | None = None,
          category: str | None = None, status: str | None = None, endpoint: str | None = None,
          limit: int | None = None, offset: int | None = None, cursor: int | None = None,
          order: str = "time") -> Query:
    """A validated Query from typed values (the CLI's options, or parsed HTTP parameters).
    None and empty strings mean "not given": the default."""
    limit = DEFAULT_LIMIT if limit is None else limit
    offset = offset or 0
    for name, when in (("start_time", start_time), ("end_time", end_time)):
        if when is not None and not 0 <= when <= MAX_TIME:  # NaN and infinities included
            raise BadQuery(f"{name}: expected unix seconds from 0 to {MAX_TIME:.0f}, "
                           f"got {when:g}")
    if since:
        if start_time is not None:
            raise BadQuery("give start_time or since, not both")
        start_time = parse_since(since)
    if start_time is not None and end_time is not None and end_time < start_time:
        raise BadQuery("end_time is before start_time")
    category = category or None
    if category is not None and category not in CATEGORIES:
        raise BadQuery(f"prompt_category: one of {', '.join(CATEGORIES)}, got {category!r}")
    status = status or None
    if status is not None and status not in STATUSES:
        raise BadQuery(f"status: one of {', '.join(STATUSES)}, got {status!r}")
    order = order or "time"
    if order not in ("time", "rank"):
        raise BadQuery(f"order: time or rank, got {order!r}")
    text = (text or "").strip() or None
    if text is not None:
        check_search(text)
    if order == "rank" and text is None:
        raise BadQuery("order=rank needs prompt_search")
    for name, value, low, high in (("limit", limit, 1, MAX_LIMIT), ("offset", offset, 0, 10**9),
                                   ("cursor", cursor, 0, 2**62)):
        if value is not None and not low <= value <= high:
            raise BadQuery(f"{name}: must be between {low} and {high}, got {value}")
    return Query(start_time=start_time, end_time=end_time, model=_model(model), text=text,
                 category=category, status=status, endpoint=endpoint or None, limit=limit,
                 offset=offset, cursor=cursor, order=order)


def parse(params: Mapping[str, str]) -> Query:
    """A Query from the search parameters (the original proxy's names, plus the new ones)."""
    known = {"start_time", "end_time", "since", "model", "prompt_search", "q", "prompt_category",
             "category", "status", "endpoint", "limit", "offset", "cursor", "order", "format"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadQuery(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return query(
        start_time=_number(params, "start_time"),
        end_time=_number(params, "end_time"),
        since=params.get("since"),
        model=params.get("model"),
        text=params.get("prompt_search") or params.get("q"),
        category=params.get("prompt_category") or params.get("category"),
        status=params.get("status"),
        endpoint=params.get("endpoint"),
        limit=_int(params, "limit"),
        offset=_int(params, "offset"),
        cursor=_int(params, "cursor"),
        order=params.get("order") or "time",
    )
