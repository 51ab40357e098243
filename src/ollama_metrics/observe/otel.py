"""OpenTelemetry export: each Ollama call as a GenAI client span, and the GenAI metrics, by OTLP.

Off unless --otel. The SDK and its exporters are the `otel` extra, imported only here and only when
turned on; `load()` says what to install when they are missing. Where telemetry goes, with which
headers, under which service name and resource, and how spans are sampled, is the SDK's standard
configuration, read by the SDK itself from its OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT,
_HEADERS, _TIMEOUT, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG),
OTEL_BSP_SCHEDULE_DELAY, OTEL_METRIC_EXPORT_INTERVAL). The protocol picks the exporter class, so it
is a setting of ours (--otel-protocol, read from OTEL_EXPORTER_OTLP_PROTOCOL).

Conventions: OpenTelemetry semantic conventions v1.41.0 for GenAI client spans and metrics. Only
Ollama calls get spans (OPERATIONS); every other route gets none. Providers are private to the
proxy: nothing global is set, so an application embedding the proxy keeps its own.

The request path pays for one span built from the finished Interaction and a deque append (the
SDK's BatchSpanProcessor); export runs on the SDK's thread. With content on, spans are built on a
thread of ours, since redacting long texts is regex work. Spans that cannot be sent are dropped and
counted in ollama_otel_spans_dropped_total: `queue_full` when more wait than the queue holds (the
collector is slow or away), `export_failed` when the exporter gave up on a batch.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from yarl import URL

from .interaction import ErrorType, Interaction, Outcome
from .labels import ModelLabels

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

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
# The spec's ExplicitBucketBoundaries, metric by metric.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
QUEUE_SIZE = 2048  # spans waiting for export, as the SDK's default

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


class Export:
    """The observer that turns finished Ollama calls into spans and GenAI metrics.

    `span_exporter` and `metric_reader` replace the OTLP ones (tests, or an embedding app).
    """

    def __init__(self, *, upstream: URL, registry: CollectorRegistry, labels: ModelLabels,
                 version: str, protocol: str = "http/protobuf", content: Content | None = None,
                 queue_size: int = QUEUE_SIZE, span_exporter: SpanExporter | None = None,
                 metric_reader: MetricReader | None = None) -> None:
        load(protocol)
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, by the SDK
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "ollama-metrics"}))
        if span_exporter is None or metric_reader is None:
            default_spans, default_reader = _exporters(protocol)
            span_exporter = span_exporter or default_spans
            metric_reader = metric_reader or default_reader
        self._upstream = upstream
        self._labels = labels
        self._content = content
        self._queue_size = queue_size
        self._lock = threading.Lock()
        self._waiting = 0  # spans handed to the processor and not yet through the exporter
        self._building = 0  # exchanges waiting for the content thread
        self.dropped = Counter(
            "ollama_otel_spans_dropped_total",
            "OpenTelemetry spans not sent: queue_full (the collector is slow or away), "
            "export_failed (the exporter gave up)", ["reason"], registry=registry)
        for reason in ("queue_full", "export_failed"):
            self.dropped.labels(reason)
        self._processor = BatchSpanProcessor(_counting(span_exporter, self),
                                             max_queue_size=queue_size)
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
        self._thread = ThreadPoolExecutor(1, "otel-content") if content is not None else None

    # --- the Observer protocol -----------------------------------------------------------------

    def started(self, interaction: Interaction) -> object:
        return None

    def finished(self, i: Interaction, token: object) -> None:
        operation = OPERATIONS.get(i.endpoint)
        if operation is None:
            return
        # A copy: the recorder lets go of the request's messages and images once it has built
        # its record, and this one may be exported after that.
        i = copy.copy(i)
        body = i.params
        try:
            if self._thread is None:
                self._emit(i, body, operation)
                return
            with self._lock:
                if self._building >= self._queue_size:
                    self.dropped.labels("queue_full").inc()
                    return
                self._building += 1
            self._thread.submit(self._emit_built, i, body, operation)
        except Exception:  # an observer never breaks the proxy
            log.exception("otel: could not export an exchange")

    # --- spans and metrics ---------------------------------------------------------------------

    def _emit_built(self, i: Interaction, body: dict[str, Any] | None, operation: str) -> None:
        try:
            self._emit(i, body, operation)
        except Exception:
            log.exception("otel: could not export an exchange")
        finally:
            with self._lock:
                self._building -= 1

    def _emit(self, i: Interaction, body: dict[str, Any] | None, operation: str) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode

        error = error_type(i)
        common: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDER,
        }
        if self._upstream.host is not None:
            common["server.address"] = self._upstream.host
        if self._upstream.port is not None:
            common["server.port"] = self._upstream.port
        if error is not None:
            common["error.type"] = error
        attributes = dict(common)
        if i.model:
            attributes["gen_ai.request.model"] = i.model
        if i.response_model:
            attributes["gen_ai.response.model"] = i.response_model
        attributes.update(request_attributes(body, i.options))
        if i.done_reason:
            attributes["gen_ai.response.finish_reasons"] = [i.done_reason]
        if i.prompt_eval_count is not None:
            attributes["gen_ai.usage.input_tokens"] = i.prompt_eval_count
        if i.eval_count is not None:
            attributes["gen_ai.usage.output_tokens"] = i.eval_count
        if i.embedding_dims is not None:
            attributes["gen_ai.embeddings.dimension.count"] = i.embedding_dims
        ttft = i.ttft
        if ttft is not None:
            attributes["ollama_metrics.time_to_first_token"] = ttft
        attributes["ollama_metrics.outcome"] = i.outcome.value
        attributes["ollama_metrics.endpoint"] = i.endpoint
        parent = Context()  # a root span unless the client sent its trace context
        if i.traceparent is not None:
            carrier = {"traceparent": i.traceparent}
            if i.tracestate is not None:
                carrier["tracestate"] = i.tracestate
            parent = self._propagator.extract(carrier, getter=self._getter)
        start = int(i.started_at * 1e9)
        end = int((i.ended_at if i.ended_at is not None else i.started_at + i.duration) * 1e9)
        name = f"{operation} {i.model}" if i.model else operation
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.CLIENT,
                                       attributes=attributes, start_time=start)
        if span.is_recording():
            if self._content is not None:
                span.set_attributes(self._content(i, body))
            if ttft is not None:
                span.add_event("gen_ai.first_token", timestamp=start + int(ttft * 1e9))
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            with self._lock:
                full = self._waiting >= self._queue_size
                if not full:
                    self._waiting += 1
            if full:
                self.dropped.labels("queue_full").inc()
            else:
                span.end(end_time=end)
        self._measure(i, common)

    def _measure(self, i: Interaction, common: dict[str, Any]) -> None:
        # Model names on metrics are bounded like the Prometheus labels.
        attributes = dict(common)
        if i.model:
            attributes["gen_ai.request.model"] = self._labels(i.model)
        if i.response_model:
            attributes["gen_ai.response.model"] = self._labels(i.response_model)
        self._operation_duration.record(i.duration, attributes)
        if i.prompt_eval_count is not None:
            self._token_usage.record(i.prompt_eval_count,
                                     {**attributes, "gen_ai.token.type": "input"})
        if i.eval_count is not None:
            self._token_usage.record(i.eval_count, {**attributes, "gen_ai.token.type": "output"})
        if i.outcome is not Outcome.SUCCESS:
            return
        self._request_duration.record(i.duration, attributes)
        if i.ttft is not None:
            self._ttft.record(i.ttft, attributes)
        tpot = i.time_per_output_token
        if tpot is not None:
            self._tpot.record(tpot, attributes)

    def _exported(self, count: int, ok: bool) -> None:
        with self._lock:
            self._waiting = max(0, self._waiting - count)
        if not ok:
            self.dropped.labels("export_failed").inc(count)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is waiting (up to `timeout` seconds each for spans and metrics), then stop.
        Blocking: call it off the event loop."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        millis = int(timeout * 1000)
        self._traces.force_flush(millis)
        self._traces.shutdown()
        self._meters.force_flush(millis)
        self._meters.shutdown(millis)


def _counting(inner: SpanExporter, owner: Export) -> SpanExporter:
    """`inner`, counting the spans it could not send."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Counting(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            try:
                result = inner.export(spans)
            except Exception:
                owner._exported(len(spans), False)
                raise
            owner._exported(len(spans), result is SpanExportResult.SUCCESS)
            return result

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return Counting()
