"""Run wrk with ``post_generate.lua`` and read its result.

Contract: ``run_wrk`` runs one wrk load (``--latency``, fixed POST body from the Lua script)
against a URL and returns a ``WrkResult`` parsed from the script's ``WRK_JSON`` line. It raises
``WrkError`` if wrk fails or prints no result. Error counts are reported, not raised: a bad target
is still measured.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA_SCRIPT = Path(__file__).resolve().parent / "post_generate.lua"
RESULT_PREFIX = "WRK_JSON "
SOCKET_ERROR_KEYS = ("connect_errors", "read_errors", "write_errors", "timeouts")


class WrkError(RuntimeError):
    """wrk itself failed to run or to report."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    status_errors: int  # responses with status >= 400
    socket_errors: int  # connect + read + write + timeout

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def wrk_version(wrk: str) -> str:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "unknown"


def run_wrk(wrk: str, url: str, *, connections: int, threads: int, duration_s: float) -> WrkResult:
    argv = [
        wrk, "--latency",
        "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s",
        "-s", str(LUA_SCRIPT), url,
    ]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish: {' '.join(argv)}") from exc
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX):])
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                status_errors=int(data["status_errors"]),
                socket_errors=sum(int(data[key]) for key in SOCKET_ERROR_KEYS),
            )
    raise WrkError(
        f"wrk exited {done.returncode} without a result line:\n{done.stdout}\n{done.stderr}"
    )
