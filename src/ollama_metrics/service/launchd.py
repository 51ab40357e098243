"""launchd: a LaunchAgent running `serve` in the user's session, restarted if it crashes."""

from __future__ import annotations

import os
import plistlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import NAME, ServiceError, ServiceSpec, tool, write_private

LABEL = f"com.github.{NAME}"


def plist(spec: ServiceSpec) -> dict[str, Any]:
    return {
        "Label": LABEL,
        "ProgramArguments": list(spec.argv),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1", **spec.environment},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
        "ExitTimeOut": round(spec.stop_timeout),
        "StandardOutPath": str(spec.log),
        "StandardErrorPath": str(spec.log),
    }


def plist_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME", "~")).expanduser() / "Library" / "LaunchAgents" / \
        f"{LABEL}.plist"


class Launchd:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.path = plist_path(environ)
        self.domain = f"gui/{os.getuid()}" if hasattr(os, "getuid") else "gui/0"

    def _ctl(self, *args: str, check: bool = True) -> str:
        result = tool(["launchctl", *args], self.environ, check=check)
        return (result.stdout + result.stderr).strip()

    def install(self, spec: ServiceSpec) -> list[str]:
        try:
            spec.log.parent.mkdir(parents=True, exist_ok=True)
            write_private(self.path, plistlib.dumps(plist(spec)))
        except OSError as exc:
            raise ServiceError(f"cannot write {self.path}: {exc.strerror}") from None
        return [f"wrote {self.path}; it starts at login",
                "start it now with `ollama-metrics service start`; its log: " + str(spec.log)]

    def uninstall(self) -> list[str]:
        self._ctl("bootout", f"{self.domain}/{LABEL}", check=False)
        try:
            self.path.unlink()
        except FileNotFoundError:
            return [f"{self.path} was not there"]
        return [f"stopped {LABEL}", f"removed {self.path}"]

    def start(self) -> list[str]:
        if not self.path.exists():
            raise ServiceError(f"{self.path} is not there; run `ollama-metrics service install`")
        loaded = tool(["launchctl", "print", f"{self.domain}/{LABEL}"], self.environ,
                      check=False).returncode == 0
        if loaded:
            self._ctl("kickstart", f"{self.domain}/{LABEL}")
        else:
            self._ctl("bootstrap", self.domain, str(self.path))
        return [f"started {LABEL}"]

    def stop(self) -> list[str]:
        self._ctl("bootout", f"{self.domain}/{LABEL}")
        return [f"stopped {LABEL} (it starts again at the next login)"]

    def status(self) -> tuple[bool, str]:
        result = tool(["launchctl", "print", f"{self.domain}/{LABEL}"], self.environ,
                      check=False)
        if result.returncode != 0:
            return False, f"{LABEL} is not loaded"
        state = [line.strip() for line in result.stdout.splitlines()
                 if line.strip().startswith(("state =", "pid =", "last exit code ="))]
        return "state = running" in state, "\n".join([LABEL, *state])
