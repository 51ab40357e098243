"""Child processes owned by the benchmark, and how to wait for them.

Contract: every process started through ``Children.spawn`` runs in its own session (so its
process group id is its pid and a terminal Ctrl-C reaches only the orchestrator), logs
stdout+stderr to a file, and is killed as a whole process group by ``Children.stop_all``: SIGTERM,
then SIGKILL after a grace period. ``stop_all`` is idempotent and never raises, so it belongs in a
``finally``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class StartupError(RuntimeError):
    """A child did not come up; the message says which and includes its log tail."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def exited(self) -> int | None:
        return self.process.poll()


@dataclass
class Children:
    log_dir: Path
    _children: list[Child] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self._children.append(child)
        return child

    def stop_all(self, grace_s: float = 3.0) -> None:
        for child in reversed(self._children):
            _signal_group(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self._children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            # Kill what is left of the group (nginx workers, a proxy's own children) even when the
            # leader has already gone.
            _signal_group(child.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=1.0)
        self._children.clear()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(child: Child, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.exited() is not None:
            raise StartupError(
                f"{child.name} exited with code {child.exited()} before listening on {port}:\n"
                f"{child.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StartupError(
        f"{child.name} did not accept connections on {port} within {timeout_s:.0f} s:\n"
        f"{child.log_tail()}"
    )


def wait_for_listening_line(child: Child, timeout_s: float) -> int:
    """Return the port from the child's ``LISTENING <port>`` line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in child.log_tail(5).splitlines():
            if line.startswith("LISTENING "):
                return int(line.split()[1])
        if child.exited() is not None:
            raise StartupError(
                f"{child.name} exited with code {child.exited()}:\n{child.log_tail()}"
            )
        time.sleep(0.05)
    raise StartupError(
        f"{child.name} printed no LISTENING line within {timeout_s:.0f} s:\n{child.log_tail()}"
    )
