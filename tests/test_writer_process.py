"""The writer process: records are built and written there, never on the proxy's event loop;
it is bounded, restarted when it dies, drained on shutdown, and shared by several proxies. The
tests marked with `transport` run both over the Unix socket and over loopback TCP with a secret
(the channel where Python has no Unix sockets, Windows)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from prometheus_client import CollectorRegistry

from analytics_helpers import record, records
from conftest import StartProxy
from fake_ollama import FakeOllama
from helpers import fake_process, proxy_process, settle
from ollama_metrics.analytics import channel
from ollama_metrics.analytics import writer as writer_module
from ollama_metrics.analytics.recorder import RECONNECT_EVERY, TRANSPORT_VARIABLE, Recorder
from ollama_metrics.analytics.settings import AnalyticsConfig
from ollama_metrics.analytics.stores import open_stores
from ollama_metrics.server.app import RECORDER

CHAT = b'{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}]}'
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads child processes from /proc")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The writer's channel: a Unix socket, or loopback TCP with a secret as on Windows."""
    if request.param == "tcp":
        monkeypatch.setenv(TRANSPORT_VARIABLE, "tcp")
    elif not hasattr(socket, "AF_UNIX"):
        pytest.skip("this Python has no Unix sockets")
    else:
        monkeypatch.delenv(TRANSPORT_VARIABLE, raising=False)
    return str(request.param)


def _over(transport: str, address: str) -> None:
    """The writer listens where `transport` says."""
    where = channel.Address.parse(address)
    if transport == "tcp":
        assert address.startswith(f"tcp://{channel.LOOPBACK}:") and where.port
        assert len(where.secret) == channel.SECRET_BYTES
    else:
        assert Path(where.path).is_socket() and not where.port


def _written(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("ollama_analytics_writes_total",
                                     {"backend": "sqlite", "status": "success"}) or 0


def _ids(directory: Path) -> list[str]:
    db = sqlite3.connect(directory / "interactions.db")
    try:
        return [row[0] for row in db.execute("SELECT id FROM interactions ORDER BY id")]
    finally:
        db.close()


def _recorder(proxy_app: object) -> Recorder:
    recorder = proxy_app[RECORDER]  # type: ignore[index]
    assert isinstance(recorder, Recorder)
    return recorder


async def test_a_writer_killed_is_restarted_counted_and_writes_again(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
    transport: str,
) -> None:
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path)))
    process = _recorder(proxy.app).process
    assert process is not None
    _over(transport, process.address)
    first = process.pid
    assert first is not None and first != os.getpid()  # written elsewhere than this loop
    async with http.post(proxy.url + "/api/chat", data=CHAT) as resp:
        await resp.read()
    await records(proxy, http, 1)
    await settle(lambda: proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                                      status="success") == 1)  # reported: not lost with it
    address = process.address
    os.kill(first, signal.SIGKILL)
    await settle(lambda: proxy.sample("ollama_analytics_writer_restarts_total") == 1, 10)
    assert process.pid != first
    assert process.address == address  # where processes attached to the first one find it
    for _ in range(3):
        async with http.post(proxy.url + "/api/chat", data=CHAT) as resp:
            await resp.read()
    assert len(await records(proxy, http, 4)) == 4  # the new writer writes
    await settle(lambda: proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                                      status="success") == 4)
    assert proxy.sample("ollama_analytics_dropped_total", backend="sqlite") == 0


