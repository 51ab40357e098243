"""deploy/: what can be checked without Docker or Grafana.

The compose file, Prometheus config and Grafana provisioning must agree with each other (service
names, ports, mounted paths, files that exist); the Dockerfile must build from files that exist
and its health check must tell a working proxy from one whose Ollama is down; the dashboard must
be importable and filter every query by its `instance` and `model` variables. `docker compose
config` runs only where the compose plugin exists (not on CI's machine).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from helpers import fake_process, proxy_process
from services import require

pytestmark = pytest.mark.slow(reason="promtool, docker compose and a proxy process")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ollama-metrics.json"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# Metrics without a `model` label (so no $model filter): the rest of ollama_* have one.
WITHOUT_MODEL = ("ollama_errors_total", "ollama_up", "ollama_upstream_", "ollama_analytics_",
                 "process_")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(COMPOSE)
    return doc


def proxy_options() -> dict[str, str]:
    """`ollama-metrics serve` options of the compose file's proxy."""
    command: list[str] = compose()["services"]["ollama-metrics"]["command"]
    assert command[:2] == ["ollama-metrics", "serve"]
    return dict(zip(command[2::2], command[3::2], strict=True))


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → host path (resolved) or named volume, from short-syntax volumes."""
    found = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        found[target] = str((DEPLOY / source).resolve()) if source.startswith(".") else source
    return found


def mounted_file(service: dict[str, Any], container_path: str) -> Path:
    """The host file behind a container path, through a file or a directory mount."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return Path(source) / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted")


def test_compose_services_fit_together() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"ollama", "ollama-metrics", "prometheus", "grafana"}

    ollama = services["ollama"]
    assert ollama["image"].startswith("ollama/ollama")
    ollama_host, ollama_port = ollama["environment"]["OLLAMA_HOST"].split(":")
    assert ollama_host == "0.0.0.0"  # non-loopback: Ollama then skips its Host check
    assert "ports" not in ollama  # apps reach Ollama through the proxy only

    proxy = services["ollama-metrics"]
    options = proxy_options()
    assert options["--upstream"] == f"http://ollama:{ollama_port}"
    listen_port = options["--listen"].rsplit(":", 1)[1]
    assert options["--listen"] == f"0.0.0.0:{listen_port}"
    assert any(p.endswith(f":{listen_port}:{listen_port}") for p in proxy["ports"])
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() \
        == DOCKERFILE.resolve()

    for name, service in services.items():
        for target, source in mounts(service).items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} (for {target}) does not exist"
            else:
                assert source in doc["volumes"], f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in services


def test_compose_command_options_exist() -> None:
    """The options the compose file passes are ones `ollama-metrics serve` has."""
    command = compose()["services"]["ollama-metrics"]["command"]
    result = subprocess.run([sys.executable, "-m", "ollama_metrics", "serve", "--help"],
                            capture_output=True, text=True, check=True)
    for option in (arg for arg in command if arg.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(option)}\b", result.stdout), option


