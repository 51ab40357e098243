"""Analytics options (ANALYTICS_* variables), shared by `serve` and the query commands."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..analytics.settings import BACKENDS, CAPTURE_LEVELS, ENV, AnalyticsConfig
from ..config import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    _ParamType = click.ParamType[str]
else:  # ParamType is generic only in newer click releases
    _ParamType = click.ParamType


class _Lines(_ParamType):
    """A repeatable option whose environment variable holds one value per line (regexes may
    contain spaces and commas)."""

    name = "REGEX"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> str:
        return str(value)


class _SetEvenIfEmpty(click.Option):
    """click reads an empty environment variable as unset; for the token, `ANALYTICS_TOKEN=`
    must reach the settings, which refuse it, rather than turn authentication off."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        if value is None and isinstance(self.envvar, str):
            return os.environ.get(self.envvar)
        return value


def _option(name: str, **kwargs: Any) -> Callable[[F], F]:
    setting = name.split("/")[0].removeprefix("--").replace("-", "_")
    return click.option(name, setting, envvar=ENV[setting], show_envvar=True,
                        show_default=True, **kwargs)


def store_options(f: F) -> F:
    """Where records are: what the query commands need too."""
    for decorator in reversed([
        _option("--analytics-backend", default="sqlite", metavar="NAMES",
                help=f"Comma-separated: {', '.join(BACKENDS)}; or none to record nothing."),
        _option("--analytics-dir", default="./ollama_analytics", metavar="DIR",
                help="Where the sqlite and jsonl backends keep their files."),
        _option("--analytics-postgres-dsn", default=None, metavar="DSN",
                help="PostgreSQL connection string for the postgres backend."),
        _option("--analytics-search-timeout", type=float, default=5.0, metavar="SECONDS",
                help="Longest a query of the records may run before it is stopped."),
    ]):
        f = decorator(f)
    return f


def analytics_options(f: F) -> F:
    """Everything about recording, for `serve`."""
    f = store_options(f)
    for decorator in reversed([
        _option("--analytics-retention-days", type=float, default=7.0, metavar="DAYS",
                help="Delete records older than this; 0 keeps everything."),
        _option("--analytics-max-size-mb", type=float, default=0.0, metavar="MB",
                help="Cap on the SQLite file / JSONL directory (oldest go first); 0: no cap."),
        _option("--analytics-capture", default="full", type=click.Choice(CAPTURE_LEVELS),
                help="How much prompt and response text to store."),
        _option("--analytics-truncate-chars", type=int, default=200, metavar="N",
                help="With --analytics-capture truncated: characters kept per text."),
        _option("--analytics-max-text", type=int, default=65_536, metavar="N",
                help="Longest text stored at any level (the rest is cut, and marked)."),
        _option("--analytics-max-messages", type=int, default=100, metavar="N",
                help="Messages kept of a conversation: the first and last halves (marked)."),
        _option("--analytics-max-record-kb", type=int, default=1024, metavar="KB",
                help="Largest record, JSON-encoded; longer texts are cut further (marked)."),
        _option("--analytics-redact/--no-analytics-redact", default=True,
                help="Mask e-mail addresses, API keys and tokens, card numbers."),
        _option("--analytics-redact-pattern", type=_Lines(), multiple=True,
                help="Also mask matches of this regex (repeatable; one per line in the "
                     "variable)."),
        _option("--analytics-token", default=None, metavar="TOKEN", cls=_SetEvenIfEmpty,
                help="Require 'Authorization: Bearer TOKEN' on analytics routes (not empty)."),
        _option("--analytics-protect-metrics/--no-analytics-protect-metrics", default=False,
                help="Require the token on the metrics route too."),
        _option("--analytics-queue-size", type=int, default=10_000, metavar="N",
                help="Records waiting per backend before new ones are dropped (and counted)."),
        _option("--analytics-batch-size", type=int, default=500, metavar="N",
                help="Most records written at once."),
        _option("--analytics-loki-url", default=None, metavar="URL",
                help="Loki base URL for the loki backend."),
        _option("--analytics-loki-tenant", default=None, metavar="ID",
                help="X-Scope-OrgID for a multi-tenant Loki."),
        _option("--analytics-jsonl-max-file-mb", type=float, default=100.0, metavar="MB",
                help="Start a new JSONL file after this size."),
        _option("--analytics-cleanup-interval", type=float, default=3600.0, metavar="SECONDS",
                help="How often retention and size caps are enforced."),
        _option("--analytics-drain-grace", type=float, default=10.0, metavar="SECONDS",
                help="On shutdown, how long queued records may take to be written."),
    ]):
        f = decorator(f)
    return f


def split_analytics(options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the analytics_* options from a command's options."""
    return {k: options.pop(k) for k in list(options) if k.startswith("analytics_")}


def build_analytics(**options: Any) -> AnalyticsConfig:
    try:
        if "analytics_redact_pattern" in options:
            options["analytics_redact_pattern"] = tuple(options["analytics_redact_pattern"])
        return AnalyticsConfig.build(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
