"""OpenTelemetry export: each Ollama call as a GenAI client span, and the GenAI metrics, by OTLP.

Off unless --otel. The SDK and its exporters are the `otel` extra, imported only here and only when
turned on; `load()` says what to install when they are missing. Where telemetry goes, with which
headers, under which service name and resource, and how spans are sampled and batched, is the
SDK's standard configuration, read by the SDK itself from its OTEL_* variables
(OTEL_EXPORTER_OTLP_*, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG),
OTEL_BSP_*, OTEL_METRIC_EXPORT_*), which the child process inherits. The protocol picks the
exporter class, so it is a setting of ours (--otel-protocol, read from
OTEL_EXPORTER_OTLP_PROTOCOL).

Conventions: OpenTelemetry semantic conventions v1.41.0 for GenAI client spans and metrics. Only
Ollama calls get spans (OPERATIONS); every other route gets none. Providers are private to the
proxy: nothing global is set, so an application embedding the proxy keeps its own.

Never in the way: the SDK builds spans, aggregates metrics and encodes OTLP in Python, some
hundreds of microseconds a call, and on a thread of the proxy's process that work holds the GIL the
event loop needs (up to the 5 ms switch interval at a time: the p50 rose by milliseconds). So the
SDK runs in a child process (otel_process.py, started with the app, stopped after it, on idle CPU
only): the event loop only copies the call's plain fields into a dict on a bounded queue (~7 us a
call); a thread of ours pickles the queue onto the child's stdin every 50 ms. With content on, the
content is built on a thread of ours first, since redacting long texts is regex work. Calls that
cannot be sent are dropped and counted in ollama_otel_spans_dropped_total: `queue_full` when more
wait than a queue holds (ours, or the SDK's batch queue in the child: the collector is slow or
away, or the child is behind), `export_failed` when the exporter gave up on a batch (the child
reports its counts on its stdout).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter
from yarl import URL

from .interaction import ErrorType, Interaction, Outcome
from .labels import ModelLabels

log = logging.getLogger(__name__)

SEMCONV_VERSION = "1.41.0"
PROVIDER = "ollama"
# Route → gen_ai.operation.name. /api/generate and /v1/completions complete a prompt; the rest
# hold a conversation.
OPERATIONS = {
    "/api/chat": "chat",
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
    "/api/generate": "text_completion",
    "/v1/completions": "text_completion",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/v1/embeddings": "embeddings",
}
QUEUE_SIZE = 2048  # calls waiting for the child process, as the SDK's default batch queue
FRAME = struct.Struct("!I")  # each pickled list of calls on the child's stdin: its length first
SEND_EVERY = 0.05  # seconds between writes to the child
PIPE_SIZE = 1 << 20

# Request parameter (native `options` or OpenAI body) → attribute, and the type it must have.
_PARAMS: list[tuple[str, str, type]] = [
    ("temperature", "gen_ai.request.temperature", float),
    ("top_p", "gen_ai.request.top_p", float),
    ("top_k", "gen_ai.request.top_k", float),
    ("frequency_penalty", "gen_ai.request.frequency_penalty", float),
    ("presence_penalty", "gen_ai.request.presence_penalty", float),
    ("seed", "gen_ai.request.seed", int),
    ("num_predict", "gen_ai.request.max_tokens", int),
    ("max_tokens", "gen_ai.request.max_tokens", int),
    ("max_completion_tokens", "gen_ai.request.max_tokens", int),
    ("max_output_tokens", "gen_ai.request.max_tokens", int),
    ("n", "gen_ai.request.choice.count", int),
]

# Content attributes of one exchange (gen_ai.input.messages and the like, JSON text), after the
# store's capture level and redaction; built by the analytics layer and handed in.
Content = Callable[[Interaction, "dict[str, Any] | None"], dict[str, str]]


class Missing(RuntimeError):
    """--otel without the SDK installed."""


def load(protocol: str = "http/protobuf") -> None:
    """Import the SDK and the exporter of `protocol`; Missing says what to install."""
    try:
        import opentelemetry.sdk.metrics
        import opentelemetry.sdk.trace
        if protocol == "grpc":
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
        else:
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError as exc:
        raise Missing(f"--otel needs the OpenTelemetry SDK and its OTLP exporter ({exc.name} is "
                      "not installed): pip install 'ollama-metrics[otel]'") from None


def request_attributes(body: dict[str, Any] | None, options: dict[str, Any] | None
                       ) -> dict[str, Any]:
    """The gen_ai.request.* parameters a request sets, natively in `options` or OpenAI-style at
    the top of the body."""
    params = {**(body or {}), **(options or {})}
    out: dict[str, Any] = {}
    for key, attribute, kind in _PARAMS:
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if kind is int and not isinstance(value, int):
            continue
        out[attribute] = kind(value)
    stop = params.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        out["gen_ai.request.stop_sequences"] = stop
    return out


def error_type(i: Interaction) -> str | None:
    """error.type: `cancelled`, Ollama's HTTP status, or the proxy's cause of an upstream
    failure (connect, reset, timeout, stream_error); None when the call succeeded."""
    if i.outcome is Outcome.CANCELLED:
        return "cancelled"
    if i.error_type in (ErrorType.HTTP_4XX, ErrorType.HTTP_5XX) and i.http_status is not None:
        return str(i.http_status)
    if i.error_type is not None:
        return i.error_type.value
    return None if i.outcome is Outcome.SUCCESS else "_OTHER"



def _write(fd: int, data: bytes) -> None:
    """All of `data`, in as few system calls as the pipe allows: one os.write releases the GIL
    for as long as the child takes to read, where a buffered file takes it back after every
    partial write (a GIL hand-off with the event loop each time the child reads a little)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _either(a: threading.Event, b: threading.Event, timeout: float) -> None:
    """Wait until `a` or `b` is set, or `timeout` seconds."""
    for _ in range(max(1, int(timeout / 0.05))):
        if a.is_set() or b.is_set():
            return
        b.wait(0.05)


