"""The README is accurate: every relative link and every repository path it names in backquotes
exists, and every shell line in its ```bash blocks runs as written here (the analytics commands
against a scratch store, the curl lines against a proxy in front of the fake Ollama) or is
skipped with a reason (SKIPPED)."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from analytics_helpers import DATA, _seed, records
from conftest import StartProxy
from fake_ollama import FakeOllama
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.cli import main

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
TOP_DIRS = ("tests/", "bench/", "deploy/", "src/", "docs/", "shared/", "packaging/")


def _anchors() -> set[str]:
    def slug(title: str) -> str:
        title = re.sub(r"[^\w\- ]", "", title.strip().lower())
        return title.replace(" ", "-")
    return {slug(m) for m in re.findall(r"^#+ (.+)$", README, re.MULTILINE)}


def test_every_relative_link_exists() -> None:
    anchors = _anchors()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if not ((ROOT / path).exists() if path else anchor in anchors):
            missing.append(target)
    assert not missing, missing


def test_every_named_path_exists() -> None:
    named = {p for p in re.findall(r"`([\w./*-]+)`", README) if p.startswith(TOP_DIRS)}
    missing = [p for p in sorted(named)
               if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, missing


# The README's shell lines, each run here or skipped for a reason.
SKIPPED = {
    "pip install": "installs the package (the suite runs from it already)",
    "apt-get": "installs system packages as root",
    "docker compose": "needs docker and a real Ollama image",
    "ollama-metrics top": "a full-screen terminal view (test_top.py drives it in tmux)",
}


def _shell_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    return lines


def test_every_shell_line_is_run_or_skipped_for_a_reason() -> None:
    for line in _shell_lines():
        assert line.startswith(("curl ", "ollama-metrics search", "ollama-metrics stats",
                                "ollama-metrics export", *SKIPPED)), \
            f"README line neither run by test_readme.py nor skipped with a reason: {line}"


def test_the_analytics_commands_run_as_written(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_seed(tmp_path, DATA))
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line) for line in _shell_lines()
                if line.startswith(("ollama-metrics search", "ollama-metrics stats",
                                    "ollama-metrics export"))]
    assert len(commands) == 3
    for argv in commands:
        result = CliRunner().invoke(main, [*argv[1:], "--analytics-dir", str(tmp_path)])
        assert result.exit_code == 0, (argv, result.output)
    assert (tmp_path / "interactions.csv").read_text().startswith("id,")


@pytest.mark.slow(reason="starts a proxy and runs curl eight times")
async def test_the_curl_lines_run_as_written(fake: FakeOllama, start_proxy: StartProxy,
                                             http: aiohttp.ClientSession,
                                             tmp_path: Path) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    async with http.post(proxy.url + "/api/generate",
                         json={"model": "llama3.2", "prompt": "summarize this", "stream": False}
                         ) as resp:
        assert resp.status == 200
    [record] = await records(proxy, http, 1)
    curls = [line for line in _shell_lines() if line.startswith("curl ")]
    assert curls
    for line in curls:
        line = line.replace("http://localhost:11434", proxy.url).replace("<id>", record["id"])
        run = await asyncio.create_subprocess_exec(
            *shlex.split(line), "-sS", "--fail", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await run.communicate()
        assert run.returncode == 0, (line, err.decode())
