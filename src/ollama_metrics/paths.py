"""Where ollama-metrics keeps files of its own: logs of a proxy started in the background or by a
service manager, and the analytics. The caller passes the environment; nothing here reads it."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path


def log_dir(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    home = Path(environ.get("USERPROFILE" if platform == "win32" else "HOME") or Path.home())
    if platform == "win32":
        return Path(environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / \
            "ollama-metrics" / "logs"
    if platform == "darwin":
        return home / "Library" / "Logs" / "ollama-metrics"
    return Path(environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "ollama-metrics"


def data_dir(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    """The per-user data directory, by the platform's convention: the same for `serve`, `run`,
    a service and the query commands, wherever they are started from."""
    home = Path(environ.get("USERPROFILE" if platform == "win32" else "HOME") or Path.home())
    if platform == "win32":
        return Path(environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "ollama-metrics"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "ollama-metrics"
    return Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "ollama-metrics"


def analytics_dir(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    """Where the sqlite and jsonl backends keep their files unless ANALYTICS_DIR says."""
    return data_dir(environ, platform) / "analytics"
