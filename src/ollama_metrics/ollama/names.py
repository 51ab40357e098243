"""One name per model, as Ollama resolves names: `fast`, `Fast:latest` and
`registry.ollama.ai/library/fast` are all `fast:latest`.

Ollama reads a name as `[host/][namespace/]model[:tag]`, fills the parts left out with
`registry.ollama.ai`, `library` and `latest`, and shows it shortest: the default host, and then the
default namespace, left out, the tag always kept (what /api/tags and /api/ps list). It compares
names ignoring ASCII case, so one model may be asked for as `Llama3` and listed as `llama3:latest`.
We show every name in lower case: the same spelling whatever a client typed, in requests, records
and the /api/ps gauges alike, so they join in PromQL and group as one in analytics without asking
Ollama how it spelled the name (it may be down while a record is written).

A string that is not a model name to Ollama (no model part, a character Ollama refuses, a digest)
is kept exactly as sent: it is not ours to rename, and Ollama answers it with an error.
"""

from __future__ import annotations

import functools
import re

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# The characters Ollama accepts in each part (a host may carry a port).
_PART = re.compile(r"[a-z0-9_.\-]+")
_NAMESPACE = re.compile(r"[a-z0-9_\-]+")
_HOST = re.compile(r"[a-z0-9_.\-]+(?::[0-9]+)?")
# Ollama caps each part at 128 bytes; a longer string is no name.
_LONGEST = 4 * 128 + 3


def normalize_model(name: str) -> str:
    """The name Ollama lists for the model `name` asks for, in lower case; `name` itself when it
    is not a model name Ollama would accept."""
    if len(name) > _LONGEST:
        return name
    return _normalize(name)


@functools.lru_cache(maxsize=512)  # a process sees few names, each on every request
def _normalize(name: str) -> str:
    text = name.lower()
    for scheme in ("http://", "https://"):
        text = text.removeprefix(scheme)
    path, tag = text, ""
    if text.rfind(":") > text.rfind("/"):
        path, _, tag = text.rpartition(":")
    parts = path.split("/")
    if len(parts) > 3 or (tag and not _PART.fullmatch(tag)):
        return name
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    if not (_PART.fullmatch(model) and _NAMESPACE.fullmatch(namespace)
            and _HOST.fullmatch(host)) or ".." in text:
        return name
    shown = f"{model}:{tag or DEFAULT_TAG}"
    if host != DEFAULT_HOST:
        return f"{host}/{namespace}/{shown}"
    if namespace != DEFAULT_NAMESPACE:
        return f"{namespace}/{shown}"
    return shown