def _widen(fd: int) -> None:
    """A larger pipe (Linux: 1 MiB), so the child's reads wake the sender less often."""
    with contextlib.suppress(AttributeError, OSError):
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def call(i: Interaction, operation: str, labels: ModelLabels) -> dict[str, Any]:
    """What the child needs of a finished call: plain values, cheap to take on the event loop
    and to pickle (no messages, no reply text)."""
    return {
        "operation": operation,
        "endpoint": i.endpoint,
        "model": i.model,
        "response_model": i.response_model,
        # Model names on metrics are bounded like the Prometheus labels.
        "model_label": labels(i.model) if i.model else None,
        "response_model_label": labels(i.response_model) if i.response_model else None,
        "params": i.params,
        "options": i.options,
        "response_id": i.response_id,
        "done_reason": i.done_reason,
        "input_tokens": i.prompt_eval_count,
        "output_tokens": i.eval_count,
        "embedding_dims": i.embedding_dims,
        "ttft": i.ttft,
        "time_per_output_token": i.time_per_output_token,
        "outcome": i.outcome.value,
        "success": i.outcome is Outcome.SUCCESS,
        "error": error_type(i),
        "traceparent": i.traceparent,
        "tracestate": i.tracestate,
        "started_at": i.started_at,
        "ended_at": i.ended_at if i.ended_at is not None else i.started_at + i.duration,
        "duration": i.duration,
    }


