"""Every setting, written once: its option, environment variable, default, type, check and help.

Three groups, one per concern: PROXY (the proxy itself), OLLAMA (the `ollama serve` it starts and
watches) and ANALYTICS (the record of every request). From them come the click options
(cli/options.py), the variable names, the defaults and validation of Config.build and
AnalyticsConfig.build, and the README's configuration tables (tests/test_settings.py compares
them). A value is checked by the setting's click type, then by its `check`; a bad one raises
ConfigError naming the option and its variable, the same text from the CLI and from Python.
Checks that involve two settings (the proxy calling itself, a backend without its URL) are the
config classes' own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
from yarl import URL

if TYPE_CHECKING:
    _ParamType = click.ParamType[str]
    AnyParamType = click.ParamType[Any]
else:  # ParamType is generic only in newer click releases
    _ParamType = AnyParamType = click.ParamType


class ConfigError(ValueError):
    """A setting has a value the proxy cannot run with."""

    def __init__(self, setting: str, message: str, env: str | None = None) -> None:
        flag = "--" + setting.replace("_", "-")
        known = next((group[setting].env for group in (PROXY, OLLAMA, ANALYTICS)
                      if setting in group), setting)
        super().__init__(f"{flag} ({env or known}): {message}")
        self.setting = setting


@dataclass(frozen=True)
class Setting:
    """One setting: `name` is the keyword of the config's build() and, dashed, the option."""

    name: str
    env: str
    default: Any
    help: str
    type: AnyParamType = click.STRING
    metavar: str | None = None
    # More than the type can say: raises ValueError with the reason a value is refused.
    check: Callable[[Any], object] | None = None
    multiple: bool = False  # repeatable; the variable holds several (split by the type)
    # An empty environment variable is a value (click reads it as unset): for the token, whose
    # empty value must be refused rather than turn authentication off.
    keep_empty: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_flag(self) -> bool:
        """An on/off switch, written --NAME / --no-NAME."""
        return isinstance(self.type, click.types.BoolParamType)

    def parse(self, value: Any) -> Any:
        """`value` (a Python value, or text from a command line or variable) as this setting
        holds it; ConfigError if it is not one."""
        if value is None:
            return None
        if self.multiple:
            return tuple(self.parse_one(item) for item in value)
        return self.parse_one(value)

    def parse_one(self, value: Any) -> Any:
        try:
            converted = self.type.convert(value, None, None)
            if isinstance(converted, float) and math.isnan(converted):  # passes every range
                raise ValueError(f"must be a number, got {value!r}")
            if self.check is not None and converted is not None:
                self.check(converted)
        except click.BadParameter as exc:
            raise ConfigError(self.name, _reason(self.type, value, exc)) from None
        except ValueError as exc:
            raise ConfigError(self.name, str(exc)) from None
        return converted


def _reason(param_type: AnyParamType, value: Any, exc: click.BadParameter) -> str:
    if isinstance(param_type, (click.FloatRange, click.IntRange)):
        base = click.FLOAT if isinstance(param_type, click.FloatRange) else click.INT
        try:
            number = base.convert(value, None, None)
        except click.BadParameter as not_a_number:
            return not_a_number.message
        return f"must be {_bounds(param_type)}, got {number}"
    return exc.message


def _bounds(t: click.FloatRange | click.IntRange) -> str:
    def num(x: float) -> str:
        return "zero" if x == 0 else f"{x:g}"

    parts = []
    if t.min is not None:
        parts.append(("more than " if t.min_open else "at least ") + num(t.min))
    if t.max is not None:
        parts.append(("less than " if t.max_open else "at most ") + num(t.max))
    text = " and ".join(parts)
    return "zero or more" if text == "at least zero" else text


class Settings:
    """An ordered group of settings, looked up by name."""

    def __init__(self, *settings: Setting) -> None:
        self._by_name = {s.name: s for s in settings}

    def __iter__(self) -> Iterator[Setting]:
        return iter(self._by_name.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Setting:
        return self._by_name[name]

    def __add__(self, other: Settings) -> Settings:
        return Settings(*self, *other)

    @property
    def env(self) -> dict[str, str]:
        """Setting name -> environment variable."""
        return {s.name: s.env for s in self}

    def parse(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every setting's value: the given one, or its default; checked (ConfigError)."""
        unknown = sorted(set(given) - set(self._by_name))
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(unknown)}")
        return {s.name: s.parse(given.get(s.name, s.default)) for s in self}


# --- Values that need more than a click type ---

def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all interfaces) → (host, port); ValueError."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets, as [::1]:11434: {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    return host or "0.0.0.0", port


