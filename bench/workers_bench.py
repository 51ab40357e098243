"""Throughput with 1 and 2 workers, next to nginx with 1 and 2 worker processes (issue 17).

    python bench/workers_bench.py            # about 2 minutes: --repeats 3 --duration 5
    python bench/workers_bench.py --quick    # smoke run: 1 round, 1 s wrk runs, 50 streams

One fake upstream (bench/upstream.py) behind four targets: nginx with `worker_processes` 1 and 2,
and `ollama-metrics serve` with `--workers` 1 and 2 (default settings: SQLite analytics on, in a
scratch directory). Per round, interleaved: req/s at 32 connections (`wrk -t2 -c32`, the
non-streamed generate of proxy_bench), then `--streams` concurrent streams (streams.py's shape:
64 frames each, 20 ms apart) through each target, with the CPU time of the target's processes
per frame relayed. The table shows medians over the rounds and the ratios that matter: each
proxy's 2 workers against its 1, and ollama-metrics against nginx with as many workers.

On a 2-core machine wrk and the upstream share the cores with the proxy, so 2 workers cannot
double anything; the ratios say how much of the second core each proxy turns into throughput.
Exit status: 0 once the report is printed; 1 if a target failed to start or died; 2 if wrk or
nginx is missing; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from processes import Children, StartupError
from proxy_bench import GENERATE_PATH, STREAMS_PATH
from targets import NGINX_CANDIDATES, Target, start_nginx, start_proxy, start_upstream
from wrk import WrkError, run_wrk

TARGETS = ("nginx-1", "nginx-2", "ollama-metrics-1", "ollama-metrics-2")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--proxy-args", default="",
                        help="more options for both ollama-metrics targets, e.g. "
                             "'--analytics-backend none' to leave the store writer out")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeats, args.streams = 1.0, 1, 50
    return args


def _cpu_s(target: Target) -> float:
    import psutil

    root = psutil.Process(target.child.process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in (root, *root.children(recursive=True)))


def main(argv: list[str] | None = None) -> int:
    import uvloop

    from streams import measure_streams

    args = _args(argv)
    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or next((c for c in NGINX_CANDIDATES if Path(c).exists()),
                                          None)
    if wrk is None or nginx is None:
        print("needs wrk and nginx: apt-get install -y wrk nginx", file=sys.stderr)
        return 2
    rps: dict[str, list[float]] = defaultdict(list)
    frame_us: dict[str, list[float]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    with tempfile.TemporaryDirectory(prefix="ollama-metrics-workers-bench-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            upstream = start_upstream(children)
            targets = [
                start_nginx(children, nginx, work, upstream.port, 1, "nginx-1"),
                start_nginx(children, nginx, work, upstream.port, 2, "nginx-2"),
                *(start_proxy(children, work, upstream.port,
                              ("--workers", str(n), "--analytics-dir",
                               str(work / f"analytics-{n}"), *args.proxy_args.split()),
                              f"ollama-metrics-{n}")
                  for n in (1, 2)),
            ]
            for target in targets:  # warm-up, not reported
                run_wrk(wrk, target.url(GENERATE_PATH), connections=32, threads=2,
                        duration_s=min(1.0, args.duration))
            for round_no in range(1, args.repeats + 1):
                for target in targets:
                    r = run_wrk(wrk, target.url(GENERATE_PATH), connections=32, threads=2,
                                duration_s=args.duration)
                    rps[target.name].append(r.requests_per_s)
                    failed[target.name] += r.status_errors + r.socket_errors
                    print(f"round {round_no}  req/s @32   {target.name:<17} "
                          f"{r.requests_per_s:,.0f}", file=sys.stderr, flush=True)
                for target in targets:
                    before = _cpu_s(target)
                    s = uvloop.run(measure_streams("127.0.0.1", target.port, STREAMS_PATH,
                                                   args.streams))
                    per_frame = (_cpu_s(target) - before) / s.frames * 1e6 if s.frames \
                        else math.nan
                    frame_us[target.name].append(per_frame)
                    failed[target.name] += s.failed
                    print(f"round {round_no}  streams {args.streams:<4} {target.name:<17} "
                          f"{per_frame:.1f} us CPU/frame", file=sys.stderr, flush=True)
                for target in targets:
                    if target.child.exited() is not None:
                        print(f"{target.name} died:\n{target.child.log_tail()}",
                              file=sys.stderr)
                        return 1
        except (StartupError, WrkError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            children.stop_all()
    med = {name: (statistics.median(rps[name]), statistics.median(frame_us[name]))
           for name in TARGETS}
    print(f"medians of {args.repeats} interleaved rounds; wrk -t2 -c32 {args.duration:g} s; "
          f"{args.streams} streams x 64 frames")
    print(f"{'target':<18} {'req/s @32':>10} {'us CPU/frame':>13} {'failed':>7}")
    for name in TARGETS:
        print(f"{name:<18} {med[name][0]:>10,.0f} {med[name][1]:>13.1f} {failed[name]:>7}")
    print()
    for who in ("nginx", "ollama-metrics"):
        print(f"{who}: 2 workers / 1 = {med[f'{who}-2'][0] / med[f'{who}-1'][0]:.2f}x req/s")
    for n in (1, 2):
        print(f"ollama-metrics / nginx, {n} worker(s): "
              f"{med[f'ollama-metrics-{n}'][0] / med[f'nginx-{n}'][0]:.2f}x req/s, "
              f"{med[f'ollama-metrics-{n}'][1] / med[f'nginx-{n}'][1]:.2f}x CPU per frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
