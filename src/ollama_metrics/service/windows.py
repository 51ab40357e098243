"""The Windows service's manager: install/start/stop/status through the thin pywin32 layer in
`winapi`, imported only when used. The service's body is `runner.ServiceRunner`.
"""

from __future__ import annotations

import logging

from . import DESCRIPTION, NAME, ServiceSpec

log = logging.getLogger("ollama_metrics.service")


class WindowsService:
    """The Manager for Windows: installs a service hosted by pywin32's pythonservice."""

    def install(self, spec: ServiceSpec) -> list[str]:
        from . import winapi
        winapi.install(spec, DESCRIPTION)
        return [f"installed the Windows service {NAME!r} (starts with Windows)",
                f"start it now with `ollama-metrics service start`; its log: {spec.log}"]

    def uninstall(self) -> list[str]:
        from . import winapi
        winapi.uninstall()
        return [f"removed the Windows service {NAME!r}"]

    def start(self) -> list[str]:
        from . import winapi
        winapi.start()
        return [f"started {NAME}"]

    def stop(self) -> list[str]:
        from . import winapi
        winapi.stop()
        return [f"stopped {NAME}"]

    def status(self) -> tuple[bool, str]:
        from . import winapi
        state = winapi.state()
        return state == "running", f"{NAME}: {state}"
