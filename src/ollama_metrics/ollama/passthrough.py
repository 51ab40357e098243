"""The real `ollama` program, run with OLLAMA_HOST pointing at the proxy.

Contract:
- `find_ollama` resolves the program by path or on the given PATH, else OllamaNotFound with what
  to do. `ollama_environ` is the caller's environment with OLLAMA_HOST replaced; every other
  OLLAMA_* variable passes through.
- `run_ollama` runs it attached to the terminal and returns its exit status (a child killed by a
  signal gives 128 + the signal number, as shells report it). While it runs, Ctrl-C is left to
  it: `ollama run` uses it to cancel a generation.
- `ensure_proxy` makes sure a proxy answers at the configured listen address: if nothing does, it
  starts `ollama-metrics serve` in the background (detached, output to a log file) and waits until
  the proxy and its Ollama answer. An Ollama or another program there is an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from yarl import URL

from ..config import Config, connect_url
from . import probe


class OllamaNotFound(Exception):
    """The ollama program is not where it was looked for."""


class ProxyNotStarted(Exception):
    """A proxy could not be had at the listen address."""


def find_ollama(name: str, environ: Mapping[str, str]) -> str:
    if os.sep in name or (os.altsep and os.altsep in name):
        found = shutil.which(name)
    else:
        found = shutil.which(name, path=environ.get("PATH", os.defpath))
    if found is None:
        raise OllamaNotFound(
            f"`{name}` was not found{' on PATH' if os.sep not in name else ''}. Install Ollama "
            "(https://ollama.com/download), or name the program with --ollama-bin PATH "
            "(OLLAMA_METRICS_OLLAMA_BIN)")
    return os.path.abspath(found)


def ollama_environ(environ: Mapping[str, str], host: str) -> dict[str, str]:
    return {**environ, "OLLAMA_HOST": host}


def proxy_url(config: Config) -> URL:
    """How a client on this machine reaches the proxy."""
    return connect_url(config.listen_host, config.listen_port)


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def _ctrl_c_left_to_child() -> Iterator[None]:
    # A no-op handler rather than SIG_IGN: handlers reset on exec, an ignored signal would not.
    def ignore(signum: int, frame: FrameType | None) -> None:
        pass

    previous = signal.signal(signal.SIGINT, ignore)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_ollama(binary: str, args: Sequence[str], config: Config,
               environ: Mapping[str, str]) -> int:
    env = ollama_environ(environ, str(proxy_url(config)))
    with _ctrl_c_left_to_child():
        return exit_status(subprocess.call([binary, *args], env=env))


@dataclass(frozen=True)
class Started:
    pid: int
    log: Path


def _detached() -> dict[str, Any]:
    if sys.platform == "win32":
        return {"creationflags": subprocess.DETACHED_PROCESS
                | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def ensure_proxy(config: Config, serve_args: Sequence[str], log: Path,
                 environ: Mapping[str, str], python: str = sys.executable) -> Started | None:
    """Make sure a proxy answers at the listen address; None if one already did."""
    url = proxy_url(config)
    answer = probe.identify(url)
    if answer.who is probe.Who.PROXY:
        return None
    if answer.who is probe.Who.OLLAMA:
        raise probe.OllamaInTheWay(probe.explain_ollama_in_the_way(config, answer.version))
    if answer.who is probe.Who.OTHER:
        raise ProxyNotStarted(f"{config.listen} is taken by a program that is neither Ollama "
                              "nor ollama-metrics; choose another with --listen HOST:PORT")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [python, "-m", "ollama_metrics", "serve", *serve_args], stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, env=dict(environ), **_detached())
    deadline = time.monotonic() + config.ollama_start_timeout + 15
    while True:
        answer = probe.identify(url, timeout=1.0)
        if answer.who is probe.Who.PROXY and (answer.upstream_ok or not config.supervise):
            return Started(proc.pid, log)
        code = proc.poll()
        if code is not None:
            raise ProxyNotStarted(f"`ollama-metrics serve` exited with code {code}: "
                                  f"{_last_line(log)} (full log: {log})")
        if time.monotonic() > deadline:
            raise ProxyNotStarted(f"`ollama-metrics serve` (pid {proc.pid}) is not answering at "
                                  f"{url} yet; see {log}")
        time.sleep(0.1)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
