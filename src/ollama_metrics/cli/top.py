"""`ollama-metrics top`: a live terminal view of a running proxy (see ..top)."""

from __future__ import annotations

import shutil
import sys

import click

from ..settings import PROXY


def _url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ..ui.top import base_url

    try:
        return base_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option("--url", default=f"http://{PROXY['listen'].default}", envvar="OLLAMA_METRICS_URL",
              show_envvar=True, show_default=True, callback=_url, metavar="URL",
              help="The proxy to watch.")
@click.option("--token", default=None, envvar="ANALYTICS_TOKEN", show_envvar=True,
              metavar="TOKEN", help="The proxy's analytics token, when it requires one.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0,
              envvar="OLLAMA_METRICS_TOP_INTERVAL", show_envvar=True, show_default=True,
              metavar="SECONDS", help="Time between refreshes.")
@click.option("--once", is_flag=True,
              help="Print one frame and exit (1 when the proxy gives no data).")
def top(url: str, token: str | None, interval: float, once: bool) -> None:
    """Watch requests in flight, recent completions and tokens/s per model (q quits)."""
    from ..ui.top import NotATerminal, watch
    from ..ui.top import once as one_frame

    if once:
        lines, ok = one_frame(url, token, shutil.get_terminal_size((120, 40)).columns)
        click.echo("\n".join(lines))
        sys.exit(0 if ok else 1)
    try:
        watch(url, token, interval)
    except NotATerminal as exc:
        raise click.UsageError(str(exc)) from None
