"""`ollama-metrics search | stats | export`: read recorded interactions from the store.

They open the configured queryable store directly (the proxy need not be running) and print
readable tables, or JSON with --json. Query parsing is analytics.query's, so the CLI and the
HTTP API accept and reject the same things.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

import click
import orjson

from ..analytics.api import csv_line, csv_row, jsonl_line
from ..analytics.query import BadQuery, Query, parse
from ..analytics.stores import FIELD_NAMES, QueryableStore, StoreError, open_stores, queryable
from ..units import MISSING, missing, seconds, shorten
from .analytics_options import build_analytics, store_options

T = TypeVar("T")


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed([
        click.option("--since", metavar="DURATION", help="Only the last 15m, 1h, 7d, …"),
        click.option("--model", help="Only this model (exact name)."),
        click.option("--category", help="Only this prompt category."),
        click.option("--status", help="ok, error, cancelled or upstream_error."),
        click.option("--endpoint", help="Only this route, e.g. /api/chat."),
    ]):
        f = decorator(f)
    return f


def _query(text: str | None = None, limit: int | None = None, **filters: Any) -> Query:
    params = {k: str(v) for k, v in filters.items() if v is not None}
    if text:
        params["prompt_search"] = text
    if limit is not None:
        params["limit"] = str(limit)
    try:
        return parse(params)
    except BadQuery as exc:
        raise click.UsageError(str(exc)) from None


def _with_store(options: dict[str, Any], work: Callable[[QueryableStore], Awaitable[T]]) -> T:
    settings = build_analytics(**options)
    store = queryable(open_stores(settings))
    if store is None:
        raise click.UsageError("searching needs the sqlite or postgres backend "
                               "(--analytics-backend / ANALYTICS_BACKEND)")
    path = getattr(store, "path", None)
    if path is not None and not path.exists():
        raise click.ClickException(f"no analytics database at {path} yet: nothing recorded")

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
@store_options
def search(text: str | None, since: str | None, model: str | None, category: str | None,
           status: str | None, endpoint: str | None, limit: int, as_json: bool,
           **options: Any) -> None:
    """Find recorded interactions, newest first (TEXT: full-text search of prompt and reply)."""
    query = _query(text, limit, since=since, model=model, prompt_category=category,
                   status=status, endpoint=endpoint)
    page = _with_store(options, lambda store: store.search(query))
    if as_json:
        click.echo(orjson.dumps(page.records, option=orjson.OPT_INDENT_2).decode())
        return
    rows = [[_when(r["started_at"]), shorten(missing(r["model"]), 32),
             shorten(r["endpoint"], 24), str(r["outcome"]),
             f"{r['prompt_tokens'] or 0}/{r['completion_tokens'] or 0}",
             seconds(r["ttft"]), seconds(r["duration"]), missing(r["prompt_category"]),
             shorten(r["prompt"], 48), str(r["id"])] for r in page.records]
    table(rows, ["time", "model", "endpoint", "status", "tokens in/out", "ttft", "total",
                 "category", "prompt", "id"], sys.stdout)
    if not rows:
        click.echo("no interactions match")


@click.command()
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@store_options
def stats(since: str | None, model: str | None, category: str | None, status: str | None,
          endpoint: str | None, as_json: bool, **options: Any) -> None:
    """Totals, per model and per category: requests, tokens, errors, p50/p95 latency and TTFT."""
    query = _query(since=since, model=model, prompt_category=category, status=status,
                   endpoint=endpoint)
    result = _with_store(options, lambda store: store.stats(query))
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


@click.command()
@_filters
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("--output", "-o", type=click.File("wb"), default="-",
              help="File to write (default: standard output).")
@store_options
def export(since: str | None, model: str | None, category: str | None, status: str | None,
           endpoint: str | None, fmt: str, output: IO[bytes], **options: Any) -> None:
    """Write every matching record, newest first, as JSON lines or CSV."""
    query = _query(since=since, model=model, prompt_category=category, status=status,
                   endpoint=endpoint)

    async def write(store: QueryableStore) -> int:
        n = 0
        if fmt == "csv":
            output.write(csv_line(FIELD_NAMES))
        async for record in store.export(query):
            output.write(jsonl_line(record) if fmt == "jsonl" else csv_row(record))
            n += 1
        return n

    count = _with_store(options, write)
    output.flush()
    click.echo(f"exported {count} interactions", err=True)
