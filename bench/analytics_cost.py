"""What analytics cost the request path: proxies with and without analytics, side by side.

Contract: ``python bench/analytics_cost.py [--rounds N] [--duration S] [--baseline-src DIR]``
starts the fake upstream, nginx (1 worker) and ``ollama-metrics serve`` twice from this tree
(default options: SQLite analytics; and ``--analytics-backend none``), and with
``--baseline-src`` the same two from another tree's src/ (e.g. main's: before a change). Each
round measures every target in turn (interleaved, so load from elsewhere on the machine falls on
all of them alike): p50 latency at 1 connection and req/s at 32 connections with wrk on the
non-streamed ``POST /api/generate``. Prints the medians over rounds, the added p50 against the
direct upstream, and the ratios the issue sets targets for: req/s against nginx's, and each
tree's analytics-on req/s against its own analytics-off; and the CPU µs per request at 32
connections of each target's own process (for a proxy: its event loop's) and of its children
(the writer process; nginx's workers). Exit status: 0 with the table printed,
1 when something failed to run, 2 when wrk or nginx is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import psutil

from processes import Children, StartupError, free_port, wait_for_port
from proxy_bench import GENERATE_PATH
from targets import NGINX_CANDIDATES, Target, start_nginx, start_upstream
from wrk import WrkError, run_wrk

HERE_SRC = Path(__file__).resolve().parent.parent / "src"


def cpu_seconds(target: Target) -> tuple[float, float]:
    """CPU seconds (user + system) of the target's process, and of its children."""
    root = psutil.Process(target.child.process.pid)
    totals = [sum(root.cpu_times()[:2]), 0.0]
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            totals[1] += sum(child.cpu_times()[:2])
    return totals[0], totals[1]


def start_proxy(children: Children, work: Path, name: str, src: Path, upstream: int,
                args: tuple[str, ...]) -> Target:
    port = free_port()
    where = work / name
    where.mkdir()
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-m", "ollama_metrics", "serve", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"http://127.0.0.1:{upstream}", "--analytics-dir", str(where / "a"),
            *args]
    child = children.spawn(name, argv, env=env, cwd=where)
    wait_for_port(child, port, timeout_s=30)
    return Target(name, port, child)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Proxies with and without analytics, "
                                     "interleaved, next to nginx and a direct connection.")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds per wrk run (default: 3)")
    parser.add_argument("--baseline-src", help="another tree's src/ to measure too")
    args = parser.parse_args(argv)
    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if Path(p).exists()),
                                          None)
    if wrk is None or nginx is None:
        print("missing: wrk or nginx (apt-get install wrk nginx)", file=sys.stderr)
        return 2
    trees = {"this": HERE_SRC}
    if args.baseline_src:
        trees = {"baseline": Path(args.baseline_src).resolve(), **trees}
    p50: dict[str, list[float]] = defaultdict(list)
    rps: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    with tempfile.TemporaryDirectory(prefix="ollama-metrics-cost-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            upstream = start_upstream(children)
            targets = [Target("direct", upstream.port, upstream.child),
                       start_nginx(children, nginx, work, upstream.port)]
            for tree, src in trees.items():
                targets.append(start_proxy(children, work, f"{tree}, analytics on", src,
                                           upstream.port, ()))
                targets.append(start_proxy(children, work, f"{tree}, analytics off", src,
                                           upstream.port, ("--analytics-backend", "none")))
            for target in targets:  # warm-up
                run_wrk(wrk, target.url(GENERATE_PATH), connections=8, threads=1,
                        duration_s=1)
            for n in range(args.rounds):
                print(f"round {n + 1}/{args.rounds}", file=sys.stderr)
                for target in targets:
                    one = run_wrk(wrk, target.url(GENERATE_PATH), connections=1, threads=1,
                                  duration_s=args.duration)
                    before = cpu_seconds(target)
                    many = run_wrk(wrk, target.url(GENERATE_PATH), connections=32, threads=2,
                                   duration_s=args.duration)
                    after = cpu_seconds(target)
                    p50[target.name].append(one.p50_ms)
                    rps[target.name].append(many.requests_per_s)
                    for k in (0, 1):
                        cpu[target.name][k].append(
                            (after[k] - before[k]) / max(many.requests, 1) * 1e6)
            time.sleep(SETTLE)  # the writers catch up with what is queued
            fate = {t.name: records(t) for t in targets if t.name.endswith("analytics on")}
        except (StartupError, WrkError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            children.stop_all()
    med_p50 = {name: statistics.median(v) for name, v in p50.items()}
    med_rps = {name: statistics.median(v) for name, v in rps.items()}
    print(f"medians of {args.rounds} interleaved rounds, {args.duration:g} s wrk runs, "
          f"non-streamed POST {GENERATE_PATH}; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'target':28} {'p50 @1 ms':>10} {'added µs':>9} {'req/s @32':>10} {'x nginx':>8} "
          f"{'on / off':>9} {'CPU µs/req':>11} {'children':>9}")
    for name in med_p50:
        added = (med_p50[name] - med_p50["direct"]) * 1000
        ratio = med_rps[name] / med_rps["nginx"]
        tree = name.split(",")[0]
        on_off = (f"{med_rps[name] / med_rps[f'{tree}, analytics off']:.2f}"
                  if name.endswith("analytics on") else "")
        own, kids = (statistics.median(v) for v in cpu[name])
        print(f"{name:28} {med_p50[name]:10.3f} {added:9.0f} {med_rps[name]:10,.0f} "
              f"{ratio:8.2f} {on_off:>9} {own:11.1f} {kids:9.1f}")
    for name, (written, dropped) in fate.items():
        print(f"{name}: {written:,.0f} records written, {dropped:,.0f} dropped (counted: "
              f"queue full while the writer, below the proxy's priority, waited for a core)")
    return 0


SETTLE = 5.0  # seconds given to the writers after the last round


def records(target: Target) -> tuple[float, float]:
    """Records written and dropped by the target, from its /metrics."""
    with urllib.request.urlopen(target.url("/metrics"), timeout=10) as resp:
        text = resp.read().decode()
    sums = {"ollama_analytics_writes_total": 0.0, "ollama_analytics_dropped_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums and (name != "ollama_analytics_writes_total" or 'status="success"' in line):
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums["ollama_analytics_writes_total"], sums["ollama_analytics_dropped_total"]


if __name__ == "__main__":
    sys.exit(main())
