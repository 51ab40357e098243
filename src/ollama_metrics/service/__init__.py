"""Running `serve` as a service: systemd on Linux, launchd on macOS, a Windows service.

`spec()` says what to run — this interpreter, `-m ollama_metrics serve` and the options given at
install time (as arguments, or as the variables they were given by), with the ollama program
resolved to a full path and the installer's PATH and OLLAMA_* variables kept (a service manager
starts with a bare environment). `manager()` picks the
platform's manager; each writes its file and drives the platform's tool, raising ServiceError with
the tool's own message when that fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..config import Config
from ..ollama.passthrough import OllamaNotFound, find_ollama

NAME = "ollama-metrics"
DESCRIPTION = "ollama-metrics: Ollama with Prometheus metrics"


class ServiceError(Exception):
    """The platform's service tool refused, or the service's file could not be written."""


@dataclass(frozen=True)
class ServiceSpec:
    serve_args: tuple[str, ...]  # the options of `serve`
    python: str
    environment: dict[str, str]
    log: Path
    stop_timeout: float  # how long the manager waits for a clean stop before killing

    @property
    def argv(self) -> tuple[str, ...]:
        return (self.python, "-m", "ollama_metrics", "serve", *self.serve_args)


def spec(config: Config, serve_args: Sequence[str], environ: Mapping[str, str], log: Path,
         settings: Mapping[str, str] | None = None, python: str = sys.executable) -> ServiceSpec:
    """`settings`: the variables that set `serve` options, passed on as they are."""
    args = list(serve_args)
    if config.supervise and "--ollama-bin" not in args:
        with contextlib.suppress(OllamaNotFound):  # if not, `serve` says so in its log
            args += ["--ollama-bin", find_ollama(config.ollama_bin, environ)]
    keep = {k: v for k, v in environ.items()
            if k == "PATH" or (k.startswith("OLLAMA_") and k != "OLLAMA_HOST"
                               and not k.startswith("OLLAMA_METRICS_"))}
    keep.update(settings or {})
    grace = config.shutdown_grace + (config.ollama_stop_grace if config.supervise else 0)
    return ServiceSpec(tuple(args), python, keep, log, grace + 10)


class Manager(Protocol):
    def install(self, spec: ServiceSpec) -> list[str]: ...

    def uninstall(self) -> list[str]: ...

    def start(self) -> list[str]: ...

    def stop(self) -> list[str]: ...

    def status(self) -> tuple[bool, str]: ...


def tool(argv: Sequence[str], environ: Mapping[str, str], check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    """Run a service tool (systemctl, launchctl) found on `environ`'s PATH, output captured."""
    found = shutil.which(argv[0], path=environ.get("PATH"))
    if found is None:
        raise ServiceError(f"`{argv[0]}` was not found on PATH")
    result = subprocess.run([found, *argv[1:]], capture_output=True, text=True,
                            env=dict(environ), check=False)
    if check and result.returncode != 0:
        raise ServiceError(f"`{' '.join(argv)}` failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def manager(user: bool, environ: Mapping[str, str], platform: str = sys.platform) -> Manager:
    if platform == "win32":
        from .windows import WindowsService
        return WindowsService()
    if platform == "darwin":
        if not user:
            raise ServiceError("on macOS ollama-metrics installs a LaunchAgent for the current "
                               "user only (it needs the user's session, as Ollama's app does)")
        from .launchd import Launchd
        return Launchd(environ)
    from .systemd import Systemd
    return Systemd(user, environ)


def write_private(path: Path, data: bytes) -> None:
    """Write a service file readable by its owner only: its environment may hold secrets
    (ANALYTICS_TOKEN, a database password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
