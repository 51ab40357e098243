"""`run`, `status` and Ollama's other commands through the proxy, with the stand-in `ollama`:
OLLAMA_HOST points at the proxy, exit codes are the program's own, `run` starts a proxy when none
answers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from helpers import fake_process, proxy_process
from wrapper_helpers import free_port, get, gone, runs, use_standin, wrapper_process

pytestmark = [pytest.mark.slow(reason="starts and stops Ollama and proxy processes"),
              pytest.mark.timeout(60)]


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return use_standin(monkeypatch, tmp_path)


def cli(*args: str, listen: str | None = None, stdin: str = "",
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = None if listen is None else {**os.environ, "OLLAMA_METRICS_LISTEN": listen}
    return subprocess.run([sys.executable, "-m", "ollama_metrics", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, input=stdin)


def requests_through(proxy_url: str, endpoint: str) -> float:
    _, body = get(proxy_url + "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("ollama_requests_total{") and f'endpoint="{endpoint}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_other_commands_go_to_ollama_through_the_proxy(standin: Path) -> None:
    with wrapper_process() as proxy:
        listen = f"127.0.0.1:{proxy.port}"
        listed = cli("list", listen=listen)
        assert listed.returncode == 0, listed.stderr
        assert "llama3.2:latest" in listed.stdout
        (_, env), = runs(standin, "list")
        assert env["OLLAMA_HOST"] == f"http://{listen}"
        assert requests_through(proxy.url, "/api/tags") == 1  # it went through the proxy

        ps = cli("ps", listen=listen)
        assert ps.returncode == 0
        assert "all-minilm:latest" in ps.stdout

        # The program's exit status and messages are passed on as they are.
        missing = cli("rm", "no-such-model", listen=listen)
        assert missing.returncode == 1
        assert "Error: model 'no-such-model' not found" in missing.stderr
        unknown = cli("frobnicate", "--flag", listen=listen)
        assert unknown.returncode == 1
        assert 'unknown command "frobnicate"' in unknown.stderr


def test_a_command_without_a_proxy_says_how_to_start_one(standin: Path) -> None:
    result = cli("list", listen=f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "could not connect to ollama server" in result.stderr  # ollama's own words
    assert "no proxy answers at" in result.stderr
    assert "ollama-metrics serve" in result.stderr


def test_our_own_options_still_work() -> None:
    assert cli("--version").stdout.startswith("ollama-metrics, version ")
    text = cli("--help").stdout
    for command in ("serve", "run", "status", "service"):
        assert command in text
    assert "Any other command" in text


def test_no_ollama_on_path_for_a_passed_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = cli("list")
    assert result.returncode == 127
    assert "`ollama` was not found on PATH" in result.stderr


def test_run_uses_a_running_proxy(standin: Path) -> None:
    with wrapper_process() as proxy:
        result = cli("run", "--listen", f"127.0.0.1:{proxy.port}", "llama3.2", "say hi")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Hello, world!\n"
        assert "started" not in result.stderr
        assert requests_through(proxy.url, "/api/generate") == 1
        # `ollama run`'s own flags go to it, before or after the model's name.
        flagged = cli("run", "--listen", f"127.0.0.1:{proxy.port}", "--verbose", "llama3.2",
                      "--keepalive", "5m", "say hi")
        assert flagged.returncode == 0, flagged.stderr
        assert flagged.stdout == "Hello, world!\n"
        missing = cli("run", "--listen", f"127.0.0.1:{proxy.port}", "nope", "hi")
        assert missing.returncode == 1
        assert "pull model manifest: file does not exist" in missing.stderr


def test_run_starts_a_proxy_in_the_background(
    standin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    args = ["--listen", listen, "--ollama-host", f"127.0.0.1:{free_port()}"]
    # Settings that are not `run`'s reach the background proxy by their variables.
    monkeypatch.setenv("OLLAMA_METRICS_OLLAMA_STOP_GRACE", "3")
    monkeypatch.setenv("OLLAMA_METRICS_SHUTDOWN_GRACE", "2")
    result = cli("run", *args, "llama3.2", stdin="say hi")
    serve_pid = None
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Hello, world!\n"
        started = result.stderr
        assert "started `ollama-metrics serve` in the background (pid " in started
        serve_pid = int(started.split("(pid ", 1)[1].split(",", 1)[0])
        log = tmp_path / ".local" / "state" / "ollama-metrics" / "serve.log"
        assert str(log) in started
        # It keeps running after `run`, with Ollama behind it; a second `run` uses it.
        health = json.loads(get(f"http://{listen}/test")[1])
        assert health["upstream"]["reachable"] is True
        again = cli("run", *args, "llama3.2", "say hi again")
        assert again.returncode == 0
        assert "started" not in again.stderr
        assert "listening on" in log.read_text()
        (child, _), = runs(standin, "serve")
    finally:
        for proc in psutil.process_iter(["cmdline"]):  # the background proxy, however it went
            if proc.pid == serve_pid or listen in (proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(15)
    assert gone(child, timeout=5)
    assert "shutting down (up to 2.0s" in log.read_text()


def test_run_refuses_an_ollama_on_the_listen_port(standin: Path) -> None:
    with fake_process() as ollama:
        result = cli("run", "--listen", f"127.0.0.1:{ollama.port}", "llama3.2", "hi")
    assert result.returncode == 4
    assert "is already answering on" in result.stderr
    assert runs(standin, "run") == []


def test_run_reports_a_background_proxy_that_cannot_start(
    standin: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_OLLAMA_EXIT", "3")
    result = cli("run", "--listen", f"127.0.0.1:{free_port()}", "--ollama-host",
                 f"127.0.0.1:{free_port()}", "llama3.2", "hi")
    assert result.returncode == 1
    assert "`ollama-metrics serve` exited with code 1" in result.stderr
    assert "the stand-in was told to fail" in result.stderr


def test_status(standin: Path, tmp_path: Path) -> None:
    with wrapper_process() as proxy:
        result = cli("status", "--listen", f"127.0.0.1:{proxy.port}")
        assert result.returncode == 0, result.stdout
        out = result.stdout
        assert f"proxy      running at http://127.0.0.1:{proxy.port} (ollama-metrics " in out
        assert "ollama     up at http://127.0.0.1:" in out
        assert "(version 0.33.0)" in out
        assert "models     llama3.2:latest (" in out
        assert "all-minilm:latest (" in out
        assert f"metrics    http://127.0.0.1:{proxy.port}/metrics" in out
        assert f"analytics  sqlite in {tmp_path / 'analytics'}" in out  # ANALYTICS_DIR


def test_status_says_forever_for_a_model_kept_loaded() -> None:
    # keep_alive -1: Ollama's /api/ps then gives an expiry about 292 years ahead.
    with fake_process() as ollama, proxy_process(ollama.url, "--ps-interval", "0") as proxy:
        body = {"model": "llama3.2", "prompt": "hi", "stream": False, "keep_alive": -1}
        request = urllib.request.Request(proxy.url + "/api/generate", json.dumps(body).encode())
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as resp:
            assert resp.status == 200
        result = cli("status", "--listen", f"127.0.0.1:{proxy.port}")
    assert result.returncode == 0, result.stdout
    (kept,) = [line for line in result.stdout.splitlines() if "llama3.2:latest (" in line]
    assert kept.endswith("context 4096, kept loaded forever)"), kept
    (other,) = [line for line in result.stdout.splitlines() if "all-minilm:latest (" in line]
    assert other.endswith(("unloads in 5 minutes)", "unloads in 4 minutes)")), other


def test_status_without_a_proxy() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with fake_process() as ollama:
        result = cli("status", "--listen", f"127.0.0.1:{port}", "--upstream", ollama.url)
        assert result.returncode == 1
        assert f"proxy      not running at http://127.0.0.1:{port}" in result.stdout
        assert f"ollama     up at {ollama.url}" in result.stdout
        beside = cli("status", "--listen", f"127.0.0.1:{ollama.port}")
        assert beside.returncode == 1
        assert "Ollama 0.33.0 itself answers" in beside.stdout
