"""The public surface, pinned: every command's --help and the metric names /metrics exposes.

A change to either is a change users see (scripts, service units, dashboards and alert rules
depend on them), so it must be deliberate: the snapshots in tests/surface/ are compared here, and
rewritten by `python tests/test_surface.py` when a change is intended (the diff then shows it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ollama_metrics.cli import main

pytestmark = pytest.mark.slow(reason="runs --help of every command in a process of its own")

SURFACE = Path(__file__).parent / "surface"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in sorted(group.list_commands(ctx)):
        command = group.get_command(ctx, name)
        assert command is not None
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def help_text(path: tuple[str, ...]) -> str:
    # A fixed width and no environment of the user's own, so the text is the same on every machine.
    result = CliRunner().invoke(main, [*path, "--help"], env={"COLUMNS": "100"},
                                terminal_width=100, prog_name="ollama-metrics")
    assert result.exit_code == 0, result.output
    return result.output


def help_snapshot() -> str:
    parts = [f"$ ollama-metrics --help\n{help_text(())}"]
    parts += [f"$ ollama-metrics {' '.join(p)} --help\n{help_text(p)}" for p in _commands(main)]
    return "\n".join(parts)


def test_help_of_every_command_is_unchanged() -> None:
    assert help_snapshot() == (SURFACE / "help.txt").read_text()


def metric_names(exposition: str) -> list[str]:
    return sorted(line.split()[2] for line in exposition.splitlines()
                  if line.startswith("# TYPE "))


def test_metric_names_are_unchanged() -> None:
    assert metric_names(_scrape()) == (SURFACE / "metrics.txt").read_text().split()


def _scrape() -> str:
    """/metrics of a proxy process after one generation, with the default analytics."""
    import urllib.request

    from helpers import fake_process, proxy_process

    with fake_process() as fake, proxy_process(fake.url) as proxy:
        request = urllib.request.Request(
            f"{proxy.url}/api/generate", data=b'{"model":"llama3.2","prompt":"hi","stream":false}')
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()
        with urllib.request.urlopen(f"{proxy.url}/metrics", timeout=10) as reply:
            return str(reply.read().decode())


if __name__ == "__main__":  # rewrite the snapshots after an intended change
    sys.path.insert(0, str(Path(__file__).parent))
    SURFACE.mkdir(exist_ok=True)
    (SURFACE / "help.txt").write_text(help_snapshot())
    (SURFACE / "metrics.txt").write_text("\n".join(metric_names(_scrape())) + "\n")
