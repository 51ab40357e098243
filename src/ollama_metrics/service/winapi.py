"""The thin layer over pywin32: the service class the SCM hosts, and the SCM calls. Windows only;
everything it does beyond calling Windows is in `windows.ServiceRunner`, which is tested anywhere.

The `serve` options and the environment kept at install time are stored with the service (its
registry Parameters key), as JSON under SETTINGS.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import servicemanager
import win32service
import win32serviceutil

from ..cli.proxy import config_from_args
from ..paths import log_dir
from ..server import serve as server
from . import NAME, ServiceSpec
from .runner import ServiceRunner

SETTINGS = "settings"
_STATES = {
    win32service.SERVICE_STOPPED: "stopped",
    win32service.SERVICE_START_PENDING: "starting",
    win32service.SERVICE_STOP_PENDING: "stopping",
    win32service.SERVICE_RUNNING: "running",
    win32service.SERVICE_PAUSED: "paused",
}


class OllamaMetricsService(win32serviceutil.ServiceFramework):
    _svc_name_ = NAME
    _svc_display_name_ = "ollama-metrics"
    _svc_description_ = "Ollama with Prometheus metrics: the proxy on 11434, Ollama behind it"

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        settings = json.loads(win32serviceutil.GetServiceCustomOption(NAME, SETTINGS) or "{}")
        # This process's own environment: `serve`'s options read their variables from it.
        os.environ.update(settings.get("environment", {}))
        environ = dict(os.environ)
        serve_args = settings.get("serve_args", [])

        async def serve(stop: asyncio.Event) -> None:
            config, analytics = config_from_args(serve_args)
            await server.serve(config, server.bind(config), stop, environ, analytics)

        self.runner = ServiceRunner(serve, log_dir(environ, "win32") / "service.log")

    def SvcStop(self) -> None:
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
        self.runner.stop()

    def SvcDoRun(self) -> None:
        servicemanager.LogInfoMsg(f"{NAME} starting; log: {self.runner.log}")
        code = self.runner.run()
        if code != 0:
            servicemanager.LogErrorMsg(f"{NAME} stopped with an error; see {self.runner.log}")


def install(spec: ServiceSpec, description: str) -> None:
    win32serviceutil.InstallService(
        f"{__name__}.OllamaMetricsService", NAME, "ollama-metrics",
        startType=win32service.SERVICE_AUTO_START, description=description)
    win32serviceutil.SetServiceCustomOption(NAME, SETTINGS, json.dumps(
        {"serve_args": list(spec.serve_args), "environment": spec.environment}))


def uninstall() -> None:
    win32serviceutil.RemoveService(NAME)


def start() -> None:
    win32serviceutil.StartService(NAME)


def stop() -> None:
    win32serviceutil.StopService(NAME)


def state() -> str:
    try:
        code = win32serviceutil.QueryServiceStatus(NAME)[1]
    except Exception:  # pywintypes.error: not installed
        return "not installed"
    return _STATES.get(code, f"state {code}")
