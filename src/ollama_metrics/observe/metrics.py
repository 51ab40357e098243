"""Prometheus metrics on an injected registry, read from finished Interactions.

Names, labels and label values keep those of the original Ollama proxy (ollama_requests_total,
ollama_request_duration_seconds, ollama_tokens_generated, ollama_tokens_per_second,
ollama_active_requests; status success/error/cancelled) and add what serving engines measure
(shared/reference/metrics-conventions.md): wall-clock TTFT and time per output token, token
counters, load time, prefill speed. Buckets are sized for LLMs: TTFT reaches past ten minutes for
cold loads, durations reach two hours.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .interaction import ErrorType, Interaction, Outcome
from .labels import NONE, ModelLabels

M = TypeVar("M", Counter, Gauge, Histogram)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                    80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0, 5120.0, 7200.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000, 200000)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000,
                             2000, 5000)
PREFILL_BUCKETS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
                1280.0)

# `*_created` series double the exposition for no use in PromQL; the original proxy had none.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Ollama reports a few ms of load_duration even when the model is already in memory; only a real
# (re)load is worth a sample.
MIN_LOAD_SECONDS = 0.1


def status_label(outcome: Outcome) -> str:
    """The `status` label: the stored outcome word, with upstream_error folded into error (the
    original proxy's three values: success, error, cancelled)."""
    return Outcome.ERROR.value if outcome is Outcome.UPSTREAM_ERROR else outcome.value


_RESTARTS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def upstream_restarts(registry: CollectorRegistry) -> Counter:
    """The registry's one ollama_upstream_restarts_total, made on first use: the Supervisor
    counts on it, and Metrics shows it at 0 when the proxy started no Ollama, so that
    `increase()` and `absent()` on it behave either way."""
    counter = _RESTARTS.get(registry)
    if counter is None:
        counter = _RESTARTS[registry] = Counter(
            "ollama_upstream_restarts_total",
            "Times the proxy restarted an `ollama serve` that had exited", registry=registry)
    return counter


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors, as the default one has."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def multiprocess_registry(path: Path) -> CollectorRegistry:
    """What a worker's /metrics shows with `--workers N`: every process's metrics, summed by
    prometheus-client's multiprocess mode from its files in `path` (gauges as their
    `multiprocess_mode` says), and the process, platform and GC collectors of the worker that
    answered (they describe one process; there is no sum of them)."""
    registry = new_registry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return registry


class Metrics:
    def __init__(self, registry: CollectorRegistry, model_labels: ModelLabels) -> None:
        self.registry = registry
        self.model_label = model_labels
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = registry
        self.requests = Counter(
            "ollama_requests_total", "Requests through the proxy",
            ["model", "endpoint", "status", "prompt_category"], registry=r)
        self.request_duration = Histogram(
            "ollama_request_duration_seconds",
            "Wall-clock time from request received to last byte sent",
            ["model", "endpoint", "prompt_category"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram(
            "ollama_time_to_first_token_seconds",
            "Wall-clock time from request received to the first content chunk (streamed replies)",
            ["model", "endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "ollama_time_per_output_token_seconds",
            "Seconds per output token after the first (wall clock when streamed, "
            "else eval_duration/eval_count)",
            ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.streaming_duration = Histogram(
            "ollama_streaming_duration_seconds",
            "Wall-clock time from first to last content chunk (streamed replies)",
            ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.tokens_generated = Histogram(
            "ollama_tokens_generated", "Output tokens per request",
            ["model", "prompt_category"], buckets=TOKEN_BUCKETS, registry=r)
        self.tokens_per_second = Histogram(
            "ollama_tokens_per_second", "Generation speed, eval_count / eval_duration",
            ["model", "prompt_category"], buckets=TOKENS_PER_SECOND_BUCKETS, registry=r)
        self.input_tokens = Counter(
            "ollama_input_tokens_total", "Prompt tokens evaluated", ["model"], registry=r)
        self.output_tokens = Counter(
            "ollama_output_tokens_total", "Tokens generated", ["model"], registry=r)
        self.load_duration = Histogram(
            "ollama_model_load_duration_seconds",
            f"Model load time reported by Ollama (load_duration >= {MIN_LOAD_SECONDS}s)",
            ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.prefill_speed = Histogram(
            "ollama_prompt_eval_tokens_per_second",
            "Prompt evaluation speed, prompt_eval_count / prompt_eval_duration",
            ["model"], buckets=PREFILL_BUCKETS, registry=r)
        self.active = Gauge(  # with workers: the sum over the live ones
            "ollama_active_requests", "Requests in flight through the proxy", ["model"],
            registry=r, multiprocess_mode="livesum")
        self.disconnects = Counter(
            "ollama_client_disconnects_total", "Clients that went away before the reply ended",
            ["model", "endpoint"], registry=r)
        self.errors = Counter(
            "ollama_errors_total", "Failed requests by cause", ["error_type"], registry=r)
        upstream_restarts(r)
        self._expose_from_the_start()

    def _expose_from_the_start(self) -> None:
        """One series per family before any request, so that `absent()` and `increase()` on
        what the dashboard and the alert rules name behave from the first scrape. Every cause
        of error is known and few; the other families get the series a request that names no
        model on an unknown route would make (model `none`, endpoint and category `other`),
        which is a real series, not a placeholder, and adds no label value of its own."""
        for error_type in ErrorType:
            self._child(self.errors, error_type.value)
        for status in sorted({status_label(outcome) for outcome in Outcome}):
            self._child(self.requests, NONE, "other", status, "other")
        self._child(self.request_duration, NONE, "other", "other")
        self._child(self.ttft, NONE, "other")
        self._child(self.disconnects, NONE, "other")
        self._child(self.tokens_generated, NONE, "other")
        self._child(self.tokens_per_second, NONE, "other")
        for histogram in (self.tpot, self.streaming_duration, self.load_duration,
                          self.prefill_speed):
            self._child(histogram, NONE)
        self._child(self.input_tokens, NONE)
        self._child(self.output_tokens, NONE)
        self._child(self.active, NONE)

    def _child(self, metric: M, *values: str) -> M:
        """metric.labels(*values), cached: label values are bounded, and this is per request."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def started(self, i: Interaction) -> object:
        """Count a request in flight; returns the label to hand back to `finished`."""
        label = self.model_label(i.model)
        self._child(self.active, label).inc()
        return label

    def finished(self, i: Interaction, active_label: object) -> None:
        assert isinstance(active_label, str)
        self._child(self.active, active_label).dec()
        model = self.model_label(i.model)
        category = i.prompt_category
        endpoint = i.endpoint
        self._child(self.requests, model, endpoint, status_label(i.outcome), category).inc()
        self._child(self.request_duration, model, endpoint, category).observe(i.duration)
        if i.outcome is Outcome.CANCELLED:
            self._child(self.disconnects, model, endpoint).inc()
        if i.error_type is not None:
            self._child(self.errors, i.error_type.value).inc()
        if i.first_token is not None:
            self._child(self.ttft, model, endpoint).observe(i.first_token - i.started)
            if i.last_token is not None:
                self._child(self.streaming_duration, model).observe(i.last_token - i.first_token)
        if i.prompt_eval_count is not None:
            self._child(self.input_tokens, model).inc(i.prompt_eval_count)
        if i.eval_count is not None:
            self._child(self.output_tokens, model).inc(i.eval_count)
            self._child(self.tokens_generated, model, category).observe(i.eval_count)
        tps = i.tokens_per_second
        if tps is not None:
            self._child(self.tokens_per_second, model, category).observe(tps)
        tpot = i.time_per_output_token
        if tpot is not None:
            self._child(self.tpot, model).observe(tpot)
        pps = i.prompt_tokens_per_second
        if pps is not None:
            self._child(self.prefill_speed, model).observe(pps)
        if i.load_duration_ns is not None and i.load_duration_ns >= MIN_LOAD_SECONDS * 1e9:
            self._child(self.load_duration, model).observe(i.load_duration_ns / 1e9)
