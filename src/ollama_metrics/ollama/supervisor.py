"""The `ollama serve` child: ports, spawn, health wait, restart with back-off, polite stop.

Contract:
- `start()` checks the child's address first. An Ollama already answering there is used as it is
  (adopted, not supervised); so is one the user is starting for it (an `ollama serve` process
  of theirs for that port, probe.ollama_starting), given THEIRS_WAIT seconds to answer; anything
  else there is an error (OllamaPortTaken). Otherwise it finds
  the ollama program (OllamaNotFound), spawns `ollama serve` with OLLAMA_HOST set to the child's
  address (every other variable passes through) and returns once it answers GET /api/version, or
  raises OllamaFailedToStart with the child's last words.
- After that, a child that exits for any reason other than `stop()` is restarted after a back-off
  that doubles with each quick failure (reset once a child stayed up for the longest back-off),
  logged with its exit status and last output line, and counted in
  ollama_upstream_restarts_total. Meanwhile the proxy answers 502 on its own.
- The child runs in its own process group, so a Ctrl-C at the terminal reaches only the proxy,
  which drains its requests first and then stops the child: SIGTERM (CTRL_BREAK_EVENT on
  Windows), then after `ollama_stop_grace` a kill of the whole group.
- The child's output is relayed as it comes to stderr; after it exits, whatever it left running
  in its process group (model runners) is killed.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from ..config import Config, parse_listen
from ..observe.metrics import upstream_restarts
from ..printable import printable
from . import control, probe, upstream
from .passthrough import find_ollama, ollama_environ

log = logging.getLogger("ollama_metrics.ollama.supervisor")

TAIL_CHARS = 4096
# How long an `ollama serve` the user started for the child's address (it can take a couple of
# seconds to bind) is waited for before the proxy starts its own; the README says it.
THEIRS_WAIT = 3.0


class OllamaPortTaken(Exception):
    """Something that is not Ollama holds the address the child should listen on."""


class OllamaFailedToStart(Exception):
    """`ollama serve` exited or stayed silent while starting."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"code {returncode}"


# --- the platform-specific bits, kept small ---

def _own_group() -> dict[str, Any]:
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _polite_stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        if sys.platform == "win32":
            try:
                proc.send_signal(signal.CTRL_BREAK_EVENT)
            except OSError:  # no console shared with the child (as a service): no polite way
                proc.terminate()
        else:
            proc.send_signal(signal.SIGTERM)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        if sys.platform == "win32":
            proc.kill()
        else:
            try:  # the whole group: `ollama serve` starts model runners of its own
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()


