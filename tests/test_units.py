"""How numbers read in the text views: units.py, and `status`'s model line that uses it."""

from __future__ import annotations

import pytest
from yarl import URL

from ollama_metrics import units
from ollama_metrics.ollama import probe
from ollama_metrics.ollama.status import Status, render


@pytest.mark.parametrize(("value", "text"), [
    (0.0007, "0.7 ms"), (0.005, "5 ms"), (0.35, "350 ms"), (1.2449, "1.24 s"), (12.54, "12.5 s"),
    (185, "3 min 05 s"), (7260, "2 h 01 min"), (0, "0 ms"), (None, "-"), (float("nan"), "-"),
])
def test_seconds_read_in_milliseconds_below_a_second(value: object, text: str) -> None:
    assert units.seconds(value) == text


def test_seconds_without_spaces_for_top() -> None:
    assert [units.seconds(v, sep="") for v in (0.0007, 0.35, 1.2449, 185)] == [
        "0.7ms", "350ms", "1.24s", "3min05s"]


@pytest.mark.parametrize(("value", "text"), [
    (512, "512 B"), (4_100, "4.1 KB"), (272_000_000, "272 MB"), (5_400_000_000, "5.4 GB"),
    (None, "-"), (-1, "-"),
])
def test_sizes_have_real_units(value: object, text: str) -> None:
    assert units.size(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (240, "4 minutes"), (60, "1 minute"), (59, "59 seconds"), (7200, "2 hours"),
    (2_274_624_292, "forever"),
])
def test_time_left_reads_in_words(value: float, text: str) -> None:
    assert units.until(value) == text


def test_long_text_is_shortened_with_an_ellipsis() -> None:
    assert units.shorten("m" * 100_000, 20) == "m" * 19 + "…"
    assert units.shorten("a\nb", 20) == "a b"


def _status(models: list[dict[str, object]]) -> list[str]:
    proxy = probe.Answer(probe.Who.NOTHING)
    return render(Status(URL("http://127.0.0.1:11434"), proxy, "http://127.0.0.1:11435", True,
                         "0.13.0", models=models), now=1_000_000.0)


def test_status_says_forever_and_sizes_in_mb() -> None:
    # Ollama's far-future expiry for keep_alive < 0, as `status` saw it unloading "in 2274624292s".
    forever = {"model": "tiny:latest", "size": 272_000_000, "size_vram": 0,
               "expires_at": "2318-01-01T00:00:00Z", "context_length": 4096}
    soon = {"model": "small:latest", "size": 5_400_000_000, "size_vram": 5_400_000_000,
            "expires_at": "1970-01-12T13:50:40Z", "context_length": 4096}
    lines = "\n".join(_status([forever, soon]))
    assert "tiny:latest (272 MB, 0% GPU, context 4096, kept loaded forever)" in lines
    assert "small:latest (5.4 GB, 100% GPU, context 4096, unloads in 4 minutes)" in lines
