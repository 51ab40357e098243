"""Configuration: one frozen dataclass, built and validated at the edge (CLI or tests).

Library code never reads the environment; the CLI maps each option to its environment variable
(ENV below) and builds a Config. A bad value raises ConfigError naming the setting and its
variable, so the process fails at start with a message a user can act on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from yarl import URL

DEFAULT_LISTEN = "127.0.0.1:11434"
DEFAULT_UPSTREAM = "http://127.0.0.1:11435"
DEFAULT_OLLAMA_HOST = "127.0.0.1:11435"

# Setting name -> environment variable, shown in errors and the README.
ENV = {
    "listen": "OLLAMA_METRICS_LISTEN",
    "upstream": "OLLAMA_METRICS_UPSTREAM",
    "connect_timeout": "OLLAMA_METRICS_CONNECT_TIMEOUT",
    "idle_timeout": "OLLAMA_METRICS_IDLE_TIMEOUT",
    "header_timeout": "OLLAMA_METRICS_HEADER_TIMEOUT",
    "max_extra_models": "OLLAMA_METRICS_MAX_EXTRA_MODELS",
    "model_refresh": "OLLAMA_METRICS_MODEL_REFRESH",
    "max_parse_bytes": "OLLAMA_METRICS_MAX_PARSE_BYTES",
    "shutdown_grace": "OLLAMA_METRICS_SHUTDOWN_GRACE",
    "metrics_path": "OLLAMA_METRICS_PATH",
    "log_level": "OLLAMA_METRICS_LOG_LEVEL",
    # --- Ollama wrapper ---
    "ollama_host": "OLLAMA_METRICS_OLLAMA_HOST",
    "ollama_bin": "OLLAMA_METRICS_OLLAMA_BIN",
    "ollama_start_timeout": "OLLAMA_METRICS_OLLAMA_START_TIMEOUT",
    "ollama_stop_grace": "OLLAMA_METRICS_OLLAMA_STOP_GRACE",
    "restart_backoff": "OLLAMA_METRICS_RESTART_BACKOFF",
    "restart_backoff_max": "OLLAMA_METRICS_RESTART_BACKOFF_MAX",
    "ps_interval": "OLLAMA_METRICS_PS_INTERVAL",
}


_DEFAULT_UPSTREAM_URL = URL(DEFAULT_UPSTREAM)


class ConfigError(ValueError):
    """A setting has a value the proxy cannot run with."""

    def __init__(self, setting: str, message: str, env: str | None = None) -> None:
        flag = "--" + setting.replace("_", "-")
        super().__init__(f"{flag} ({env or ENV.get(setting, setting)}): {message}")
        self.setting = setting


@dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 11434
    upstream: URL = _DEFAULT_UPSTREAM_URL
    connect_timeout: float = 10.0
    # Seconds the upstream may stay silent mid-reply; None means never cut (the default: model
    # loads and long generations have no upper bound).
    idle_timeout: float | None = None
    # Seconds a client may take to send a request head (a new connection's first from accept,
    # later ones from their first byte); None: no limit.
    header_timeout: float | None = 60.0
    max_extra_models: int = 20
    model_refresh: float = 60.0
    max_parse_bytes: int = 32 * 1024 * 1024
    shutdown_grace: float = 10.0
    metrics_path: str = "/metrics"
    log_level: str = "INFO"
    # --- Ollama wrapper ---
    # True when no upstream was given: `serve` starts `ollama serve` listening at `ollama_host`,
    # supervises it, and `upstream` is that address.
    supervise: bool = False
    ollama_host: str = DEFAULT_OLLAMA_HOST
    ollama_bin: str = "ollama"
    ollama_start_timeout: float = 60.0
    ollama_stop_grace: float = 10.0
    restart_backoff: float = 1.0
    restart_backoff_max: float = 30.0
    # Seconds between /api/ps polls for the model gauges; None turns them off.
    ps_interval: float | None = 10.0

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @property
    def listens_on_loopback(self) -> bool:
        if self.listen_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.listen_host).is_loopback
        except ValueError:
            return False

    @classmethod
    def build(
        cls,
        *,
        listen: str = DEFAULT_LISTEN,
        upstream: str | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 0.0,
        header_timeout: float = 60.0,
        max_extra_models: int = 20,
        model_refresh: float = 60.0,
        max_parse_bytes: int = 32 * 1024 * 1024,
        shutdown_grace: float = 10.0,
        metrics_path: str = "/metrics",
        log_level: str = "INFO",
        # --- Ollama wrapper ---
        ollama_host: str = DEFAULT_OLLAMA_HOST,
        ollama_bin: str = "ollama",
        ollama_start_timeout: float = 60.0,
        ollama_stop_grace: float = 10.0,
        restart_backoff: float = 1.0,
        restart_backoff_max: float = 30.0,
        ps_interval: float = 10.0,
    ) -> Config:
        """Validate raw settings (as typed by a user) into a Config.

        Without `upstream`, the proxy is to start and supervise `ollama serve` at `ollama_host`.
        """
        host, port = parse_listen(listen)
        child_host, child_port = parse_listen(ollama_host, "ollama_host")
        upstream_url = (parse_upstream(upstream) if upstream is not None
                        else connect_url(child_host, child_port))
        for name, value in [("connect_timeout", connect_timeout), ("idle_timeout", idle_timeout),
                            ("header_timeout", header_timeout), ("model_refresh", model_refresh),
                            ("shutdown_grace", shutdown_grace)]:
            if value < 0:
                raise ConfigError(name, f"must be zero or more seconds, got {value}")
        if connect_timeout == 0:
            raise ConfigError("connect_timeout", "must be more than zero seconds")
        if max_extra_models < 0:
            raise ConfigError("max_extra_models", f"must be zero or more, got {max_extra_models}")
        if max_parse_bytes < 0:
            raise ConfigError("max_parse_bytes", f"must be zero or more, got {max_parse_bytes}")
        if not metrics_path.startswith("/") or metrics_path.startswith(("/api/", "/v1/")):
            raise ConfigError("metrics_path",
                              f"must start with / and not shadow an Ollama route: {metrics_path!r}")
        level = log_level.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level", f"must be DEBUG, INFO, WARNING or ERROR: {log_level!r}")
        local = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")
        if upstream_url.port == port and (upstream_url.host == host or (
                upstream_url.host in local and host in local)):
            raise ConfigError(
                "upstream" if upstream is not None else "ollama_host",
                f"{upstream_url} is the proxy's own address; the proxy would call "
                "itself. Point it at Ollama (by default http://127.0.0.1:11435)")
        # --- Ollama wrapper ---
        if upstream is None and child_port == 0:
            raise ConfigError("ollama_host", f"must name a port, got {ollama_host!r}")
        if upstream is None and child_port == port and (
                child_host == host or {child_host, host} & {"0.0.0.0", "::"}):
            raise ConfigError("ollama_host", f"{ollama_host} is where the proxy listens; "
                              "Ollama needs a port of its own (by default 127.0.0.1:11435)")
        if not ollama_bin.strip():
            raise ConfigError("ollama_bin", "must name the ollama program")
        for name, value in [("ollama_start_timeout", ollama_start_timeout),
                            ("ollama_stop_grace", ollama_stop_grace),
                            ("restart_backoff", restart_backoff), ("ps_interval", ps_interval)]:
            if value < 0:
                raise ConfigError(name, f"must be zero or more seconds, got {value}")
        if ollama_start_timeout == 0:
            raise ConfigError("ollama_start_timeout", "must be more than zero seconds")
        if restart_backoff_max < restart_backoff:
            raise ConfigError("restart_backoff_max",
                              f"must be at least --restart-backoff ({restart_backoff}), "
                              f"got {restart_backoff_max}")
        return cls(
            listen_host=host,
            listen_port=port,
            upstream=upstream_url,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout or None,
            header_timeout=header_timeout or None,
            max_extra_models=max_extra_models,
            model_refresh=model_refresh,
            max_parse_bytes=max_parse_bytes,
            shutdown_grace=shutdown_grace,
            metrics_path=metrics_path,
            log_level=level,
            # --- Ollama wrapper ---
            supervise=upstream is None,
            ollama_host=_host_port(child_host, child_port),
            ollama_bin=ollama_bin.strip(),
            ollama_start_timeout=ollama_start_timeout,
            ollama_stop_grace=ollama_stop_grace,
            restart_backoff=restart_backoff,
            restart_backoff_max=restart_backoff_max,
            ps_interval=ps_interval or None,
        )


def parse_listen(value: str, setting: str = "listen") -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all interfaces) → (host, port)."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(setting, f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(setting, f"write IPv6 addresses in brackets, as [::1]:11434: {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(setting, f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(setting, f"port must be 0-65535, got {port}")
    return host or "0.0.0.0", port


def parse_upstream(value: str) -> URL:
    """An http(s) URL; a bare `host:port` is taken as http://host:port, as OLLAMA_HOST is."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        url = URL(text)
    except ValueError as exc:
        raise ConfigError("upstream", f"not a URL: {value!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError("upstream", f"expected http://HOST:PORT, got {value!r}")
    if url.query_string or url.fragment:
        raise ConfigError("upstream", f"must not carry a query or fragment: {value!r}")
    return url


# --- Ollama wrapper ---

def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connectable(host: str) -> str:
    """The address to connect to for a server listening on `host` (all interfaces → loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def connect_url(host: str, port: int) -> URL:
    """How a client on this machine reaches a server listening on host:port (an `ollama serve`
    started with OLLAMA_HOST=host:port, or the proxy itself)."""
    return URL(f"http://{_host_port(connectable(host), port)}")
