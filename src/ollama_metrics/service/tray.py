"""The tray icon: proxy and Ollama status at a glance, and a menu to open the dashboard, open the
metrics, and stop the service.

`Tray` is the logic (what the icon says, what each item does) and needs no GUI; `build_icon` and
`run_tray` are the pystray glue (an extra: `pip install ollama-metrics[windows]`), imported only
when a tray is shown. Green: proxy and Ollama answer; orange: the proxy answers but Ollama does
not; red: no proxy.
"""

from __future__ import annotations

import threading
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from ..config import Config
from ..ollama import probe
from ..ollama.passthrough import proxy_url

DEFAULT_DASHBOARD = "http://localhost:3000/d/ollama-metrics"  # Grafana, as deploy/ provisions it
COLORS = {"green": (46, 160, 67), "orange": (230, 140, 20), "red": (200, 40, 40)}


@dataclass(frozen=True)
class TrayState:
    color: str
    title: str


def tray_state(answer: probe.Answer, url: URL) -> TrayState:
    if answer.who is probe.Who.PROXY:
        up = answer.health.get("upstream") or {}
        if up.get("reachable"):
            return TrayState("green", f"ollama-metrics {answer.version} at {url}: "
                                      f"Ollama {up.get('version') or ''} up")
        return TrayState("orange", f"ollama-metrics {answer.version} at {url}: Ollama is not "
                                   f"answering ({up.get('error') or 'unknown error'})")
    if answer.who is probe.Who.OLLAMA:
        return TrayState("red", f"Ollama {answer.version} answers at {url} without the proxy")
    return TrayState("red", f"ollama-metrics is not running at {url}")


class Tray:
    def __init__(self, config: Config, stop_service: Callable[[], object],
                 dashboard_url: str = DEFAULT_DASHBOARD,
                 open_url: Callable[[str], object] = webbrowser.open) -> None:
        self.url = proxy_url(config)
        self.metrics_url = str(self.url.with_path(config.metrics_path))
        self.dashboard_url = dashboard_url
        self._stop_service = stop_service
        self._open_url = open_url
        self.state = TrayState("red", f"ollama-metrics at {self.url}: checking…")

    def refresh(self) -> TrayState:
        self.state = tray_state(probe.identify(self.url, timeout=2.0), self.url)
        return self.state

    def actions(self) -> list[tuple[str, Callable[[], object]]]:
        return [
            ("Open dashboard", lambda: self._open_url(self.dashboard_url)),
            ("Open metrics", lambda: self._open_url(self.metrics_url)),
            ("Stop ollama-metrics", self._stop_then_refresh),
        ]

    def _stop_then_refresh(self) -> None:
        self._stop_service()
        self.refresh()


def icon_image(color: str) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((6, 6, 58, 58), fill=COLORS[color] + (255,))
    return image


def build_icon(tray: Tray) -> Any:
    """The pystray Icon with the tray's menu (and Quit, which closes the icon only)."""
    import pystray

    def item(label: str, action: Callable[[], object]) -> Any:
        return pystray.MenuItem(label, lambda icon, _: action())

    icon: Any = None
    menu = pystray.Menu(*(item(label, action) for label, action in tray.actions()),
                        pystray.Menu.SEPARATOR,
                        item("Quit tray", lambda: icon.stop()))
    icon = pystray.Icon("ollama-metrics", icon_image(tray.state.color), tray.state.title, menu)
    return icon


def show(icon: Any, state: TrayState) -> None:
    icon.icon = icon_image(state.color)
    icon.title = state.title


def run_tray(tray: Tray, interval: float = 5.0) -> None:
    """Show the icon until Quit, refreshing its state every `interval` seconds."""
    icon = build_icon(tray)
    done = threading.Event()

    def watch(icon: Any) -> None:
        icon.visible = True
        while not done.is_set():
            show(icon, tray.refresh())
            done.wait(interval)

    try:
        icon.run(setup=watch)
    finally:
        done.set()