class Export:
    """The observer that hands finished Ollama calls to the exporting child process."""

    def __init__(self, *, upstream: URL, registry: CollectorRegistry, labels: ModelLabels,
                 version: str, protocol: str = "http/protobuf", content: Content | None = None,
                 queue_size: int = QUEUE_SIZE) -> None:
        load(protocol)
        self._settings = {"upstream": str(upstream), "version": version, "protocol": protocol}
        self._labels = labels
        self._content = content
        self._queue_size = queue_size
        self._waiting: deque[dict[str, Any]] = deque()
        self._closing = threading.Event()
        self._ready = threading.Event()  # the child can export
        self._gone = threading.Event()  # the child's output ended
        self._lock = threading.Lock()
        self._queued = 0  # calls taken and not yet written to the child (content ones included)
        self.dropped = Counter(
            "ollama_otel_spans_dropped_total",
            "OpenTelemetry spans not sent: queue_full (the collector is slow or away), "
            "export_failed (the exporter gave up)", ["reason"], registry=registry)
        for reason in ("queue_full", "export_failed"):
            self.dropped.labels(reason)
        self._thread = ThreadPoolExecutor(1, "otel-content") if content is not None else None
        self._child: subprocess.Popen[bytes] | None = None
        self._threads: list[threading.Thread] = []
        self._close_timeout = 10.0

    def start(self) -> None:
        """Start the child process and the threads that talk to it."""
        env = dict(os.environ)
        # The child imports this package from where the parent did, installed or not.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._child = subprocess.Popen(
            [sys.executable, "-m", "ollama_metrics.observe.otel_process",
             json.dumps(self._settings)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self._child.stdin is not None and self._child.stdout is not None
        _widen(self._child.stdin.fileno())
        self._threads = [
            threading.Thread(target=self._send, args=(self._child.stdin,), name="otel-send",
                             daemon=True),
            threading.Thread(target=self._reports, args=(self._child.stdout,),
                             name="otel-reports", daemon=True)]
        for thread in self._threads:
            thread.start()

    # --- the Observer protocol -----------------------------------------------------------------

    def started(self, interaction: Interaction) -> object:
        return None

    def finished(self, i: Interaction, token: object) -> None:
        operation = OPERATIONS.get(i.endpoint)
        if operation is None:
            return
        try:
            with self._lock:
                full = self._queued >= self._queue_size
                if not full:
                    self._queued += 1
            if full:
                self.dropped.labels("queue_full").inc()
            elif self._thread is None:
                self._waiting.append(call(i, operation, self._labels))
            else:
                # A copy: the recorder lets go of the request's messages once it has built its
                # record, and the content is built after that.
                self._thread.submit(self._with_content, copy.copy(i), operation)
        except Exception:  # an observer never breaks the proxy
            log.exception("otel: could not export an exchange")

    # --- off the event loop --------------------------------------------------------------------

    def _with_content(self, i: Interaction, operation: str) -> None:
        assert self._content is not None
        try:
            record = call(i, operation, self._labels)
            record["content"] = self._content(i, i.params)
        except Exception:
            log.exception("otel: could not build a span's content")
            with self._lock:
                self._queued -= 1
            return
        self._waiting.append(record)

    def _send(self, pipe: IO[bytes]) -> None:
        """Every SEND_EVERY seconds, pickle what waits onto the child's stdin, in one frame;
        close() ends it. Polling, not waking per call: a wake-up per request would be a GIL
        hand-off per request. Nothing is written before the child says it is ready, so a child
        that cannot start loses no call uncounted."""
        ended = False
        while not ended:
            ended = self._closing.wait(SEND_EVERY)
            if ended:  # give a child still starting the time to say whether it can export
                _either(self._ready, self._gone, self._close_timeout)
            elif not (self._ready.is_set() or self._gone.is_set()):
                continue
            records = []
            while self._waiting:
                records.append(self._waiting.popleft())
            with self._lock:
                self._queued -= len(records)
            if ended:  # the last word: how long the child may take to send what it holds
                records.append({"close": self._close_timeout})
            calls = sum(1 for r in records if "close" not in r)
            if self._gone.is_set():
                self.dropped.labels("export_failed").inc(calls)
                continue
            if not records:
                continue
            data = pickle.dumps(records, pickle.HIGHEST_PROTOCOL)
            try:
                _write(pipe.fileno(), FRAME.pack(len(data)) + data)
            except (OSError, ValueError):
                self.dropped.labels("export_failed").inc(calls)
        with contextlib.suppress(OSError):
            pipe.close()  # end of input: the child sends what it holds and exits

    def _reports(self, pipe: IO[bytes]) -> None:
        """`ready` once the child can export, then its drop counts, one `reason count` line
        each. End of output before close(): the child is gone, said once."""
        for line in pipe:
            reason, _, count = line.decode(errors="replace").strip().partition(" ")
            if reason == "ready":
                self._ready.set()
            elif reason in ("queue_full", "export_failed") and count.isdigit():
                self.dropped.labels(reason).inc(int(count))
        self._gone.set()
        if not self._closing.is_set():  # its own error is above, on stderr
            child = self._child
            log.error("otel: the exporting process exited (code %s); spans are dropped, "
                      "counted as export_failed", child.wait() if child is not None else None)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is waiting (the child allows up to `timeout` seconds each for spans and
        metrics), then stop. Blocking: call it off the event loop."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._close_timeout = timeout
        self._closing.set()
        child = self._child
        if child is None:
            return
        try:
            child.wait(2 * timeout + 5)
        except subprocess.TimeoutExpired:
            log.warning("otel: the exporting process did not stop in time; killed")
            child.kill()
            child.wait()
        for thread in self._threads:
            thread.join(timeout)
        for pipe in (child.stdin, child.stdout):  # left open, each warns when collected
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
