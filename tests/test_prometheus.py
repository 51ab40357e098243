"""The PromQL we ship, run by a real Prometheus scraping a real proxy with traffic through it.

Every expression in the Grafana dashboard, in deploy/prometheus/rules.yml and in the README's
```promql examples must parse. Expressions on metrics the proxy exposes today ("traffic") must
return data. Expressions on metrics still being built ("pending", PENDING below) must parse, and
must return data as soon as the proxy's /metrics carries samples of them, so this test tightens
by itself as those features land. Alerts are conditions: their data check runs with each
comparison against a number made a `bool` comparison, so "the series exist" is what is checked,
not "the alert fires" (rules.test.yml covers firing).

Prometheus is Debian's `prometheus` package (`.ci/run` installs it); it is started here with a
temporary config and storage, not as a service.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from helpers import Process, fake_process, proxy_process
from services import require

pytestmark = pytest.mark.slow(reason="a real Prometheus scraping a proxy process, and promtool")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ollama-metrics.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
README = ROOT / "README.md"

# Specified metrics that other features are adding (models, supervisor, analytics queue).
PENDING = frozenset({
    "ollama_up", "ollama_model_loaded", "ollama_model_vram_bytes", "ollama_model_size_bytes",
    "ollama_model_expires_in_seconds", "ollama_model_context_length",
    "ollama_upstream_restarts_total", "ollama_upstream_info",
    "ollama_analytics_queue_size", "ollama_analytics_queue_capacity",
    "ollama_analytics_writes_total", "ollama_analytics_dropped_total",
})

# Grafana's variables, as the test's short history needs them ("All" is `.*`).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m",
    "$instance": ".*", "$model": ".*",
}

SCENARIOS = {
    # load_duration >= 0.1 s so that model load time is recorded
    "llama3.2:latest": {"tokens": ["The", " sky", " is", " blue", " because", "."],
                        "token_delay": 0.005, "load_duration": 200_000_000},
    "broken:latest": {"error_before": [500, "model runner has unexpectedly stopped"]},
    "slow:latest": {"tokens": ["tick"] * 200, "token_delay": 0.05},
}
REQUESTS_PER_BATCH = 7

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# A comparison with a number (not a label matcher: those compare with a string).
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(?=[0-9.])")

T = TypeVar("T")


@dataclass(frozen=True)
class Expression:
    source: str
    promql: str
    alert: bool = False

    @property
    def query(self) -> str:
        """The expression with Grafana's variables filled in."""
        text = self.promql
        for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
            text = text.replace(name, GRAFANA_VARIABLES[name])
        assert "$" not in text, f"{self.source}: unknown Grafana variable in {self.promql!r}"
        return text

    @property
    def data_query(self) -> str:
        """What must return data: for an alert, its condition with `bool` comparisons."""
        return COMPARISON.sub(r"\1 bool ", self.query) if self.alert else self.query

    def __str__(self) -> str:
        return f"{self.source}: {' '.join(self.promql.split())}"


