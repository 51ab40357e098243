"""Where the proxy's CPU goes: µs per request and per streamed frame, split by stage.

Contract: ``python bench/cpu_stages.py [--duration S] [--streams N] [--proxy-args ARGS]`` starts the
fake upstream, nginx (1 worker) and ``python -m ollama_metrics serve`` (default options unless
``--proxy-args``), then for each path (non-streamed ``POST /api/generate`` under wrk at 32
connections; ``--streams`` concurrent streamed generates of 64 frames):

1. measures the CPU time (user + system, the proxy's processes and their children) per request or
   per frame, with no profiler attached, for ollama-metrics and for nginx in the same run;
2. repeats the load with py-spy sampling the proxy (``--nonblocking``, subprocesses included) and
   sorts every sampled stack into one stage (``STAGES``: the first stage, in that order, any of
   whose patterns a frame of the stack matches);
3. prints each stage's share of the samples times the unprofiled CPU figure.

The profiler's own cost does not enter the µs (they come from the unprofiled run); it only
decides the split. Samples are taken of threads that are running, so the split is of CPU, not of
wall time. Exit status: 0 with the table printed, 1 when something failed to run, 2 when wrk,
nginx or py-spy is missing (``pip install py-spy``), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from processes import Children, StartupError
from proxy_bench import GENERATE_PATH, STREAMS_PATH
from targets import NGINX_CANDIDATES, Target, start_nginx, start_proxy, start_upstream
from wrk import WrkError, run_wrk

# (stage, patterns): a stack belongs to the first stage one of whose patterns is a substring of
# one of its frames ("function (file:line)"), the frames that start the event loop left out.
# Record and store come first: they run inside the request handler's `finally` and in the
# writer, under frames of the other stages. A stage may be listed twice to rank some of its
# patterns above another stage's.
PARSE = "accept/parse: request, routing, body"
WRITER = "writer process (own core): build, encode, write, index"
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # The writer process's stacks start with its command line (py-spy --subprocesses).
    (WRITER, ("ollama_metrics.analytics.writer",)),
    ("hand-off to the writer process: append, encode the turn's frame, write, reports", (
        "Recorder.finished", "Recorder.submit", "Recorder._append", "Recorder._flush",
        "Recorder._reported", "analytics/channel.py", "_Link.")),
    ("record: categorize, build, privacy", (
        "analytics/record.py", "analytics/privacy.py", "observe/categorize.py", "apply_caps")),
    ("store: encode, write, index", ("analytics/stores/", "analytics/writer.py")),
    ("metrics: counters, histograms, live", (
        "observe/metrics.py", "observe/live.py", "observe/labels.py", "prometheus_client/")),
    (PARSE, ("read_request", "Proxy._parse", "Proxy._request_body", "Client._next",
             "new_interaction")),
    ("relay: reply read, parsed, written", (
        "server/relay.py", "Proxy._relay", "Proxy._settle", "ollama/wire.py",
        "web_response.py", "strip_own_server_header", "finish_response", "ProxyResponse",
        "Upstream.data_received", "Upstream.on_", "Exchange.head", "Exchange.body",
        "Exchange.flush", "Exchange.complete", "Proxy.settle")),
    ("upstream request: connect, send, read head", (
        "aiohttp/client", "aiohttp/connector.py", "aiohttp/payload.py", "Proxy._exchange",
        "Exchange.send", "Exchange._connect", "Upstream.take")),
    (PARSE, (
        "aiohttp/web_", "aiohttp/http_parser", "aiohttp/streams.py", "ollama_metrics/")),
    ("thread hand-offs (executor workers)", ("concurrent/futures/thread.py",)),
)
EVENT_LOOP = "event loop, socket I/O (uvloop; writes py-spy could not place)"
ENTRY = ("asyncio/runners.py", "uvloop/__init__.py")  # frames up to these start the loop


@dataclass
class Split:
    """CPU µs per unit (request or frame) and the py-spy samples sorted by stage."""

    cpu_us: float = math.nan  # the proxy's processes: its event loop's and the writer's
    writer_us: float = math.nan  # of which the writer process (the proxy's children)
    nginx_us: float = math.nan
    samples: Counter[str] = field(default_factory=Counter)

    def stage_us(self, stage: str) -> float:
        total = sum(self.samples.values())
        return self.cpu_us * self.samples[stage] / total if total else math.nan


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    # With --subprocesses a stack starts with its process, after its parents: "process N:...".
    processes = [f for f in frames[:4] if f.startswith("process ")]
    if any(p in f for f in processes for p in STAGES[0][1]):
        return WRITER
    entry = [k for k, frame in enumerate(frames) if any(e in frame for e in ENTRY)]
    if entry:
        frames = frames[entry[-1] + 1:]
    for stage, patterns in STAGES:
        if any(p in frame for frame in frames for p in patterns):
            return stage
    return EVENT_LOOP


def read_raw(path: Path) -> Counter[str]:
    """py-spy's raw (collapsed) output: one ``frame;frame;... count`` line per distinct stack."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[stage_of(stack)] += int(n)
    return counts


