"""Each setting is defined once (ollama_metrics.settings); what is made from it agrees with it.

The README's tables are checked against the definitions here (option, variable and default of
every row, in order); a missing or stale row fails with the row to write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.cli import main
from ollama_metrics.config import Config, ConfigError
from ollama_metrics.settings import ANALYTICS, OLLAMA, PROXY, Setting, Settings

README = Path(__file__).parent.parent / "README.md"
HEADER = "| option | variable | default | meaning |"


def _shown(default: Any) -> str:
    if default is None or default == ():
        return "—"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


def _option(setting: Setting) -> str:
    return f"--[no-]{setting.name.replace('_', '-')}" if setting.is_flag else setting.flag


def _row(setting: Setting) -> str:
    option = _option(setting) + (f" {setting.metavar}" if setting.metavar else "")
    return f"| `{option}` | `{setting.env}` | {_shown(setting.default)} | {setting.help} |"


def _table(heading: str) -> list[list[str]]:
    """The cells of the rows of the first settings table under `heading` in the README."""
    lines = README.read_text().splitlines()
    at = lines.index(next(line for line in lines if line.startswith(heading)))
    at = lines.index(HEADER, at) + 2  # past the header and its |---| line
    rows = []
    for line in lines[at:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:4]])
    return rows


def _matches(cells: list[str], setting: Setting) -> bool:
    option, variable, default = cells
    shown = _shown(setting.default)
    return (option.strip("`").split(" ")[0] == _option(setting)
            and variable == f"`{setting.env}`"
            and (default == shown or default.startswith(shown + " (")))


@pytest.mark.parametrize(("heading", "settings"), [
    ("## Configuration", PROXY + OLLAMA),
    ("## Analytics", ANALYTICS),
])
def test_readme_tables_are_the_settings(heading: str, settings: Settings) -> None:
    """Every setting has its row, in order, with its option, variable and default; no other
    row is there. (The meaning column is the README's own words.)"""
    rows = _table(heading)
    for i, setting in enumerate(settings):
        assert i < len(rows) and _matches(rows[i], setting), (
            f"README, {heading!r}: row {i + 1} should be {setting.name}'s, e.g.\n{_row(setting)}")
    assert len(rows) == len(list(settings)), f"README, {heading!r}: rows for no setting: " \
        f"{rows[len(list(settings)):]}"


def test_options_are_the_settings() -> None:
    """Every option of `serve` that reads a variable is a setting, with its default."""
    serve = main.get_command(click.Context(main), "serve")
    assert serve is not None
    options = [p for p in serve.params if isinstance(p, click.Option) and p.envvar]
    settings = PROXY + OLLAMA + ANALYTICS
    assert sorted(str(p.name) for p in options) == sorted(s.name for s in settings)
    for option in options:
        setting = settings[str(option.name)]
        assert (option.envvar, option.default) == (setting.env, setting.default)


def test_config_defaults_are_the_settings_defaults() -> None:
    assert Config() == Config.build()
    assert AnalyticsConfig() == AnalyticsConfig.build()
    assert Config().connect_timeout == PROXY["connect_timeout"].default
    assert AnalyticsConfig().queue_size == ANALYTICS["analytics_queue_size"].default


def test_unknown_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="connect_timout"):
        Config.build(connect_timout=1)
    with pytest.raises(TypeError, match="analytics_bakend"):
        AnalyticsConfig.build(analytics_bakend="sqlite")


# Refused after the options are read, so a command whose bad value slipped through fails (with
# another message) instead of serving.
BAD_BACKOFF = ["--restart-backoff", "5", "--restart-backoff-max", "2"]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("connect_timeout", "0", "must be more than zero, got 0.0"),
    ("idle_timeout", "-1", "must be zero or more, got -1.0"),
    ("max_extra_models", "many", "'many' is not a valid integer."),
    ("log_level", "loud", "'loud' is not one of 'debug', 'info', 'warning', 'error'."),
    ("listen", "nonsense", "expected HOST:PORT, got 'nonsense'"),
    ("metrics_path", "/api/metrics", "must start with / and not shadow an Ollama route"),
    ("ollama_bin", " ", "must name the ollama program"),
    ("analytics_queue_size", "0", "must be more than zero, got 0"),
    ("analytics_capture", "everything", "'everything' is not one of 'full', 'truncated'"),
    ("analytics_backend", "mysql", "unknown backend 'mysql'; choose from sqlite, jsonl"),
    ("analytics_redact_pattern", "(", "not a valid regular expression: '('"),
    ("analytics_loki_url", "loki:3100", "expected an http(s) URL: 'loki:3100'"),
])
def test_a_bad_value_is_refused_in_the_same_words_everywhere(
    name: str, text: str, message: str,
) -> None:
    """From Python, the command line and the environment: the option, its variable, why."""
    setting = (PROXY + OLLAMA + ANALYTICS)[name]
    expected = f"{setting.flag} ({setting.env}): {message}"
    value: Any = (text,) if setting.multiple else text
    build = AnalyticsConfig.build if name in ANALYTICS else Config.build
    with pytest.raises(ConfigError) as raised:
        build(**{name: value})
    assert str(raised.value).startswith(expected)
    runner = CliRunner()
    for args, env in (([setting.flag, text], {}), ([], {setting.env: text})):
        result = runner.invoke(main, ["serve", *BAD_BACKOFF, *args], env=env)
        assert result.exit_code == 2, result.output
        assert f"Error: {expected}" in result.output


@pytest.mark.parametrize(("build", "given", "message"), [
    (Config.build, {"restart_backoff": 5, "restart_backoff_max": 2},
     "--restart-backoff-max (OLLAMA_METRICS_RESTART_BACKOFF_MAX): must be at least "
     "--restart-backoff (5.0), got 2.0"),
    (Config.build, {"listen": "127.0.0.1:4000", "ollama_host": "127.0.0.1:4000"},
     "--ollama-host (OLLAMA_METRICS_OLLAMA_HOST): http://127.0.0.1:4000 is the proxy's own "
     "address"),
    (Config.build, {"ollama_host": ":0"},
     "--ollama-host (OLLAMA_METRICS_OLLAMA_HOST): must name a port, got ':0'"),
    (AnalyticsConfig.build, {"analytics_backend": "sqlite,postgres"},
     "--analytics-postgres-dsn (ANALYTICS_POSTGRES_DSN): the postgres backend needs a DSN"),
    (AnalyticsConfig.build, {"analytics_backend": "loki"},
     "--analytics-loki-url (ANALYTICS_LOKI_URL): the loki backend needs Loki's base URL"),
])
def test_checks_across_settings(build: Any, given: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build(**given)
    assert str(raised.value).startswith(message)


def test_values_as_typed_and_as_python_build_the_same_config() -> None:
    typed = Config.build(upstream="127.0.0.1:11435", connect_timeout="2.5", log_level="debug",
                         ps_interval="0", max_parse_bytes="1024")
    assert typed == Config.build(upstream="http://127.0.0.1:11435", connect_timeout=2.5,
                                 log_level="DEBUG", ps_interval=0, max_parse_bytes=1024)
    assert (typed.log_level, typed.ps_interval, typed.supervise) == ("DEBUG", None, False)
    analytics = AnalyticsConfig.build(analytics_backend=" SQLite, jsonl,sqlite",
                                      analytics_redact="off", analytics_redact_pattern=["x+", ""])
    assert analytics.backends == ("sqlite", "jsonl")
    assert analytics.redact is False
    assert [p.pattern for p in analytics.redact_patterns] == ["x+"]
    assert AnalyticsConfig.build(analytics_backend="none").enabled is False
