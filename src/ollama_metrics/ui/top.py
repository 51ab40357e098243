"""`top`: a live terminal view of a running proxy, drawn from its GET /analytics/live.

`fetch` asks the proxy once (short timeout, no http_proxy) and turns every expected failure into
`Unavailable`, whose message says what to do. `render` is pure: a snapshot and/or a failure in, at
most `height` lines of at most `width` characters out. `watch` redraws on the terminal's alternate
screen every `interval` seconds until q or Ctrl-C (or SIGTERM), then restores the terminal: main
screen, cursor, and the keyboard mode it found.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import sys
import textwrap
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn, TextIO

from ..ollama import control
from ..units import MISSING, missing, seconds

FETCH_TIMEOUT = 2.0
ONCE_HEIGHT = 1000  # --once prints the whole frame: no screen to fit
MODEL_WIDTH = (8, 40)  # the model column takes the room left, within these bounds
GAP = " "  # right-aligned numbers pad themselves; 80 columns hold every table

Snapshot = dict[str, Any]
Key = Callable[[float], str]  # waits up to that many seconds for a key; "" when none came


class Unavailable(Exception):
    """No snapshot: nothing answers, a token is missing or refused, or it is not this proxy."""


class NotATerminal(Exception):
    """The live view needs a terminal to draw on."""


def base_url(url: str) -> str:
    """The proxy's address as given (`host:port` alone means http); ValueError if unusable."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise ValueError(f"{url!r}: expected http://HOST:PORT")
    return url


