"""`ollama-metrics search | stats | export` against a real store, as a user types them (in-process,
with click's CliRunner)."""

from __future__ import annotations

import asyncio
import csv
import io
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from analytics_helpers import DATA, _seed
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