def names_in(promql: str) -> set[str]:
    """Identifiers outside string literals: metric names, functions, labels, keywords."""
    return set(NAME.findall(STRING.sub('""', promql)))


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_expressions() -> list[Expression]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [Expression(f"dashboard {panel['title']!r} {target['refId']}", target["expr"])
            for panel in walk_panels(dashboard["panels"])
            for target in panel.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule_expressions() -> list[Expression]:
    return [Expression(f"rule {rule.get('record') or rule['alert']}", rule["expr"],
                       alert="alert" in rule)
            for rule in rules()]


def readme_expressions() -> list[Expression]:
    """Each ```promql block of the README; expressions in a block are separated by `#` comment
    lines or blank lines."""
    found = []
    for block in re.findall(r"^```promql\n(.*?)^```", README.read_text(), re.M | re.S):
        current: list[str] = []
        for line in [*block.splitlines(), ""]:
            if line.strip() and not line.lstrip().startswith("#"):
                current.append(line)
            elif current:
                found.append(Expression("README", "\n".join(current)))
                current = []
    return found


def all_expressions() -> list[Expression]:
    return dashboard_expressions() + rule_expressions() + readme_expressions()


def pending_names(expr: Expression, recorded: dict[str, str]) -> set[str]:
    """The PENDING metrics an expression reads, through the recording rules it uses."""
    names = names_in(expr.promql)
    found = names & PENDING
    for name in names & recorded.keys():
        found |= pending_names(Expression(name, recorded[name]), recorded)
    return found


def recorded_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def exposed_samples(metrics_text: str) -> set[str]:
    """Names of the samples (not just HELP/TYPE lines) in a /metrics exposition."""
    return {m.group(0) for line in metrics_text.splitlines()
            if line and not line.startswith("#") and (m := NAME.match(line))}


def eventually(check: Callable[[], T], timeout: float = 15.0) -> T:
    """check()'s result once it stops raising AssertionError; its last error after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.25)


# --- talking to the proxy and to Prometheus -------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def post_json(base: str, path: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        with err:
            err.read()
            return err.code


def leave_mid_stream(port: int) -> None:
    """Start a streamed generation, read until the first token, hang up."""
    body = json.dumps({"model": "slow", "prompt": "Count slowly"}).encode()
    head = (f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        received = b""
        while b'"response"' not in received:
            chunk = sock.recv(65536)
            assert chunk, f"proxy closed before the first token: {received!r}"
            received += chunk


def send_traffic(base: str, port: int) -> None:
    """REQUESTS_PER_BATCH requests covering streamed and whole replies, native and /v1, an error
    reply from Ollama, a model Ollama does not have, and a client that leaves mid-stream."""
    chat = [{"role": "user", "content": "Explain why the sky is blue"}]
    assert post_json(base, "/api/generate",
                     {"model": "llama3.2", "prompt": "Summarize this text: the sky"}) == 200
    assert post_json(base, "/api/generate",
                     {"model": "llama3.2", "prompt": "Why is the sky blue?",
                      "stream": False}) == 200
    assert post_json(base, "/api/chat", {"model": "llama3.2", "messages": chat}) == 200
    assert post_json(base, "/v1/chat/completions",
                     {"model": "llama3.2", "messages": chat, "stream": True,
                      "stream_options": {"include_usage": True}}) == 200
    assert post_json(base, "/api/chat", {"model": "broken", "messages": chat}) == 500
    assert post_json(base, "/api/generate", {"model": "missing", "prompt": "hi"}) == 404
    leave_mid_stream(port)


def proxy_total(metrics_text: str, metric: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith(metric + "{"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> tuple[int, dict[str, Any]]:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        result: dict[str, Any] = json.loads(body)
        return status, result

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result; AssertionError naming Prometheus' error if it fails."""
        status, body = self.api("query", query=promql)
        refused = f"Prometheus refused {promql!r}: {body.get('errorType')}: {body.get('error')}"
        assert status == 200, refused
        assert body["status"] == "success", refused
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@dataclass
class Stack:
    prometheus: Prometheus
    proxy_metrics: str  # the proxy's /metrics once Prometheus holds all the traffic


def prometheus_config(target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml (its job name, its rules) aimed at the test's proxy and
    scraping every second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = require("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    with fake_process("--scenarios", json.dumps(SCENARIOS)) as fake, \
            proxy_process(fake.url) as proxy:
        send_traffic(proxy.url, proxy.port)  # counters exist before the first scrape
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{proxy.port}")))
        port = free_port()
        server = Process([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}"])
        try:
            server.wait_for("Server is ready to receive web requests")
            prometheus = Prometheus(f"http://127.0.0.1:{port}")

            def scraped_twice() -> None:
                result = prometheus.query('count_over_time(up{job="ollama-metrics"}[1m])')
                assert result, "no scrape yet"
                assert float(result[0]["value"][1]) >= 2, result

            eventually(scraped_twice)
            # A second batch between scrapes, so rates over the short history are not zero.
            send_traffic(proxy.url, proxy.port)
            expected = 2 * REQUESTS_PER_BATCH

            def proxy_recorded() -> str:
                status, body = http_get(proxy.url + "/metrics")
                assert status == 200
                text = body.decode()
                assert proxy_total(text, "ollama_requests_total") == expected, text
                return text

            metrics_text = eventually(proxy_recorded)

            def prometheus_has_all() -> None:
                result = prometheus.query("sum(ollama_requests_total)")
                assert result, "no requests scraped yet"
                assert float(result[0]["value"][1]) == expected, result

            eventually(prometheus_has_all)
            yield Stack(prometheus, metrics_text)
        finally:
            server.stop()


# --- tests ---------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = subprocess.run([require("promtool", "prometheus"), "check", "rules", str(RULES)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    """Each alert fires on the input meant to trigger it and not on its neighbours."""
    promtool = require("promtool", "prometheus")
    result = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules() if "alert" in rule}


def test_expressions_are_found() -> None:
    """The extraction itself: a dashboard, rules or README that yields nothing checks nothing."""
    assert len(dashboard_expressions()) >= 40
    assert len(rule_expressions()) == len(rules())
    readme = readme_expressions()
    assert len(readme) >= 5
    assert all(e.promql.strip() and "\n\n" not in e.promql for e in readme)


def test_every_expression_parses(stack: Stack) -> None:
    failures = []
    for expr in all_expressions():
        try:
            stack.prometheus.query(expr.query)
        except AssertionError as err:
            failures.append(f"{expr}\n    {err}")
    assert not failures, "\n".join(failures)


def test_expressions_return_data(stack: Stack) -> None:
    recorded = recorded_rules()
    exposed = exposed_samples(stack.proxy_metrics)
    traffic, live, waiting = [], [], []
    for expr in all_expressions():
        pending = pending_names(expr, recorded)
        if not pending:
            traffic.append(expr)
        elif pending <= exposed:
            live.append(expr)
        else:
            waiting.append(expr)
    assert traffic

    def all_return_data() -> None:
        empty = []
        for expr in traffic + live:
            result = stack.prometheus.query(expr.data_query)
            if not any(math.isfinite(float(sample["value"][1])) for sample in result):
                empty.append(f"{expr}\n    -> {result}")
        assert not empty, "no data from:\n" + "\n".join(empty)

    eventually(all_return_data)  # recording rules need an evaluation after the last scrape
    print(f"\n{len(traffic)} traffic and {len(live)} pending expressions returned data; "
          f"{len(waiting)} pending expressions only parsed, their metrics not exposed yet: "
          f"{sorted(set().union(*(pending_names(e, recorded) for e in waiting)) - exposed)}")


def test_metric_names_are_known(stack: Stack) -> None:
    """A misspelled name would return nothing forever, even once its metric lands."""
    status, body = stack.prometheus.api("label/__name__/values")
    assert status == 200
    known = set(body["data"]) | PENDING | recorded_rules().keys()
    unknown = {f"{name} ({expr.source})" for expr in all_expressions()
               for name in names_in(expr.promql)
               if name.startswith(("ollama_", "process_")) or ":" in name
               if name not in known}
    assert not unknown, sorted(unknown)


def test_rules_are_loaded_and_healthy(stack: Stack) -> None:
    expected = {rule.get("record") or rule["alert"] for rule in rules()}

    def healthy() -> None:
        status, body = stack.prometheus.api("rules")
        assert status == 200
        loaded = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        assert {rule["name"] for rule in loaded} == expected
        bad = [(r["name"], r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
        assert not bad, bad

    eventually(healthy)


def test_dashboard_variable_queries_list_values(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in queries} == {"instance", "model"}
    for variable in queries:
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert m, variable["definition"]
        selector = Expression(f"variable {variable['name']}", m.group(1)).query
        status, body = stack.prometheus.api("series", **{"match[]": selector})
        assert status == 200, body
        values = {series.get(m.group(2)) for series in body["data"]} - {None}
        assert values, f"{variable['definition']} lists nothing"
