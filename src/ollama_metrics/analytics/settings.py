"""Analytics settings: one frozen dataclass, checked at the edge like Config.

The settings themselves (options, variables, defaults, checks) are ANALYTICS in ..settings;
environment names keep the original proxy's (ANALYTICS_BACKEND, ANALYTICS_DIR,
ANALYTICS_RETENTION_DAYS) and add the rest under the same prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..paths import analytics_dir
from ..settings import ANALYTICS, BACKENDS, CAPTURE_LEVELS, ConfigError, parse_backends

__all__ = ["BACKENDS", "CAPTURE_LEVELS", "ENV", "AnalyticsConfig"]

ENV = ANALYTICS.env  # setting name -> environment variable


def _fields(v: dict[str, Any]) -> dict[str, Any]:
    """Checked settings → AnalyticsConfig's fields. A setting is the field of its name without
    the analytics_ prefix unless changed here; one without a field is a TypeError."""
    v = {name.removeprefix("analytics_"): value for name, value in v.items()}
    backend, patterns = v.pop("backend"), v.pop("redact_pattern")
    return {
        **v,
        "backends": parse_backends(backend),
        "dir": Path(v["dir"]).expanduser() if v["dir"] else analytics_dir({}),
        "redact_patterns": tuple(re.compile(p) for p in patterns if p.strip()),
        "token": (v["token"] or "").strip() or None,
        "postgres_dsn": v["postgres_dsn"] or None,
        "loki_url": (v["loki_url"] or "").rstrip("/") or None,
        "loki_tenant": v["loki_tenant"] or None,
    }


_D = _fields(ANALYTICS.parse({}))  # the defaults, as fields (..settings has them as settings)


@dataclass(frozen=True)
class AnalyticsConfig:
    backends: tuple[str, ...] = _D["backends"]  # empty: analytics off
    dir: Path = _D["dir"]
    retention_days: float = _D["retention_days"]  # 0 keeps everything
    max_size_mb: float = _D["max_size_mb"]  # SQLite file / JSONL directory cap; 0 means no cap
    queue_size: int = _D["queue_size"]
    batch_size: int = _D["batch_size"]
    capture: str = _D["capture"]
    truncate_chars: int = _D["truncate_chars"]
    max_text: int = _D["max_text"]
    max_messages: int = _D["max_messages"]
    max_record_kb: int = _D["max_record_kb"]
    redact: bool = _D["redact"]
    redact_patterns: tuple[re.Pattern[str], ...] = _D["redact_patterns"]
    token: str | None = _D["token"]
    protect_metrics: bool = _D["protect_metrics"]
    postgres_dsn: str | None = _D["postgres_dsn"]
    loki_url: str | None = _D["loki_url"]
    loki_tenant: str | None = _D["loki_tenant"]
    jsonl_max_file_mb: float = _D["jsonl_max_file_mb"]
    cleanup_interval: float = _D["cleanup_interval"]
    drain_grace: float = _D["drain_grace"]
    search_timeout: float = _D["search_timeout"]  # seconds a query of the records may take

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    @classmethod
    def build(cls, **given: Any) -> AnalyticsConfig:
        """Check analytics_* settings (Python values, or text as typed by a user) into an
        AnalyticsConfig; ConfigError names a bad one."""
        config = cls(**_fields(ANALYTICS.parse(given)))
        if "postgres" in config.backends and not config.postgres_dsn:
            raise ConfigError("analytics_postgres_dsn", "the postgres backend needs a DSN, e.g. "
                              "postgresql://user:pass@host:5432/db")
        if "loki" in config.backends and not config.loki_url:
            raise ConfigError("analytics_loki_url", "the loki backend needs Loki's base URL, "
                              "e.g. http://localhost:3100")
        return config
