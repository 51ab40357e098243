"""What the workers of `--workers N` share, without processes: the model label bound kept in one
file, and the live view merged from what each worker published (test_workers.py runs them)."""

from __future__ import annotations

import time
from pathlib import Path

from ollama_metrics.observe.interaction import Interaction
from ollama_metrics.observe.labels import OTHER, ModelLabels
from ollama_metrics.observe.live import ACTIVE_SHOWN, Live


def test_labels_sharing_a_file_admit_the_same_names_up_to_the_bound(tmp_path: Path) -> None:
    shared = tmp_path / "model-labels"
    one, two = ModelLabels(3, shared), ModelLabels(3, shared)
    assert [one("a"), two("b"), one("c")] == ["a", "b", "c"]
    # Full together: a fourth name is `other` in both, and each admits what the other did.
    assert two("d") == OTHER and one("d") == OTHER
    assert [two("a"), one("b"), two("c")] == ["a", "b", "c"]
    # A name that cannot be written as a line never reaches the file.
    fresh = ModelLabels(3, tmp_path / "other-file")
    assert fresh("bad\nname") == OTHER and fresh("\ud800") == OTHER
    assert shared.read_text().split() == ["a", "b", "c"]


def test_labels_alone_keep_their_own_bound() -> None:
    one, two = ModelLabels(1), ModelLabels(1)
    assert (one("a"), two("b")) == ("a", "b")  # without a file, each its own: the old way


def _interaction(model: str) -> Interaction:
    return Interaction(method="POST", path="/api/chat", endpoint="/api/chat",
                       started_at=time.time(), started=time.perf_counter(), model=model)


def test_live_merges_what_other_workers_published() -> None:
    here, there = Live(), Live()
    mine, theirs = _interaction("a:latest"), _interaction("b:latest")
    here.started(mine)
    there.started(theirs)
    done = _interaction("b:latest")
    there.started(done)
    done.ended_at = time.time()
    there.finished(done, None)
    published = there.published()
    published["time"] -= 2.0  # published two seconds ago: its request has run that much more
    snap = here.snapshot(recent=5, others=[published])
    assert snap["active_count"] == 2
    assert {a["id"] for a in snap["active"]} == {mine.id, theirs.id}
    assert snap["active"][0]["id"] == theirs.id  # the longest-running first, lag included
    assert snap["active"][0]["elapsed"] >= 2.0
    assert [r["id"] for r in snap["recent"]] == [done.id]
    assert snap["models"][0]["model"] == "b:latest"


def test_live_merge_keeps_the_cap_and_the_true_count() -> None:
    here, there = Live(), Live()
    for _ in range(ACTIVE_SHOWN):
        here.started(_interaction("a"))
        there.started(_interaction("b"))
    snap = here.snapshot(others=[there.published()])
    assert snap["active_count"] == 2 * ACTIVE_SHOWN
    assert len(snap["active"]) == ACTIVE_SHOWN
