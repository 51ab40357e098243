"""Bounded label values for `model`, so a stray model name cannot explode metric cardinality.

Allowed values: every name the upstream lists in /api/tags (refreshed in the background), plus the
first `max_extra` other names seen (models being pulled, typos, cloud models), then `other`.
`none` stands for a request that names no model. The set only grows within those bounds, so
Prometheus series stay stable for a process's life. Names arrive as ollama.names spells them
(`fast` as `fast:latest`), in requests and in /api/tags alike, so one model is one label value,
the same as the /api/ps gauges'.
"""

from __future__ import annotations

NONE = "none"
OTHER = "other"
# Ollama names are short; anything longer is not a model name worth a series. Below the
# Interaction's cap on model names (interaction.CAPS), so a name cut to that cap is never a label.
MAX_NAME = 200


class ModelLabels:
    def __init__(self, max_extra: int) -> None:
        self._max_extra = max_extra
        self._known: frozenset[str] = frozenset()
        self._extra: set[str] = set()

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
        if len(self._extra) < self._max_extra and len(model) <= MAX_NAME and model.isprintable():
            self._extra.add(model)
            return model
        return OTHER
