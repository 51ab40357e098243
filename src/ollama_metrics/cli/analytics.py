"""`ollama-metrics search | stats | export`: read recorded interactions.

They ask the proxy running at --listen first (it knows its store, wherever that is:
analytics.remote), and otherwise open the configured queryable store themselves (the proxy need
not be running); a store named on their command line is read directly. They print readable
tables, or JSON with --json, and say where they looked when nothing is found. The typed options
go straight to analytics.query's `query`, which checks them for the HTTP API too, so both accept
and reject the same things.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import click
import orjson

from ..analytics.api import csv_line, csv_row, jsonl_line
from ..analytics.query import BadQuery, Query, query
from ..analytics.remote import Remote, RemoteError, find
from ..analytics.settings import AnalyticsConfig
from ..analytics.stores import FIELD_NAMES, QueryableStore, StoreError, open_stores, queryable
from ..config import connect_url
from ..settings import ANALYTICS, PROXY, STORE, parse_listen
from ..units import MISSING, missing, seconds, shorten
from .analytics_options import build_analytics, store_options
from .options import options

T = TypeVar("T")


def _proxy_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Where the running proxy is, and its token: asked first."""
    return options([PROXY["listen"], ANALYTICS["analytics_token"]])(f)


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed([
        click.option("--since", metavar="DURATION", help="Only the last 15m, 1h, 7d, …"),
        click.option("--model", help="Only this model (exact name)."),
        click.option("--category", help="Only this prompt category."),
        click.option("--status", help="success, error, cancelled or upstream_error."),
        click.option("--endpoint", help="Only this route, e.g. /api/chat."),
    ]):
        f = decorator(f)
    return f


def _query(text: str | None = None, limit: int | None = None, *, category: str | None = None,
           **filters: Any) -> tuple[Query, dict[str, str]]:
    """The query, checked once by analytics.query from the typed options (UsageError), and
    its parameters as the HTTP API takes them, for asking a running proxy."""
    try:
        asked = query(text=text, limit=limit, category=category, **filters)
    except BadQuery as exc:
        raise click.UsageError(str(exc)) from None
    given = {**filters, "prompt_search": text, "limit": limit, "prompt_category": category}
    return asked, {k: str(v) for k, v in given.items() if v is not None and v != ""}


@dataclass
class _Source:
    """Where a command reads: the running proxy (`remote`), or the store on disk."""

    settings: AnalyticsConfig
    remote: Remote | None
    asked: str  # the proxy it asked, for the message when it reads the disk instead

    @property
    def where(self) -> str:
        if self.remote is not None:
            return self.remote.where
        store = queryable(open_stores(self.settings))
        path = getattr(store, "path", None)
        return f"{path if path is not None else getattr(store, 'name', '?')} ({self.asked})"


def _source(options: dict[str, Any]) -> _Source:
    listen, token = options.pop("listen"), options.pop("analytics_token")
    settings = build_analytics(**options)
    named = click.get_current_context().get_parameter_source
    url = connect_url(*parse_listen(listen)) if listen else None
    if url is None or any(named(s.name) == click.core.ParameterSource.COMMANDLINE
                          for s in STORE):
        return _Source(settings, None, "a store named on the command line")
    remote = find(url, token, settings.search_timeout + 5.0)
    return _Source(settings, remote, f"no proxy with searchable records answers at {url}")


def _remote(work: Callable[[], T]) -> T:
    try:
        return work()
    except RemoteError as exc:
        if exc.status == 400:
            raise click.UsageError(str(exc)) from None
        raise click.ClickException(str(exc)) from None


def _with_store(source: _Source, work: Callable[[QueryableStore], Awaitable[T]]) -> T:
    store = queryable(open_stores(source.settings))
    if store is None:
        raise click.UsageError("searching needs the sqlite or postgres backend "
                               f"(--analytics-backend / ANALYTICS_BACKEND); {source.asked}")
    path = getattr(store, "path", None)
    if path is not None and not path.exists():
        raise click.ClickException(f"no analytics database at {path} yet: nothing recorded "
                                   f"({source.asked})")

    async def main() -> T:
        await store.open()
        try:
            return await work(store)
        except BadQuery as exc:
            raise click.UsageError(str(exc)) from None
        except StoreError as exc:  # past the deadline (ANALYTICS_SEARCH_TIMEOUT), unreachable
            raise click.ClickException(str(exc)) from None
        finally:
            await store.close()

    return asyncio.run(main())


def _when(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)):
        return MISSING
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")




