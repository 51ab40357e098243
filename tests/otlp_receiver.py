"""An OTLP/HTTP receiver of ours: POST /v1/traces and /v1/metrics (protobuf), decoded with the
official opentelemetry-proto messages, kept for exact checks. Also the same over gRPC."""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(span: Span) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in span.attributes}


class Receiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}  # name → the last Metric message received
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.delay = 0.0  # seconds before answering an export of spans: a slow collector

    def take_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for rs in request.resource_spans:
            self.resources.append({kv.key: value(kv.value) for kv in rs.resource.attributes})
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)

    async def _traces(self, request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        await asyncio.sleep(self.delay)
        self.take_traces(message)
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse()
                            .SerializeToString(), content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        message = metrics_service_pb2.ExportMetricsServiceRequest()
        message.ParseFromString(await request.read())
        self.take_metrics(message)
        return web.Response(body=metrics_service_pb2.ExportMetricsServiceResponse()
                            .SerializeToString(), content_type="application/x-protobuf")

    def take_metrics(self, message: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        for rm in message.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    self.metrics[metric.name] = metric

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


class GrpcTraces(trace_service_pb2_grpc.TraceServiceServicer):
    """The OTLP trace service over gRPC, feeding a Receiver."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.take_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class GrpcMetrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    """The OTLP metrics service over gRPC, feeding a Receiver."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest,
               context: Any) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self.receiver.take_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def grpc_server(receiver: Receiver) -> tuple[Any, int]:
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        GrpcTraces(receiver), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        GrpcMetrics(receiver), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
