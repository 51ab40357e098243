"""Services: the systemd unit (checked by systemd-analyze), the launchd plist (plistlib), the
install/start/stop/status commands against stand-in systemctl/launchctl, and the Windows service
body and tray logic, run here without Windows APIs."""

from __future__ import annotations

import asyncio
import os
import plistlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import StartProxy
from fake_ollama import FakeOllama
from ollama_metrics.cli.proxy import config_from_args
from ollama_metrics.config import Config
from ollama_metrics.server import serve as server
from ollama_metrics.service import ServiceError, ServiceSpec, manager, spec
from ollama_metrics.service.launchd import LABEL, Launchd, plist
from ollama_metrics.service.runner import ServiceRunner
from ollama_metrics.service.systemd import Systemd, unit_text
from ollama_metrics.service.tray import Tray, build_icon, icon_image, show
from ollama_metrics.service.windows import WindowsService
from services import require
from wrapper_helpers import free_port, get, gone, runs, standin_path, use_standin, wait_until

pytestmark = [pytest.mark.slow(reason="systemd-analyze and service processes"),
              pytest.mark.timeout(60)]

ODD = "/opt/odd dir/100% \"ollama\" $HOME"  # spaces, a specifier, quotes, a variable


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return use_standin(monkeypatch, tmp_path)


def a_spec(tmp_path: Path, *args: str) -> ServiceSpec:
    config = Config.build()
    environ = {"PATH": "/usr/local/bin:/usr/bin", "OLLAMA_MODELS": "/srv/models",
               "OLLAMA_HOST": "0.0.0.0:1", "OLLAMA_METRICS_LISTEN": ":11434", "SECRET": "x"}
    return spec(config, ["--listen", "127.0.0.1:11434", *args], environ,
                tmp_path / "service.log")


def verify(unit: str, tmp_path: Path, user: bool) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "ollama-metrics.service"
    path.write_text(unit)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    analyze = require("systemd-analyze", "systemd")
    return subprocess.run([analyze, *(["--user"] if user else []), "verify", str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})


def test_spec_runs_this_interpreter_with_the_given_options(tmp_path: Path) -> None:
    s = a_spec(tmp_path, "--ollama-bin", ODD)
    assert s.argv == (sys.executable, "-m", "ollama_metrics", "serve",
                      "--listen", "127.0.0.1:11434", "--ollama-bin", ODD)
    # PATH and Ollama's own settings travel; OLLAMA_HOST (the child gets its own), our settings
    # (already options) and anything else do not.
    assert s.environment == {"PATH": "/usr/local/bin:/usr/bin", "OLLAMA_MODELS": "/srv/models"}
    assert s.stop_timeout == 10 + 10 + 10


def test_spec_pins_the_ollama_program(tmp_path: Path) -> None:
    config = Config.build()
    s = spec(config, [], {"PATH": standin_path("")}, tmp_path / "log")
    assert s.serve_args == ("--ollama-bin", str(Path(__file__).parent / "bin" / "ollama"))
    proxy_only = spec(Config.build(upstream="http://127.0.0.1:1"), [],
                      {"PATH": standin_path("")}, tmp_path / "log")
    assert proxy_only.serve_args == ()


@pytest.mark.parametrize("user", [True, False], ids=["user", "system"])
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    unit = unit_text(a_spec(tmp_path, "--ollama-bin", ODD), user)
    result = verify(unit, tmp_path, user)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # not even a warning
    assert f"ExecStart={sys.executable} -m ollama_metrics serve --listen 127.0.0.1:11434 " \
        '--ollama-bin "/opt/odd dir/100%% \\"ollama\\" $$HOME"\n' in unit
    assert "KillMode=mixed\n" in unit
    assert ("WantedBy=default.target" if user else "WantedBy=multi-user.target") in unit


def test_systemd_analyze_verify_does_catch_a_bad_unit(tmp_path: Path) -> None:
    bad = unit_text(a_spec(tmp_path), True).replace(sys.executable, "/nonexistent/python")
    assert verify(bad + "Bogus=1\n", tmp_path, True).returncode != 0