def _kill_leftovers(proc: asyncio.subprocess.Process) -> None:
    """Model runners an exited `ollama serve` left behind would hold on to GPU memory."""
    if sys.platform != "win32":
        # The group outlives its leader only while members remain, so its id is not reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class Supervisor:
    def __init__(self, config: Config, registry: CollectorRegistry,
                 environ: Mapping[str, str]) -> None:
        self.config = config
        self.restarts = upstream_restarts(registry)
        self._environ = environ
        self._binary = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tail = ""
        self._stopping = False
        self._spawned_at = 0.0
        self.restart_count = 0
        self.adopted = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Have an Ollama answering at the child's address, starting one if need be."""
        config = self.config
        host, port = parse_listen(config.ollama_host)
        answer = await asyncio.to_thread(probe.identify, config.upstream, 2.0)
        if answer.who is probe.Who.NOTHING and (
                starting := await asyncio.to_thread(probe.ollama_starting, port)):
            answer = await self._wait_for_theirs(starting)
        if answer.who is probe.Who.OLLAMA:
            self.adopted = True
            log.info("Ollama %s already answers at %s; forwarding to it as it is (it was not "
                     "started by ollama-metrics, so it is not restarted if it stops)",
                     answer.version or "", config.ollama_host)
            return
        if answer.who is not probe.Who.NOTHING or not probe.port_free(host, port):
            raise OllamaPortTaken(
                f"{config.ollama_host}, where Ollama should listen, is taken by "
                f"{answer.who.value if answer.who is not probe.Who.NOTHING else 'another program'}"
                ". Free it, or choose another address with --ollama-host HOST:PORT "
                "(OLLAMA_METRICS_OLLAMA_HOST)")
        self._binary = find_ollama(config.ollama_bin, self._environ)
        self._session = upstream.open_session(config)
        try:
            await self._spawn()
            await self._until_healthy()
        except OllamaFailedToStart:
            await self._reap()
            if await self._adopt_late():
                return
            await self.stop()
            raise
        except BaseException:
            await self.stop()
            raise
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self, now: asyncio.Event | None = None) -> None:
        """Stop the child politely, then by force after the grace period, or as soon as `now`
        is set (a second Ctrl-C)."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.info("stopping ollama serve (pid %d, up to %ss)", proc.pid,
                     self.config.ollama_stop_grace)
            _polite_stop(proc)
            exited = asyncio.ensure_future(proc.wait())
            forced = asyncio.ensure_future((now or asyncio.Event()).wait())
            await asyncio.wait({exited, forced}, timeout=self.config.ollama_stop_grace,
                               return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            if not exited.done():
                exited.cancel()
                if now is not None and now.is_set():
                    log.warning("stopping now: killing ollama serve (pid %d)", proc.pid)
                else:
                    log.warning("ollama serve (pid %d) did not stop within %ss; killing it",
                                proc.pid, self.config.ollama_stop_grace)
                _kill(proc)
        await self._reap()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _wait_for_theirs(self, pids: list[int]) -> probe.Answer:
        """An `ollama serve` started by hand for the child's address is given THEIRS_WAIT
        seconds to answer before the proxy starts its own (which would take the port first)."""
        log.info("an ollama serve started for %s (pid %s) does not answer yet; waiting up to "
                 "%ss for it", self.config.ollama_host, ", ".join(map(str, pids)), THEIRS_WAIT)
        deadline = time.monotonic() + THEIRS_WAIT
        while True:
            answer = await asyncio.to_thread(probe.identify, self.config.upstream, 1.0)
            if answer.who is not probe.Who.NOTHING or time.monotonic() >= deadline:
                return answer
            await asyncio.sleep(0.1)

    async def _adopt_late(self) -> bool:
        """An Ollama started by hand at the same moment may have won the port race."""
        answer = await asyncio.to_thread(probe.identify, self.config.upstream, 2.0)
        if answer.who is not probe.Who.OLLAMA:
            return False
        self.adopted = True
        log.info("another Ollama %s took %s first; forwarding to it as it is",
                 answer.version or "", self.config.ollama_host)
        return True

    async def _spawn(self) -> None:
        self._tail = ""
        self._spawned_at = time.monotonic()
        env = ollama_environ(self._environ, self.config.ollama_host)
        self._proc = await asyncio.create_subprocess_exec(
            self._binary, "serve", env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **_own_group())
        assert self._proc.stdout is not None
        self._relay = asyncio.create_task(self._relay_output(self._proc.stdout))
        log.info("started %s serve (pid %d) with OLLAMA_HOST=%s", self._binary, self._proc.pid,
                 self.config.ollama_host)

    async def _relay_output(self, stream: asyncio.StreamReader) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while chunk := await stream.read(65536):
            text = decoder.decode(chunk)
            self._tail = (self._tail + text)[-TAIL_CHARS:]
            with contextlib.suppress(OSError, ValueError, AttributeError):  # no usable stderr
                sys.stderr.write(text)
                sys.stderr.flush()

    async def _reap(self) -> None:
        """Wait for the exited child and the last of its output."""
        if self._proc is not None and self._proc.returncode is None:
            _kill(self._proc)
        if self._proc is not None:
            await self._proc.wait()
            _kill_leftovers(self._proc)
        if self._relay is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay
            self._relay = None

    def _last_words(self) -> str:
        lines = [line.strip() for line in self._tail.splitlines() if line.strip()]
        return printable(lines[-1]) if lines else "(no output)"

    async def _until_healthy(self) -> None:
        proc, session = self._proc, self._session
        assert proc is not None
        assert session is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ollama_start_timeout
        pause = 0.02
        while True:
            if proc.returncode is not None:
                await self._reap()
                raise OllamaFailedToStart(
                    f"ollama serve exited with {describe_exit(proc.returncode)} while starting: "
                    f"{self._last_words()}")
            health = await control.health(session, self.config.upstream, timeout=1.0)
            if health.ok:
                log.info("Ollama %s answers at %s", health.version or "", self.config.ollama_host)
                return
            if loop.time() > deadline:
                raise OllamaFailedToStart(
                    f"ollama serve (pid {proc.pid}) did not answer at {self.config.upstream_shown} "
                    f"within {self.config.ollama_start_timeout}s (--ollama-start-timeout): "
                    f"{health.error}")
            # Wake early if the child exits.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), pause)
            pause = min(pause * 2, 0.25)

    async def _watch(self) -> None:
        """Restart the child whenever it exits, forever (cancelled by stop())."""
        config = self.config
        failures = 0
        while True:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            await self._reap()
            if self._stopping:
                return
            if time.monotonic() - self._spawned_at >= config.restart_backoff_max:
                failures = 0
            delay = min(config.restart_backoff * 2 ** failures, config.restart_backoff_max)
            failures += 1
            log.warning("ollama serve (pid %d) exited unexpectedly with %s (last output: %s); "
                        "restarting it in %.1fs. Requests get 502 until it is back.",
                        proc.pid, describe_exit(code), self._last_words(), delay)
            await asyncio.sleep(delay)
            self.restart_count += 1
            self.restarts.inc()
            await self._spawn()
            try:
                await self._until_healthy()
            except OllamaFailedToStart as exc:
                if self.running:  # silent, not exited (an exit is reported at the loop's top)
                    log.warning("%s; killing it", exc)
                    await self._reap()
                continue
            log.info("ollama serve is back (restart %d)", self.restart_count)
