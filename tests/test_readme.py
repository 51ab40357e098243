"""The README points only at what exists: every relative link, and every repository path it
names in backquotes (`tests/…`, `bench/…`, `deploy/…`, `src/…`, `docs/…`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
TOP_DIRS = ("tests/", "bench/", "deploy/", "src/", "docs/", "shared/", "packaging/")


def _anchors() -> set[str]:
    def slug(title: str) -> str:
        title = re.sub(r"[^\w\- ]", "", title.strip().lower())
        return title.replace(" ", "-")
    return {slug(m) for m in re.findall(r"^#+ (.+)$", README, re.MULTILINE)}


def test_every_relative_link_exists() -> None:
    anchors = _anchors()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if not ((ROOT / path).exists() if path else anchor in anchors):
            missing.append(target)
    assert not missing, missing


def test_every_named_path_exists() -> None:
    named = {p for p in re.findall(r"`([\w./*-]+)`", README) if p.startswith(TOP_DIRS)}
    missing = [p for p in sorted(named)
               if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, missing
