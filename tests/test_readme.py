"""The README is accurate: every relative link and every repository path it names in backquotes
exists, and every command it shows -- the lines of its ```bash blocks and the commands quoted in
its text -- runs as written here, or is listed in NOT_RUN with the reason it cannot.

Ports are the one change: the README's 11434 and 11435 become free ports (the proxy's through
OLLAMA_METRICS_LISTEN, Ollama's in the text), since other tests may run beside these. `ollama`
is the stand-in (tests/bin/ollama)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import click
import psutil
import pytest
from click.testing import CliRunner

from analytics_helpers import DATA, _seed, records
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import Process
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.cli import main
from wrapper_helpers import BIN, free_port, get, runs, use_standin, wrapper_process

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


# --- which commands the README shows -----------------------------------------------------------

# A quoted text is a command when its first word is one of these programs.
PROGRAMS = frozenset({
    "ollama-metrics", "ollama", "python", "python3", "pip", "curl", "docker", "systemctl",
    "journalctl", "launchctl", "loginctl", "apt-get", "sudo", ".ci/run", "ruff", "mypy",
    "pytest"})
# A program named alone in the text, not a command line.
NAMES = frozenset({"ollama-metrics", "ollama", "systemctl", "launchctl"})

_DOCKER = "needs a Docker daemon and the compose plugin (neither is here); test_deploy.py checks "
_SERVICE = "changes the machine's service manager (systemd as init, root for --system); "
_BENCH = "a benchmark of minutes whose figures people read (bench/README.md), not a test"
_OLLAMA = ("Ollama's own command, named for what ours pass on to it; the stand-in runs it in "
           "test_passthrough.py")
# Commands (or the `&&`-joined parts of a shell line) that are not run here, and why.
NOT_RUN = {
    "pip install .": "installs the package (the suite runs from an installed checkout)",
    "pip install -e '.[test]'": "installs the package (the suite runs from an installed checkout)",
    "pip install 'ollama-metrics[otel]'": "installs from PyPI (network)",
    "pip install 'ollama-metrics[postgres]'": "installs from PyPI (network)",
    "pip install 'ollama-metrics[windows]'": "installs from PyPI (network), for Windows",
    "apt-get update": "changes the machine's packages, as root",
    "apt-get install -y nginx wrk prometheus postgresql systemd tmux chromium chromium-driver":
        "changes the machine's packages, as root",
    "python -m venv /opt/phoenix-venv": "makes a virtualenv for Arize Phoenix, as root",
    "/opt/phoenix-venv/bin/pip install 'arize-phoenix==20.26.1'":
        "installs Arize Phoenix from PyPI (network); its tests use it",
    ".ci/victoria-metrics": "downloads Debian 13's victoria-metrics package and installs its "
                            "binary in /opt, as root; its test uses it",
    "python -m pytest": "the suite itself, which runs this test",
    'python -m pytest -m "not slow"': "the suite itself, which runs this test",
    ".ci/run": "the suite plus ruff and mypy: it runs this test",
    "mypy": "about 30 s of type checking on this machine; .ci/run runs it",
    "docker compose up -d --build": _DOCKER + "the compose file it reads",
    "docker compose exec ollama ollama pull llama3.2": _DOCKER + "the compose file's services",
    "docker compose up": _DOCKER + "the compose file it reads",
    "docker compose config": _DOCKER + "the compose file (and runs this where the plugin is)",
    "docker build": _DOCKER + "that the Dockerfile copies files that exist",
    "systemctl edit": _SERVICE + "test_service.py checks the calls with a stand-in systemctl",
    "loginctl enable-linger": _SERVICE + "a user's services starting at boot",
    "journalctl [--user] -u ollama-metrics": "reads an installed service's journal (systemd as "
                                             "init, the service installed)",
    "launchctl bootstrap gui/UID": "macOS only; test_service.py checks the calls it is given",
    "ollama-metrics service install [--user|--system] [serve options…]":
        _SERVICE + "test_service.py installs with the stand-in systemctl (its synopsis is "
                   "checked here against --help)",
    "ollama-metrics service tray": "a tray icon needs a desktop session (test_service.py drives "
                                   "it with pystray's dummy backend)",
    "ollama-metrics top": "the full-screen view, until q: test_top.py drives it in tmux",
    'ollama-metrics top --url http://gpu-box:11434 --token "$ANALYTICS_TOKEN" --interval 2':
        "the full-screen view, of another machine: test_top.py drives it in tmux",
    "ollama-metrics pull …": "downloads a model from ollama.com (network; the stand-in has no "
                             "registry)",
    "ollama list": _OLLAMA, "ollama run": _OLLAMA, "ollama run MODEL ARGS…": _OLLAMA,
    "ollama serve": _OLLAMA,
    "python bench/analytics_bench.py": _BENCH,
    "python bench/proxy_bench.py": _BENCH + "; test_bench.py runs its quick mode",
    "python bench/soak.py --minutes 10": _BENCH,
}

# Commands with placeholders (a synopsis): the usage line of their --help must match.
SYNOPSES = {
    "ollama-metrics run [OPTIONS] MODEL [ARGS…]": ["run"],
    "ollama-metrics search TEXT": ["search"],
    "ollama-metrics service install [--user|--system] [serve options…]": ["service", "install"],
}


def _shell_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    return lines


def _quoted_commands() -> set[str]:
    """Commands quoted in the text (outside fenced blocks), a line break read as a space."""
    text = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    spans = {" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text)}
    return {s for s in spans if s.split(" ")[0] in PROGRAMS and s not in NAMES}


def _run_here(command: str) -> str:
    """A command without its parts that are not run here ("" when none is left)."""
    return " && ".join(p for p in command.split(" && ") if p.strip() not in NOT_RUN)


def _commands() -> list[str]:
    """Every command the README shows, as run here (parts in NOT_RUN left out)."""
    shown = [*_shell_lines(), *sorted(_quoted_commands())]
    return [c for c in (_run_here(c) for c in shown if c not in SYNOPSES) if c]


def _quick_start(command: str) -> bool:
    return command.startswith(("(OLLAMA_HOST=", "ollama-metrics serve",
                               "python -m ollama_metrics serve"))


STORE_COMMANDS = ("ollama-metrics search", "ollama-metrics stats", "ollama-metrics export")
PROXY_COMMANDS = ("ollama-metrics status", "ollama-metrics list", "ollama-metrics run llama3.2",
                  "ollama-metrics top --once")
# Which test runs each command, by the words it starts with.
RUN_BY = [
    (("curl",), "test_the_curl_lines_run_as_written"),
    (STORE_COMMANDS, "test_the_analytics_commands_run_as_written"),
    (("ollama-metrics stat",), "test_a_typo_as_written"),
    (PROXY_COMMANDS, "test_the_commands_against_a_proxy_run_as_written"),
    (("ruff check",), "test_ruff_check_as_written"),
]


def _runner(command: str) -> str | None:
    if _quick_start(command):
        return "test_the_quick_start_runs_as_written"
    for starts, test in RUN_BY:
        if any(command == s or command.startswith(s + " ") for s in starts):
            return test
    return None


def test_every_command_is_run_or_not_run_for_a_reason() -> None:
    commands = _commands()
    assert len(commands) > 20, commands
    unplaced = [c for c in commands if _runner(c) is None]
    assert not unplaced, ("README commands neither run by test_readme.py nor in NOT_RUN with a "
                          f"reason: {unplaced}")
    # Every exception still names a command the README shows.
    shown = {p.strip() for c in [*_shell_lines(), *_quoted_commands()] for p in c.split(" && ")}
    assert set(NOT_RUN) - shown == set()
    assert set(SYNOPSES) - _quoted_commands() == set()
    assert set(map(_runner, commands)) >= {test for _, test in RUN_BY}


def test_only_bash_blocks_hold_commands() -> None:
    for language, block in re.findall(r"```(\w*)\n(.*?)```", README, re.DOTALL):
        if language != "bash":
            assert language in ("", "promql", "yaml"), language
            assert not any(line.split(" ")[0] in PROGRAMS - NAMES
                           for line in block.splitlines()), block


# --- run here, in-process ----------------------------------------------------------------------

def _help(path: list[str]) -> str:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, (path, result.output)
    return result.stdout


def test_every_command_has_help_and_is_in_the_readme() -> None:
    for name, command in main.commands.items():
        _help([name])
        assert f"ollama-metrics {name}" in " ".join(README.split()), name
        if isinstance(command, click.Group):
            for sub in command.commands:
                _help([name, sub])


def _flags(path: list[str]) -> set[str]:
    command: click.Command = main
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts
            if o != "--help"}


@pytest.mark.parametrize("synopsis", sorted(SYNOPSES))
def test_each_synopsis_matches_its_usage(synopsis: str) -> None:
    path = SYNOPSES[synopsis]
    usage = _help(path).splitlines()[0].replace("...", "…")
    shown = re.findall(r"\[[^]]*\]|\S+", synopsis.removeprefix(
        "ollama-metrics " + " ".join(path)))
    given = usage.split(" ".join(path), 1)[1].split()
    for word in shown:
        if word.startswith("[--"):  # options: each named in --help
            for flag in word.strip("[]").split("|"):
                assert flag in _help(path), (synopsis, flag)
        elif word == "[serve options…]":  # every option of `serve`
            assert _flags(["serve"]) <= _flags(path), _flags(["serve"]) - _flags(path)
        else:  # an argument (or [OPTIONS]) its usage line names
            assert word.strip("[]…") in {g.strip("[]…") for g in given}, (synopsis, usage)


def test_the_analytics_commands_run_as_written(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_seed(tmp_path, DATA))
    monkeypatch.chdir(tmp_path)
    lines = [c for c in _commands() if c.startswith(STORE_COMMANDS)]
    lines += [c.replace("TEXT", "tides") for c in SYNOPSES if c.startswith(STORE_COMMANDS)]
    assert len(lines) >= 5, lines
    outputs = {}
    for line in lines:
        argv = shlex.split(line)
        result = CliRunner().invoke(main, [*argv[1:], "--analytics-dir", str(tmp_path)])
        assert result.exit_code == 0, (line, result.output)
        outputs[line] = result.stdout
    assert (tmp_path / "interactions.csv").read_text().startswith("id,")
    assert "explain tides" in outputs["ollama-metrics search tides"]
    assert "translate hello" in outputs["ollama-metrics search"]


def test_a_typo_as_written() -> None:
    assert "ollama-metrics stat" in _commands()
    result = CliRunner().invoke(main, ["stat"])
    assert result.exit_code == 2
    assert "No such command 'stat'. Did you mean 'stats'?" in result.stderr
    assert "`ollama-metrics stat` says `No such command 'stat'. Did you mean 'stats'?` and " \
           "exits 2" in " ".join(README.split())


def test_ruff_check_as_written() -> None:
    assert "ruff check" in _commands()
    result = subprocess.run([sys.executable, "-m", "ruff", "check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# --- run here, against a proxy -----------------------------------------------------------------

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
    curls = [line for line in _commands() if line.startswith("curl ")]
    assert len(curls) >= 8
    for line in curls:
        line = line.replace("http://localhost:11434", proxy.url).replace("<id>", record["id"])
        run = await asyncio.create_subprocess_exec(
            *shlex.split(line), "-sS", "--fail", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await run.communicate()
        assert run.returncode == 0, (line, err.decode())


def _shell(command: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                          env=env, input=stdin)


@pytest.mark.slow(reason="starts a proxy with the stand-in Ollama and runs commands against it")
@pytest.mark.timeout(90)
def test_the_commands_against_a_proxy_run_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    log = use_standin(monkeypatch, tmp_path)
    with wrapper_process() as proxy:
        env = {**os.environ, "OLLAMA_METRICS_LISTEN": f"127.0.0.1:{proxy.port}",
               "OLLAMA_METRICS_URL": proxy.url}
        commands = [c for c in _commands() if c.startswith(PROXY_COMMANDS)]
        assert sorted(commands) == sorted(PROXY_COMMANDS)
        ran = {c: _shell(c, env, stdin="say hi") for c in PROXY_COMMANDS}
    for command, result in ran.items():
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    assert f"proxy      running at {proxy.url}" in ran["ollama-metrics status"].stdout
    assert "llama3.2:latest" in ran["ollama-metrics list"].stdout
    assert ran["ollama-metrics run llama3.2"].stdout == "Hello, world!\n"
    assert "llama3.2" in ran["ollama-metrics top --once"].stdout
    assert [env["OLLAMA_HOST"] for _, env in runs(log, "list")] == [proxy.url]


@contextlib.contextmanager
def _started(command: str, env: dict[str, str]) -> Iterator[Process]:
    """The command under bash; on leaving, Ctrl-C (SIGINT) to the proxy it started."""
    shell = Process(["bash", "-c", command], env=env)
    try:
        yield shell
    finally:
        procs = [psutil.Process(shell.proc.pid)]
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += procs[0].children(recursive=True)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(p.endswith(("ollama-metrics", "ollama_metrics")) for p in proc.cmdline()):
                    proc.send_signal(signal.SIGINT)
        shell.proc.wait(20)
        shell.stop()


@pytest.mark.slow(reason="runs the quick start's commands: a proxy and Ollama, five times")
@pytest.mark.timeout(120)
def test_the_quick_start_runs_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = use_standin(monkeypatch, tmp_path)
    commands = [c for c in _commands() if _quick_start(c)]
    assert "(OLLAMA_HOST=127.0.0.1:11435 ollama serve &) && ollama-metrics serve" in commands
    assert len(commands) >= 4, commands
    try:
        for command in commands:
            _quick_start_runs(command)
    finally:  # the Ollama the first line starts in the background, as a user's, is ours to end
        for pid, _ in runs(log, "serve"):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).send_signal(signal.SIGTERM)


def _quick_start_runs(command: str) -> None:
    """One quick-start command: the proxy it starts answers, with Ollama behind it, and stops
    on Ctrl-C with status 0."""
    listen, ollama = free_port(), free_port()
    env = {**os.environ, "OLLAMA_METRICS_LISTEN": f"127.0.0.1:{listen}",
           "OLLAMA_METRICS_OLLAMA_HOST": f"127.0.0.1:{ollama}"}
    own = None
    if "--upstream" in command:  # an Ollama already running there
        own = Process([str(BIN / "ollama"), "serve"],
                      env={**env, "OLLAMA_HOST": f"127.0.0.1:{ollama}"})
        own.wait_for("Listening on")
    try:
        with _started(command.replace("11435", str(ollama)), env) as shell:
            shell.wait_for(rf"listening on http://127\.0\.0\.1:{listen}")
            status, body = get(f"http://127.0.0.1:{listen}/test")
            assert status == 200, (command, body)
            assert json.loads(body)["upstream"]["reachable"] is True, (command, body)
        assert shell.proc.returncode == 0, (command, shell.output)
    finally:
        if own is not None:
            own.stop()
