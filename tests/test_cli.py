"""The `ollama-metrics` command: options, help and config errors in-process (click's CliRunner);
real processes where the process is the point -- ports, signals, start-up, the log."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import Process, fake_process, proxy_process
from ollama_metrics.cli import main


def _run(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollama_metrics", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_version_and_help() -> None:
    assert CliRunner().invoke(main, ["--version"]).stdout.startswith("ollama-metrics, version ")
    text = CliRunner().invoke(main, ["serve", "--help"]).stdout
    for var in ("OLLAMA_METRICS_LISTEN", "OLLAMA_METRICS_UPSTREAM", "127.0.0.1:11434",
                "http://127.0.0.1:11435"):
        assert var in text


@pytest.mark.parametrize(("typed", "meant"), [("stat", "stats"), ("serach", "search"),
                                             ("statu", "status"), ("expotr", "export")])
def test_a_typo_gets_did_you_mean(typed: str, meant: str) -> None:
    result = CliRunner().invoke(main, [typed])
    assert result.exit_code == 2, result.output
    assert f"No such command '{typed}'. Did you mean '{meant}'?" in result.stderr
    assert "ollama" not in result.stderr.split("Error:")[1]


def test_ollama_commands_are_never_corrected() -> None:
    # `stop` is close to our `top` and `ps` to nothing of ours: both are Ollama's, and go to it.
    from ollama_metrics.cli import OLLAMA_COMMANDS, wrapper
    ctx = main.make_context("ollama-metrics", ["stop", "x"], resilient_parsing=True)
    for name in ("stop", "ps", "list", "signin", "launch"):
        assert name in OLLAMA_COMMANDS
        assert main.resolve_command(ctx, [name])[1] is wrapper.passthrough


def test_each_help_lists_only_its_own_options() -> None:
    def flags(command: str) -> set[str]:
        text = CliRunner().invoke(main, [command, "--help"]).stdout
        return {w for w in text.split() if w.startswith("--") and w != "--help"}

    assert flags("status") == {"--listen", "--metrics-path", "--upstream", "--ollama-host"}
    assert flags("run") == {"--listen", "--upstream", "--ollama-host", "--ollama-bin",
                            "--ollama-start-timeout"}
    assert {"--idle-timeout", "--max-parse-bytes", "--shutdown-grace"} <= flags("serve")


@pytest.mark.parametrize(("given", "variable"), [
    (["--shutdown-grace", "2"], "OLLAMA_METRICS_SHUTDOWN_GRACE"),
    (["--ollama-stop-grace=3"], "OLLAMA_METRICS_OLLAMA_STOP_GRACE"),
    (["--analytics-dir", "/tmp/x"], "ANALYTICS_DIR"),
    (["--no-analytics-protect-metrics"], "ANALYTICS_PROTECT_METRICS")])
def test_run_refuses_an_option_of_serve_rather_than_pass_it_as_the_model(
    given: list[str], variable: str,
) -> None:
    # Before MODEL, an option `run` lacks would reach `ollama run` as the model's name.
    result = CliRunner().invoke(main, ["run", "--listen", "127.0.0.1:9", *given, "llama3.2"])
    assert result.exit_code == 2, result.output
    name = given[0].split("=")[0]
    assert f"{name} is an option of `serve`, not of `run`" in result.stderr
    assert f"set {variable}" in result.stderr


def test_port_in_use_names_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("serve", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 3
    assert f"port {port}" in result.stderr
    assert "--listen" in result.stderr
    assert "OLLAMA_HOST=127.0.0.1:11435" in result.stderr


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--listen", "nonsense"], {}, "--listen (OLLAMA_METRICS_LISTEN)"),
    (["--upstream", "ftp://x"], {}, "--upstream (OLLAMA_METRICS_UPSTREAM)"),
    ([], {"OLLAMA_METRICS_CONNECT_TIMEOUT": "-1"}, "OLLAMA_METRICS_CONNECT_TIMEOUT"),
    ([], {"OLLAMA_METRICS_MAX_EXTRA_MODELS": "many"}, "OLLAMA_METRICS_MAX_EXTRA_MODELS"),
    (["--header-timeout", "-5"], {}, "--header-timeout (OLLAMA_METRICS_HEADER_TIMEOUT)"),
    (["--listen", "127.0.0.1:4000", "--upstream", "http://127.0.0.1:4000"], {},
     "the proxy's own address"),
    (["--listen", "0.0.0.0:4000", "--upstream", "http://localhost:4000"], {},
     "the proxy's own address"),
    # An empty token is no token: refused, not read as "authentication off".
    ([], {"ANALYTICS_TOKEN": ""}, "--analytics-token (ANALYTICS_TOKEN): is empty"),
    ([], {"ANALYTICS_TOKEN": " \t "}, "--analytics-token (ANALYTICS_TOKEN): is empty"),
    (["--analytics-token", ""], {}, "--analytics-token (ANALYTICS_TOKEN): is empty"),
    (["--analytics-token", "   "], {}, "--analytics-token (ANALYTICS_TOKEN): is empty"),
])
def test_bad_config_fails_at_start_naming_the_setting(
    args: list[str], env: dict[str, str], named: str,
) -> None:
    result = CliRunner().invoke(main, ["serve", *args], env=env)
    assert result.exit_code == 2, result.output
    assert named in result.stderr


def test_env_vars_configure_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_process() as fake:
        monkeypatch.setenv("OLLAMA_METRICS_UPSTREAM", fake.url)
        monkeypatch.setenv("OLLAMA_METRICS_PATH", "/prom")
        with proxy_process(fake.url) as proxy, urllib.request.urlopen(proxy.url + "/prom") as r:
            assert b"ollama_active_requests" in r.read()


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow(
    reason="serve --workers 2: three processes"))])
def test_says_clearly_when_ollama_is_not_running(workers: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with proxy_process(f"http://127.0.0.1:{port}", "--workers", workers) as proxy:
            warning = proxy.wait_for("Ollama is not answering").string
            assert f"at http://127.0.0.1:{port}" in warning
            assert "ollama serve" in warning


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow(
    reason="serve --workers 2: three processes"))])
def test_sigterm_exits_cleanly(workers: str) -> None:
    with fake_process() as fake, proxy_process(fake.url, "--workers", workers) as proxy:
        with urllib.request.urlopen(proxy.url + "/api/version") as resp:
            assert resp.status == 200
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.stop() == 0
        assert "Traceback" not in proxy.output


def test_warns_when_prompts_are_reachable_from_the_network(tmp_path: Path) -> None:
    with fake_process() as fake:
        for extra, warned in (([], True), (["--analytics-token", "t"], False)):
            proxy = Process([sys.executable, "-m", "ollama_metrics", "serve", "--listen",
                             "0.0.0.0:0", "--upstream", fake.url, "--analytics-dir",
                             str(tmp_path), *extra])
            try:
                proxy.wait_for(r"recording interactions to sqlite")
                proxy.wait_for(r"Ollama \S+ answers")
            finally:
                assert proxy.stop() == 0
            assert ("with no ANALYTICS_TOKEN" in proxy.output) is warned


# psycopg made unimportable in the child, whatever this machine has installed.
_NO_PSYCOPG = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("psycopg", "psycopg_pool"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Block())
from ollama_metrics.cli import main
main(prog_name="ollama-metrics")
"""