def cpu_seconds(target: Target) -> tuple[float, float]:
    """CPU seconds (user + system) of the target's process and of its children."""
    import psutil

    root = psutil.Process(target.child.process.pid)
    totals = [0.0, 0.0]
    for n, p in enumerate([root, *root.children(recursive=True)]):
        try:
            totals[min(n, 1)] += sum(p.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return totals[0], totals[1]


def measured(target: Target, load: Callable[[], int]) -> tuple[float, float]:
    """CPU µs per unit of `load` (which returns the units it carried): all the target's
    processes, and its children's alone."""
    before = cpu_seconds(target)
    units = load()
    after = cpu_seconds(target)
    if not units:
        return math.nan, math.nan
    children = (after[1] - before[1]) / units * 1e6
    return (after[0] - before[0]) / units * 1e6 + children, children


def profiled(py_spy: str, target: Target, load: Callable[[], int], seconds: float,
             out: Path) -> Counter[str]:
    argv = [py_spy, "record", "--pid", str(target.child.process.pid), "--rate", "500",
            "--format", "raw", "--output", str(out), "--nonblocking", "--subprocesses",
            "--duration", str(max(1, math.ceil(seconds)))]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        load()
    finally:
        _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')}")
    return read_raw(out)


def render(plain: Split, streamed: Split, streams: int) -> str:
    rows = [("stage", "us/request", "share", f"us/frame @{streams} streams", "share")]

    def share(split: Split, stage: str) -> str:
        total = sum(split.samples.values())
        return f"{100 * split.samples[stage] / total:.0f} %" if total else "-"

    for stage in (*dict.fromkeys(s for s, _ in STAGES), EVENT_LOOP):
        rows.append((stage, f"{plain.stage_us(stage):.1f}", share(plain, stage),
                     f"{streamed.stage_us(stage):.2f}", share(streamed, stage)))
    rows.append(("ollama-metrics CPU, total", f"{plain.cpu_us:.1f}", "100 %",
                 f"{streamed.cpu_us:.2f}", "100 %"))
    rows.append(("  of which the writer process", f"{plain.writer_us:.1f}", "",
                 f"{streamed.writer_us:.2f}", ""))
    rows.append(("  of which the event loop's process", f"{plain.cpu_us - plain.writer_us:.1f}",
                 "", f"{streamed.cpu_us - streamed.writer_us:.2f}", ""))
    rows.append(("nginx CPU, same run", f"{plain.nginx_us:.1f}", "",
                 f"{streamed.nginx_us:.2f}", ""))
    rows.append(("ollama-metrics / nginx", f"{plain.cpu_us / plain.nginx_us:.2f}x", "",
                 f"{streamed.cpu_us / streamed.nginx_us:.2f}x", ""))
    loop = plain.cpu_us - plain.writer_us, streamed.cpu_us - streamed.writer_us
    rows.append(("event loop's process / nginx", f"{loop[0] / plain.nginx_us:.2f}x", "",
                 f"{loop[1] / streamed.nginx_us:.2f}x", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]),
                                *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]))
        if index == 0 or row[0] == EVENT_LOOP:
            lines.append("  ".join("-" * w for w in widths))
    samples = sum(plain.samples.values()), sum(streamed.samples.values())
    lines.append(f"(py-spy samples: {samples[0]} non-streamed, {samples[1]} streamed)")
    return "\n".join(lines)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Split the proxy's CPU per request and per "
                                     "streamed frame by stage (py-spy), next to nginx's CPU.")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per wrk run (default: 5)")
    parser.add_argument("--streams", type=int, default=200,
                        help="concurrent streamed generates (default: 200)")
    parser.add_argument("--proxy-args", default="", metavar="ARGS",
                        help="extra options for `ollama-metrics serve`, e.g. "
                             "'--analytics-backend none'")
    args = parser.parse_args(argv)
    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or next(
        (p for p in NGINX_CANDIDATES if Path(p).exists()), None)
    py_spy = shutil.which("py-spy")
    missing = [name for name, path in (("wrk", wrk), ("nginx", nginx), ("py-spy", py_spy))
               if not path]
    if missing or wrk is None or nginx is None or py_spy is None:
        print(f"missing: {', '.join(missing)} (apt-get install wrk nginx; pip install py-spy)",
              file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)
    import uvloop

    from streams import measure_streams

    def wrk_load(target: Target) -> Callable[[], int]:
        return lambda: run_wrk(wrk, target.url(GENERATE_PATH), connections=32, threads=2,
                               duration_s=args.duration).requests

    def streams_load(target: Target) -> Callable[[], int]:
        return lambda: uvloop.run(
            measure_streams("127.0.0.1", target.port, STREAMS_PATH, args.streams)).frames

    plain, streamed = Split(), Split()
    with tempfile.TemporaryDirectory(prefix="ollama-metrics-profile-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            upstream = start_upstream(children)
            web = start_nginx(children, nginx, work, upstream.port)
            proxy = start_proxy(children, work, upstream.port,
                                tuple(shlex.split(args.proxy_args)))
            print("warming up", file=sys.stderr)
            run_wrk(wrk, proxy.url(GENERATE_PATH), connections=32, threads=2,
                    duration_s=min(1.0, args.duration))
            for split, load in ((plain, wrk_load), (streamed, streams_load)):
                split.nginx_us = measured(web, load(web))[0]
                split.cpu_us, split.writer_us = measured(proxy, load(proxy))
            print("profiling", file=sys.stderr)
            plain.samples = profiled(py_spy, proxy, wrk_load(proxy), args.duration,
                                     work / "plain.txt")
            streamed.samples = profiled(py_spy, proxy, streams_load(proxy),
                                        3.0, work / "streamed.txt")
        except (StartupError, WrkError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            children.stop_all()
    print(f"ollama-metrics serve {args.proxy_args or '(default options)'}: CPU per "
          f"non-streamed request (wrk, 32 connections) and per frame ({args.streams} streams)")
    print(render(plain, streamed, args.streams))
    return 0


if __name__ == "__main__":
    sys.exit(main())
