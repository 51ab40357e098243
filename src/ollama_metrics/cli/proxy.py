"""`ollama-metrics serve`: the proxy, with Ollama started and supervised unless told where it is."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import click

from ..analytics.settings import AnalyticsConfig
from ..config import Config
from .analytics_options import analytics_options, build_analytics, split_analytics
from .options import build_config, ollama_options, proxy_options

# Exit statuses of `serve` (and of `run`, which may start it); the README lists them.
EXIT_FAILED = 1
# As click's for a bad option: also an unusable address or analytics store, and --otel without
# the otel extra.
EXIT_BAD_SETTING = 2
EXIT_PORT_IN_USE = 3
EXIT_OLLAMA_IN_THE_WAY = 4
EXIT_OLLAMA_PORT_TAKEN = 5
EXIT_UNSUPPORTED_AIOHTTP = 6
EXIT_NO_OLLAMA = 127


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"ollama-metrics: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def start_errors() -> Iterator[None]:
    """Expected failures to start, as a message and an exit status (no traceback)."""
    from ..analytics.stores import StoreError
    from ..ollama.passthrough import OllamaNotFound, ProxyNotStarted
    from ..ollama.probe import OllamaInTheWay
    from ..ollama.supervisor import OllamaFailedToStart, OllamaPortTaken
    from ..server.internals import Unsupported
    from ..server.serve import CannotListen, PortInUse
    from ..server.workers import WorkerFailed

    try:
        yield
    except OllamaInTheWay as exc:
        fail(str(exc), EXIT_OLLAMA_IN_THE_WAY)
    except PortInUse as exc:
        fail(exc.strerror or str(exc), EXIT_PORT_IN_USE)
    except CannotListen as exc:
        fail(exc.strerror or str(exc), EXIT_BAD_SETTING)
    except StoreError as exc:
        fail(str(exc), EXIT_BAD_SETTING)
    except OllamaPortTaken as exc:
        fail(str(exc), EXIT_OLLAMA_PORT_TAKEN)
    except OllamaNotFound as exc:
        fail(str(exc), EXIT_NO_OLLAMA)
    except Unsupported as exc:
        fail(str(exc), EXIT_UNSUPPORTED_AIOHTTP)
    except (OllamaFailedToStart, ProxyNotStarted, WorkerFailed) as exc:
        fail(str(exc), EXIT_FAILED)


@click.command()
@proxy_options
@ollama_options
@analytics_options
def serve(**options: Any) -> None:
    """Run the proxy, with Ollama started behind it (or the one at --upstream)."""
    analytics = build_analytics(**split_analytics(options))
    config = build_config(**options)
    if config.otel:
        from ..observe import otel

        try:
            otel.load(config.otel_protocol)
        except otel.Missing as exc:
            fail(str(exc), EXIT_BAD_SETTING)
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..server.shared import prepared

    # Before prometheus_client is imported (by server.serve): workers share its values.
    with prepared(config.workers) as shared:
        from ..server.serve import run  # aiohttp is imported only when serving

        with start_errors(), contextlib.suppress(KeyboardInterrupt):
            run(config, os.environ, analytics, shared)


def config_from_args(serve_args: Sequence[str]) -> tuple[Config, AnalyticsConfig]:
    """The settings `ollama-metrics serve ARGS` would run with (click.UsageError if invalid), for
    a service that stored its `serve` options."""
    from . import main

    # Under main's context, as from a shell: a context of its own would leave `serve` with
    # main's help option names lost (click keeps the first help option it makes).
    with click.Context(main, info_name="ollama-metrics", **main.context_settings) as parent, \
            serve.make_context("serve", list(serve_args), parent=parent) as ctx:
        options = dict(ctx.params)
    analytics = build_analytics(**split_analytics(options))
    return build_config(**options), analytics