async def test_a_stopped_writer_costs_counted_drops_never_waits(
    fake: FakeOllama, start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    """The writer cannot read (stopped): the socket and then the proxy's bounded buffer fill,
    later records are dropped and counted, and requests go on at their own pace."""
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_queue_size=2)
    proxy = await start_proxy(fake.url, analytics=settings)
    process = _recorder(proxy.app).process
    assert process is not None and process.pid is not None
    body = CHAT.replace(b"Why is the sky blue?", b"why " * 10_000)  # about 40 kB a record
    os.kill(process.pid, signal.SIGSTOP)
    try:
        slowest = 0.0
        for _ in range(40):
            started = time.perf_counter()
            async with http.post(proxy.url + "/api/chat", data=body) as resp:
                assert resp.status == 200
                await resp.read()
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.5
        await settle(lambda: proxy.sample("ollama_analytics_dropped_total",
                                          backend="sqlite") > 0)
        assert proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                            status="success") == 0
    finally:
        os.kill(process.pid, signal.SIGCONT)
    await settle(lambda: proxy.sample("ollama_analytics_queue_size", backend="sqlite") == 0, 10)
    dropped = proxy.sample("ollama_analytics_dropped_total", backend="sqlite")
    stored = len(await records(proxy, http, int(40 - dropped)))
    assert stored + dropped == 40 and stored > 0
    assert proxy.sample("ollama_analytics_writer_restarts_total") == 0


async def test_several_proxies_feed_one_writer(tmp_path: Path, transport: str) -> None:
    """A second Recorder (another worker's) attaches to the first one's writer: both are
    written, each proxy's figures are its own records'."""
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    first = Recorder(open_stores(settings), settings, first_registry)
    await first.start()
    assert first.process is not None
    _over(transport, first.process.address)
    second = Recorder(open_stores(settings), settings, second_registry,
                      writer=first.process.address)
    await second.start()
    try:
        assert second.process is None  # started nothing
        for n in range(5):
            first.submit(record(n))
        for n in range(5, 8):
            second.submit(record(n))
        await settle(lambda: _written(first_registry) == 5 and _written(second_registry) == 3)
    finally:
        await second.close()
        await first.close()
    db = sqlite3.connect(tmp_path / "interactions.db")
    assert db.execute("SELECT COUNT(*) FROM interactions").fetchone() == (8,)
    db.close()


async def test_an_attached_proxy_reaches_a_restarted_writer(tmp_path: Path,
                                                            transport: str) -> None:
    """A Recorder attached with the first one's address (another worker's) finds the writer
    the first one's process started again."""
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    first = Recorder(open_stores(settings), settings, first_registry)
    await first.start()
    process = first.process
    assert process is not None and process.pid is not None
    _over(transport, process.address)
    second = Recorder(open_stores(settings), settings, second_registry, writer=process.address)
    await second.start()
    try:
        second.submit(record(0))
        await settle(lambda: _written(second_registry) == 1)
        os.kill(process.pid, signal.SIGKILL)
        await settle(lambda: first_registry.get_sample_value(
            "ollama_analytics_writer_restarts_total") == 1, 10)
        for n in range(1, 4):
            second.submit(record(n))
        await settle(lambda: _written(second_registry) == 4, 5)
    finally:
        await second.close()
        await first.close()
    assert _ids(tmp_path) == ["rec00000", "rec00001", "rec00002", "rec00003"]


async def test_closing_writes_out_what_was_sent(tmp_path: Path, transport: str) -> None:
    """Records sent in the last loop turn before close() are written, and the writer exits."""
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    registry = CollectorRegistry()
    recorder = Recorder(open_stores(settings), settings, registry)
    await recorder.start()
    assert recorder.process is not None
    _over(transport, recorder.process.address)
    pid = recorder.process.pid
    for n in range(300):
        recorder.submit(record(n))
    await recorder.close()
    assert registry.get_sample_value("ollama_analytics_writes_total",
                                     {"backend": "sqlite", "status": "success"}) == 300
    assert registry.get_sample_value("ollama_analytics_dropped_total", {"backend": "sqlite"}) == 0
    db = sqlite3.connect(tmp_path / "interactions.db")
    assert db.execute("SELECT COUNT(*) FROM interactions").fetchone() == (300,)
    db.close()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # exited and reaped


