"""Bounded label values for `model`, so a stray model name cannot explode metric cardinality.

Allowed values: every name the upstream lists in /api/tags (refreshed in the background), plus the
first `max_extra` other names seen (models being pulled, typos, cloud models), then `other`.
`none` stands for a request that names no model. The set only grows within those bounds, so
Prometheus series stay stable for a process's life. Names arrive as ollama.names spells them
(`fast` as `fast:latest`), in requests and in /api/tags alike, so one model is one label value,
the same as the /api/ps gauges'.

With several workers (server/workers.py) the bound is the processes' together: given `shared`
(a file), the names admitted beyond /api/tags are kept there, one a line, under an exclusive
lock, so every worker admits the same ones and no more than `max_extra` in all. A worker reads
the file only for a name it has not admitted yet, and never again once the file is full.
"""

from __future__ import annotations

import os
from pathlib import Path

NONE = "none"
OTHER = "other"
# Ollama names are short; anything longer is not a model name worth a series. Below the
# Interaction's cap on model names (interaction.CAPS), so a name cut to that cap is never a label.
MAX_NAME = 200


class ModelLabels:
    def __init__(self, max_extra: int, shared: Path | None = None) -> None:
        self._max_extra = max_extra
        self._known: frozenset[str] = frozenset()
        self._extra: set[str] = set()
        self._shared = shared

    def set_known(self, names: list[str]) -> None:
        """Replace the names the upstream serves (from /api/tags)."""
        self._known = frozenset(names)

    @property
    def known(self) -> frozenset[str]:
        return self._known

    def __call__(self, model: str | None) -> str:
        if not model:
            return NONE
        if model in self._known or model in self._extra:
            return model
        if len(self._extra) >= self._max_extra or len(model) > MAX_NAME \
                or not model.isprintable():
            return OTHER
        if self._shared is not None:
            try:
                model.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: cannot be written to the file
                return OTHER
            return self._admit_shared(model, self._shared)
        self._extra.add(model)
        return model

    def _admit_shared(self, model: str, shared: Path) -> str:
        import fcntl  # only with workers, which need a system that has it

        fd = os.open(shared, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "r", encoding="utf-8") as text:
                text.seek(0)
                admitted = [line.rstrip("\n") for line in text]
            self._extra.update(admitted[:self._max_extra])
            if model in self._extra:
                return model
            if len(self._extra) >= self._max_extra:
                return OTHER
            # isprintable() above: the name holds no newline.
            os.write(fd, (model + "\n").encode("utf-8"))
            self._extra.add(model)
            return model
        finally:
            os.close(fd)  # releases the lock
