"""Stores behind one small protocol, chosen by one factory from the settings.

A store receives finished records (dicts of FIELDS, as analytics.record builds them) in batches
from its writer task. Every store can `write_batch`, `purge` and `close`; the queryable ones
(SQLite, PostgreSQL) also `search`, `get`, `stats`, `models`, `timeseries` and `export`.
Optional backends import their libraries lazily, so a plain install needs none of them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from ...ollama.names import normalize_model
from ..query import Page, Query
from ..settings import AnalyticsConfig

Record = dict[str, Any]

# The stored fields, in order, with their kind. Stores derive their schemas from this list.
FIELDS: list[tuple[str, str]] = [
    ("id", "text"),
    ("started_at", "real"),
    ("ended_at", "real"),
    ("client_ip", "text"),
    ("user_agent", "text"),
    ("method", "text"),
    ("path", "text"),
    ("endpoint", "text"),
    ("model", "text"),
    ("stream", "bool"),
    ("options", "json"),
    ("http_status", "int"),
    ("outcome", "text"),
    ("error", "text"),
    ("prompt", "text"),
    ("messages", "json"),
    ("system", "text"),
    ("response", "text"),
    ("thinking", "text"),
    ("tool_calls", "json"),
    ("images", "json"),
    ("image_count", "int"),
    ("prompt_category", "text"),
    ("ttft", "real"),
    ("duration", "real"),
    ("total_duration", "real"),
    ("load_duration", "real"),
    ("prompt_eval_duration", "real"),
    ("eval_duration", "real"),
    ("prompt_tokens", "int"),
    ("completion_tokens", "int"),
    ("tokens_per_second", "real"),
    ("request_bytes", "int"),
    ("response_bytes", "int"),
    ("done_reason", "text"),
    ("embedding_dims", "int"),
    ("truncated", "bool"),
    ("capture", "text"),
    # Added by migration (sqlite m004, postgres m003): the names of the fields shortened or left
    # out by a cap (analytics.record), or null.
    ("truncated_fields", "json"),
    # Added by migration (sqlite m007, postgres m005): true when completion_tokens was counted
    # by the proxy from the reply's chunks because the reply carried no count (an estimate).
    ("tokens_estimated", "bool"),
]
# The fields the first migration created; later ones add the rest.
FIELDS_V1 = FIELDS[:[name for name, _ in FIELDS].index("capture") + 1]
FIELD_NAMES = [name for name, _ in FIELDS]
JSON_FIELDS = frozenset(name for name, kind in FIELDS if kind == "json")
BOOL_FIELDS = frozenset(name for name, kind in FIELDS if kind == "bool")


def renamed_models(names: list[str]) -> list[tuple[str, str]]:
    """(old, new) for each stored model name that ollama.names spells otherwise: what the
    migrations to one name per model rename."""
    return [(name, new) for name in names if (new := normalize_model(name)) != name]


def column_filters(q: Query) -> list[tuple[str, str, Any]]:
    """A query's column filters as (column, operator, value), in SQL order. Each SQL store
    renders its own placeholders and adds its outcome and full-text conditions."""
    filters: list[tuple[str, str, Any]] = []
    if q.start_time is not None:
        filters.append(("i.started_at", ">=", q.start_time))
    if q.end_time is not None:
        filters.append(("i.started_at", "<", q.end_time))
    for column, value in (("model", q.model), ("prompt_category", q.category),
                          ("endpoint", q.endpoint)):
        if value is not None:
            filters.append((f"i.{column}", "=", value))
    return filters


class StoreError(RuntimeError):
    """A store cannot do what was asked (unreachable, misconfigured); the message says why."""


class QueryTimeout(StoreError):
    """A query ran past the search deadline and was stopped."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the query took longer than {seconds:g} s (ANALYTICS_SEARCH_TIMEOUT) and was "
            "stopped; narrow it: a time range, a model, fewer or longer search terms")


