"""`ollama-metrics search | stats | export` against a real store, as a user types them (in-process,
with click's CliRunner)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from analytics_helpers import DATA, _seed, record
from helpers import fake_process, proxy_process
from ollama_metrics.cli import main


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("analytics")
    asyncio.run(_seed(directory, DATA))
    return directory


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli(store_dir: Path, *args: str) -> Ran:
    result = CliRunner().invoke(main, [*args, "--analytics-dir", str(store_dir)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def test_search_table_and_json(store_dir: Path) -> None:
    result = cli(store_dir, "search", "meeting")
    assert result.returncode == 0, result.stderr
    header, _, row = result.stdout.splitlines()
    assert header.split()[:4] == ["time", "model", "endpoint", "status"]
    assert "qwen3" in row and "summarize the meeting notes" in row and "rec00021" in row
    as_json = orjson.loads(cli(store_dir, "search", "--model", "qwen3", "--json").stdout)
    assert [r["id"] for r in as_json] == ["rec00023", "rec00022", "rec00021"]
    assert cli(store_dir, "search", "--status", "cancelled", "--json").stdout.count('"id"') == 1
    assert "no interactions match" in cli(store_dir, "search", "zebra").stdout


def test_bad_input_is_a_usage_error(store_dir: Path) -> None:
    for args in (["search", "--since", "soon"],
                 ["stats", "--category", "poetry"], ["search", "--limit", "0"]):
        result = cli(store_dir, *args)
        assert result.returncode == 2, args
        assert "Error:" in result.stderr and "Traceback" not in result.stderr


def test_plain_words_with_punctuation_are_searched_literally(store_dir: Path) -> None:
    for text in ("gpt-4", "don't", "C++", '"unbalanced'):  # issue 15: these were exit 2
        result = cli(store_dir, "search", text)
        assert result.returncode == 0, (text, result.stderr)


def test_stats(store_dir: Path) -> None:
    out = cli(store_dir, "stats").stdout.splitlines()
    assert out[2].split()[:4] == ["all", "24", "2", "8.3"]
    assert any(line.startswith("model qwen3") for line in out)
    data = orjson.loads(cli(store_dir, "stats", "--json").stdout)
    assert data["totals"]["requests"] == 24


def test_export(store_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    result = cli(store_dir, "export", "--format", "csv", "--output", str(target))
    assert result.returncode == 0 and "exported 24 interactions" in result.stderr
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert len(rows) == 25 and rows[0][0] == "id"
    lines = cli(store_dir, "export", "--model", "qwen3").stdout.splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == ["rec00023", "rec00022", "rec00021"]


def test_missing_store_is_explained(tmp_path: Path) -> None:
    result = cli(tmp_path / "nothing", "search")
    assert result.returncode == 1
    assert "no analytics database" in result.stderr


# --- where the records are: the running proxy first, then the store on disk --------------------

def _ask(*args: str, env: dict[str, str] | None = None) -> Ran:
    result = CliRunner().invoke(main, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def _records(env: dict[str, str]) -> list[dict[str, Any]]:
    """The records `search --json` finds, once the proxy has written them."""
    deadline = time.monotonic() + 10
    while True:
        ran = _ask("search", "--json", env=env)
        assert ran.returncode == 0, ran.stderr
        found: list[dict[str, Any]] = orjson.loads(ran.stdout)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.slow(reason="a proxy process")
def test_commands_ask_the_running_proxy_first(tmp_path: Path) -> None:
    """The proxy records somewhere the command cannot know (its own --analytics-dir, behind a
    token): search, stats and export still find the records, through the proxy."""
    elsewhere = tmp_path / "the-proxy's-own"
    with fake_process() as fake, proxy_process(fake.url, "--analytics-dir", str(elsewhere),
                                               "--analytics-token", "tok") as proxy:
        with urllib.request.urlopen(urllib.request.Request(
                proxy.url + "/api/generate", data=b'{"model": "llama3.2", "prompt": "hi"}')) as r:
            r.read()
        listen = {"OLLAMA_METRICS_LISTEN": f"127.0.0.1:{proxy.port}"}
        refused = _ask("search", env=listen)
        assert refused.returncode == 1
        assert "need its token: --analytics-token (ANALYTICS_TOKEN)" in refused.stderr
        env = {**listen, "ANALYTICS_TOKEN": "tok"}
        assert [r["prompt"] for r in _records(env)] == ["hi"]
        stats = _ask("stats", "--json", env=env)
        assert orjson.loads(stats.stdout)["totals"]["requests"] == 1
        exported = _ask("export", "--format", "csv", env=env)
        assert exported.returncode == 0 and "exported 1 interactions from the proxy at " \
            f"http://127.0.0.1:{proxy.port} (recording to sqlite in {elsewhere})" \
            in exported.stderr
        assert len(list(csv.DictReader(io.StringIO(exported.stdout)))) == 1
        none = _ask("search", "zebra", env=env)
        assert f"no interactions match (looked in the proxy at http://127.0.0.1:{proxy.port}" \
            in none.stdout
        bad = _ask("search", "--since", "soon", env=env)
        assert bad.returncode == 2


@pytest.mark.slow(reason="a proxy process")
def test_serve_and_the_commands_agree_on_the_data_directory(tmp_path: Path) -> None:
    """Without ANALYTICS_DIR, the proxy records to the per-user data directory; the commands,
    run from anywhere with no proxy answering, read the same store, and say where they looked
    when it has nothing."""
    data_home = tmp_path / "data-home"
    store = data_home / "ollama-metrics" / "analytics" / "interactions.db"
    nobody = {"OLLAMA_METRICS_LISTEN": f"127.0.0.1:{_free_port()}",
              "XDG_DATA_HOME": str(data_home)}
    missing = _ask("search", env=nobody)
    assert missing.returncode == 1
    assert f"no analytics database at {store} yet: nothing recorded (no proxy with " \
        f"searchable records answers at http://{nobody['OLLAMA_METRICS_LISTEN']})" \
        in missing.stderr
    os.environ["XDG_DATA_HOME"], saved = str(data_home), os.environ["XDG_DATA_HOME"]
    try:
        with fake_process() as fake, proxy_process(fake.url) as proxy:
            with urllib.request.urlopen(urllib.request.Request(
                    proxy.url + "/api/generate", data=b'{"model": "llama3.2", "prompt": "hi"}')):
                pass
            proxy.wait_for(f"recording interactions to sqlite \\({store.parent}\\)")
    finally:
        os.environ["XDG_DATA_HOME"] = saved
    assert store.exists()
    assert [r["prompt"] for r in _records(nobody)] == ["hi"]
    none = _ask("search", "zebra", env=nobody)
    assert f"no interactions match (looked in {store} (no proxy" in none.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_typed_values_are_validated_once_by_the_query_layer() -> None:
    """The CLI hands typed values to analytics.query.query; the HTTP parser reads its strings
    into the same call, so both accept and refuse alike, with the same reasons."""
    from ollama_metrics.analytics.query import BadQuery, parse, query

    typed = query(since="1h", model="qwen3", status="ok", limit=5, text="  meeting ")
    assert (typed.model, typed.status, typed.outcomes, typed.limit, typed.text) == (
        "qwen3:latest", "ok", ("success",), 5, "meeting")
    assert parse({"limit": "5", "status": "success"}) == query(limit=5, status="success")
    for bad, reason in (({"limit": 0}, "limit: must be between 1 and 1000"),
                        ({"start_time": float("nan")}, "start_time: expected unix seconds"),
                        ({"order": "rank"}, "order=rank needs prompt_search")):
        with pytest.raises(BadQuery, match=reason):
            query(**bad)
        with pytest.raises(BadQuery, match=reason):
            parse({k: str(v) for k, v in bad.items()})


def test_tables_read_like_ollama(tmp_path: Path) -> None:
    """No model reads `-` in both tables, a 0.7 ms TTFT reads `0.7 ms`, a 100,000-character model
    name is shortened with an ellipsis."""
    asyncio.run(_seed(tmp_path, [
        record(1, model=None, endpoint="/api/version", path="/api/version", ttft=0.0007,
               duration=0.35),
        record(2, model="m" * 100_000, ttft=0.0007, duration=1.2449)]))
    stats = cli(tmp_path, "stats").stdout
    assert "model -" in stats and "model None" not in stats
    assert "0.7 ms" in stats and "0.00" not in stats
    found = cli(tmp_path, "search").stdout.splitlines()
    assert all(len(line) < 250 for line in found), [len(line) for line in found]
    assert any("0.7 ms" in line and "350 ms" in line for line in found)
    assert any("m…" in line and "1.24 s" in line for line in found)