def test_service_commands_with_systemd(standin: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "tools.log"
    monkeypatch.setenv("FAKE_TOOL_LOG", str(tools))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("ANALYTICS_DIR", raising=False)
    monkeypatch.setenv("OLLAMA_METRICS_PS_INTERVAL", "5")
    monkeypatch.setenv("ANALYTICS_TOKEN", "do-not-show")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ollama_metrics", "service", *args],
                              capture_output=True, text=True, timeout=30)

    installed = cli("install", "--user", "--listen", "127.0.0.1:11500")
    assert installed.returncode == 0, installed.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "ollama-metrics.service"
    assert f"wrote {unit}" in installed.stdout
    text = unit.read_text()
    # The options given on the command line, and the ollama program found; those given by
    # variable stay variables (out of command lines, which any user can read).
    # Its analytics go to the per-user data directory, the default of every command: no
    # --analytics-dir of its own, and the installer's XDG_DATA_HOME.
    assert f"ExecStart={sys.executable} -m ollama_metrics serve --listen 127.0.0.1:11500 " \
        f"--ollama-bin {Path(__file__).parent / 'bin' / 'ollama'}\n" in text
    assert f"Environment=XDG_DATA_HOME={tmp_path / 'data'}\n" in text
    assert "Environment=OLLAMA_METRICS_PS_INTERVAL=5\n" in text
    assert "Environment=ANALYTICS_TOKEN=do-not-show\n" in text
    assert unit.stat().st_mode & 0o777 == 0o600  # the token is in there: owner only
    assert cli("start").returncode == 0
    assert cli("stop").returncode == 0
    status = cli("status")
    assert status.returncode == 0
    assert "systemctl status: ok" in status.stdout
    assert cli("uninstall").returncode == 0
    assert not unit.exists()
    assert tools.read_text().splitlines() == [
        "systemctl --user daemon-reload",
        "systemctl --user enable ollama-metrics.service",
        "systemctl --user start ollama-metrics.service",
        "systemctl --user stop ollama-metrics.service",
        "systemctl --user status --no-pager ollama-metrics.service",
        "systemctl --user disable --now ollama-metrics.service",
        "systemctl --user daemon-reload",
    ]

    monkeypatch.setenv("FAKE_TOOL_FAIL", "start")
    failed = cli("start")
    assert failed.returncode == 1
    assert "`systemctl --user start ollama-metrics.service` failed (1): systemctl: start failed" \
        in failed.stderr


def test_systemd_refusals_are_clean(tmp_path: Path) -> None:
    environ = {"PATH": standin_path(""), "FAKE_TOOL_LOG": str(tmp_path / "log"),
               "FAKE_TOOL_FAIL": "enable", "XDG_CONFIG_HOME": str(tmp_path)}
    with pytest.raises(ServiceError, match=r"systemctl --user enable ollama-metrics\.service` "
                                           "failed"):
        Systemd(True, environ).install(a_spec(tmp_path))
    with pytest.raises(ServiceError, match="`systemctl` was not found"):
        Systemd(True, {"PATH": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}).start()


def test_launchd_plist_round_trips(tmp_path: Path) -> None:
    s = a_spec(tmp_path, "--ollama-bin", ODD)
    data = plistlib.dumps(plist(s), fmt=plistlib.FMT_XML)
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist')
    back = plistlib.loads(data)
    assert back == plist(s)
    assert back["Label"] == LABEL
    assert back["ProgramArguments"] == list(s.argv)
    assert back["KeepAlive"] == {"SuccessfulExit": False}
    assert back["EnvironmentVariables"]["OLLAMA_MODELS"] == "/srv/models"
    assert back["StandardErrorPath"] == str(tmp_path / "service.log")


def test_launchd_install_start_stop(tmp_path: Path) -> None:
    tools = tmp_path / "tools.log"
    environ = {"PATH": standin_path(""), "HOME": str(tmp_path), "FAKE_TOOL_LOG": str(tools)}
    agent = Launchd(environ)
    s = a_spec(tmp_path)
    agent.install(s)
    path = tmp_path / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    with open(path, "rb") as f:
        assert plistlib.load(f) == plist(s)
    agent.start()  # loaded already (the stand-in's `print` succeeds): kickstart
    running, _ = agent.status()
    agent.stop()
    agent.uninstall()
    assert not path.exists()
    domain = f"gui/{os.getuid()}"
    assert tools.read_text().splitlines() == [
        f"launchctl print {domain}/{LABEL}", f"launchctl kickstart {domain}/{LABEL}",
        f"launchctl print {domain}/{LABEL}", f"launchctl bootout {domain}/{LABEL}",
        f"launchctl bootout {domain}/{LABEL}",
    ]
    assert running is False  # the stand-in prints no `state = running`


