"""systemd: a unit running `serve`, for the user (~/.config/systemd/user) or the system.

KillMode=mixed sends SIGTERM to the proxy alone, which drains its requests and then stops its
`ollama serve` politely; whatever is left when the proxy has exited is killed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from . import DESCRIPTION, NAME, ServiceError, ServiceSpec, tool, write_private

UNIT = f"{NAME}.service"
_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def quote(arg: str) -> str:
    """One ExecStart/Environment word: specifiers (%) and variables ($) kept literal."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(spec: ServiceSpec, user: bool) -> str:
    env = "".join(f"Environment={quote(f'{k}={v}')}\n"
                  for k, v in sorted({"PYTHONUNBUFFERED": "1", **spec.environment}.items()))
    return (
        "[Unit]\n"
        f"Description={DESCRIPTION}\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=exec\n"
        f"ExecStart={' '.join(quote(a) for a in spec.argv)}\n"
        f"{env}"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "KillMode=mixed\n"
        f"TimeoutStopSec={round(spec.stop_timeout)}\n"
        "\n"
        "[Install]\n"
        f"WantedBy={'default.target' if user else 'multi-user.target'}\n"
    )


def unit_path(user: bool, environ: Mapping[str, str]) -> Path:
    if not user:
        return Path("/etc/systemd/system") / UNIT
    config = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(config).expanduser() / "systemd" / "user" / UNIT


class Systemd:
    def __init__(self, user: bool, environ: Mapping[str, str]) -> None:
        self.user = user
        self.environ = environ
        self.path = unit_path(user, environ)

    def _ctl(self, *args: str, check: bool = True) -> str:
        scope = ["--user"] if self.user else []
        result = tool(["systemctl", *scope, *args], self.environ, check=check)
        return (result.stdout + result.stderr).strip()

    def install(self, spec: ServiceSpec) -> list[str]:
        # A system service has no HOME of its own, and Ollama keeps its models under it.
        if not self.user and "HOME" in self.environ:
            spec = ServiceSpec(spec.serve_args, spec.python,
                               {**spec.environment, "HOME": self.environ["HOME"]}, spec.log,
                               spec.stop_timeout)
        try:
            write_private(self.path, unit_text(spec, self.user).encode())
        except OSError as exc:
            raise ServiceError(f"cannot write {self.path}: {exc.strerror}"
                               f"{' (a system unit needs root)' if not self.user else ''}"
                               ) from None
        self._ctl("daemon-reload")
        self._ctl("enable", UNIT)
        scope = " --user" if self.user else ""
        return [f"wrote {self.path}", f"enabled {UNIT}; it starts at "
                f"{'login' if self.user else 'boot'}",
                f"start it now with `ollama-metrics service start{scope}`; its log: "
                f"journalctl{scope} -u {UNIT}"]

    def uninstall(self) -> list[str]:
        self._ctl("disable", "--now", UNIT, check=False)
        try:
            self.path.unlink()
        except FileNotFoundError:
            return [f"{self.path} was not there"]
        self._ctl("daemon-reload")
        return [f"stopped and disabled {UNIT}", f"removed {self.path}"]

    def start(self) -> list[str]:
        self._ctl("start", UNIT)
        return [f"started {UNIT}"]

    def stop(self) -> list[str]:
        self._ctl("stop", UNIT)
        return [f"stopped {UNIT}"]

    def status(self) -> tuple[bool, str]:
        scope = ["--user"] if self.user else []
        result = tool(["systemctl", *scope, "status", "--no-pager", UNIT], self.environ,
                      check=False)
        return result.returncode == 0, (result.stdout + result.stderr).strip()