def parse_upstream(value: str) -> URL:
    """An http(s) URL; a bare `host:port` is taken as http://host:port, as OLLAMA_HOST is."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        url = URL(text)
    except ValueError as exc:
        raise ValueError(f"not a URL: {value!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected http://HOST:PORT, got {value!r}")
    if url.query_string or url.fragment:
        raise ValueError(f"must not carry a query or fragment: {value!r}")
    return url


def shown(url: URL) -> str:
    """`url` as it may be shown (logs, replies, status, suggested commands): credentials in it
    are masked, `http://user:***@host:port`."""
    if url.password is not None:
        url = url.with_password("***")
    elif url.user is not None:
        url = url.with_user("***")
    return str(url)


def masked_in(text: str, url: URL) -> str:
    """`text` (an error message that may quote `url`) with `url`'s credentials masked."""
    if url.user is None:
        return text
    for user, password in ((url.raw_user, url.raw_password), (url.user, url.password)):
        if password is not None:
            text = text.replace(f"{user}:{password}@", f"{user}:***@")
        elif user:
            text = text.replace(f"{user}@", "***@")
    return text


def _metrics_path(value: str) -> None:
    if not value.startswith("/") or value.startswith(("/api/", "/v1/")):
        raise ValueError(f"must start with / and not shadow an Ollama route: {value!r}")


def _program(value: str) -> None:
    if not value.strip():
        raise ValueError("must name the ollama program")


BACKENDS = ("sqlite", "jsonl", "postgres", "loki")
CAPTURE_LEVELS = ("full", "truncated", "metadata")


def parse_backends(value: str) -> tuple[str, ...]:
    """`sqlite,loki` → ("sqlite", "loki"); empty or `none` → () (analytics off)."""
    names = [b.strip().lower() for b in value.split(",") if b.strip()]
    if names in ([], ["none"]):
        return ()
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)} "
                         "(comma-separated), or none")
    return tuple(dict.fromkeys(names))


def _regex(value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {value!r} ({exc})") from None


def _finite(value: float) -> None:
    if math.isinf(value):
        raise ValueError("must be a number of seconds, not inf")


def _not_blank(value: str) -> None:
    # An empty ANALYTICS_TOKEN= reads as "no token" elsewhere: refuse it rather than serve every
    # stored prompt to anyone while the user believes them guarded.
    if not value.strip():
        raise ValueError("is empty or blank: give a token, or leave the setting out to run "
                         "without one")


def _http_url(value: str) -> None:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s) URL: {value!r}")


class _Lines(_ParamType):
    """Text whose environment variable holds one value per line (regexes may contain spaces
    and commas)."""

    name = "REGEX"
    envvar_list_splitter = "\n"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> str:
        return str(value)


_ZERO_OR_MORE = click.FloatRange(min=0)
_MORE_THAN_ZERO = click.FloatRange(min=0, min_open=True)
_COUNT = click.IntRange(min=0)
_POSITIVE_COUNT = click.IntRange(min=0, min_open=True)

# Where `serve` starts Ollama: the port next to Ollama's own, which the proxy takes.
_OLLAMA_HOST = "127.0.0.1:11435"