class StoreBusy(StoreError):
    """As many full-text queries as the store runs at once are running; try again shortly."""

    def __init__(self, running: int) -> None:
        super().__init__(f"{running} full-text queries are running, the most at once; "
                         "try again in a moment")


# Full-text queries a store runs at once (more wait, up to MAX_WAITING_SEARCHES, then are
# answered busy): the rest of its readers stay free for lookups, the dashboard's figures and
# the writer, whatever the searches cost.
MAX_SEARCHES = 2
MAX_WAITING_SEARCHES = 6


@runtime_checkable
class Store(Protocol):
    name: str

    async def open(self) -> None: ...

    async def write_batch(self, records: list[Record]) -> int:
        """Write `records` or raise (to be retried); writing the same record twice must be
        harmless. Returns how many of them the store refused for good (0 when all are stored):
        those are counted as dropped, never sent again."""

    async def purge(self, older_than: float | None, max_bytes: int | None) -> int:
        """Delete records that started before `older_than`, then the oldest until the store
        fits `max_bytes`; returns how many were deleted (or -1 when it cannot tell)."""

    async def close(self) -> None: ...


@runtime_checkable
class QueryableStore(Store, Protocol):
    async def search(self, query: Query) -> Page: ...

    async def get(self, record_id: str) -> Record | None: ...

    async def stats(self, query: Query) -> dict[str, Any]: ...

    async def models(self, query: Query) -> list[dict[str, Any]]: ...

    async def timeseries(self, query: Query, step: float) -> list[dict[str, Any]]:
        """The figures of `stats` totals per bucket of `step` seconds, oldest first, each with
        `start` (a multiple of `step`, epoch seconds); buckets without requests are left out."""

    def export(self, query: Query) -> AsyncIterator[Record]: ...


def check_usable(settings: AnalyticsConfig) -> None:
    """Refuse, before the proxy serves, settings its stores could never work with: a directory
    that cannot be created or written, an optional backend whose library is not installed.
    (An unreachable database or Loki may come up later: their writers retry.) StoreError says
    which and what to do."""
    if {"sqlite", "jsonl"} & set(settings.backends):
        where = settings.dir
        try:
            where.mkdir(parents=True, exist_ok=True)
            probe = where / f".ollama-metrics-check-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            why = "a file, not a directory" if where.is_file() else \
                (exc.strerror or type(exc).__name__).lower()
            raise StoreError(
                f"cannot keep analytics in {where} ({why}): name a directory this user can "
                "write with --analytics-dir (ANALYTICS_DIR), or record nothing with "
                "--analytics-backend none") from None
    if "postgres" in settings.backends:
        from . import postgres  # noqa: F401  raises StoreError when psycopg is missing


def open_stores(settings: AnalyticsConfig) -> list[Store]:
    """The configured stores, not yet opened, in the order given."""
    stores: list[Store] = []
    for backend in settings.backends:
        if backend == "sqlite":
            from .sqlite import SqliteStore

            stores.append(SqliteStore(settings.dir / "interactions.db",
                                      search_timeout=settings.search_timeout))
        elif backend == "jsonl":
            from .jsonl import JsonlStore

            stores.append(JsonlStore(settings.dir, int(settings.jsonl_max_file_mb * 2**20)))
        elif backend == "postgres":
            from .postgres import PostgresStore

            assert settings.postgres_dsn is not None
            stores.append(PostgresStore(settings.postgres_dsn,
                                        search_timeout=settings.search_timeout))
        elif backend == "loki":
            from .loki import LokiStore

            assert settings.loki_url is not None
            stores.append(LokiStore(settings.loki_url, tenant=settings.loki_tenant))
    return stores


def queryable(stores: list[Store]) -> QueryableStore | None:
    """The store that answers queries: the first one that can."""
    for store in stores:
        if isinstance(store, QueryableStore):
            return store
    return None
