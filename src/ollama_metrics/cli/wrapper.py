"""Ollama's own commands through the proxy: `run`, `status`, and every other command, passed on.

`passthrough` is not listed among the commands: the group hands it any name it does not know.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .options import (
    RUN_SETTINGS,
    STATUS_SETTINGS,
    build_config,
    from_environ,
    given_args,
    some_options,
)
from .proxy import EXIT_FAILED, EXIT_NO_OLLAMA, fail, serve, start_errors


def _serve_only(word: str) -> click.Option | None:
    """The `serve` option `word` names (`--flag` or `--flag=value`) when `run` lacks it."""
    name = word.split("=", 1)[0]
    for param in serve.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@some_options(*RUN_SETTINGS)
@click.argument("model")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, /, model: str, args: tuple[str, ...], **options: Any) -> None:
    """Run `ollama run MODEL ...` through the proxy, starting the proxy first if need be.

    Options for the proxy go before MODEL; everything after it goes to `ollama run`. A proxy
    started here takes the other settings from their environment variables.
    """
    from ..ollama.passthrough import ensure_proxy, find_ollama, run_ollama
    from ..paths import log_dir

    # Options go to `run` before MODEL; an option of `serve` there would otherwise reach
    # `ollama run` as the model's name.
    if model.startswith("--") and (setting := _serve_only(model)) is not None:
        ctx.fail(f"{model.split('=', 1)[0]} is an option of `serve`, not of `run`: for the proxy "
                 f"`run` starts, set {setting.envvar} (or start `ollama-metrics serve` yourself)")
    config = build_config(**options)
    with start_errors():
        binary = find_ollama(config.ollama_bin, os.environ)
        started = ensure_proxy(config, given_args(ctx), log_dir(os.environ) / "serve.log",
                               os.environ)
    if started is not None:
        click.echo(f"ollama-metrics: started `ollama-metrics serve` in the background (pid "
                   f"{started.pid}, log {started.log}); it keeps running after this", err=True)
    sys.exit(run_ollama(binary, ["run", model, *args], config, os.environ))


@click.command()
@some_options(*STATUS_SETTINGS)
def status(**options: Any) -> None:
    """Show whether the proxy and Ollama are up, their versions and the loaded models."""
    from ..ollama.status import gather, render

    state = gather(build_config(**options))
    for line in render(state):
        click.echo(line)
    sys.exit(0 if state.ok else EXIT_FAILED)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def passthrough(args: tuple[str, ...]) -> None:
    """Any other command: run by the real `ollama`, with OLLAMA_HOST pointing at the proxy."""
    from ..ollama.passthrough import OllamaNotFound, find_ollama, proxy_url, run_ollama
    from ..ollama.probe import Who, identify

    config = build_config(**from_environ("listen", "ollama_bin"))
    try:
        binary = find_ollama(config.ollama_bin, os.environ)
    except OllamaNotFound as exc:
        fail(str(exc), EXIT_NO_OLLAMA)
    code = run_ollama(binary, args, config, os.environ)
    if code != 0 and identify(proxy_url(config), timeout=1.0).who is Who.NOTHING:
        click.echo(f"ollama-metrics: no proxy answers at {proxy_url(config)}; start one with "
                   "`ollama-metrics serve` (`ollama-metrics run MODEL` starts it by itself)",
                   err=True)
    sys.exit(code)
