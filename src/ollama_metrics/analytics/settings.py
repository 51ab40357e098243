"""Analytics settings: one frozen dataclass, validated at the edge like Config.

Environment names keep the original proxy's (ANALYTICS_BACKEND, ANALYTICS_DIR,
ANALYTICS_RETENTION_DAYS) and add the rest under the same prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError

BACKENDS = ("sqlite", "jsonl", "postgres", "loki")
CAPTURE_LEVELS = ("full", "truncated", "metadata")

ENV = {
    "analytics_backend": "ANALYTICS_BACKEND",
    "analytics_dir": "ANALYTICS_DIR",
    "analytics_retention_days": "ANALYTICS_RETENTION_DAYS",
    "analytics_max_size_mb": "ANALYTICS_MAX_SIZE_MB",
    "analytics_queue_size": "ANALYTICS_QUEUE_SIZE",
    "analytics_batch_size": "ANALYTICS_BATCH_SIZE",
    "analytics_capture": "ANALYTICS_CAPTURE",
    "analytics_truncate_chars": "ANALYTICS_TRUNCATE_CHARS",
    "analytics_max_text": "ANALYTICS_MAX_TEXT",
    "analytics_max_messages": "ANALYTICS_MAX_MESSAGES",
    "analytics_max_record_kb": "ANALYTICS_MAX_RECORD_KB",
    "analytics_redact": "ANALYTICS_REDACT",
    "analytics_redact_pattern": "ANALYTICS_REDACT_PATTERNS",
    "analytics_token": "ANALYTICS_TOKEN",
    "analytics_protect_metrics": "ANALYTICS_PROTECT_METRICS",
    "analytics_postgres_dsn": "ANALYTICS_POSTGRES_DSN",
    "analytics_loki_url": "ANALYTICS_LOKI_URL",
    "analytics_loki_tenant": "ANALYTICS_LOKI_TENANT",
    "analytics_jsonl_max_file_mb": "ANALYTICS_JSONL_MAX_FILE_MB",
    "analytics_cleanup_interval": "ANALYTICS_CLEANUP_INTERVAL",
    "analytics_drain_grace": "ANALYTICS_DRAIN_GRACE",
    "analytics_search_timeout": "ANALYTICS_SEARCH_TIMEOUT",
}


def _error(setting: str, message: str) -> ConfigError:
    return ConfigError(setting, message, ENV[setting])


@dataclass(frozen=True)
class AnalyticsConfig:
    backends: tuple[str, ...] = ("sqlite",)  # empty: analytics off
    dir: Path = Path("ollama_analytics")
    retention_days: float = 7.0  # 0 keeps everything
    max_size_mb: float = 0.0  # SQLite file / JSONL directory cap; 0 means no cap
    queue_size: int = 10_000
    batch_size: int = 500
    capture: str = "full"
    truncate_chars: int = 200
    max_text: int = 65_536
    max_messages: int = 100
    max_record_kb: int = 1024
    redact: bool = True
    redact_patterns: tuple[re.Pattern[str], ...] = field(default=())
    token: str | None = None
    protect_metrics: bool = False
    postgres_dsn: str | None = None
    loki_url: str | None = None
    loki_tenant: str | None = None
    jsonl_max_file_mb: float = 100.0
    cleanup_interval: float = 3600.0
    drain_grace: float = 10.0
    search_timeout: float = 5.0  # seconds a query of the analytics API may take

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    @classmethod
    def build(
        cls,
        *,
        analytics_backend: str = "sqlite",
        analytics_dir: str = "./ollama_analytics",
        analytics_retention_days: float = 7.0,
        analytics_max_size_mb: float = 0.0,
        analytics_queue_size: int = 10_000,
        analytics_batch_size: int = 500,
        analytics_capture: str = "full",
        analytics_truncate_chars: int = 200,
        analytics_max_text: int = 65_536,
        analytics_max_messages: int = 100,
        analytics_max_record_kb: int = 1024,
        analytics_redact: bool = True,
        analytics_redact_pattern: tuple[str, ...] = (),
        analytics_token: str | None = None,
        analytics_protect_metrics: bool = False,
        analytics_postgres_dsn: str | None = None,
        analytics_loki_url: str | None = None,
        analytics_loki_tenant: str | None = None,
        analytics_jsonl_max_file_mb: float = 100.0,
        analytics_cleanup_interval: float = 3600.0,
        analytics_drain_grace: float = 10.0,
        analytics_search_timeout: float = 5.0,
    ) -> AnalyticsConfig:
        names = [b.strip().lower() for b in analytics_backend.split(",") if b.strip()]
        if names in ([], ["none"]):
            backends: tuple[str, ...] = ()
        else:
            unknown = [b for b in names if b not in BACKENDS]
            if unknown:
                raise _error("analytics_backend", f"unknown backend {unknown[0]!r}; choose from "
                             f"{', '.join(BACKENDS)} (comma-separated), or none")
            backends = tuple(dict.fromkeys(names))
        if "postgres" in backends and not analytics_postgres_dsn:
            raise _error("analytics_postgres_dsn", "the postgres backend needs a DSN, e.g. "
                         "postgresql://user:pass@host:5432/db")
        if "loki" in backends and not analytics_loki_url:
            raise _error("analytics_loki_url", "the loki backend needs Loki's base URL, e.g. "
                         "http://localhost:3100")
        if analytics_loki_url and not analytics_loki_url.startswith(("http://", "https://")):
            raise _error("analytics_loki_url", f"expected an http(s) URL: {analytics_loki_url!r}")
        for name, value in [("analytics_retention_days", analytics_retention_days),
                            ("analytics_max_size_mb", analytics_max_size_mb),
                            ("analytics_drain_grace", analytics_drain_grace),
                            ("analytics_truncate_chars", analytics_truncate_chars)]:
            if value < 0:
                raise _error(name, f"must be zero or more, got {value}")
        for name, value in [("analytics_queue_size", analytics_queue_size),
                            ("analytics_batch_size", analytics_batch_size),
                            ("analytics_max_text", analytics_max_text),
                            ("analytics_jsonl_max_file_mb", analytics_jsonl_max_file_mb),
                            ("analytics_cleanup_interval", analytics_cleanup_interval),
                            ("analytics_search_timeout", analytics_search_timeout)]:
            if not value > 0:  # NaN too
                raise _error(name, f"must be more than zero, got {value}")
        # A record must hold its marker of elided messages and the texts around it.
        for name, value, least in [("analytics_max_messages", analytics_max_messages, 2),
                                   ("analytics_max_record_kb", analytics_max_record_kb, 16)]:
            if value < least:
                raise _error(name, f"must be at least {least}, got {value}")
        if analytics_search_timeout == float("inf"):
            raise _error("analytics_search_timeout", "must be a number of seconds, not inf")
        capture = analytics_capture.strip().lower()
        if capture not in CAPTURE_LEVELS:
            raise _error("analytics_capture",
                         f"must be one of {', '.join(CAPTURE_LEVELS)}: {analytics_capture!r}")
        patterns = []
        for text in analytics_redact_pattern:
            if not text.strip():
                continue
            try:
                patterns.append(re.compile(text))
            except re.error as exc:
                raise _error("analytics_redact_pattern",
                             f"not a valid regular expression: {text!r} ({exc})") from None
        if analytics_token is not None and not analytics_token.strip():
            # An empty ANALYTICS_TOKEN= reads as "no token" elsewhere: refuse it rather than
            # serve every stored prompt to anyone while the user believes them guarded.
            raise _error("analytics_token", "is empty or blank: give a token, or leave the setting "
                         "out to run without one")
        token = analytics_token.strip() if analytics_token is not None else None
        return cls(
            backends=backends,
            dir=Path(analytics_dir).expanduser(),
            retention_days=analytics_retention_days,
            max_size_mb=analytics_max_size_mb,
            queue_size=analytics_queue_size,
            batch_size=analytics_batch_size,
            capture=capture,
            truncate_chars=analytics_truncate_chars,
            max_text=analytics_max_text,
            max_messages=analytics_max_messages,
            max_record_kb=analytics_max_record_kb,
            redact=analytics_redact,
            redact_patterns=tuple(patterns),
            token=token,
            protect_metrics=analytics_protect_metrics,
            postgres_dsn=analytics_postgres_dsn or None,
            loki_url=(analytics_loki_url or "").rstrip("/") or None,
            loki_tenant=analytics_loki_tenant or None,
            jsonl_max_file_mb=analytics_jsonl_max_file_mb,
            cleanup_interval=analytics_cleanup_interval,
            drain_grace=analytics_drain_grace,
            search_timeout=analytics_search_timeout,
        )
