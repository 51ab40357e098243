"""`ollama-metrics service install|uninstall|start|stop|status|tray`: run `serve` as a service."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..service.tray import DEFAULT_DASHBOARD
from .analytics_options import analytics_options, build_analytics, split_analytics
from .options import build_config, given_args, given_environ, ollama_options, proxy_options
from .proxy import EXIT_FAILED, fail

F = TypeVar("F", bound=Callable[..., Any])


def _scope(f: F) -> F:
    return click.option(
        "--user/--system", default=True, show_default=True,
        help="A service of the current user (starts at login) or of the system (starts at "
             "boot, needs root). systemd only; macOS has user agents, Windows system services."
    )(f)


def _manager(user: bool) -> Any:
    from ..service import ServiceError, manager

    try:
        return manager(user, os.environ)
    except ServiceError as exc:
        fail(str(exc), EXIT_FAILED)


def _do(action: Callable[[], list[str]]) -> None:
    from ..service import ServiceError

    try:
        lines = action()
    except ServiceError as exc:
        fail(str(exc), EXIT_FAILED)
    for line in lines:
        click.echo(line)


@click.group()
def service() -> None:
    """Run `serve` as a service: systemd, launchd or a Windows service."""


@service.command()
@_scope
@proxy_options
@ollama_options
@analytics_options
@click.pass_context
def install(ctx: click.Context, /, user: bool, **options: Any) -> None:
    """Install the service with this interpreter and these `serve` options."""
    from ..paths import log_dir
    from ..service import spec

    analytics = build_analytics(**split_analytics(options))  # validated now, not at start
    config = build_config(**options)
    manager = _manager(user)
    # Unnamed, the service's analytics go where every command looks: the per-user data
    # directory. A named one is made absolute, as the service runs from / (or the system
    # directory).
    named = ctx.get_parameter_source("analytics_dir") != click.core.ParameterSource.DEFAULT
    args = given_args(ctx)
    if named:
        args += ["--analytics-dir", str(analytics.dir.resolve())]
    environ = given_environ(ctx)
    if "XDG_DATA_HOME" in os.environ:  # the service's data directory is the installer's
        environ["XDG_DATA_HOME"] = os.environ["XDG_DATA_HOME"]
    what = spec(config, args, os.environ, log_dir(os.environ) / "service.log", environ)
    _do(lambda: manager.install(what))


@service.command()
@_scope
def uninstall(user: bool) -> None:
    """Stop and remove the service."""
    _do(_manager(user).uninstall)


@service.command()
@_scope
def start(user: bool) -> None:
    """Start the installed service."""
    _do(_manager(user).start)


@service.command()
@_scope
def stop(user: bool) -> None:
    """Stop the service."""
    _do(_manager(user).stop)


@service.command()
@_scope
def status(user: bool) -> None:
    """Show whether the service runs (the platform's own report)."""
    running, text = _manager(user).status()
    click.echo(text)
    sys.exit(0 if running else 3)


@service.command()
@_scope
@click.option("--dashboard-url", default=DEFAULT_DASHBOARD,
              envvar="OLLAMA_METRICS_DASHBOARD_URL", show_envvar=True, show_default=True,
              help="What `Open dashboard` opens (Grafana with deploy/'s dashboard).")
@click.option("--interval", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="How often the icon checks the proxy.")
@proxy_options
def tray(user: bool, dashboard_url: str, interval: float, **options: Any) -> None:
    """Show a tray icon with the proxy's and Ollama's status (needs the [windows] extra)."""
    from ..service.tray import Tray, run_tray

    config = build_config(**options)
    manager = _manager(user)
    try:
        run_tray(Tray(config, manager.stop, dashboard_url), interval)
    except ImportError as exc:
        fail(f"the tray needs pystray and Pillow: pip install 'ollama-metrics[windows]' ({exc})",
             EXIT_FAILED)
    except Exception as exc:  # pystray's backends fail in their own ways (no display, no bus)
        fail(f"cannot show a tray icon here: {type(exc).__name__}: {exc}", EXIT_FAILED)
