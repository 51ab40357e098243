"""Every metric the Grafana dashboard, the alert rules and the README name is on /metrics from
the first scrape, before any request, so `increase()` and `absent()` on it behave."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import settle
from ollama_metrics.analytics.settings import AnalyticsConfig

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ollama-metrics.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
README = ROOT / "README.md"

# A metric name in PromQL: not part of a recorded series' name (`instance:ollama_x:rate5m`),
# not a wildcard (`ollama_model_*`).
_IN_PROMQL = re.compile(r"(?<![\w:])ollama_[a-z_]*[a-z](?![\w:*])")
# In prose, a name stands alone between backticks.
_IN_PROSE = re.compile(r"`(ollama_[a-z_]*[a-z])`")
_PROMQL_BLOCK = re.compile(r"```promql\n(.*?)```", re.S)


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def named_metrics() -> dict[str, set[str]]:
    """Each metric name, with the files that name it."""
    found: dict[str, set[str]] = {}

    def add(names: Iterator[str] | list[str], where: str) -> None:
        for name in names:
            found.setdefault(name, set()).add(where)

    for expr in _exprs(json.loads(DASHBOARD.read_text())):
        add(_IN_PROMQL.findall(expr), DASHBOARD.name)
    for expr in _exprs(yaml.safe_load(RULES.read_text())):
        add(_IN_PROMQL.findall(expr), RULES.name)
    readme = README.read_text()
    add(_IN_PROSE.findall(readme), README.name)
    for block in _PROMQL_BLOCK.findall(readme):
        add(_IN_PROMQL.findall(block), README.name)
    return found


def test_the_names_are_read() -> None:
    """The extraction itself: it finds names from each file, and no fragments."""
    names = named_metrics()
    assert {"ollama_requests_total", "ollama_upstream_restarts_total",
            "ollama_time_to_first_token_seconds_bucket", "ollama_analytics_dropped_total",
            "ollama_model_loaded"} <= names.keys()
    assert {where for places in names.values() for where in places} == {
        DASHBOARD.name, RULES.name, README.name}
    assert not {"ollama_requests", "ollama_model", "ollama_metrics",
                "ollama_analytics"} & names.keys()


async def test_every_named_metric_is_exposed_from_the_start(
        fake: FakeOllama, start_any: StartProxy, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    proxy = await start_any(fake.url, AnalyticsConfig.build(analytics_dir=str(tmp_path)),
                            ps_interval=0.05)
    # The loaded-model gauges and the version describe Ollama: they are there once its first
    # /api/ps answer is (a poll, not a request through the proxy).
    await settle(lambda: proxy.sample("ollama_up") == 1)
    async with http.get(proxy.url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {s.name: s for family in text_string_to_metric_families(text)
               for s in family.samples}
    assert not any(s.value for name, s in samples.items()
                   if name.startswith("ollama_requests_total")), "no request was made"
    missing = {name: sorted(where) for name, where in named_metrics().items()
               if name not in samples and f"{name}_bucket" not in samples}
    assert not missing, f"named but not exposed before any request: {missing}"
    # Counters start at 0, the restart counter too, though this proxy started no Ollama.
    assert samples["ollama_upstream_restarts_total"].value == 0
    assert samples["ollama_errors_total"].value == 0