def table(rows: list[list[str]], header: list[str], out: IO[str]) -> None:
    widths = [max(len(h), *(len(r[n]) for r in rows)) if rows else len(h)
              for n, h in enumerate(header)]
    for row in [header, ["-" * w for w in widths], *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


@click.command()
@click.argument("text", required=False)
@_filters
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@_proxy_options
@store_options
def search(text: str | None, since: str | None, model: str | None, category: str | None,
           status: str | None, endpoint: str | None, limit: int, as_json: bool,
           **options: Any) -> None:
    """Find recorded interactions, newest first (TEXT: full-text search of prompt and reply)."""
    asked, params = _query(text, limit, since=since, model=model, category=category,
                    status=status, endpoint=endpoint)
    source = _source(options)
    if source.remote is not None:
        remote = source.remote
        records = _remote(lambda: remote.get("analytics/search", params))["results"]
    else:
        records = _with_store(source, lambda store: store.search(asked)).records
    if as_json:
        click.echo(orjson.dumps(records, option=orjson.OPT_INDENT_2).decode())
        return
    rows = [[_when(r["started_at"]), shorten(missing(r["model"]), 32),
             shorten(r["endpoint"], 24), str(r["outcome"]),
             f"{r['prompt_tokens'] or 0}/{r['completion_tokens'] or 0}",
             seconds(r["ttft"]), seconds(r["duration"]), missing(r["prompt_category"]),
             shorten(r["prompt"], 48), str(r["id"])] for r in records]
    table(rows, ["time", "model", "endpoint", "status", "tokens in/out", "ttft", "total",
                 "category", "prompt", "id"], sys.stdout)
    if not rows:
        click.echo(f"no interactions match (looked in {source.where})")


@click.command()
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@_proxy_options
@store_options
def stats(since: str | None, model: str | None, category: str | None, status: str | None,
          endpoint: str | None, as_json: bool, **options: Any) -> None:
    """Totals, per model and per category: requests, tokens, errors, p50/p95 latency and TTFT."""
    asked, params = _query(since=since, model=model, category=category, status=status,
                    endpoint=endpoint)
    source = _source(options)
    if source.remote is not None:
        remote = source.remote
        result = _remote(lambda: remote.get("analytics/stats", params))
        result.pop("range", None)  # the API's addition; the store's own figures otherwise
    else:
        result = _with_store(source, lambda store: store.stats(asked))
    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    header = ["", "requests", "errors", "error %", "tokens in", "tokens out", "p50", "p95",
              "ttft p50", "ttft p95"]

    def row(name: str, s: dict[str, Any]) -> list[str]:
        return [name, str(s["requests"]), str(s["errors"]), f"{s['error_rate'] * 100:.1f}",
                str(s["prompt_tokens"]), str(s["completion_tokens"]), seconds(s["latency_p50"]),
                seconds(s["latency_p95"]), seconds(s["ttft_p50"]), seconds(s["ttft_p95"])]

    table([row("all", result["totals"])]
          + [row(f"model {shorten(missing(s['model']), 40)}", s) for s in result["models"]]
          + [row(f"category {missing(s['prompt_category'])}", s) for s in result["categories"]],
          header, sys.stdout)
    if not result["totals"]["requests"]:
        click.echo(f"nothing recorded matches (looked in {source.where})")


@click.command()
@_filters
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--output", "-o", type=click.File("wb"), default="-",
              help="File to write (default: standard output).")
@_proxy_options
@store_options
def export(since: str | None, model: str | None, category: str | None, status: str | None,
           endpoint: str | None, fmt: str, output: IO[bytes], **options: Any) -> None:
    """Write every matching record, newest first, as JSON lines or CSV."""
    asked, params = _query(since=since, model=model, category=category, status=status,
                    endpoint=endpoint)
    source = _source(options)
    if fmt == "csv":
        output.write(csv_line(FIELD_NAMES))

    def write(record: dict[str, Any]) -> None:
        output.write(jsonl_line(record) if fmt == "jsonl" else csv_row(record))

    if source.remote is not None:
        remote = source.remote

        def fetch() -> int:
            n = 0
            for line in remote.lines("analytics/export", {**params, "format": "jsonl"}):
                write(orjson.loads(line))
                n += 1
            return n
        count = _remote(fetch)
    else:
        async def read(store: QueryableStore) -> int:
            n = 0
            async for record in store.export(asked):
                write(record)
                n += 1
            return n
        count = _with_store(source, read)
    output.flush()
    click.echo(f"exported {count} interactions from {source.where}", err=True)
