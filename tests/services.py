"""Real external services for tests, started once per session and thrown away afterwards.

`postgres_dsn`: a PostgreSQL server of Debian's `postgresql` package, in a temporary directory,
on 127.0.0.1 and a free port, with its socket in that directory (never the system's). The
server refuses to run as root, so as root its files belong to `postgres` and its programs run
as that user. Trust authentication and fsync off: it lives for one test session.

`require(tool, package)`: the path of a program a test needs. When it is not installed, the test
is skipped with the reason and the package to install -- except where `CI` is set (CI systems
set `CI=true`, and so does .ci/run), where it fails: the full run in CI installs every service
and must skip none of them.

`phoenix`: Arize Phoenix (PyPI `arize-phoenix`, a real third-party OTLP receiver), installed in its
own virtualenv PHOENIX_VENV so that its pins stay apart from ours, started once per session on free
loopback ports with its working directory and SQLite database in a temporary directory and its
telemetry off. It takes OTLP/HTTP traces on /v1/traces and answers what it stored on its REST API
(GET /v1/projects/{project}/spans). It takes about 20 s to start.

`victoria_metrics`: VictoriaMetrics (Debian 13's `victoria-metrics`, a real third-party OTLP metrics
receiver; Debian 12's Prometheus and VictoriaMetrics have none), installed by .ci/victoria-metrics
as VICTORIA_METRICS, started once per session on a free loopback port with its data in a temporary
directory. It takes OTLP/HTTP metrics on /opentelemetry/v1/metrics, names them as Prometheus does
(-opentelemetry.usePrometheusNaming: unit suffixes, `_` for `.`) and answers Prometheus's query
API (/api/v1/query). Queries see a sample as soon as it is stored (no latency offset, no cache).

`loki`: a LokiReceiver (tests/loki_receiver.py) on a loopback port, one per test, that checks
pushes against Loki's documented push format and keeps what it stored.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from helpers import Process
from loki_receiver import LokiReceiver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def missing(what: str, package: str, install: str = "apt-get install -y") -> NoReturn:
    """Skip the test for want of `what`, naming the package to install; fail under CI."""
    reason = f"{what} is not installed: {install} {package}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, where nothing may be skipped)", pytrace=False)
    pytest.skip(reason)


def require(tool: str, package: str | None = None) -> str:
    """The path of the program `tool`, or a skip (a failure under CI) naming its package."""
    return shutil.which(tool) or missing(tool, package or tool)


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    return Path(require("initdb", "postgresql")).parent


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """The DSN of an empty database `test` on a throwaway server (user `postgres`, trust)."""
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="ollama-metrics-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, cwd=root)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-locale", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -c port={port} "
                   f"-c unix_socket_directories={root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        run(str(bindir / "pg_ctl"), "start", "-w", "-t", "30", "-D", str(data), "-l", str(log),
            "-o", options)
        try:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                "test")
            yield f"postgresql://postgres@127.0.0.1:{port}/test"
        finally:
            run(str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate")
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text(errors="replace") if log.exists() else ""
        raise AssertionError(f"PostgreSQL failed: {exc.cmd}\n{exc.stderr.decode()}\n"
                             f"{server_log}") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def new_postgres_schema(dsn: str) -> str:
    """A DSN for the same database whose tables go into a new, empty schema of their own."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    name = f"test_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return make_conninfo(dsn, options=f"-c search_path={name}")


PHOENIX_VENV = Path("/opt/phoenix-venv")


@dataclass(frozen=True)
class Phoenix:
    url: str  # its HTTP port: the UI, the REST API and OTLP/HTTP on /v1/traces

    @property
    def traces(self) -> str:
        return self.url + "/v1/traces"


@pytest.fixture(scope="session")
def phoenix() -> Iterator[Phoenix]:
    program = PHOENIX_VENV / "bin" / "phoenix"
    if not program.exists():
        missing("Arize Phoenix", "arize-phoenix",
                f"python -m venv {PHOENIX_VENV} && {PHOENIX_VENV}/bin/pip install")
    root = Path(tempfile.mkdtemp(prefix="ollama-metrics-phoenix-"))
    port = _free_port()
    env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(_free_port()), "PHOENIX_WORKING_DIR": str(root),
           "PHOENIX_SQL_DATABASE_URL": f"sqlite:///{root}/phoenix.db",
           "PHOENIX_TELEMETRY_ENABLED": "false"}
    for name in [k for k in env if k.startswith("OTEL_") or k == "PYTHONPATH"]:
        del env[name]  # its own tracing stays off; our source tree is not its business
    log = root / "phoenix.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(program), "serve"], env=env, cwd=root, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _answers(url + "/healthz"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("Phoenix did not start:\n"
                                     + log.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        yield Phoenix(url)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


VICTORIA_METRICS = Path("/opt/victoria-metrics/victoria-metrics")


@dataclass(frozen=True)
class VictoriaMetrics:
    url: str  # its HTTP port: OTLP/HTTP metrics in, Prometheus's query API out

    @property
    def otlp_metrics(self) -> str:
        return self.url + "/opentelemetry/v1/metrics"


@pytest.fixture(scope="session")
def victoria_metrics() -> Iterator[VictoriaMetrics]:
    if not VICTORIA_METRICS.exists():
        missing("VictoriaMetrics with an OTLP receiver", "(Debian 13's victoria-metrics, as root)",
                ".ci/victoria-metrics")
    root = Path(tempfile.mkdtemp(prefix="ollama-metrics-vm-"))
    port = _free_port()
    server = Process([str(VICTORIA_METRICS), f"-storageDataPath={root}",
                      f"-httpListenAddr=127.0.0.1:{port}", "-opentelemetry.usePrometheusNaming",
                      "-search.latencyOffset=0s", "-search.disableCache"])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not _answers(url + "/health"):
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"VictoriaMetrics did not start:\n{server.output[-3000:]}")
            time.sleep(0.1)
        yield VictoriaMetrics(url)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@pytest.fixture
async def loki() -> AsyncIterator[LokiReceiver]:
    """A started Loki push receiver; its knobs can be set by the test."""
    receiver = LokiReceiver()
    await receiver.start()
    yield receiver
    await receiver.close()