def test_prometheus_in_compose_scrapes_the_proxy_and_loads_the_rules() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"])
    config_path = flags["--config.file"]
    config_file = mounted_file(prometheus, config_path)
    assert config_file == DEPLOY / "prometheus" / "prometheus.yml"
    config = load_yaml(config_file)
    [job] = config["scrape_configs"]
    assert job["job_name"] == "ollama-metrics"  # what OllamaMetricsProxyDown selects
    listen_port = proxy_options()["--listen"].rsplit(":", 1)[1]
    assert job["static_configs"] == [{"targets": [f"ollama-metrics:{listen_port}"]}]
    for rule_file in config["rule_files"]:
        in_container = PurePosixPath(config_path).parent / rule_file
        assert mounted_file(prometheus, str(in_container)) == DEPLOY / "prometheus" / rule_file
    promtool = require("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "config", str(config_file)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    for kind in ("datasources", "dashboards"):
        assert mounted_file(grafana, f"/etc/grafana/provisioning/{kind}") == PROVISIONING / kind

    [datasource] = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    port = next(f.split(":")[-1] for f in services["prometheus"]["ports"])
    assert datasource["url"] == f"http://prometheus:{port}"
    scrape_interval = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["global"]
    assert datasource["jsonData"]["timeInterval"] == scrape_interval["scrape_interval"]

    [provider] = load_yaml(PROVISIONING / "dashboards" / "ollama-metrics.yml")["providers"]
    assert provider["type"] == "file"
    path = PurePosixPath(provider["options"]["path"]) / DASHBOARD.name
    assert mounted_file(grafana, str(path)) == DASHBOARD


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def test_dockerfile_builds_from_files_that_exist() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    context = (DEPLOY / compose()["services"]["ollama-metrics"]["build"]["context"]).resolve()
    assert context == ROOT
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (context / source).exists(), f"COPY {source}: not in the build context"
                assert f"!{source}" in ignore or f"!{source}/" in ignore, \
                    f"COPY {source}: excluded by Dockerfile.dockerignore"
    runs = " ".join(args for instruction, args in steps if instruction == "RUN")
    assert "pip install ." in runs
    [user] = [args for instruction, args in steps if instruction == "USER"]
    assert user not in ("root", "0")
    assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", runs)
    assert ("EXPOSE", "11434") in steps
    [cmd] = [json.loads(args) for instruction, args in steps if instruction == "CMD"]
    assert cmd[:2] == ["ollama-metrics", "serve"]


def healthcheck_command(port: int) -> list[str]:
    [args] = [args for instruction, args in dockerfile() if instruction == "HEALTHCHECK"]
    command: list[str] = json.loads(args.split("CMD", 1)[1])
    assert command[0] == "python"
    return [sys.executable, *(a.replace("127.0.0.1:11434", f"127.0.0.1:{port}")
                              for a in command[1:])]


def test_dockerfile_healthcheck_tells_up_from_down() -> None:
    with fake_process() as fake, proxy_process(fake.url) as proxy:
        up = subprocess.run(healthcheck_command(proxy.port), capture_output=True, timeout=10,
                            check=False)
        assert up.returncode == 0, up.stderr
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        with proxy_process(f"http://127.0.0.1:{closed.getsockname()[1]}") as proxy:
            down = subprocess.run(healthcheck_command(proxy.port), capture_output=True,
                                  timeout=10, check=False)
            assert down.returncode != 0
            assert b"503" in down.stderr


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        check=False).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- the dashboard ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def test_dashboard_imports_anywhere() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    assert doc["uid"] == "ollama-metrics"
    assert doc["id"] is None
    [ds_input] = doc["__inputs"]
    assert (ds_input["name"], ds_input["type"], ds_input["pluginId"]) == \
        ("DS_PROMETHEUS", "datasource", "prometheus")
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert list(variables) == ["DS_PROMETHEUS", "instance", "model"]
    # A data source *variable* named like the input: on import Grafana replaces
    # ${DS_PROMETHEUS} with the chosen data source; when provisioned, the variable resolves it.
    assert (variables["DS_PROMETHEUS"]["type"], variables["DS_PROMETHEUS"]["query"]) == \
        ("datasource", "prometheus")
    assert variables["instance"]["definition"] == "label_values(ollama_requests_total, instance)"
    assert variables["model"]["definition"] == \
        'label_values(ollama_requests_total{instance=~"$instance"}, model)'
    for name in ("instance", "model"):
        v = variables[name]
        assert (v["type"], v["multi"], v["includeAll"], v["allValue"]) == \
            ("query", True, True, ".*")
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for variable in ("instance", "model"):
        assert variables[variable]["datasource"] == ds
    for panel in walk_panels(doc["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"] == ds, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == ds, panel["title"]


def test_dashboard_layout() -> None:
    doc = dashboard()
    panels = list(walk_panels(doc["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in panels if p["type"] == "row"]
    for topic in ("Traffic", "Latency", "Tokens", "Errors", "Models", "Analytics"):
        assert any(topic in title for title in rows), topic
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] < pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_queries_filter_by_instance_and_model() -> None:
    for panel in walk_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            bare = re.findall(r"\b((?:ollama|process)_\w+)\b(?!\s*\{)", expr)
            assert not bare, f"{panel['title']}: {bare} without a selector"
            for metric, matchers in re.findall(r"\b(\w+)\s*\{([^}]*)\}", expr):
                assert 'instance=~"$instance"' in matchers, f"{panel['title']}: {metric}"
                if not metric.startswith(WITHOUT_MODEL):
                    assert 'model=~"$model"' in matchers, f"{panel['title']}: {metric}"
