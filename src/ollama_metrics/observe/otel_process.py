"""The OpenTelemetry SDK's side of --otel: a child process of the proxy (see otel.py for why).

Contract: `python -m ollama_metrics.observe.otel_process SETTINGS` (JSON: upstream, version,
protocol) reads calls from stdin in frames, each a 4-byte big-endian length and a pickled list of
otel.call() dicts; turns each into a GenAI client span and the GenAI metrics with the SDK, exported
by OTLP with the SDK's standard configuration (its OTEL_* variables, read by the SDK itself: no
value of the batch processor, exporter or reader is set here, so OTEL_BSP_*, OTEL_EXPORTER_OTLP_*
and OTEL_METRIC_EXPORT_* all hold). A last `{"close": seconds}` and then end of input make it send
what it holds (up to that long each for spans and metrics) and exit 0; a configuration the SDK
refuses, exit 2 with one line on stderr. On stdout it writes `ready` once it can export, then the
spans it dropped, one `queue_full N` or `export_failed N` line at a time; its log goes to stderr.
SIGINT and SIGTERM are ignored: the parent ends it. It runs only on CPU time nothing else wants
(SCHED_IDLE): on a busy machine the export falls behind and drops, counted, rather than taking
CPU from the proxy.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from yarl import URL

from .otel import FRAME, PROVIDER, SEMCONV_VERSION, request_attributes

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("ollama_metrics.observe.otel")

# The spec's ExplicitBucketBoundaries, metric by metric.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Reports:
    """Drop counts for the parent, written as lines on stdout (from any thread)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def dropped(self, reason: str, count: int) -> None:
        self.line(f"{reason} {count}")

    def line(self, text: str) -> None:
        with self._lock:
            try:
                self._out.write(text.encode() + b"\n")
                self._out.flush()
            except (OSError, ValueError):  # the parent is gone
                pass


def _exporters(protocol: str) -> tuple[SpanExporter, MetricReader]:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetrics,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpans,
        )
        return GrpcSpans(), PeriodicExportingMetricReader(GrpcMetrics())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(), PeriodicExportingMetricReader(OTLPMetricExporter())


