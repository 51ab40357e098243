"""OpenTelemetry export (--otel): GenAI spans and metrics, checked as a collector receives them.

A receiver of ours decodes OTLP with the official opentelemetry-proto messages; an application
instrumented with the SDK calls Ollama through the proxy with the `ollama` client and finds the
proxy's span inside its own trace. The proxy is configured as a user would: OTEL_* variables.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import openai
import psutil
import pytest
from aiohttp import web
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from conftest import StartProxy
from fake_ollama import FakeOllama, Scenario
from helpers import RunningProxy, proxy_process, settle
from ollama_metrics.config import Config
from ollama_metrics.observe.interaction import Interaction
from ollama_metrics.observe.metrics import new_registry
from ollama_metrics.ollama.wire import reply_reader
from ollama_metrics.server.app import create_app
from ollama_metrics.server.lifecycle import make_runner
from otlp_receiver import Receiver, attributes, grpc_server
from services import Phoenix, VictoriaMetrics

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue? Mail me at bob@example.com"}]


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    # The SDK reads its standard variables itself.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "proxy-under-test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    yield r
    await r.close()


async def _spans(receiver: Receiver, name: str, count: int = 1) -> list[Span]:
    await settle(lambda: len(receiver.named(name)) >= count, timeout=5.0)
    return receiver.named(name)


async def _otel_proxy(fake: FakeOllama, start_proxy: StartProxy, **settings: object
                      ) -> RunningProxy:
    return await start_proxy(fake.url, otel=True, **settings)


async def test_a_chat_is_one_genai_span(receiver: Receiver, fake: FakeOllama,
                                        start_proxy: StartProxy) -> None:
    proxy = await _otel_proxy(fake, start_proxy)
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.chat(model="llama3.2", messages=MESSAGES, stream=False,
                          options={"temperature": 0.2, "top_p": 0.9, "num_predict": 64,
                                   "seed": 7, "stop": ["\n\n"]})
        await client.list()  # not an Ollama call: no span
    [span] = await _spans(receiver, "chat llama3.2:latest")
    a = attributes(span)
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert not span.parent_span_id  # no trace context from the client: a root
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "ollama"
    assert a["gen_ai.request.model"] == "llama3.2:latest"
    assert a["gen_ai.response.model"] == "llama3.2"
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.top_p"] == 0.9
    assert a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.request.seed"] == 7
    assert a["gen_ai.request.stop_sequences"] == ["\n\n"]
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.output_tokens"] == 4
    assert isinstance(a["gen_ai.usage.input_tokens"], int)
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] == fake.port
    assert "error.type" not in a
    assert "gen_ai.response.id" not in a  # native replies carry no id
    assert not any(k.startswith("gen_ai.input") or k.startswith("gen_ai.output") for k in a)
    assert span.end_time_unix_nano > span.start_time_unix_nano
    assert receiver.resources[0]["service.name"] == "proxy-under-test"
    assert len(receiver.spans) == 1


async def test_streamed_generate_embed_and_errors(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await _otel_proxy(fake, start_proxy)
    async with ollama.AsyncClient(host=proxy.url) as client:
        async for _ in await client.generate(model="llama3.2", prompt="hi", stream=True):
            pass
        await client.embed(model="all-minilm", input=["a", "b"])
        with pytest.raises(ollama.ResponseError):
            await client.chat(model="missing", messages=MESSAGES)
    [generate] = await _spans(receiver, "text_completion llama3.2:latest")
    assert any(e.name == "gen_ai.first_token" for e in generate.events)
    assert attributes(generate)["ollama_metrics.time_to_first_token"] > 0
    [embed] = await _spans(receiver, "embeddings all-minilm:latest")
    assert attributes(embed)["gen_ai.embeddings.dimension.count"] > 0
    [failed] = await _spans(receiver, "chat missing:latest")
    assert attributes(failed)["error.type"] == "404"
    assert failed.status.code == Status.STATUS_CODE_ERROR


async def test_openai_routes_and_a_cancelled_call(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await _otel_proxy(fake, start_proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="ollama")
    async with client:
        reply = await client.chat.completions.create(
            model="llama3.2", messages=MESSAGES, max_tokens=32, temperature=0.5, seed=3,  # type: ignore[arg-type]
            top_p=0.8, stop=["END"])
        streamed = await client.completions.create(model="llama3.2", prompt="hi", stream=True,
                                                   stream_options={"include_usage": True})
        ids = {chunk.id async for chunk in streamed}
    [span] = await _spans(receiver, "chat llama3.2:latest")
    a = attributes(span)
    assert a["gen_ai.request.max_tokens"] == 32
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.top_p"] == 0.8
    assert a["gen_ai.request.seed"] == 3
    assert a["gen_ai.request.stop_sequences"] == ["END"]
    assert a["gen_ai.response.id"] == reply.id
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens  # type: ignore[union-attr]
    assert a["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert a["ollama_metrics.endpoint"] == "/v1/chat/completions"
    [completion] = await _spans(receiver, "text_completion llama3.2:latest")
    assert [attributes(completion)["gen_ai.response.id"]] == list(ids)
    fake.scenarios["slow:latest"] = Scenario(tokens=["a"] * 50, token_delay=0.05)
    async with aiohttp.ClientSession() as http, http.post(
            proxy.url + "/api/generate", json={"model": "slow", "prompt": "hi"}) as cut:
        await cut.content.readline()  # the first token, then the client goes away
    [cancelled] = await _spans(receiver, "text_completion slow:latest")
    assert attributes(cancelled)["error.type"] == "cancelled"
    assert attributes(cancelled)["ollama_metrics.outcome"] == "cancelled"


async def test_the_app_trace_holds_the_proxy_span(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy) -> None:
    """An app instrumented with the SDK, calling through the proxy inside its span."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.propagate import inject
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    proxy = await _otel_proxy(fake, start_proxy)
    app = TracerProvider()
    app.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=receiver.url + "/v1/traces")))
    tracer = app.get_tracer("the-app")
    with tracer.start_as_current_span("answer-question") as parent:
        headers: dict[str, str] = {}
        inject(headers)  # what an instrumented HTTP client adds
        async with ollama.AsyncClient(host=proxy.url, headers=headers) as client:
            await client.chat(model="llama3.2", messages=MESSAGES, stream=False)
    await asyncio.to_thread(app.shutdown)
    [ours] = await _spans(receiver, "chat llama3.2:latest")
    [theirs] = await _spans(receiver, "answer-question")  # the app's, through its own exporter
    context = parent.get_span_context()
    assert theirs.span_id == context.span_id.to_bytes(8, "big")
    assert ours.trace_id == context.trace_id.to_bytes(16, "big")
    assert ours.parent_span_id == context.span_id.to_bytes(8, "big")
    sent = [r.headers for r in fake.requests if r.path_qs == "/api/chat"]
    assert [h.get("traceparent") for h in sent] == [headers["traceparent"]]  # unchanged


