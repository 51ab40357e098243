"""Collected measurements and the printed comparison.

Contract: ``Results`` accumulates one value per (target, metric, round) plus error counts;
``render_table`` and ``render_checks`` turn the MEDIANS across rounds into the text report
(rows = metrics; columns = targets (the bare floors among them), ollama-metrics minus direct,
ollama-metrics over nginx,
ollama-metrics+otel against ollama-metrics);
``to_json`` gives the same data, with every round's values, for machines. Missing targets or values
print as ``-``. ``render_log_problems`` summarises warnings, errors and tracebacks in a child's log.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from targets import ALL_TARGETS, DIRECT, NGINX, OTEL, PROXY

# Issue 17's targets, on the quiet 2-core test machine, default settings, same run.
ADDED_P50_LIMIT_MS = 0.25
RPS_RATIO_LIMIT = 0.4  # of nginx's req/s at 32 connections
FRAME_CPU_RATIO_LIMIT = 1.3  # of nginx's CPU per streamed frame
TTFT_ADDED_P99_LIMIT_MS = 1.0
OTEL_ADDED_P50_LIMIT_MS = 0.1  # what turning on --otel may add to the proxy's p50
LOG_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
TRACEBACK = "Traceback (most recent call last):"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "ms" or "us" (lower is better) or "req/s" (higher is better)


METRICS = (
    Metric("p50_ms", "p50 latency ms @1 conn", "ms"),
    Metric("p99_ms", "p99 latency ms @1 conn", "ms"),
    Metric("rps", "req/s @32 conns", "req/s"),
    Metric("ttft_median_ms", "TTFT median ms", "ms"),
    Metric("ttft_p99_ms", "TTFT p99 ms", "ms"),
    Metric("stretch_p99_ms", "frame gap stretch p99 ms @streams", "ms"),
    Metric("frame_cpu_us", "hop CPU us per frame @streams", "us"),
)


@dataclass
class Errors:
    status: int = 0  # wrk: responses with status >= 400
    socket: int = 0  # wrk: connect/read/write errors and timeouts
    ttft: int = 0  # TTFT client: failed or malformed streams
    first_ttft_error: str = ""
    streams: int = 0  # streams run: failed or malformed streams
    first_stream_error: str = ""

    @property
    def total(self) -> int:
        return self.status + self.socket + self.ttft + self.streams


@dataclass
class Results:
    targets: tuple[str, ...]
    rounds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, Errors] = field(default_factory=dict)

    def add(self, target: str, key: str, value: float) -> None:
        self.rounds.setdefault(target, {}).setdefault(key, []).append(value)

    def errors_for(self, target: str) -> Errors:
        return self.errors.setdefault(target, Errors())

    def median(self, target: str, key: str) -> float:
        values = [v for v in self.rounds.get(target, {}).get(key, []) if not math.isnan(v)]
        return statistics.median(values) if values else math.nan


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "+ms":
        return f"{value:+.3f}"
    if unit == "us":
        return f"{value:.1f}"
    return f"{value:,.0f}" if unit == "req/s" else f"{value:.3f}"


def render_table(results: Results) -> str:
    header = ("metric", *ALL_TARGETS, "added vs direct", "ratio vs nginx", "otel vs off")
    rows: list[tuple[str, ...]] = [header]
    for metric in METRICS:
        values = {t: results.median(t, metric.key) for t in ALL_TARGETS}
        added = values[PROXY] - values[DIRECT]
        ratio = values[PROXY] / values[NGINX] if values[NGINX] else math.nan
        otel = values[OTEL] - values[PROXY]
        if metric.unit == "ms":
            otel_cell = "-" if math.isnan(otel) else f"{_fmt(otel, '+ms')} ms"
        else:
            otel_ratio = values[OTEL] / values[PROXY] if values[PROXY] else math.nan
            otel_cell = "-" if math.isnan(otel_ratio) else f"{otel_ratio:.2f}x"
        rows.append((
            metric.label,
            *(_fmt(values[t], metric.unit) for t in ALL_TARGETS),
            "-" if metric.unit != "ms" or math.isnan(added) else f"{_fmt(added, '+ms')} ms",
            "-" if math.isnan(ratio) else f"{ratio:.2f}x",
            otel_cell,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_errors(results: Results) -> str:
    lines = [
        "errors (wrk: non-2xx/3xx responses, socket errors incl. timeouts; failed TTFT and "
        "streams-run streams):"
    ]
    for target in results.targets:
        e = results.errors_for(target)
        line = (f"  {target:<19} non-2xx/3xx {e.status}  socket {e.socket}  ttft {e.ttft}  "
                f"streams {e.streams}")
        if e.first_ttft_error:
            line += f"  (first TTFT error: {e.first_ttft_error[:160]})"
        if e.first_stream_error:
            line += f"  (first streams error: {e.first_stream_error[:160]})"
        lines.append(line)
    return "\n".join(lines)


def render_log_problems(name: str, log: str) -> str:
    """Counts of WARNING/ERROR/CRITICAL lines and tracebacks, the first few, the first traceback."""
    lines = log.splitlines()
    leveled = [line for line in lines if LOG_LEVEL.search(line)]
    starts = [index for index, line in enumerate(lines) if line.startswith(TRACEBACK)]
    if not leveled and not starts:
        return ""
    out = [f"{name} log: {len(leveled)} warning/error line(s), {len(starts)} traceback(s); first:"]
    out.extend(f"  {line[:200]}" for line in leveled[:3])
    if starts:
        out.append("  first traceback:")
        end = starts[0] + 1
        while end < len(lines) and lines[end].startswith(" "):
            end += 1
        frames = [line for line in lines[starts[0] : end + 1] if line.strip(" ^~")]
        out.extend(f"    {line[:200]}" for line in frames[:40])
    return "\n".join(out)


@dataclass(frozen=True)
class Check:
    passed: bool | None  # None: not measurable in this run
    text: str


def checks(results: Results) -> list[Check]:
    added = results.median(PROXY, "p50_ms") - results.median(DIRECT, "p50_ms")
    proxy_rps = results.median(PROXY, "rps")
    floor = RPS_RATIO_LIMIT * results.median(NGINX, "rps")
    otel = results.median(OTEL, "p50_ms") - results.median(PROXY, "p50_ms")
    frame_ratio = results.median(PROXY, "frame_cpu_us") / results.median(NGINX, "frame_cpu_us")
    ttft_added = results.median(PROXY, "ttft_p99_ms") - results.median(DIRECT, "ttft_p99_ms")
    return [
        Check(
            None if math.isnan(added) else added <= ADDED_P50_LIMIT_MS,
            f"added p50 latency at 1 connection: {_fmt(added, '+ms')} ms "
            f"(target <= {ADDED_P50_LIMIT_MS} ms)",
        ),
        Check(
            None if math.isnan(proxy_rps) or math.isnan(floor) else proxy_rps >= floor,
            f"ollama-metrics req/s at 32 connections: {_fmt(proxy_rps, 'req/s')} "
            f"(target >= {RPS_RATIO_LIMIT} x nginx = {_fmt(floor, 'req/s')})",
        ),
        Check(
            None if math.isnan(frame_ratio) else frame_ratio <= FRAME_CPU_RATIO_LIMIT,
            f"hop CPU per streamed frame: {frame_ratio:.2f} x nginx's "
            f"(target <= {FRAME_CPU_RATIO_LIMIT} x)",
        ),
        Check(
            None if math.isnan(ttft_added) else ttft_added <= TTFT_ADDED_P99_LIMIT_MS,
            f"TTFT p99 added: {_fmt(ttft_added, '+ms')} ms "
            f"(target <= {TTFT_ADDED_P99_LIMIT_MS} ms)",
        ),
        Check(
            None if math.isnan(otel) else otel <= OTEL_ADDED_P50_LIMIT_MS,
            f"p50 latency at 1 connection added by --otel: {_fmt(otel, '+ms')} ms "
            f"(target <= {OTEL_ADDED_P50_LIMIT_MS} ms)",
        ),
    ]


def render_checks(results: Results) -> str:
    words = {True: "PASS", False: "FAIL", None: "SKIP"}
    return "\n".join(f"{words[c.passed]}  {c.text}" for c in checks(results))


def to_json(results: Results, config: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": config,
        "machine": machine,
        "medians": {
            t: {m.key: _nan_to_none(results.median(t, m.key)) for m in METRICS}
            for t in results.targets
        },
        "rounds": results.rounds,
        "errors": {t: vars(results.errors_for(t)) for t in results.targets},
        "checks": [{"passed": c.passed, "text": c.text} for c in checks(results)],
    }


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value