def fetch(url: str, token: str | None = None, recent: int = 20,
          timeout: float = FETCH_TIMEOUT) -> Snapshot:
    """The proxy's live snapshot. Raises Unavailable with a message a user can act on."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/analytics/live?recent={recent}", headers=headers)
    try:
        with control.open_url(request, timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 401:
            raise Unavailable(
                f"the proxy at {url} refused the token (401): check --token / ANALYTICS_TOKEN"
                if token else
                f"the proxy at {url} needs a token (401): pass --token or set ANALYTICS_TOKEN"
            ) from None
        if exc.code == 404:
            raise Unavailable(f"{url} has no /analytics/live (404): is it ollama-metrics, "
                              "and a recent one?") from None
        raise Unavailable(f"{url}/analytics/live answered HTTP {exc.code}") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise Unavailable(f"no proxy answers at {url} ({reason})") from None
    try:
        snapshot = json.loads(body)
    except ValueError:
        snapshot = None
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("active"), list):
        raise Unavailable(f"{url}/analytics/live answered something else than a live snapshot")
    return snapshot


# --- drawing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    title: str
    width: int  # 0: the model column, sized to the room left
    left: bool = False


IN_FLIGHT = (Column("MODEL", 0, True), Column("ENDPOINT", 20, True), Column("ELAPSED", 8),
             Column("TOKENS", 7), Column("TTFT", 7))
PER_MODEL = (Column("MODEL", 0, True), Column("REQ/S", 7), Column("TOK/S", 8),
             Column("REQUESTS", 9), Column("TOKENS", 8), Column("ERRORS", 7))
RECENT = (Column("TIME", 8, True), Column("MODEL", 0, True), Column("ENDPOINT", 16, True),
          Column("STATUS", 11, True), Column("DURATION", 8), Column("TTFT", 6),
          Column("TOKENS", 6), Column("TOK/S", 6))


def _clean(text: object) -> str:
    # Model names come from clients: never let one send escape sequences to the terminal.
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[:width - 1] + "…" if width > 1 else text[:width]


def _table(columns: tuple[Column, ...], rows: list[list[str]], width: int) -> list[str]:
    fixed = sum(c.width for c in columns) + len(GAP) * (len(columns) - 1)
    low, high = MODEL_WIDTH
    flex = min(max(width - fixed, low), high)

    def line(cells: list[str]) -> str:
        parts = []
        for column, cell in zip(columns, cells, strict=True):
            w = column.width or flex
            cell = _cut(_clean(cell), w)
            parts.append(cell.ljust(w) if column.left else cell.rjust(w))
        return GAP.join(parts).rstrip()

    return [line([c.title for c in columns]), *(line(r) for r in rows)]


def _secs(value: Any) -> str:
    return seconds(value, sep="")


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else MISSING


def _clock(epoch: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch)) if isinstance(epoch, (int, float)) \
        else MISSING


def _in_flight_rows(snapshot: Snapshot) -> list[list[str]]:
    return [[missing(a.get("model")), missing(a.get("endpoint")), _secs(a.get("elapsed")),
             _num(a.get("chunks"), "{}"), _secs(a.get("ttft"))]
            for a in snapshot.get("active", [])]


def _model_rows(snapshot: Snapshot) -> list[list[str]]:
    return [[missing(m.get("model")), _num(m.get("requests_per_second"), "{:.2f}"),
             _num(m.get("tokens_per_second")), _num(m.get("requests"), "{}"),
             _num(m.get("tokens"), "{}"), _num(m.get("errors"), "{}")]
            for m in snapshot.get("models", [])]


def _recent_rows(snapshot: Snapshot) -> list[list[str]]:
    return [[_clock(r.get("ended_at")), missing(r.get("model")), missing(r.get("endpoint")),
             _status(r.get("status"), r.get("http_status")),
             _secs(r.get("duration")), _secs(r.get("ttft")),
             _num(r.get("completion_tokens"), "{}"), _num(r.get("tokens_per_second"))]
            for r in snapshot.get("recent", [])]


def _status(word: Any, http_status: Any) -> str:
    word = word or MISSING
    # A cancelled request's code is whatever Ollama had started to send: not worth the room.
    return word if word == "cancelled" or not http_status else f"{word} {http_status}"


def _in_flight(snapshot: Snapshot) -> int:
    """Requests in flight: all of them (`active_count`), not only those listed (`active`)."""
    count = snapshot.get("active_count")
    return count if isinstance(count, int) else len(snapshot.get("active", []))


def _totals(snapshot: Snapshot) -> str:
    models = snapshot.get("models", [])
    window = snapshot.get("window_seconds", 60)

    def total(key: str) -> float:
        return sum(m.get(key) or 0 for m in models)

    errors = total("errors")
    return (f"in flight {_in_flight(snapshot)}   last {window:g} s: "
            f"{total('requests'):g} requests, {total('requests_per_second'):.2f} req/s, "
            f"{total('tokens_per_second'):.1f} tok/s, {errors:g} error{'' if errors == 1 else 's'}")


def _allot(needs: list[int], room: int) -> list[int]:
    """Rows each section may show: one each in turn while there is room, so none is starved."""
    shown = [0] * len(needs)
    while room > 0 and shown != needs:
        for k, need in enumerate(needs):
            if room > 0 and shown[k] < need:
                shown[k] += 1
                room -= 1
    return shown


def render(snapshot: Snapshot | None, width: int, height: int, *, url: str = "",
           error: str | None = None, footer: str = "") -> list[str]:
    """One screen: header, In flight, Per model, Recent; at most `height` lines of at most
    `width` characters. With `error`, the message heads the screen above the last data, if any."""
    width, height = max(width, 1), max(height, 0)
    when = _clock(snapshot["time"] if snapshot is not None else time.time())
    head = [f"ollama-metrics top   {url}   {when}"]
    if error:
        head += ["! " + line for line in textwrap.wrap(error, max(width - 2, 10))]
    if snapshot is None:
        body: list[str] = []
    else:
        head.append(_totals(snapshot))
        window = snapshot.get("window_seconds", 60)
        flying = _in_flight(snapshot)
        sections = [(f"In flight ({flying})", IN_FLIGHT,
                     _in_flight_rows(snapshot), "nothing in flight"),
                    (f"Per model (last {window:g} s)", PER_MODEL, _model_rows(snapshot),
                     "no requests in the window"),
                    ("Recent", RECENT, _recent_rows(snapshot), "nothing finished yet")]
        tables = [_table(columns, rows, width) if rows else ["  " + empty]
                  for _, columns, rows, empty in sections]
        # Rows not on screen: those the screen has no room for, and the requests in flight the
        # snapshot does not list.
        unlisted = [max(0, flying - len(snapshot.get("active", []))), 0, 0]
        # Every section keeps its blank line, title and column header (or "nothing" line).
        fixed = len(head) + bool(footer) + 3 * len(sections)
        shown = _allot([len(t) - 1 for t in tables], height - fixed)
        body = []
        for (title, _, _, _), table, n, more in zip(sections, tables, shown, unlisted,
                                                    strict=True):
            hidden = len(table) - 1 - n + more
            body += ["", f"{title}   +{hidden} more" if hidden else title, *table[:1 + n]]
    lines = head + body
    if footer and height > 0:
        lines = lines[:height - 1]
        lines += [""] * (height - 1 - len(lines)) + [footer]
    return [_cut(line, width) for line in lines[:height]]


# --- the live screen ---------------------------------------------------------------------------


def once(url: str, token: str | None, width: int) -> tuple[list[str], bool]:
    """One frame for --once, and whether the proxy gave data."""
    try:
        snapshot, error = fetch(url, token), None
    except Unavailable as exc:
        snapshot, error = None, str(exc)
    return render(snapshot, width, ONCE_HEIGHT, url=url, error=error), error is None


def watch(url: str, token: str | None, interval: float, out: TextIO = sys.stdout,
          keys: TextIO = sys.stdin) -> None:
    """Redraw every `interval` seconds until q, Ctrl-C or SIGTERM; the terminal is restored."""
    if not out.isatty():
        raise NotATerminal("the live view needs a terminal; --once prints one frame")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _screen(out), _keyboard(keys) as key:
            last: Snapshot | None = None
            while True:
                size = os.get_terminal_size(out.fileno())
                try:
                    last, error = fetch(url, token, recent=max(size.lines, 20)), None
                except Unavailable as exc:
                    error = f"{exc} — retrying every {interval:g} s"
                _draw(out, render(last, size.columns, size.lines, url=url, error=error,
                                  footer=f"q quits · refresh {interval:g} s"), size.lines)
                if _pause(key, interval, out, size):
                    return
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _draw(out: TextIO, lines: list[str], height: int) -> None:
    # Each row is erased then written: no full clear (no flicker), and a full-width last row is
    # never erased by a trailing erase-to-end.
    frame = "".join(f"\x1b[{n};1H\x1b[2K{line}" for n, line in enumerate(lines, 1))
    if len(lines) < height:
        frame += f"\x1b[{len(lines) + 1};1H\x1b[J"
    out.write(frame)
    out.flush()


def _pause(key: Key, interval: float, out: TextIO, size: os.terminal_size) -> bool:
    """Wait for the next refresh; True when q was pressed. A resize redraws at once."""
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        if "q" in key(min(left, 0.1)).lower():
            return True
        if os.get_terminal_size(out.fileno()) != size:
            return False
    return False


@contextlib.contextmanager
def _screen(out: TextIO) -> Iterator[None]:
    out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, cursor hidden
    out.flush()
    try:
        yield
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()


@contextlib.contextmanager
def _keyboard(keys: TextIO) -> Iterator[Key]:
    """Keys one at a time, unechoed; Ctrl-C still interrupts. Restores the mode it found."""
    if sys.platform == "win32":  # untested: no Windows here
        import msvcrt

        def key(timeout: float) -> str:
            deadline = time.monotonic() + timeout
            while not msvcrt.kbhit():
                if time.monotonic() >= deadline:
                    return ""
                time.sleep(0.02)
            return msvcrt.getwch()

        yield key
    elif not keys.isatty():
        def sleep(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield sleep
    else:
        import termios
        import tty

        fd = keys.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

        def read(timeout: float) -> str:
            ready, _, _ = select.select([fd], [], [], timeout)
            return os.read(fd, 64).decode(errors="replace") if ready else ""

        try:
            yield read
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
