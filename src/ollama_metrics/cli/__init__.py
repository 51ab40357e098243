"""The command line: click commands that parse options, build a Config and call in.

No logic lives here. Commands are grouped by what they drive: `proxy` (serve). Each module defines
its commands; this one gathers them under `main`.
"""

from __future__ import annotations

import click

from .. import __version__
from . import proxy


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ollama-metrics")
def main() -> None:
    """A transparent proxy for Ollama that adds Prometheus metrics."""


for command in (proxy.serve,):
    main.add_command(command)
