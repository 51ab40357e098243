"""The command line: click commands that parse options, build a Config and call in.

No logic lives here. Commands are grouped by what they drive: `proxy` (serve), `wrapper` (run,
status, any Ollama command passed through), `service` (the service manager), `analytics` (search,
stats, export of recorded interactions), `top` (a live view of a running proxy). Each module
defines its commands; this one gathers them under `main`.
"""

from __future__ import annotations

import difflib

import click

from .. import __version__
from . import analytics, proxy, service, top, wrapper

# Ollama's own commands and aliases (cmd/cmd.go in ollama/ollama): these always go to `ollama`.
OLLAMA_COMMANDS = frozenset({
    "serve", "start", "create", "show", "run", "stop", "pull", "push", "list", "ls", "ps", "cp",
    "rm", "signin", "signout", "launch", "help", "completion"})


class OllamaGroup(click.Group):
    """Hands any command it does not know to `ollama`, as `ollama-metrics list` → `ollama list`.

    A name that is no Ollama command but close to one of ours (`stat`) is a typo: it gets a
    "did you mean" and exit code 2 rather than ollama's `unknown command`.
    """

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            if args[0] not in OLLAMA_COMMANDS:
                close = difflib.get_close_matches(args[0], list(self.commands), n=1, cutoff=0.6)
                if close:
                    ctx.fail(f"No such command '{args[0]}'. Did you mean '{close[0]}'?")
            return args[0], wrapper.passthrough, args
        return super().resolve_command(ctx, args)


@click.group(cls=OllamaGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Any other command (list, ps, pull, show, rm, cp, create, stop, …) is run by "
                    "the real `ollama` with OLLAMA_HOST pointing at the proxy.")
@click.version_option(__version__, prog_name="ollama-metrics")
def main() -> None:
    """A transparent proxy for Ollama that adds Prometheus metrics."""


for command in (proxy.serve, wrapper.run, wrapper.status, service.service, analytics.search,
                analytics.stats, analytics.export, top.top):
    main.add_command(command)
