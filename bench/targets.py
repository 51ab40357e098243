"""The things the benchmark talks to, and how each is started.

Contract: ``start_upstream``, ``start_nginx``, ``start_bare`` and ``start_proxy`` each spawn one
process group via
``Children`` and return only once it accepts connections (or raise ``StartupError`` with its log
tail). ``Target.port`` is where the benchmark clients connect; every target ends at the same fake
upstream, so "direct" is the no-proxy baseline.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from processes import Child, Children, free_port, wait_for_listening_line, wait_for_port

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

DIRECT = "direct"
NGINX = "nginx"
PROXY = "ollama-metrics"
OTEL = "ollama-metrics+otel"  # the same, with --otel exporting to a local collector (otlp_sink.py)
# The floors under ollama-metrics' own code (bare.py): a framework-free uvloop proxy, and the
# aiohttp server and client calls ollama-metrics makes, with nothing else.
BARE_ASYNCIO = "bare-asyncio"
BARE_AIOHTTP = "bare-aiohttp"
ALL_TARGETS = (DIRECT, NGINX, BARE_ASYNCIO, BARE_AIOHTTP, PROXY, OTEL)


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    child: Child

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_upstream(children: Children) -> Target:
    argv = [sys.executable, str(BENCH_DIR / "upstream.py"), "--port", "0"]
    child = children.spawn("upstream", argv)
    port = wait_for_listening_line(child, timeout_s=15)
    return Target(DIRECT, port, child)


def nginx_config(work_dir: Path, listen_port: int, upstream_port: int, as_root: bool,
                 workers: int = 1) -> str:
    # As root, nginx drops workers to "nobody", who cannot enter the 0700 temp dir. With buffering
    # off this workload never touches it, but anything spilling to a temp file would fail.
    user_line = "user root;\n" if as_root else ""
    return f"""{user_line}daemon off;
master_process on;
worker_processes {workers};
pid {work_dir}/nginx.pid;
error_log {work_dir}/nginx-error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {work_dir}/client_body;
    proxy_temp_path {work_dir}/proxy_temp;
    fastcgi_temp_path {work_dir}/fastcgi_temp;
    uwsgi_temp_path {work_dir}/uwsgi_temp;
    scgi_temp_path {work_dir}/scgi_temp;
    # Keep wrk's connections open for the whole run, as the Python servers do.
    keepalive_requests 1000000;

    upstream ollama {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


def start_nginx(children: Children, nginx: str, work_dir: Path, upstream_port: int,
                workers: int = 1, name: str = NGINX) -> Target:
    port = free_port()
    nginx_dir = work_dir / name
    nginx_dir.mkdir()
    conf = nginx_dir / "nginx.conf"
    conf.write_text(nginx_config(nginx_dir, port, upstream_port, as_root=os.geteuid() == 0,
                                 workers=workers))
    error_log = nginx_dir / "nginx-error.log"
    argv = [nginx, "-p", str(nginx_dir), "-c", str(conf), "-e", str(error_log)]
    child = children.spawn(name, argv)
    wait_for_port(child, port, timeout_s=10)
    return Target(name, port, child)


def start_bare(children: Children, name: str, upstream_port: int) -> Target:
    """One of bare.py's proxies: BARE_ASYNCIO or BARE_AIOHTTP."""
    kind = "asyncio" if name == BARE_ASYNCIO else "aiohttp"
    argv = [sys.executable, str(BENCH_DIR / "bare.py"), "--kind", kind,
            "--upstream-port", str(upstream_port)]
    child = children.spawn(name, argv)
    return Target(name, wait_for_listening_line(child, timeout_s=15), child)


def start_sink(children: Children) -> int:
    """The local OTLP collector of the OTEL target; its port."""
    argv = [sys.executable, str(BENCH_DIR / "otlp_sink.py")]
    return wait_for_listening_line(children.spawn("otlp-sink", argv), timeout_s=15)


def start_proxy(children: Children, work_dir: Path, upstream_port: int,
                extra_args: tuple[str, ...] = (), name: str = PROXY,
                otel_sink: int | None = None) -> Target:
    """ollama-metrics; with `otel_sink`, the OTEL target: --otel, exporting to that port."""
    if otel_sink is not None and name == PROXY:
        name = OTEL
    port = free_port()
    env = dict(os.environ)
    src = str(REPO_DIR / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    if otel_sink is not None:
        extra_args = (*extra_args, "--otel")
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{otel_sink}"
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    proxy_dir = work_dir / ("proxy" if name == PROXY else name)
    proxy_dir.mkdir()
    argv = [
        sys.executable, "-m", "ollama_metrics", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"http://127.0.0.1:{upstream_port}",
        *extra_args,
    ]
    # cwd in the temp dir so anything the proxy writes relative to it is cleaned up with it.
    child = children.spawn(name, argv, env=env, cwd=proxy_dir)
    wait_for_port(child, port, timeout_s=20)
    return Target(name, port, child)