class Emitter:
    """Spans and metrics of calls, through the SDK's providers (private: nothing global)."""

    def __init__(self, *, upstream: URL, version: str, protocol: str, reports: Reports) -> None:
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, by the SDK
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "ollama-metrics"}))
        span_exporter, metric_reader = _exporters(protocol)
        self._upstream = upstream
        self._reports = reports
        self._lock = threading.Lock()
        self._waiting = 0  # spans handed to the processor and not yet through the exporter
        self._processor = BatchSpanProcessor(_counting(span_exporter, self))
        # The processor's own queue drops silently when full; the same bound, counted, here.
        # Its size is the SDK's to read (OTEL_BSP_MAX_QUEUE_SIZE): ask the processor.
        self._queue_size: int = getattr(getattr(self._processor, "_batch_processor", None),
                                        "_max_queue_size", 2048)
        self._traces = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
        self._traces.add_span_processor(self._processor)
        self._tracer = self._traces.get_tracer(
            "ollama_metrics", version,
            schema_url=f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}")
        self._meters = MeterProvider(resource=resource, metric_readers=[metric_reader])
        meter = self._meters.get_meter("ollama_metrics", version)
        self._operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._request_duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Generative AI server request duration such as time-to-last byte",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate first token for successful responses",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token generated after the first token for successful "
                        "responses",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS)
        self._propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()

    def emit(self, c: dict[str, Any]) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode

        error = c["error"]
        common: dict[str, Any] = {
            "gen_ai.operation.name": c["operation"],
            "gen_ai.provider.name": PROVIDER,
        }
        if self._upstream.host is not None:
            common["server.address"] = self._upstream.host
        if self._upstream.port is not None:
            common["server.port"] = self._upstream.port
        if error is not None:
            common["error.type"] = error
        attributes = dict(common)
        if c["model"]:
            attributes["gen_ai.request.model"] = c["model"]
        if c["response_model"]:
            attributes["gen_ai.response.model"] = c["response_model"]
        if c["response_id"]:
            attributes["gen_ai.response.id"] = c["response_id"]
        attributes.update(request_attributes(c["params"], c["options"]))
        if c["done_reason"]:
            attributes["gen_ai.response.finish_reasons"] = [c["done_reason"]]
        if c["input_tokens"] is not None:
            attributes["gen_ai.usage.input_tokens"] = c["input_tokens"]
        if c["output_tokens"] is not None:
            attributes["gen_ai.usage.output_tokens"] = c["output_tokens"]
        if c["embedding_dims"] is not None:
            attributes["gen_ai.embeddings.dimension.count"] = c["embedding_dims"]
        ttft = c["ttft"]
        if ttft is not None:
            attributes["ollama_metrics.time_to_first_token"] = ttft
        attributes["ollama_metrics.outcome"] = c["outcome"]
        attributes["ollama_metrics.endpoint"] = c["endpoint"]
        parent = Context()  # a root span unless the client sent its trace context
        if c["traceparent"] is not None:
            carrier = {"traceparent": c["traceparent"]}
            if c["tracestate"] is not None:
                carrier["tracestate"] = c["tracestate"]
            parent = self._propagator.extract(carrier, getter=self._getter)
        start = int(c["started_at"] * 1e9)
        end = int(c["ended_at"] * 1e9)
        name = f"{c['operation']} {c['model']}" if c["model"] else c["operation"]
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.CLIENT,
                                       attributes=attributes, start_time=start)
        if span.is_recording():
            if c.get("content"):
                span.set_attributes(c["content"])
            if ttft is not None:
                span.add_event("gen_ai.first_token", timestamp=start + int(ttft * 1e9))
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            with self._lock:
                full = self._waiting >= self._queue_size
                if not full:
                    self._waiting += 1
            if full:
                self._reports.dropped("queue_full", 1)
            else:
                span.end(end_time=end)
        self._measure(c, common)

    def _measure(self, c: dict[str, Any], common: dict[str, Any]) -> None:
        attributes = dict(common)
        if c["model_label"]:
            attributes["gen_ai.request.model"] = c["model_label"]
        if c["response_model_label"]:
            attributes["gen_ai.response.model"] = c["response_model_label"]
        self._operation_duration.record(c["duration"], attributes)
        if c["input_tokens"] is not None:
            self._token_usage.record(c["input_tokens"],
                                     {**attributes, "gen_ai.token.type": "input"})
        if c["output_tokens"] is not None:
            self._token_usage.record(c["output_tokens"],
                                     {**attributes, "gen_ai.token.type": "output"})
        if not c["success"]:
            return
        self._request_duration.record(c["duration"], attributes)
        if c["ttft"] is not None:
            self._ttft.record(c["ttft"], attributes)
        if c["time_per_output_token"] is not None:
            self._tpot.record(c["time_per_output_token"], attributes)

    def exported(self, count: int, ok: bool) -> None:
        with self._lock:
            self._waiting = max(0, self._waiting - count)
        if not ok:
            self._reports.dropped("export_failed", count)

    def close(self, timeout: float) -> None:
        millis = int(timeout * 1000)
        self._traces.force_flush(millis)
        self._traces.shutdown()
        self._meters.force_flush(millis)
        self._meters.shutdown(millis)


def _counting(inner: SpanExporter, owner: Emitter) -> SpanExporter:
    """`inner`, counting the spans it could not send."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Counting(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            try:
                result = inner.export(spans)
            except Exception:
                owner.exported(len(spans), False)
                raise
            owner.exported(len(spans), result is SpanExportResult.SUCCESS)
            return result

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return Counting()


def _read(pipe: IO[bytes], size: int) -> bytes | None:
    data = pipe.read(size)
    return data if data is not None and len(data) == size else None


def serve(settings: dict[str, str], source: IO[bytes], out: IO[bytes]) -> None:
    reports = Reports(out)
    try:
        emitter = Emitter(upstream=URL(settings["upstream"]), version=settings["version"],
                          protocol=settings["protocol"], reports=reports)
    except ValueError as exc:  # the SDK refuses its configuration (OTEL_BSP_* out of range…)
        print(f"otel: cannot export: {exc}", file=sys.stderr)
        sys.exit(2)
    reports.line("ready")
    timeout = 10.0
    while (header := _read(source, FRAME.size)) is not None:
        data = _read(source, FRAME.unpack(header)[0])
        if data is None:
            break
        for c in pickle.loads(data):
            if "close" in c:
                timeout = float(c["close"])
                continue
            try:
                emitter.emit(c)
            except Exception:  # one bad call costs its span, never the others
                log.exception("otel: could not export an exchange")
    emitter.close(timeout)


def _yield_the_cpu() -> None:
    """Run only on CPU time nothing else wants (Linux's SCHED_IDLE; elsewhere the lowest nice):
    on a busy machine export falls behind and drops, counted, rather than slow the proxy."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main() -> None:
    # Ended by its parent (end of input), never by a signal to the whole process group (Ctrl-C
    # in a terminal, a service manager's SIGTERM): the parent still has spans to hand over.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _yield_the_cpu()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    serve(json.loads(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