@linux_only
@pytest.mark.slow(reason="starts proxy processes")
def test_a_writer_process_only_with_analytics(tmp_path: Path) -> None:
    with fake_process() as fake:
        with proxy_process(fake.url, "--analytics-backend", "none") as proxy:
            time.sleep(0.5)
            assert _children(proxy.proc.pid) == []
        with proxy_process(fake.url, "--analytics-dir", str(tmp_path)) as proxy:
            (writer,) = _children(proxy.proc.pid)
            # Below the proxy's priority: on a busy machine the cores go to requests first.
            assert (psutil.Process(writer).nice()
                    == psutil.Process(proxy.proc.pid).nice() + writer_module.NICENESS)
            assert proxy.stop() == 0
        with pytest.raises(ProcessLookupError):
            os.kill(writer, 0)  # the writer stopped with the proxy


async def test_searches_answer_while_the_writer_writes(
    fake: FakeOllama, start_proxy: StartProxy, tmp_path: Path,
) -> None:
    """The proxy reads the store itself: searches answer while the writer is busy."""
    proxy = await start_proxy(fake.url, analytics=AnalyticsConfig.build(
        analytics_dir=str(tmp_path), analytics_retention_days=0))
    recorder = _recorder(proxy.app)
    async with aiohttp.ClientSession() as http:
        for n in range(2000):
            recorder.submit(record(n, prompt=f"sky number {n}"))
        answered = 0
        while proxy.sample("ollama_analytics_writes_total", backend="sqlite",
                           status="success") < 2000:
            async with http.get(proxy.url + "/analytics/search",
                                params={"prompt_search": "sky", "limit": "5"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            answered += 1
            await asyncio.sleep(0)
        assert answered > 0


@pytest.mark.parametrize("capture", ["full", "truncated"])
def test_what_the_proxy_leaves_out_changes_no_record(capture: str) -> None:
    """channel.trim drops the middle messages and the tails of long texts before they are
    encoded: the writer builds from what arrives the very record built from everything."""
    from ollama_metrics.analytics import channel
    from ollama_metrics.analytics import record as building
    from ollama_metrics.analytics.privacy import Privacy
    from ollama_metrics.observe.interaction import Interaction, Message

    settings = AnalyticsConfig.build(analytics_capture=capture, analytics_max_messages=6,
                                     analytics_max_text=1000, analytics_max_record_kb=16)

    def exchange() -> Interaction:
        i = Interaction(method="POST", path="/api/chat", endpoint="/api/chat",
                        started_at=1.0, started=2.0, ended=3.0, ended_at=2.0, id="x",
                        system="rules " * 5000, prompt="ask me@example.com " * 3000)
        i.messages = [Message(role="user", text=f"turn {n} " + "word " * (n * 700),
                              thinking="hmm " * 2000 if n % 3 else None)
                      for n in range(20)]
        i.response_pieces = ["answer " * 100]
        return i

    privacy = Privacy.from_settings(settings)
    whole = building.build(exchange(), privacy)
    sent = exchange()
    elided = channel.trim(sent, settings.max_messages, privacy.decisive_chars)
    payload, n = channel.encode([(channel.INTERACTION, sent, elided)])
    assert n == 1 and elided == 14 and len(payload) < 40_000
    ((kind, data, left_out),) = channel.decode(payload)
    assert kind == channel.INTERACTION
    assert building.build(channel.interaction(data, left_out), privacy) == whole
    assert whole["truncated"] and whole["messages"][3] == {"elided": 14}


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """What the writer sends on a connection until it closes it."""
    with contextlib.suppress(ConnectionResetError):  # closed with our frames unread
        return await asyncio.wait_for(reader.read(), 5)
    return b""


def _frame(payload: bytes) -> bytes:
    return channel.frame(payload) + payload


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(channel.HEADER), "big")
    return await reader.readexactly(size)


async def test_over_tcp_a_connection_that_does_not_prove_the_secret_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any local process can reach a loopback port: the writer stores nothing from a connection
    that does not answer its challenge with the proof of the secret, answers it nothing but the
    challenge, and goes on serving the proxy."""
    monkeypatch.setenv(TRANSPORT_VARIABLE, "tcp")
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    registry = CollectorRegistry()
    recorder = Recorder(open_stores(settings), settings, registry)
    await recorder.start()
    try:
        assert recorder.process is not None
        where = channel.Address.parse(recorder.process.address)
        assert where.port
        secret = where.secret
        records_frame = _frame(channel.encode([(channel.RECORD, record(900))])[0])
        ours = bytes(range(channel.CHALLENGE_BYTES))

        def answers(challenge: bytes) -> list[bytes]:
            other = bytes(channel.CHALLENGE_BYTES)
            return [
                _frame(secret),  # the secret itself, as the channel once sent it first
                _frame(ours + channel.proof(secret, channel.PROXY_ROLE, other, ours)),  # stale
                _frame(ours + channel.proof(secret, channel.WRITER_ROLE, challenge, ours)),
                _frame(ours + channel.proof(bytes(channel.SECRET_BYTES), channel.PROXY_ROLE,
                                            challenge, ours)),  # another key
                _frame(ours + channel.proof(secret, channel.PROXY_ROLE, challenge, ours)[:-1]),
                b"",  # records straight away
            ]

        for index in range(6):
            reader, writer = await asyncio.open_connection(channel.LOOPBACK, where.port)
            challenge = await _read_frame(reader)
            assert len(challenge) == channel.CHALLENGE_BYTES
            writer.write(answers(challenge)[index] + records_frame)
            writer.write_eof()
            assert await _answer(reader) == b"", index  # closed: no proof, no report
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        # The same records after a right proof are taken, and the writer proves itself.
        reader, writer = await asyncio.open_connection(channel.LOOPBACK, where.port)
        challenge = await _read_frame(reader)
        writer.write(_frame(ours + channel.proof(secret, channel.PROXY_ROLE, challenge, ours)))
        assert channel.proven(secret, channel.WRITER_ROLE, challenge, ours,
                              await _read_frame(reader))
        writer.write(records_frame.replace(b"rec00900", b"rec00901"))
        writer.write_eof()
        assert b'"received":1' in await _answer(reader)
        writer.close()
        await writer.wait_closed()
        for n in range(3):
            recorder.submit(record(n))
        await settle(lambda: _written(registry) == 3)
    finally:
        await recorder.close()
    assert _ids(tmp_path) == ["rec00000", "rec00001", "rec00002", "rec00901"]


@pytest.mark.parametrize("impostor", ["challenges", "silent"])
async def test_over_tcp_a_process_on_the_writers_port_gets_neither_secret_nor_records(
    tmp_path: Path, impostor: str,
) -> None:
    """A writer that died leaves its loopback port; another local process may listen there
    before it is restarted. A proxy attached to that address sends it no secret and no record:
    it answers a challenge with a proof that reveals nothing, sends nothing to a process that
    does not challenge it, and counts its records as dropped, never sent."""
    secret = os.urandom(channel.SECRET_BYTES)
    received: list[bytes] = []
    connections = 0

    async def squatter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if impostor == "challenges":
            challenge = os.urandom(channel.CHALLENGE_BYTES)
            writer.write(_frame(challenge))
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                received.append(await _read_frame(reader))
                writer.write(_frame(os.urandom(32)))  # a proof it cannot make
        with contextlib.suppress(ConnectionError):
            received.append(await reader.read())  # all else, until the proxy closes
        writer.close()

    server = await asyncio.start_server(squatter, channel.LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    registry = CollectorRegistry()
    recorder = Recorder(open_stores(settings), settings, registry,
                        writer=str(channel.Address(port=port, secret=secret)))
    starting = asyncio.ensure_future(recorder.start())
    try:
        await settle(lambda: connections >= 1)
        for n in range(3):
            recorder.submit(record(n))
        await asyncio.sleep(2 * RECONNECT_EVERY + 0.5)
    finally:
        await recorder.close()
        await starting
        server.close()
        await server.wait_closed()
    sent = b"".join(received)
    assert secret not in sent and b"rec0000" not in sent
    if impostor == "challenges":
        assert connections >= 2  # refused, and tried again
        assert len(received[0]) == channel.CHALLENGE_BYTES + 32  # our challenge and proof
        assert received[1] == b""  # then nothing: the link was closed unproven
    else:
        assert sent == b""  # a silent listener is sent nothing at all
    assert registry.get_sample_value("ollama_analytics_dropped_total",
                                     {"backend": "sqlite"}) == 3


@linux_only
async def test_over_tcp_the_writer_listens_on_loopback_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TRANSPORT_VARIABLE, "tcp")
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    recorder = Recorder(open_stores(settings), settings, CollectorRegistry())
    await recorder.start()
    try:
        assert recorder.process is not None and recorder.process.pid is not None
        where = channel.Address.parse(recorder.process.address)
        listening = [(c.laddr.ip, c.laddr.port) for c in psutil.Process(
            recorder.process.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening == [(channel.LOOPBACK, where.port)]
        with pytest.raises(ConnectionRefusedError):  # another loopback address: nobody there
            await asyncio.open_connection("127.0.0.2", where.port)
    finally:
        await recorder.close()


def test_an_address_that_is_no_writers_is_refused() -> None:
    settings = AnalyticsConfig.build(analytics_backend="none")
    for address in ("tcp://0.0.0.0:1234#" + "00" * channel.SECRET_BYTES,
                    "tcp://127.0.0.1:1234#00", "tcp://127.0.0.1:1234"):
        with pytest.raises(ValueError, match="not a writer's address"):
            Recorder([], settings, CollectorRegistry(), writer=address)
    secret = bytes(range(channel.SECRET_BYTES))
    address = str(channel.Address(port=1234, secret=secret))
    assert channel.Address.parse(address) == channel.Address(port=1234, secret=secret)


async def test_over_tcp_a_writer_restarted_on_another_port_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restarted writer listens on the last one's port if it can; when that is taken, on
    another, and the proxy's reconnect goes there, never to whoever took the old one."""
    monkeypatch.setenv(TRANSPORT_VARIABLE, "tcp")
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    registry = CollectorRegistry()
    recorder = Recorder(open_stores(settings), settings, registry)
    await recorder.start()
    squatter = socket.socket()
    try:
        process = recorder.process
        assert process is not None and process.pid is not None
        old = channel.Address.parse(process.address).port
        recorder.submit(record(0))
        await settle(lambda: _written(registry) == 1)
        os.kill(process.pid, signal.SIGKILL)
        await settle(lambda: process.address == "")  # the dead writer's port is forgotten
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((channel.LOOPBACK, old))
        squatter.listen()
        squatter.setblocking(False)
        await settle(lambda: process.address != "", 10)
        new = channel.Address.parse(process.address).port
        assert new != old
        for n in range(1, 4):
            recorder.submit(record(n))
        await settle(lambda: _written(registry) == 4, 5)
        with pytest.raises(BlockingIOError):
            squatter.accept()  # nobody came: the secret went to the writer only
    finally:
        squatter.close()
        await recorder.close()
    assert _ids(tmp_path) == ["rec00000", "rec00001", "rec00002", "rec00003"]


async def test_over_tcp_a_writer_that_proves_itself_and_leaves_is_reconnected(
    tmp_path: Path,
) -> None:
    """A writer that proves itself and closes at once (it died right after) is gone before the
    link is in use: the proxy connects again rather than keep a dead link."""
    secret = os.urandom(channel.SECRET_BYTES)
    connections = 0

    async def proves_and_leaves(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        challenge = os.urandom(channel.CHALLENGE_BYTES)
        writer.write(_frame(challenge))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            answer = await _read_frame(reader)
            theirs = answer[:channel.CHALLENGE_BYTES]
            writer.write(_frame(channel.proof(secret, channel.WRITER_ROLE, challenge, theirs)))
        writer.close()  # the proof and the end in the same read

    server = await asyncio.start_server(proves_and_leaves, channel.LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    settings = AnalyticsConfig.build(analytics_dir=str(tmp_path), analytics_retention_days=0)
    recorder = Recorder(open_stores(settings), settings, CollectorRegistry(),
                        writer=str(channel.Address(port=port, secret=secret)))
    starting = asyncio.ensure_future(recorder.start())
    try:
        await settle(lambda: connections >= 3, timeout=10)
    finally:
        await recorder.close()
        await starting
        server.close()
        await server.wait_closed()
