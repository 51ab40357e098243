"""Who answers at an address: nothing, this proxy, an Ollama, or something else; and what to tell
a user when an Ollama holds the proxy's own address.

Blocking and short (loopback, a few seconds at most): used before anything is served — to explain
a taken port, to decide whether `run` must start a proxy, and by `status` and the tray. It ignores
http_proxy and friends; these are local addresses.
"""

from __future__ import annotations

import enum
import os
import socket
import sys
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from ..config import Config
from . import control


class OllamaInTheWay(Exception):
    """An Ollama already answers where the proxy should listen."""


class Who(enum.Enum):
    NOTHING = "nothing"
    PROXY = "ollama-metrics"
    OLLAMA = "Ollama"
    OTHER = "something else"


@dataclass(frozen=True)
class Answer:
    who: Who
    version: str | None = None
    # The proxy's /test body (its own and its upstream's health).
    health: dict[str, Any] = field(default_factory=dict)

    @property
    def upstream_ok(self) -> bool:
        return bool(self.health.get("upstream", {}).get("reachable"))


def identify(base: URL, timeout: float = 3.0) -> Answer:
    try:
        status, body = control.get_json(base.joinpath("test"), timeout)
    except (OSError, urllib.error.URLError):
        return Answer(Who.NOTHING)
    if isinstance(body, dict) and isinstance(body.get("proxy"), dict) and \
            body["proxy"].get("name") == "ollama-metrics":
        return Answer(Who.PROXY, body["proxy"].get("version"), body)
    try:
        status, body = control.get_json(base.joinpath("api/version"), timeout)
    except (OSError, urllib.error.URLError):
        return Answer(Who.OTHER)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("version"), str):
        return Answer(Who.OLLAMA, body["version"])
    return Answer(Who.OTHER)


def _port_of(ollama_host: str) -> int:
    """The port of an OLLAMA_HOST value, as `ollama serve` reads it (default 11434)."""
    value = ollama_host.strip().strip("\"'").split("://", 1)[-1].split("/", 1)[0]
    _, sep, port = value.rpartition(":")
    return int(port) if sep and port.isdigit() else 11434


def ollama_starting(port: int, proc: Path = Path("/proc")) -> list[int]:
    """The pids of this user's `ollama serve` processes that will listen on `port` (by their
    OLLAMA_HOST): one the user started a moment ago may not listen yet (Ollama takes a couple of
    seconds before it binds). Read from /proc, so Linux only; elsewhere always empty."""
    found = []
    for entry in proc.glob("[0-9]*") if proc.is_dir() else ():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not any(Path(os.fsdecode(arg)).name in ("ollama", "ollama.exe")
                       and argv[i + 1:i + 2] == [b"serve"] for i, arg in enumerate(argv)):
                continue
            environ = dict(item.partition(b"=")[::2] for item in
                           (entry / "environ").read_bytes().split(b"\0") if item)
        except OSError:  # gone, or another user's
            continue
        if _port_of(os.fsdecode(environ.get(b"OLLAMA_HOST", b""))) == port:
            found.append(int(entry.name))
    return found


def port_free(host: str, port: int) -> bool:
    """Whether host:port can be bound now (the answer may change the moment after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if sys.platform != "win32":  # ignore TIME_WAIT leftovers, as the server binding next will
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def explain_ollama_in_the_way(config: Config, version: str | None,
                              platform: str = sys.platform) -> str:
    """What to say when an Ollama (the desktop app, a system service) holds the proxy's port."""
    where = config.listen
    move = {
        "darwin": "quit the Ollama app, then `launchctl setenv OLLAMA_HOST 127.0.0.1:11435` "
                  "before starting it again",
        "win32": "quit Ollama from its tray icon, set the user variable "
                 "OLLAMA_HOST=127.0.0.1:11435, then start it again",
    }.get(platform, "for the system service: `sudo systemctl edit ollama`, add "
                    "[Service] Environment=\"OLLAMA_HOST=127.0.0.1:11435\", then "
                    "`sudo systemctl restart ollama`")
    return (
        f"Ollama{' ' + version if version else ''} is already answering on {where} — usually "
        "the Ollama desktop app or its system service. The proxy needs that address so your "
        "apps keep working unchanged, and will not fight over it. Two ways out:\n"
        f"  1. Move that Ollama to 127.0.0.1:11435 ({move}), then run\n"
        f"     ollama-metrics serve --upstream http://127.0.0.1:11435\n"
        f"     (or stop it for good and let `ollama-metrics serve` start Ollama itself).\n"
        f"  2. Leave it there and put the proxy on another port in front of it:\n"
        f"     ollama-metrics serve --listen 127.0.0.1:11436 --upstream http://{where}\n"
        "     then point apps (and OLLAMA_HOST) at 127.0.0.1:11436."
    )