PROXY = Settings(
    Setting("listen", "OLLAMA_METRICS_LISTEN", "127.0.0.1:11434", metavar="HOST:PORT",
            check=parse_listen, help="Where clients connect (Ollama's usual address)."),
    Setting("upstream", "OLLAMA_METRICS_UPSTREAM", None, metavar="URL", check=parse_upstream,
            help=f"Forward to the Ollama already running at this URL (e.g. http://{_OLLAMA_HOST}). "
                 "Without it, `ollama serve` is started at --ollama-host and supervised."),
    Setting("connect_timeout", "OLLAMA_METRICS_CONNECT_TIMEOUT", 10.0, type=_MORE_THAN_ZERO,
            metavar="SECONDS", help="Give up connecting to Ollama after this long (504)."),
    Setting("idle_timeout", "OLLAMA_METRICS_IDLE_TIMEOUT", 0.0, type=_ZERO_OR_MORE,
            metavar="SECONDS",
            help="Cut a reply Ollama stays silent in for this long; 0 never cuts (model loads "
                 "and long generations have no upper bound)."),
    Setting("header_timeout", "OLLAMA_METRICS_HEADER_TIMEOUT", 60.0, type=_ZERO_OR_MORE,
            metavar="SECONDS",
            help="Close a client connection whose request head (request line and headers) "
                 "takes longer than this to arrive; 0 never does."),
    Setting("max_extra_models", "OLLAMA_METRICS_MAX_EXTRA_MODELS", 20, type=_COUNT, metavar="N",
            help="Model label values allowed beyond those in /api/tags before 'other'."),
    Setting("model_refresh", "OLLAMA_METRICS_MODEL_REFRESH", 60.0, type=_ZERO_OR_MORE,
            metavar="SECONDS", help="How often to re-read /api/tags for model label values."),
    Setting("max_parse_bytes", "OLLAMA_METRICS_MAX_PARSE_BYTES", 32 * 1024 * 1024, type=_COUNT,
            metavar="BYTES", help="Largest JSON request or reply body parsed for metrics; "
                                  "larger ones stream through unread."),
    Setting("shutdown_grace", "OLLAMA_METRICS_SHUTDOWN_GRACE", 10.0, type=_ZERO_OR_MORE,
            metavar="SECONDS",
            help="On SIGTERM/SIGINT, how long requests in flight may take to finish."),
    Setting("workers", "OLLAMA_METRICS_WORKERS", 1, type=_POSITIVE_COUNT, metavar="N",
            help="Event loops serving the listen port, each in a process of its own (Linux: "
                 "SO_REUSEPORT); 1 where the system cannot share a port."),
    Setting("metrics_path", "OLLAMA_METRICS_PATH", "/metrics", metavar="PATH",
            check=_metrics_path, help="Where Prometheus scrapes."),
    Setting("log_level", "OLLAMA_METRICS_LOG_LEVEL", "INFO",
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            help="Log verbosity. Prompt text is never logged."),
    Setting("otel", "OLLAMA_METRICS_OTEL", False, type=click.BOOL,
            help="Export each Ollama call as an OpenTelemetry GenAI span and metrics by OTLP "
                 "(configured by the standard OTEL_* variables; needs the `otel` extra)."),
    Setting("otel_protocol", "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf",
            type=click.Choice(["http/protobuf", "grpc"]),
            help="How spans and metrics are sent (the OpenTelemetry variable of that name)."),
    Setting("otel_content", "OLLAMA_METRICS_OTEL_CONTENT", False, type=click.BOOL,
            help="Put prompt and reply text on the spans, after the analytics capture level and "
                 "redaction."),
)

OLLAMA = Settings(
    Setting("ollama_host", "OLLAMA_METRICS_OLLAMA_HOST", _OLLAMA_HOST, metavar="HOST:PORT",
            check=parse_listen,
            help="Where the Ollama started by the proxy listens (its OLLAMA_HOST)."),
    Setting("ollama_bin", "OLLAMA_METRICS_OLLAMA_BIN", "ollama", metavar="PATH", check=_program,
            help="The ollama program: a name looked up on PATH, or a path."),
    Setting("ollama_start_timeout", "OLLAMA_METRICS_OLLAMA_START_TIMEOUT", 60.0,
            type=_MORE_THAN_ZERO, metavar="SECONDS",
            help="How long `ollama serve` may take to answer after it starts."),
    Setting("ollama_stop_grace", "OLLAMA_METRICS_OLLAMA_STOP_GRACE", 10.0, type=_ZERO_OR_MORE,
            metavar="SECONDS",
            help="On shutdown, how long Ollama may take to stop before it is killed."),
    Setting("restart_backoff", "OLLAMA_METRICS_RESTART_BACKOFF", 1.0, type=_ZERO_OR_MORE,
            metavar="SECONDS", help="Wait before restarting an Ollama that exited; doubles "
                                    "with each failure in a row."),
    Setting("restart_backoff_max", "OLLAMA_METRICS_RESTART_BACKOFF_MAX", 30.0, type=_ZERO_OR_MORE,
            metavar="SECONDS", help="The longest wait between restarts."),
    Setting("ps_interval", "OLLAMA_METRICS_PS_INTERVAL", 10.0, type=_ZERO_OR_MORE,
            metavar="SECONDS",
            help="How often /api/ps is read for the loaded-model gauges; 0 turns them off."),
)

