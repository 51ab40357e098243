"""Options shared by every command that runs a proxy, each with its environment variable.

The variables are named in config.ENV and shown in --help; `build_config` turns a bad value into a
usage error that names the option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import DEFAULT_LISTEN, DEFAULT_UPSTREAM, ENV, Config, ConfigError

F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, **kwargs: Any) -> Callable[[F], F]:
    setting = name.removeprefix("--").replace("-", "_")
    return click.option(name, envvar=ENV[setting], show_envvar=True, show_default=True, **kwargs)


def proxy_options(f: F) -> F:
    """The options every command that runs a proxy shares."""
    for decorator in reversed([
        _option("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                help="Where clients connect (Ollama's usual address)."),
        _option("--upstream", default=DEFAULT_UPSTREAM, metavar="URL",
                help="The Ollama server to forward to."),
        _option("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                help="Give up connecting to Ollama after this long (504)."),
        _option("--idle-timeout", type=float, default=0.0, metavar="SECONDS",
                help="Cut a reply Ollama stays silent in for this long; 0 never cuts "
                     "(model loads and long generations have no upper bound)."),
        _option("--max-extra-models", type=int, default=20, metavar="N",
                help="Model label values allowed beyond those in /api/tags before 'other'."),
        _option("--model-refresh", type=float, default=60.0, metavar="SECONDS",
                help="How often to re-read /api/tags for model label values."),
        _option("--max-parse-bytes", type=int, default=32 * 1024 * 1024, metavar="BYTES",
                help="Largest JSON request or reply body parsed for metrics; larger ones "
                     "stream through unread."),
        _option("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                help="On SIGTERM/SIGINT, how long requests in flight may take to finish."),
        _option("--metrics-path", default="/metrics", metavar="PATH",
                help="Where Prometheus scrapes."),
        _option("--log-level", default="INFO",
                type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
                help="Log verbosity. Prompt text is never logged."),
    ]):
        f = decorator(f)
    return f


def build_config(**options: Any) -> Config:
    try:
        return Config.build(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
