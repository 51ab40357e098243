"""Configuration: one frozen dataclass, built and validated at the edge (CLI or tests).

Library code never reads the environment; the CLI maps each option to its environment variable
and builds a Config. The settings, their defaults and their checks are PROXY and OLLAMA in
settings.py; build() adds the checks across settings. A bad value raises ConfigError naming the
setting and its variable, so the process fails at start with a message a user can act on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from yarl import URL

from .settings import OLLAMA, PROXY, ConfigError, parse_listen, parse_upstream, shown

__all__ = ["ENV", "Config", "ConfigError", "connect_url", "connectable", "parse_listen",
           "parse_upstream"]

SETTINGS = PROXY + OLLAMA
ENV = SETTINGS.env  # setting name -> environment variable


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connectable(host: str) -> str:
    """The address to connect to for a server listening on `host` (all interfaces → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def connect_url(host: str, port: int) -> URL:
    """How a client on this machine reaches a server listening on host:port (an `ollama serve`
    started with OLLAMA_HOST=host:port, or the proxy itself)."""
    return URL(f"http://{_host_port(connectable(host), port)}")


def _fields(v: dict[str, Any]) -> dict[str, Any]:
    """Checked settings → Config's fields. A setting is the field of its name unless changed
    here; one without a field is a TypeError, so a new setting cannot be left out."""
    host, port = parse_listen(v.pop("listen"))
    child_host, child_port = parse_listen(v.pop("ollama_host"))
    upstream = v.pop("upstream")
    return {
        **v,
        "listen_host": host,
        "listen_port": port,
        "upstream": (parse_upstream(upstream) if upstream is not None
                     else connect_url(child_host, child_port)),
        "supervise": upstream is None,
        "idle_timeout": v["idle_timeout"] or None,
        "header_timeout": v["header_timeout"] or None,
        "ollama_host": _host_port(child_host, child_port),
        "ollama_bin": v["ollama_bin"].strip(),
        "ps_interval": v["ps_interval"] or None,
    }


_D = _fields(SETTINGS.parse({}))  # the defaults, as fields (settings.py has them as settings)


@dataclass(frozen=True)
class Config:
    listen_host: str = _D["listen_host"]
    listen_port: int = _D["listen_port"]
    upstream: URL = _D["upstream"]
    connect_timeout: float = _D["connect_timeout"]
    # Seconds the upstream may stay silent mid-reply; None means never cut (the default: model
    # loads and long generations have no upper bound).
    idle_timeout: float | None = _D["idle_timeout"]
    # Seconds a client may take to send a request head (a new connection's first from accept,
    # later ones from their first byte); None: no limit.
    header_timeout: float | None = _D["header_timeout"]
    max_extra_models: int = _D["max_extra_models"]
    model_refresh: float = _D["model_refresh"]
    max_parse_bytes: int = _D["max_parse_bytes"]
    shutdown_grace: float = _D["shutdown_grace"]
    # Processes serving the listen port (server/workers.py); 1 serves in this one.
    workers: int = _D["workers"]
    metrics_path: str = _D["metrics_path"]
    log_level: str = _D["log_level"]
    # OpenTelemetry export (observe/otel.py); where to, how and what sampled are the SDK's own
    # OTEL_* variables, read by the SDK.
    otel: bool = _D["otel"]
    otel_protocol: str = _D["otel_protocol"]
    otel_content: bool = _D["otel_content"]
    # --- Ollama wrapper ---
    # True when no upstream was given: `serve` starts `ollama serve` listening at `ollama_host`,
    # supervises it, and `upstream` is that address.
    supervise: bool = _D["supervise"]
    ollama_host: str = _D["ollama_host"]
    ollama_bin: str = _D["ollama_bin"]
    ollama_start_timeout: float = _D["ollama_start_timeout"]
    ollama_stop_grace: float = _D["ollama_stop_grace"]
    restart_backoff: float = _D["restart_backoff"]
    restart_backoff_max: float = _D["restart_backoff_max"]
    # Seconds between /api/ps polls for the model gauges; None turns them off.
    ps_interval: float | None = _D["ps_interval"]

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @property
    def upstream_shown(self) -> str:
        """The upstream as logs, replies and suggestions show it: credentials masked."""
        return shown(self.upstream)

    @property
    def listens_on_loopback(self) -> bool:
        if self.listen_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.listen_host).is_loopback
        except ValueError:
            return False

    @classmethod
    def build(cls, **given: Any) -> Config:
        """Check settings (Python values, or text as typed by a user; settings.py has their
        names and defaults) into a Config; ConfigError names a bad one.

        Without `upstream`, the proxy is to start and supervise `ollama serve` at `ollama_host`.
        """
        config = cls(**_fields(SETTINGS.parse(given)))
        host, port = config.listen_host, config.listen_port
        child_host, child_port = parse_listen(config.ollama_host)
        url = config.upstream
        local = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")
        if url.port == port and (url.host == host or (url.host in local and host in local)):
            raise ConfigError(
                "ollama_host" if config.supervise else "upstream",
                f"{shown(url)} is the proxy's own address; the proxy would call itself. Point it "
                f"at Ollama (by default {_D['upstream']})")
        # --- Ollama wrapper ---
        if config.supervise and child_port == 0:
            raise ConfigError("ollama_host", "must name a port, got "
                              f"{given.get('ollama_host', config.ollama_host)!r}")
        if config.supervise and child_port == port and (
                child_host == host or {child_host, host} & {"0.0.0.0", "::"}):
            raise ConfigError("ollama_host", f"{config.ollama_host} is where the proxy listens; "
                              "Ollama needs a port of its own (by default "
                              f"{_D['ollama_host']})")
        if config.restart_backoff_max < config.restart_backoff:
            raise ConfigError("restart_backoff_max",
                              f"must be at least --restart-backoff ({config.restart_backoff}), "
                              f"got {config.restart_backoff_max}")
        return config