@pytest.mark.parametrize(("args", "said"), [
    (["--listen", "8.8.8.8:21440"], "cannot listen on 8.8.8.8:21440: not an address of this"),
    (["--listen", "nosuchhost.invalid:21440"], "no address is known for 'nosuchhost.invalid'"),
    (["--analytics-dir", "/proc/nope"], "cannot keep analytics in /proc/nope"),
    (["--analytics-dir", "{file}"], "in {file} (a file, not a directory): name a directory"),
    (["--analytics-backend", "postgres", "--analytics-postgres-dsn", "postgresql://x@h/db"],
     "the postgres backend needs psycopg: pip install 'ollama-metrics[postgres]'"),
])
def test_start_failures_are_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                said: str) -> None:
    """A setting the proxy cannot start with is refused before it serves: one line naming the
    cause and the fix, exit 2, no traceback."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    args = [arg.replace("{file}", str(a_file)) for arg in args]
    result = subprocess.run(
        [sys.executable, "-c", _NO_PSYCOPG, "serve", "--upstream", "http://127.0.0.1:9",
         "--listen", "127.0.0.1:0", "--analytics-dir", str(tmp_path / "records"), *args],
        capture_output=True, text=True, timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said.replace("{file}", str(a_file)) in lines[0], result.stderr
    assert lines[0].startswith("ollama-metrics: ")


# `serve` as on Windows: an event loop without add_signal_handler (Windows' loops have none; they
# do run subprocesses, as the analytics writer needs, so this one is Unix's with the signal
# handlers taken away), and no uvloop.
_NO_SIGNAL_HANDLERS = """
import asyncio, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "uvloop":
            raise ImportError("No module named 'uvloop' (blocked by the test)")
sys.meta_path.insert(0, _Block())
class _Loop(asyncio.SelectorEventLoop):
    def add_signal_handler(self, sig, callback, *args):
        raise NotImplementedError
    def remove_signal_handler(self, sig):
        raise NotImplementedError
class _Policy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _Loop()
asyncio.set_event_loop_policy(_Policy())
from ollama_metrics.cli import main
main(prog_name="ollama-metrics")
"""


@pytest.mark.slow(reason="a proxy process, a stream in flight and two signals")
@pytest.mark.parametrize(("loop", "workers"), [
    ("unix", "1"), ("unix", "2"), ("without add_signal_handler (as on Windows)", "1")])
def test_second_signal_stops_at_once_after_writing_the_queue(tmp_path: Path, loop: str,
                                                             workers: str) -> None:
    """The first SIGINT starts the grace and says how to cut it short; the second stops at
    once (not after the 60 s grace), and the records are in the store, the cut stream's too."""
    slow = json.dumps({"slow:latest": {"tokens": ["x"] * 200, "token_delay": 0.3},
                       "llama3.2:latest": {}})
    python = ("-m", "ollama_metrics") if loop == "unix" else ("-c", _NO_SIGNAL_HANDLERS)
    with fake_process("--scenarios", slow) as fake, \
            proxy_process(fake.url, "--analytics-dir", str(tmp_path),
                          "--shutdown-grace", "60", "--workers", workers,
                          python=python) as proxy:
        with urllib.request.urlopen(urllib.request.Request(
                proxy.url + "/api/generate", data=b'{"model": "llama3.2", "prompt": "hi"}')) as r:
            r.read()
        stream = urllib.request.urlopen(urllib.request.Request(
            proxy.url + "/api/generate", data=b'{"model": "slow", "prompt": "long"}'))
        try:
            stream.readline()  # the stream is under way
            proxy.proc.send_signal(signal.SIGINT)
            proxy.wait_for("press Ctrl-C again")
            proxy.proc.send_signal(signal.SIGINT)
            assert proxy.proc.wait(timeout=8) == 0, proxy.output
        finally:
            stream.close()
    assert "stopping now" in proxy.output and "Traceback" not in proxy.output
    with sqlite3.connect(tmp_path / "interactions.db") as db:
        models = sorted(m for (m,) in db.execute("SELECT model FROM interactions"))
    assert models == ["llama3.2:latest", "slow:latest"]
