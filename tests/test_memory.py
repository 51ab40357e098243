"""Large bodies stream through: a 1 GB blob upload leaves the proxy's memory flat."""

from __future__ import annotations

import hashlib
import threading
import time

import aiohttp
import psutil
import pytest

from helpers import fake_process, proxy_process

pytestmark = pytest.mark.slow(reason="RSS of proxy processes under load")

CHUNK = bytes(range(256)) * 4096  # 1 MiB
COUNT = 1024  # 1 GiB


async def test_1gb_blob_upload_keeps_proxy_memory_flat() -> None:
    digest = hashlib.sha256()
    for _ in range(COUNT):
        digest.update(CHUNK)
    path = f"/api/blobs/sha256:{digest.hexdigest()}"
    with fake_process() as fake, proxy_process(fake.url) as proxy:
        process = psutil.Process(proxy.proc.pid)
        baseline = process.memory_info().rss
        peak = baseline
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()

        async def body() -> object:
            for _ in range(COUNT):
                yield CHUNK

        try:
            timeout = aiohttp.ClientTimeout(total=300)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(proxy.url + path, data=body(),
                                        headers={"Content-Length": str(COUNT * len(CHUNK))}
                                        ) as resp:
                    assert resp.status == 201, await resp.text()
                async with session.head(proxy.url + path) as resp:
                    assert resp.status == 200
        finally:
            stop.set()
            watcher.join()
        rise = (peak - baseline) / 2**20
        print(f"proxy RSS baseline {baseline / 2**20:.1f} MiB, peak rise {rise:.1f} MiB")
        assert rise < 50, f"proxy RSS rose {rise:.1f} MiB while streaming 1 GiB"