# The first three say where records are (the query commands need them too: STORE).
ANALYTICS = Settings(
    Setting("analytics_backend", "ANALYTICS_BACKEND", "sqlite", metavar="NAMES",
            check=parse_backends,
            help=f"Comma-separated: {', '.join(BACKENDS)}; or none to record nothing."),
    # None: the per-user data directory (paths.analytics_dir), which depends on the platform
    # and the environment, so the edge (cli/analytics_options.py) fills it in.
    Setting("analytics_dir", "ANALYTICS_DIR", None, metavar="DIR",
            help="Where the sqlite and jsonl backends keep their files [default: analytics/ in "
                 "the per-user data directory, see README]."),
    Setting("analytics_postgres_dsn", "ANALYTICS_POSTGRES_DSN", None, metavar="DSN",
            help="PostgreSQL connection string for the postgres backend."),
    Setting("analytics_search_timeout", "ANALYTICS_SEARCH_TIMEOUT", 5.0, type=_MORE_THAN_ZERO,
            metavar="SECONDS", check=_finite,
            help="Longest a query of the records may run before it is stopped."),
    Setting("analytics_retention_days", "ANALYTICS_RETENTION_DAYS", 7.0, type=_ZERO_OR_MORE,
            metavar="DAYS", help="Delete records older than this; 0 keeps everything."),
    Setting("analytics_max_size_mb", "ANALYTICS_MAX_SIZE_MB", 0.0, type=_ZERO_OR_MORE,
            metavar="MB",
            help="Cap on the SQLite file / JSONL directory (oldest go first); 0: no cap."),
    Setting("analytics_capture", "ANALYTICS_CAPTURE", "full", type=click.Choice(CAPTURE_LEVELS),
            help="How much prompt and response text to store."),
    Setting("analytics_truncate_chars", "ANALYTICS_TRUNCATE_CHARS", 200, type=_COUNT,
            metavar="N", help="With --analytics-capture truncated: characters kept per text."),
    Setting("analytics_max_text", "ANALYTICS_MAX_TEXT", 65_536, type=_POSITIVE_COUNT,
            metavar="N",
            help="Longest text stored at any level (the rest is cut, and marked)."),
    # A record must hold its marker of elided messages and the texts around it.
    Setting("analytics_max_messages", "ANALYTICS_MAX_MESSAGES", 100, type=click.IntRange(min=2),
            metavar="N",
            help="Messages kept of a conversation: the first and last halves (marked)."),
    Setting("analytics_max_record_kb", "ANALYTICS_MAX_RECORD_KB", 1024,
            type=click.IntRange(min=16), metavar="KB",
            help="Largest record, JSON-encoded; longer texts are cut further (marked)."),
    Setting("analytics_redact", "ANALYTICS_REDACT", True, type=click.BOOL,
            help="Mask e-mail addresses, API keys and tokens, card numbers."),
    Setting("analytics_redact_pattern", "ANALYTICS_REDACT_PATTERNS", (), type=_Lines(),
            multiple=True, check=_regex,
            help="Also mask matches of this regex (repeatable; one per line in the variable)."),
    Setting("analytics_token", "ANALYTICS_TOKEN", None, metavar="TOKEN", check=_not_blank,
            keep_empty=True,
            help="Require 'Authorization: Bearer TOKEN' on analytics routes (not empty)."),
    Setting("analytics_protect_metrics", "ANALYTICS_PROTECT_METRICS", False, type=click.BOOL,
            help="Require the token on the metrics route too."),
    Setting("analytics_queue_size", "ANALYTICS_QUEUE_SIZE", 10_000, type=_POSITIVE_COUNT,
            metavar="N",
            help="Records waiting per backend before new ones are dropped (and counted)."),
    Setting("analytics_batch_size", "ANALYTICS_BATCH_SIZE", 500, type=_POSITIVE_COUNT,
            metavar="N", help="Most records written at once."),
    Setting("analytics_loki_url", "ANALYTICS_LOKI_URL", None, metavar="URL", check=_http_url,
            help="Loki base URL for the loki backend."),
    Setting("analytics_loki_tenant", "ANALYTICS_LOKI_TENANT", None, metavar="ID",
            help="X-Scope-OrgID for a multi-tenant Loki."),
    Setting("analytics_jsonl_max_file_mb", "ANALYTICS_JSONL_MAX_FILE_MB", 100.0,
            type=_MORE_THAN_ZERO, metavar="MB",
            help="Start a new JSONL file after this size."),
    Setting("analytics_cleanup_interval", "ANALYTICS_CLEANUP_INTERVAL", 3600.0,
            type=_MORE_THAN_ZERO, metavar="SECONDS",
            help="How often retention and size caps are enforced."),
    Setting("analytics_drain_grace", "ANALYTICS_DRAIN_GRACE", 10.0, type=_ZERO_OR_MORE,
            metavar="SECONDS",
            help="On shutdown, how long queued records may take to be written."),
)

STORE = Settings(*(ANALYTICS[name] for name in
                   ("analytics_backend", "analytics_dir", "analytics_postgres_dsn")))