def test_manager_by_platform(tmp_path: Path) -> None:
    assert isinstance(manager(True, {}, "win32"), WindowsService)  # pywin32 not imported yet
    assert isinstance(manager(False, {}, "linux"), Systemd)
    assert isinstance(manager(True, {"HOME": str(tmp_path)}, "darwin"), Launchd)
    with pytest.raises(ServiceError, match="LaunchAgent for the current user"):
        manager(False, {}, "darwin")


# --- Windows: the service's body, driven as the Service Control Manager would ---

def _service_thread(runner: ServiceRunner) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    return thread, result


def test_windows_service_body_serves_until_stopped(standin: Path, tmp_path: Path) -> None:
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--ollama-host", f"127.0.0.1:{free_port()}",
            "--ollama-stop-grace", "3", "--shutdown-grace", "2"]
    environ = dict(os.environ)

    async def serve(stop: asyncio.Event) -> None:  # what winapi's service class runs
        config, analytics = config_from_args(args)
        await server.serve(config, server.bind(config), stop, environ, analytics)

    log = tmp_path / "logs" / "service.log"
    runner = ServiceRunner(serve, log)
    thread, result = _service_thread(runner)
    try:
        wait_until(lambda: get_ok(f"http://127.0.0.1:{port}/api/version"), timeout=20)
        (child, env), = runs(standin, "serve")
        assert env["OLLAMA_HOST"] == args[3]
    finally:
        runner.stop()  # SvcStop, from another thread
        thread.join(20)
    assert not thread.is_alive()
    assert result == [0]
    assert gone(child, timeout=0)
    text = log.read_text()
    assert "ollama-metrics listening on" in text  # the proxy's log
    assert 'msg="Listening on 127.0.0.1:' in text  # Ollama's own output, relayed
    assert "stopping ollama serve" in text


def test_windows_service_body_logs_why_it_cannot_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    async def serve(stop: asyncio.Event) -> None:
        config_from_args(["--listen", "nonsense"])

    log = tmp_path / "service.log"
    runner = ServiceRunner(serve, log)
    assert runner.run() == 1
    assert "cannot start: --listen (OLLAMA_METRICS_LISTEN): expected HOST:PORT" in \
        log.read_text()
    caplog.clear()  # the critical record is the point here


def test_windows_service_stopped_before_it_ran(tmp_path: Path) -> None:
    ran: list[bool] = []

    async def serve(stop: asyncio.Event) -> None:
        ran.append(True)

    runner = ServiceRunner(serve, tmp_path / "service.log")
    runner.stop()
    assert runner.run() == 0
    assert ran == []


def get_ok(url: str) -> bool:
    try:
        return get(url, timeout=1)[0] == 200
    except OSError:
        return False


# --- the tray ---

class Recorder:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)


async def test_tray_states(fake: FakeOllama, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(fake.url)
    tray = Tray(proxy.config, Recorder())
    tray.url = tray.url.with_port(proxy.port)  # the test proxy listens on a free port
    state = await asyncio.to_thread(tray.refresh)
    assert state.color == "green"
    assert "Ollama 0.33.0 up" in state.title
    await fake.close()
    state = await asyncio.to_thread(tray.refresh)
    assert state.color == "orange"
    assert "Ollama is not answering" in state.title
    tray.url = tray.url.with_port(free_port())
    state = await asyncio.to_thread(tray.refresh)
    assert state.color == "red"
    assert "not running" in state.title


def test_tray_menu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSTRAY_BACKEND", "dummy")  # pystray without a display
    stop, opened = Recorder(), Recorder()
    config = Config.build(listen=f"127.0.0.1:{free_port()}", metrics_path="/prom")
    tray = Tray(config, stop, "http://grafana.test/d/x", opened)
    icon = build_icon(tray)
    import pystray
    items = [item for item in icon.menu.items if item is not pystray.Menu.SEPARATOR]
    assert [item.text for item in items] == [
        "Open dashboard", "Open metrics", "Stop ollama-metrics", "Quit tray"]
    items[0](icon)
    items[1](icon)
    items[2](icon)
    assert opened.calls == [("http://grafana.test/d/x",), (f"{tray.url}/prom",)]
    assert stop.calls == [()]
    assert tray.state.color == "red"  # refreshed after the stop: nothing answers
    show(icon, tray.state)
    assert icon.title == tray.state.title
    assert icon_image("green").getpixel((32, 32)) == (46, 160, 67, 255)
    assert icon_image("green").getpixel((0, 0))[3] == 0  # transparent corners
