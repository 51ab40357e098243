"""Analytics options (ANALYTICS_* variables), shared by `serve` and the query commands; made,
like the proxy's, from their settings (..settings.ANALYTICS)."""

from __future__ import annotations

import os
from typing import Any

import click

from ..analytics.settings import AnalyticsConfig
from ..config import ConfigError
from ..paths import analytics_dir
from ..settings import ANALYTICS, STORE
from .options import F, options


def store_options(f: F) -> F:
    """Where records are: what the query commands need too."""
    return options(STORE)(f)


def analytics_options(f: F) -> F:
    """Everything about recording, for `serve` (where records are, last)."""
    return options(s for s in ANALYTICS if s.name not in STORE)(store_options(f))


def split_analytics(options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the analytics settings from a command's options."""
    return {k: options.pop(k) for k in list(options) if k in ANALYTICS}


def build_analytics(**options: Any) -> AnalyticsConfig:
    """The analytics settings; without ANALYTICS_DIR, the files go to the per-user data
    directory of this environment (XDG_DATA_HOME, LOCALAPPDATA, ...)."""
    if not options.get("analytics_dir"):
        options["analytics_dir"] = str(analytics_dir(os.environ))
    try:
        return AnalyticsConfig.build(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
