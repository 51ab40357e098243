"""Side-by-side benchmark: fake Ollama direct vs behind nginx vs behind ollama-metrics.

Contract: ``python bench/proxy_bench.py [--duration S] [--repeats N] [--quick] [--json]`` starts
the fake upstream, nginx (1 worker) and ``python -m ollama_metrics serve`` as separate process
groups, measures each with wrk (latency at 1 connection, throughput at 32) and the TTFT client,
interleaving targets within every round, and prints the medians across rounds as a table with
pass/fail lines. Exit status: 0 when the report was produced (missed targets included), 1 when
something failed to run, 2 when a required tool is missing, 130 on Ctrl-C/SIGTERM. Every child
process is killed on the way out, whatever the exit.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from processes import Children, StartupError
from report import (
    Results,
    render_checks,
    render_errors,
    render_log_problems,
    render_table,
    to_json,
)
from targets import (
    ALL_TARGETS,
    BARE_AIOHTTP,
    BARE_ASYNCIO,
    DIRECT,
    NGINX,
    NGINX_CANDIDATES,
    OTEL,
    PROXY,
    Target,
    start_bare,
    start_nginx,
    start_proxy,
    start_sink,
    start_upstream,
)
from wrk import WrkError, WrkResult, run_wrk, wrk_version

GENERATE_PATH = "/api/generate"
TTFT_FIRST_DELAY_MS = 20
TTFT_CHUNK_DELAY_MS = 5
TTFT_CHUNKS = 8
TTFT_PATH = (
    f"{GENERATE_PATH}?first_delay_ms={TTFT_FIRST_DELAY_MS}"
    f"&chunk_delay_ms={TTFT_CHUNK_DELAY_MS}&chunks={TTFT_CHUNKS}"
)
STREAMS_CHUNKS = 63  # and the final line: 64 frames, as in failure mode 19
STREAMS_CHUNK_DELAY_MS = 20
STREAMS_PATH = f"{GENERATE_PATH}?chunk_delay_ms={STREAMS_CHUNK_DELAY_MS}&chunks={STREAMS_CHUNKS}"
DROPPED = re.compile(r'^ollama_otel_spans_dropped_total\{reason="(\w+)"\} (\S+)$', re.M)
INSTALL_HINT = "{tool} not found: install the Debian package `{tool}` (apt-get install {tool})"


@dataclass(frozen=True)
class Settings:
    duration_s: float
    repeats: int
    ttft_samples: int
    streams: int
    targets: tuple[str, ...]
    emit_json: bool
    proxy_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tools:
    wrk: str
    nginx: str


class BenchError(RuntimeError):
    """Something the benchmark needs broke while running (a target died, a tool failed)."""


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Benchmark ollama-metrics against a direct connection and nginx."
    )
    add = parser.add_argument
    add("--duration", type=float, default=5.0, help="seconds per wrk run (default: 5)")
    add("--repeats", type=int, default=3, help="interleaved rounds, medians reported (default: 3)")
    add("--ttft-samples", type=int, default=200, help="requests per TTFT run (default: 200)")
    add("--streams", type=int, default=200,
        help="concurrent streamed generates per streams run (default: 200)")
    add("--quick", action="store_true",
        help="smoke mode: 1 round, 1 s wrk runs, 20 TTFT samples, 50 streams")
    add("--json", action="store_true", help="also print the results as one JSON object")
    add("--proxy-args", default="", metavar="ARGS",
        help="extra options for `ollama-metrics serve`, e.g. '--analytics-backend none' to "
             "measure metrics alone (default: none; analytics then records to SQLite)")
    add(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}; direct always runs",
    )
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.targets.split(",") if name.strip()}
    unknown = wanted - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if args.quick:
        args.duration, args.repeats, args.ttft_samples, args.streams = 1.0, 1, 20, 50
    if args.duration <= 0 or min(args.repeats, args.ttft_samples, args.streams) < 1:
        parser.error("--duration, --repeats, --ttft-samples and --streams must be positive")
    targets = tuple(t for t in ALL_TARGETS if t in wanted or t == ALL_TARGETS[0])
    return Settings(args.duration, args.repeats, args.ttft_samples, args.streams, targets,
                    args.json,
                    tuple(shlex.split(args.proxy_args)))


def find_tools(settings: Settings) -> Tools | str:
    """Return the tools, or a message naming what to install."""
    missing = []
    wrk = shutil.which("wrk") or ""
    if not wrk:
        missing.append(INSTALL_HINT.format(tool="wrk"))
    # /usr/sbin is often not on a non-root PATH.
    on_disk = (path for path in NGINX_CANDIDATES if os.access(path, os.X_OK))
    nginx = shutil.which("nginx") or next(on_disk, "")
    if not nginx and NGINX in settings.targets:
        missing.append(INSTALL_HINT.format(tool="nginx"))
    for module in ("aiohttp", "uvloop", "psutil"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"Python package {module} not found: pip install {module}")
    return "\n".join(missing) if missing else Tools(wrk, nginx)


def machine_info(tools: Tools) -> dict[str, Any]:
    nginx_version = "not used"
    if tools.nginx:
        done = subprocess.run(
            [tools.nginx, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
        nginx_version = (done.stderr or done.stdout).strip().removeprefix("nginx version: ")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wrk": wrk_version(tools.wrk),
        "nginx": nginx_version,
        "aiohttp": importlib.metadata.version("aiohttp"),
        "uvloop": importlib.metadata.version("uvloop"),
    }


def header(settings: Settings, machine: dict[str, Any]) -> str:
    m, s = machine, settings
    return "\n".join([
        "ollama-metrics proxy benchmark",
        f"machine: nproc {m['nproc']}, load avg {m['loadavg_at_start']}, {m['platform']}",
        f"         Python {m['python']}, {m['wrk']}, {m['nginx']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}",
        f"rounds:  {s.repeats}, targets interleaved within each; per target and round:",
        f"         wrk {s.duration_s:g} s @1 conn/1 thread and {s.duration_s:g} s "
        f"@32 conns/2 threads, POST {GENERATE_PATH} stream:false;",
        f"         {s.ttft_samples} sequential streamed generates for TTFT (first chunk after "
        f"{TTFT_FIRST_DELAY_MS} ms, {TTFT_CHUNKS} chunks {TTFT_CHUNK_DELAY_MS} ms apart;",
        "         TTFT = request sent -> first NDJSON line received);",
        f"         {s.streams} concurrent streamed generates of {STREAMS_CHUNKS + 1} frames "
        f"{STREAMS_CHUNK_DELAY_MS} ms apart (stretch = gap at the",
        "         client minus gap at the upstream; hop CPU = the proxy's CPU time per frame)",
        "targets: direct = the fake Ollama (aiohttp+uvloop, 1 process);",
        "         nginx = worker_processes 1: the Python proxy is a single process too, so one",
        "         nginx worker is the fair comparison;",
        "         bare-asyncio, bare-aiohttp = the floors under ollama-metrics' own code "
        "(bench/bare.py):",
        "         a framework-free uvloop proxy, and the aiohttp server and client calls alone;",
        "         ollama-metrics = python -m ollama_metrics serve "
        + (" ".join(s.proxy_args) if s.proxy_args else "(default options: metrics, and "
           "analytics recorded to SQLite)"),
        "         ollama-metrics+otel = the same with --otel, exporting OTLP/HTTP to a local",
        "         collector (bench/otlp_sink.py); `otel vs off` is its cost over ollama-metrics",
        "Values are medians across rounds. wrk, the proxies and the upstream share the same CPUs.",
    ])


def ensure_alive(targets: list[Target]) -> None:
    for target in targets:
        code = target.child.exited()
        if code is not None:
            raise BenchError(
                f"{target.child.name} exited with code {code} during the benchmark:\n"
                f"{target.child.log_tail()}"
            )


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_rounds(settings: Settings, tools: Tools, targets: list[Target]) -> Results:
    # Imported here so that a missing uvloop is reported by find_tools (exit 2), not a traceback.
    import psutil
    import uvloop

    from streams import measure_streams
    from ttft import measure_ttft

    results = Results(tuple(t.name for t in targets))
    progress("warming up (not reported)")
    for target in targets:
        wrk_load(tools, target, 32, 2, min(1.0, settings.duration_s))
    ensure_alive(targets)

    def latency(target: Target) -> str:
        r = wrk_load(tools, target, 1, 1, settings.duration_s)
        results.add(target.name, "p50_ms", r.p50_ms)
        results.add(target.name, "p99_ms", r.p99_ms)
        note = _count_wrk_errors(results, target.name, r)
        return f"p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms{note}"

    def throughput(target: Target) -> str:
        r = wrk_load(tools, target, 32, 2, settings.duration_s)
        results.add(target.name, "rps", r.requests_per_s)
        note = _count_wrk_errors(results, target.name, r)
        return f"{r.requests_per_s:,.0f} req/s{note}"

    def ttft(target: Target) -> str:
        r = uvloop.run(measure_ttft("127.0.0.1", target.port, TTFT_PATH, settings.ttft_samples))
        results.add(target.name, "ttft_median_ms", r.median_ms)
        results.add(target.name, "ttft_p99_ms", r.p99_ms)
        errors = results.errors_for(target.name)
        errors.ttft += r.errors
        errors.first_ttft_error = errors.first_ttft_error or r.first_error
        note = f"  [{r.errors} failed streams]" if r.errors else ""
        return f"median {r.median_ms:.3f} ms, p99 {r.p99_ms:.3f} ms{note}"

    def streams(target: Target) -> str:
        hop = psutil.Process(target.child.process.pid) if target.name != DIRECT else None

        def cpu_s() -> float:
            if hop is None:
                return math.nan
            return sum(sum(p.cpu_times()[:2]) for p in (hop, *hop.children(recursive=True)))

        before = cpu_s()
        r = uvloop.run(measure_streams("127.0.0.1", target.port, STREAMS_PATH, settings.streams))
        per_frame_us = (cpu_s() - before) / r.frames * 1e6 if r.frames else math.nan
        results.add(target.name, "stretch_p99_ms", r.stretch_p99_ms)
        results.add(target.name, "frame_cpu_us", per_frame_us)
        errors = results.errors_for(target.name)
        errors.streams += r.failed
        errors.first_stream_error = errors.first_stream_error or r.first_error
        note = f"  [{r.failed} failed streams]" if r.failed else ""
        return f"stretch p99 {r.stretch_p99_ms:.3f} ms, {per_frame_us:.1f} us CPU/frame{note}"

    phases: list[tuple[str, Callable[[Target], str]]] = [
        ("latency @1 conn", latency),
        ("throughput @32 conns", throughput),
        ("TTFT", ttft),
        ("streams", streams),
    ]
    for round_no in range(1, settings.repeats + 1):
        for phase, measure in phases:
            for target in targets:  # interleaved so drifting machine noise hits every target alike
                summary = measure(target)
                ensure_alive(targets)
                where = f"round {round_no}/{settings.repeats}  {phase:<20} {target.name:<15}"
                progress(f"{where} {summary}")
    return results


def wrk_load(
    tools: Tools, target: Target, connections: int, threads: int, duration_s: float
) -> WrkResult:
    return run_wrk(
        tools.wrk,
        target.url(GENERATE_PATH),
        connections=connections,
        threads=threads,
        duration_s=duration_s,
    )


def _count_wrk_errors(results: Results, target: str, result: WrkResult) -> str:
    errors = results.errors_for(target)
    errors.status += result.status_errors
    errors.socket += result.socket_errors
    if not (result.status_errors or result.socket_errors):
        return ""
    return f"  [non-2xx/3xx {result.status_errors}, socket errors {result.socket_errors}]"


def log_problems(targets: list[Target]) -> str:
    return "\n".join(text for t in targets if t.name in (PROXY, OTEL)
                     if (text := render_log_problems(t.name, t.child.log_tail(100_000))))


def otel_export(targets: list[Target], sink: int | None) -> str:
    """What the OTEL target had sent to the collector by the end of the last round, and what it
    dropped: export must have run for its figures to mean anything."""
    target = next((t for t in targets if t.name == OTEL), None)
    if target is None or sink is None:
        return ""
    with urllib.request.urlopen(f"http://127.0.0.1:{sink}/stats", timeout=5) as reply:
        stats = json.load(reply)
    with urllib.request.urlopen(target.url("/metrics"), timeout=5) as reply:
        scrape = reply.read().decode()
    dropped = {m[1]: float(m[2]) for m in DROPPED.finditer(scrape)}
    return (f"{OTEL} export: {stats['traces_exports']} trace exports "
            f"({stats['traces_bytes']:,} bytes) and {stats['metrics_exports']} metric exports "
            f"received by the local collector; spans dropped: "
            + ", ".join(f"{reason} {count:.0f}" for reason, count in sorted(dropped.items())))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(settings: Settings, tools: Tools) -> int:
    machine = machine_info(tools)
    print(header(settings, machine), flush=True)
    with tempfile.TemporaryDirectory(prefix="ollama-metrics-bench-") as tmp:
        work_dir = Path(tmp)
        children = Children(work_dir)
        try:
            upstream = start_upstream(children)
            targets = [upstream]
            if NGINX in settings.targets:
                targets.append(start_nginx(children, tools.nginx, work_dir, upstream.port))
            for bare in (BARE_ASYNCIO, BARE_AIOHTTP):
                if bare in settings.targets:
                    targets.append(start_bare(children, bare, upstream.port))
            if PROXY in settings.targets:
                targets.append(start_proxy(children, work_dir, upstream.port,
                                           settings.proxy_args))
            sink = None
            if OTEL in settings.targets:
                sink = start_sink(children)
                targets.append(start_proxy(children, work_dir, upstream.port,
                                           settings.proxy_args, otel_sink=sink))
            progress("started: " + ", ".join(f"{t.name} on :{t.port}" for t in targets))
            results = run_rounds(settings, tools, targets)
            problems = log_problems(targets)
            export = otel_export(targets, sink)
        except (StartupError, WrkError, BenchError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; stopping children", file=sys.stderr)
            return 130
        finally:
            children.stop_all()
    print()
    print(render_table(results))
    print()
    print(render_errors(results))
    if problems:
        print(problems)
    if export:
        print(export)
    print()
    print(render_checks(results))
    if settings.emit_json:
        config = {
            "duration_s": settings.duration_s,
            "repeats": settings.repeats,
            "ttft_samples": settings.ttft_samples,
            "ttft_path": TTFT_PATH,
            "streams": settings.streams,
            "streams_path": STREAMS_PATH,
            "targets": list(settings.targets),
        }
        print(json.dumps(to_json(results, config, machine)))
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    tools = find_tools(settings)
    if isinstance(tools, str):
        print(tools, file=sys.stderr)
        return 2
    # SIGINT too: a shell may start us with it ignored (a background job); cleanup must still run.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    try:
        return run(settings, tools)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
