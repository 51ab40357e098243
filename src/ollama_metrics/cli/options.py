"""Options shared by every command that runs a proxy, each with its environment variable.

The variables are named in config.ENV and shown in --help; `build_config` turns a bad value into a
usage error that names the option.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import (
    DEFAULT_LISTEN,
    DEFAULT_OLLAMA_HOST,
    DEFAULT_UPSTREAM,
    ENV,
    Config,
    ConfigError,
)

F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, **kwargs: Any) -> Callable[[F], F]:
    setting = name.removeprefix("--").replace("-", "_")
    return click.option(name, envvar=ENV[setting], show_envvar=True, show_default=True, **kwargs)


def proxy_options(f: F) -> F:
    """The options every command that runs a proxy shares."""
    for decorator in reversed([
        _option("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                help="Where clients connect (Ollama's usual address)."),
        _option("--upstream", default=None, metavar="URL",
                help="Forward to the Ollama already running at this URL (e.g. "
                     f"{DEFAULT_UPSTREAM}). Without it, `ollama serve` is started at "
                     "--ollama-host and supervised."),
        _option("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                help="Give up connecting to Ollama after this long (504)."),
        _option("--idle-timeout", type=float, default=0.0, metavar="SECONDS",
                help="Cut a reply Ollama stays silent in for this long; 0 never cuts "
                     "(model loads and long generations have no upper bound)."),
        _option("--header-timeout", type=float, default=60.0, metavar="SECONDS",
                help="Close a client connection whose request head (request line and "
                     "headers) takes longer than this to arrive; 0 never does."),
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


# --- Ollama wrapper ---
def ollama_options(f: F) -> F:
    """How the proxy starts and watches `ollama serve` (when no --upstream is given)."""
    for decorator in reversed([
        _option("--ollama-host", default=DEFAULT_OLLAMA_HOST, metavar="HOST:PORT",
                help="Where the Ollama started by the proxy listens (its OLLAMA_HOST)."),
        _option("--ollama-bin", default="ollama", metavar="PATH",
                help="The ollama program: a name looked up on PATH, or a path."),
        _option("--ollama-start-timeout", type=float, default=60.0, metavar="SECONDS",
                help="How long `ollama serve` may take to answer after it starts."),
        _option("--ollama-stop-grace", type=float, default=10.0, metavar="SECONDS",
                help="On shutdown, how long Ollama may take to stop before it is killed."),
        _option("--restart-backoff", type=float, default=1.0, metavar="SECONDS",
                help="Wait before restarting an Ollama that exited; doubles with each "
                     "failure in a row."),
        _option("--restart-backoff-max", type=float, default=30.0, metavar="SECONDS",
                help="The longest wait between restarts."),
        _option("--ps-interval", type=float, default=10.0, metavar="SECONDS",
                help="How often /api/ps is read for the loaded-model gauges; 0 turns them "
                     "off."),
    ]):
        f = decorator(f)
    return f


def _given(ctx: click.Context, source: click.core.ParameterSource) -> list[click.Option]:
    """The settings of `ctx` (options with an environment variable) that came from `source`."""
    return [p for p in ctx.command.params
            if isinstance(p, click.Option) and isinstance(p.envvar, str) and p.name is not None
            and ctx.get_parameter_source(p.name) == source]


def given_args(ctx: click.Context) -> list[str]:
    """The settings given on the command line, as arguments for another `serve` (one started in
    the background, or by a service manager)."""
    args: list[str] = []
    for param in _given(ctx, click.core.ParameterSource.COMMANDLINE):
        value = ctx.params[param.name or ""]
        if param.is_flag:
            args += param.opts[:1] if value else param.secondary_opts[:1]
        elif param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
        elif value is not None:
            args += [param.opts[0], str(value)]
    return args


def given_environ(ctx: click.Context) -> dict[str, str]:
    """The settings given by environment variable, as variables (kept out of command lines,
    where other users could read them)."""
    return {str(p.envvar): os.environ[str(p.envvar)]
            for p in _given(ctx, click.core.ParameterSource.ENVIRONMENT)}


def build_config(**options: Any) -> Config:
    try:
        return Config.build(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
