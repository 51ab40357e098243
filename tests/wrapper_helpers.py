"""Helpers for the wrapper's tests: the stand-in `ollama` first on PATH, free ports, and
`ollama-metrics serve` starting (and restarting) that stand-in as a real child process."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import TESTS, Process

BIN = TESTS / "bin"
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def standin_path(rest: str | None = None) -> str:
    """PATH with the stand-ins first, then this interpreter's directory (their `python3`)."""
    parts = [str(BIN), str(Path(sys.executable).parent)]
    return os.pathsep.join([*parts, rest if rest is not None else os.environ.get("PATH", "")])


def use_standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Put the stand-in `ollama` first on PATH (for this test and the processes it starts);
    returns the file each of its runs logs to. Logs and analytics stay in `tmp_path`."""
    log = tmp_path / "ollama-runs.log"
    monkeypatch.setenv("PATH", standin_path())
    monkeypatch.setenv("FAKE_OLLAMA_LOG", str(log))
    monkeypatch.setenv("HOME", str(tmp_path))  # background logs land in the test's directory
    monkeypatch.setenv("ANALYTICS_DIR", str(tmp_path / "analytics"))
    return log


def runs(log: Path, command: str) -> list[tuple[int, dict[str, str]]]:
    """(pid, OLLAMA_* variables) of each run of the stand-in with this command."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text().splitlines():
        name, pid, env = line.split(" ", 2)
        if name == command:
            found.append((int(pid), json.loads(env)))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with _opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(url: str, name: str) -> float | None:
    """A sample's value from the proxy's /metrics text (name with labels, as exposed)."""
    _, body = get(url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process `pid` has ended (or is a zombie nobody reaps) within `timeout`."""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    return True


def serve_args(ollama_port: int, *args: str) -> list[str]:
    """`serve` with the child on `ollama_port` and everything time-scaled for tests."""
    return ["--listen", "127.0.0.1:0", "--ollama-host", f"127.0.0.1:{ollama_port}",
            "--restart-backoff", "0.3", "--restart-backoff-max", "2", "--ollama-stop-grace", "3",
            "--shutdown-grace", "2", "--ps-interval", "0.2", *args]


@contextmanager
def wrapper_process(*args: str) -> Iterator[Process]:
    """`python -m ollama_metrics serve` starting the stand-in Ollama; `.child` is its pid."""
    p = Process([sys.executable, "-m", "ollama_metrics", "serve", *serve_args(free_port(), *args)])
    try:
        p.port = int(p.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        yield p
    finally:
        p.stop()


def child_pid(p: Process, after: int = 0) -> int:
    """The pid of the newest `ollama serve` the proxy started (other than `after`)."""
    deadline = time.monotonic() + 10
    while True:
        pids = [int(m) for m in _started(p.output)]
        if pids and pids[-1] != after:
            return pids[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no new ollama serve started: {p.output}")
        time.sleep(0.02)


def _started(output: str) -> list[str]:
    return re.findall(r"started \S+ serve \(pid (\d+)\)", output)