async def test_content_only_with_otel_content_and_redacted(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await _otel_proxy(fake, start_proxy, otel_content=True)
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.chat(model="llama3.2", messages=MESSAGES, stream=False)
    [span] = await _spans(receiver, "chat llama3.2:latest")
    a = attributes(span)
    assert "Why is the sky blue?" in a["gen_ai.input.messages"]
    assert "bob@example.com" not in a["gen_ai.input.messages"]
    assert "[REDACTED_EMAIL]" in a["gen_ai.input.messages"]
    assert "Hello, world!" in a["gen_ai.output.messages"]


async def test_genai_metrics_with_the_spec_buckets(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await _otel_proxy(fake, start_proxy)
    async with ollama.AsyncClient(host=proxy.url) as client:
        async for _ in await client.chat(model="llama3.2", messages=MESSAGES, stream=True):
            pass
    names = ("gen_ai.client.operation.duration", "gen_ai.client.token.usage",
             "gen_ai.server.request.duration", "gen_ai.server.time_to_first_token",
             "gen_ai.server.time_per_output_token")
    await settle(lambda: all(n in receiver.metrics for n in names), timeout=5.0)
    duration = receiver.metrics["gen_ai.client.operation.duration"]
    assert list(duration.histogram.data_points[0].explicit_bounds) == [
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
    tokens = receiver.metrics["gen_ai.client.token.usage"]
    kinds = {value.value.string_value for p in tokens.histogram.data_points
             for value in p.attributes if value.key == "gen_ai.token.type"}
    assert kinds == {"input", "output"}
    assert list(receiver.metrics["gen_ai.server.time_to_first_token"]
                .histogram.data_points[0].explicit_bounds)[:3] == [0.001, 0.005, 0.01]


@pytest.mark.slow(reason="the gRPC exporters take seconds to shut down")
async def test_export_over_grpc(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, port = grpc_server(receiver)
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        proxy = await _otel_proxy(fake, start_proxy, otel_protocol="grpc")
        async with ollama.AsyncClient(host=proxy.url) as client:
            await client.chat(model="llama3.2", messages=MESSAGES, stream=False)
        [span] = await _spans(receiver, "chat llama3.2:latest")
        assert attributes(span)["gen_ai.provider.name"] == "ollama"
        await settle(lambda: "gen_ai.client.operation.duration" in receiver.metrics, 5.0)
    finally:
        server.stop(None)


@pytest.mark.slow(reason="waits for the exporter to give up")
async def test_an_unreachable_collector_costs_counted_spans(
        fake: FakeOllama, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing there
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    proxy = await _otel_proxy(fake, start_proxy)
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.chat(model="llama3.2", messages=MESSAGES, stream=False)
    await settle(lambda: proxy.sample("ollama_otel_spans_dropped_total",
                                      reason="export_failed") == 1, timeout=10.0)
    caplog.clear()  # the SDK's exporter logs its failure, as it should


async def test_the_batch_processor_follows_otel_bsp_variables(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own variables size its queue: with room for one span and a slow collector, the
    first span is being sent while the next two find the queue full, and are counted."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
    receiver.delay = 0.5
    proxy = await _otel_proxy(fake, start_proxy)
    async with ollama.AsyncClient(host=proxy.url) as client:
        for _ in range(3):
            await client.generate(model="llama3.2", prompt="hi", stream=False)
    await settle(lambda: proxy.sample("ollama_otel_spans_dropped_total",
                                      reason="queue_full") == 2, timeout=5.0)
    [_] = await _spans(receiver, "text_completion llama3.2:latest")


async def test_the_exporting_process_sends_what_waits_and_ends_with_the_app(
        receiver: Receiver, fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK runs in a child process of the proxy: started with the app, at idle priority,
    deaf to the process group's signals; on shutdown it sends what still waits (the schedule
    delay is long here) and exits."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    config = Config.build(upstream=fake.url, listen="127.0.0.1:0", otel=True)
    runner = make_runner(create_app(config, new_registry(), None), config)
    await runner.setup()
    try:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        [child] = [p for p in psutil.Process().children()
                   if "ollama_metrics.observe.otel_process" in p.cmdline()]
        if hasattr(os, "SCHED_IDLE"):  # set first thing once it runs
            await settle(lambda: os.sched_getscheduler(child.pid) == os.SCHED_IDLE, 10.0)
        # What a terminal's Ctrl-C or a service manager sends the whole process group: the
        # child stays, for the proxy to end once it has handed everything over.
        child.send_signal(signal.SIGINT)
        child.send_signal(signal.SIGTERM)
        async with ollama.AsyncClient(host=f"http://127.0.0.1:{sock.getsockname()[1]}") as c:
            await c.generate(model="llama3.2", prompt="hi", stream=False)
        await asyncio.sleep(0.2)
        assert receiver.spans == []  # waiting in the child's batch
    finally:
        await runner.cleanup()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert [s.name for s in receiver.spans] == ["text_completion llama3.2:latest"]


async def test_a_configuration_the_sdk_refuses_costs_counted_spans(
        receiver: Receiver, fake: FakeOllama, start_proxy: StartProxy,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A batch larger than the queue (OTEL_BSP_MAX_EXPORT_BATCH_SIZE defaults to 512): the SDK
    refuses it, the exporting process exits, the proxy carries on and counts what it drops."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1")
    proxy = await _otel_proxy(fake, start_proxy)
    async with ollama.AsyncClient(host=proxy.url) as client:
        await client.generate(model="llama3.2", prompt="hi", stream=False)
    await settle(lambda: proxy.sample("ollama_otel_spans_dropped_total",
                                      reason="export_failed") == 1, timeout=10.0)
    assert any("exporting process exited (code 2)" in r.getMessage() for r in caplog.records)
    caplog.clear()


@pytest.mark.slow(reason="a proxy process started and stopped by SIGTERM")
async def test_a_stopped_proxy_process_hands_over_its_spans(
        receiver: Receiver, fake: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --otel` as a process, stopped as a service manager stops it: the call still
    waiting in the exporting process reaches the collector, and no process is left behind."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    with proxy_process(fake.url, "--otel", "--analytics-backend", "none") as p:
        async with ollama.AsyncClient(host=p.url) as client:
            await client.chat(model="llama3.2", messages=MESSAGES, stream=False)
        [child] = psutil.Process(p.proc.pid).children()
        await asyncio.sleep(0.2)
        assert receiver.spans == []
        assert await asyncio.to_thread(p.stop) == 0  # the collector answers meanwhile
    assert [s.name for s in receiver.spans] == ["chat llama3.2:latest"]
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_otel_without_the_extra_fails_at_start() -> None:
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "from ollama_metrics.cli import main\n"
            "main(['serve', '--otel', '--upstream', 'http://127.0.0.1:9'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install 'ollama-metrics[otel]'" in lines[0]


@pytest.mark.slow(reason="starts Arize Phoenix, a real OTLP receiver: about 20 s")
async def test_phoenix_stores_the_proxy_span_inside_the_app_trace(
        receiver: Receiver, phoenix: Phoenix, fake: FakeOllama, start_proxy: StartProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party receiver takes our spans (Phoenix takes traces, not metrics: those still go
    to our receiver) and, asked back over its REST API, has ours as a child of the app's."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.propagate import inject
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    project = f"ollama-metrics-{uuid.uuid4().hex[:8]}"  # Phoenix files spans by this attribute
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", phoenix.traces)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"openinference.project.name={project}")
    proxy = await _otel_proxy(fake, start_proxy)
    app = TracerProvider(resource=Resource({"openinference.project.name": project}))
    app.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=phoenix.traces)))
    with app.get_tracer("the-app").start_as_current_span("answer-question") as parent:
        headers: dict[str, str] = {}
        inject(headers)
        async with ollama.AsyncClient(host=proxy.url, headers=headers) as client:
            await client.chat(model="llama3.2", messages=MESSAGES, stream=False,
                              options={"temperature": 0.2, "num_predict": 64})
    await asyncio.to_thread(app.shutdown)
    stored: dict[str, dict[str, Any]] = {}

    async def both_stored() -> bool:  # Phoenix writes what it receives in batches
        async with aiohttp.ClientSession() as http, http.get(
                f"{phoenix.url}/v1/projects/{project}/spans", params={"limit": "100"}) as reply:
            if reply.status == 200:
                stored.update({s["name"]: s for s in (await reply.json())["data"]})
        return {"answer-question", "chat llama3.2:latest"} <= stored.keys()

    for _ in range(150):
        if await both_stored():
            break
        await asyncio.sleep(0.1)
    assert {"answer-question", "chat llama3.2:latest"} <= stored.keys(), stored.keys()
    ours, theirs = stored["chat llama3.2:latest"], stored["answer-question"]
    context = parent.get_span_context()
    assert theirs["context"]["span_id"] == f"{context.span_id:016x}"
    assert ours["context"]["trace_id"] == f"{context.trace_id:032x}"
    assert ours["parent_id"] == f"{context.span_id:016x}"
    a = ours["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "ollama"
    assert a["gen_ai.request.model"] == "llama3.2:latest"
    assert a["gen_ai.response.model"] == "llama3.2"
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.usage.output_tokens"] == 4
    assert a["server.port"] == fake.port


@pytest.mark.parametrize(("content_type", "body", "expected"), [
    ("text/event-stream",  # /v1/responses, streamed: the id comes with response.created
     b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1"}}\n\n'
     b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1",'
     b'"usage":{"input_tokens":3,"output_tokens":2}}}\n\n', "resp_1"),
    ("text/event-stream",  # /v1/messages (Anthropic), streamed
     b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1"}}\n\n'
     b'event: message_stop\ndata: {"type":"message_stop"}\n\n', "msg_1"),
    ("application/json",  # /v1/messages, whole
     b'{"id":"msg_2","type":"message","usage":{"input_tokens":3,"output_tokens":2}}', "msg_2"),
    ("application/json",  # /v1/responses, whole
     b'{"id":"resp_2","object":"response","model":"llama3.2"}', "resp_2"),
    ("application/x-ndjson",  # native: no id
     b'{"model":"llama3.2","response":"hi","done":true,"done_reason":"stop"}\n', None),
])
def test_the_reply_id_of_each_route_shape(content_type: str, body: bytes,
                                          expected: str | None) -> None:
    """gen_ai.response.id comes from Interaction.response_id, read from replies in the reference's
    shapes (the fake Ollama has no /v1/responses or /v1/messages)."""
    i = Interaction(method="POST", path="/v1/x", endpoint="/v1/x", started_at=0.0, started=0.0)
    reader = reply_reader(content_type, i, 1 << 20)
    reader.feed(body, 1.0)
    reader.close()
    assert i.response_id == expected


# The GenAI conventions' explicit bucket boundaries, as `le` labels.
SPEC_BUCKETS: dict[str, list[float]] = {
    "gen_ai_client_operation_duration_seconds": [
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92],
    "gen_ai_client_token_usage": [
        1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
        67108864],
    "gen_ai_server_time_to_first_token_seconds": [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10],
    "gen_ai_server_time_per_output_token_seconds": [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5],
}


@pytest.mark.slow(reason="starts VictoriaMetrics, a real OTLP metrics receiver, and waits for "
                         "its queries to show the exports")
async def test_victoria_metrics_stores_the_genai_metrics(
        receiver: Receiver, victoria_metrics: VictoriaMetrics, fake: FakeOllama,
        start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party receiver takes our metrics over OTLP/HTTP (traces still go to our receiver)
    and, asked with PromQL, holds each call's count, the tokens Ollama reported, the spec's
    buckets and the service's name."""
    service = f"ollama-metrics-{uuid.uuid4().hex[:8]}"  # the receiver lives for the session
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", victoria_metrics.otlp_metrics)
    monkeypatch.setenv("OTEL_SERVICE_NAME", service)
    fake.scenarios["alpha:latest"] = Scenario(tokens=["a", "b", "c"], prompt_eval_count=11)
    fake.scenarios["beta:latest"] = Scenario(tokens=["x"] * 5, prompt_eval_count=7,
                                             token_delay=0.01)
    proxy = await _otel_proxy(fake, start_proxy)
    async with ollama.AsyncClient(host=proxy.url) as client:
        for _ in range(2):
            await client.chat(model="alpha", messages=MESSAGES, stream=False)
        async for _ in await client.generate(model="beta", prompt="hi", stream=True):
            pass
        with pytest.raises(ollama.ResponseError):
            await client.chat(model="missing", messages=MESSAGES)
    ours = f'service_name="{service}"'
    async with aiohttp.ClientSession() as http:

        async def query(promql: str, *by: str) -> dict[tuple[str, ...], float]:
            # Stored rows become searchable when VictoriaMetrics flushes them, seconds later
            # (sometimes over 10 s here); its flush handler, meant for tests, does it now.
            async with http.get(victoria_metrics.url + "/internal/force_flush") as flushed:
                assert flushed.status == 200
            async with http.get(victoria_metrics.url + "/api/v1/query",
                                params={"query": promql}) as reply:
                body = await reply.json()
            assert reply.status == 200, body
            return {tuple(r["metric"].get(label, "") for label in by): float(r["value"][1])
                    for r in body["data"]["result"]}

        async def holds(promql: str, by: tuple[str, ...],
                        expected: dict[tuple[str, ...], float]) -> None:
            got: dict[tuple[str, ...], float] = {}
            for _ in range(100):  # exported every 100 ms; searchable a moment after
                got = await query(promql, *by)
                if got == expected:
                    return
                await asyncio.sleep(0.1)
            assert got == expected, promql

        model = ("gen_ai_operation_name", "gen_ai_request_model", "error_type")
        await holds(f"sum by ({', '.join(model)}) "
                    f"(gen_ai_client_operation_duration_seconds_count{{{ours}}})", model,
                    {("chat", "alpha:latest", ""): 2, ("text_completion", "beta:latest", ""): 1,
                     ("chat", "missing:latest", "404"): 1})
        tokens = ("gen_ai_request_model", "gen_ai_token_type")
        await holds(f"sum by (gen_ai_request_model, gen_ai_token_type) "
                    f"(gen_ai_client_token_usage_sum{{{ours}}})", tokens,
                    {("alpha:latest", "input"): 22, ("alpha:latest", "output"): 6,
                     ("beta:latest", "input"): 7, ("beta:latest", "output"): 5})
        # Server duration and time per output token: the successes (the non-streamed chats'
        # time per token from Ollama's own eval duration).
        successes: dict[tuple[str, ...], float] = {("alpha:latest",): 2, ("beta:latest",): 1}
        for name in ("gen_ai_server_request_duration_seconds",
                     "gen_ai_server_time_per_output_token_seconds"):
            await holds(f"sum by (gen_ai_request_model) ({name}_count{{{ours}}})",
                        ("gen_ai_request_model",), successes)
        # Time to first token: the streamed call only.
        await holds(f"sum by (gen_ai_request_model) "
                    f"(gen_ai_server_time_to_first_token_seconds_count{{{ours}}})",
                    ("gen_ai_request_model",), {("beta:latest",): 1})
        for name, bounds in SPEC_BUCKETS.items():
            buckets = await query(f'{name}_bucket{{{ours}, gen_ai_request_model="beta:latest"}}',
                                  "le", "gen_ai_token_type")
            les = sorted({float(le) for le, _ in buckets})
            assert les == [*bounds, float("inf")], name
            assert buckets[("+Inf", "output" if "token_usage" in name else "")] == 1, name
        labels = await query(f"gen_ai_client_operation_duration_seconds_count{{{ours}}}",
                             "gen_ai_provider_name", "server_port", "service_name")
        assert set(labels) == {("ollama", str(fake.port), service)}
    assert not receiver.metrics  # OTEL_EXPORTER_OTLP_METRICS_ENDPOINT sent them elsewhere
