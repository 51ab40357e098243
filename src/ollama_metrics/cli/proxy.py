"""`ollama-metrics serve`: run the proxy."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .options import build_config, proxy_options


@click.command()
@proxy_options
def serve(**options: Any) -> None:
    """Run the proxy in front of an Ollama that is already running."""
    config = build_config(**options)
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..server import PortInUse, run  # aiohttp is imported only when serving

    try:
        run(config)
    except PortInUse as exc:
        click.echo(f"ollama-metrics: {exc.strerror}", err=True)
        sys.exit(3)
    except KeyboardInterrupt:
        pass
