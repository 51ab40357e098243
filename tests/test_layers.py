"""The package's layers: each folder is one, and imports run only downwards, with no circle.

Read from the source (every `import` and `from … import`, at any depth in a module), so a lazy
import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "ollama_metrics"

# Lowest first: a layer may import its own and those before it.
LAYERS = ["base", "observe", "ollama", "analytics", "dashboard", "server", "ui", "service", "cli"]
BASE = {"settings", "config", "paths", "printable", "units", "__init__", "__main__"}

# Upward imports with a reason they cannot run the other way.
ALLOWED = {
    ("service.winapi", "cli.proxy"): "pythonservice starts the service class by its name, so the "
                                     "service parses the `serve` options it stored itself",
    ("__main__", "cli"): "python -m ollama_metrics runs the command line",
}


def _layer(module: str) -> str:
    head = module.split(".")[0]
    return "base" if head in BASE else head


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` imports."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("ollama_metrics"):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = ".".join([*target, alias.name])
                out.add(sub if sub in known else ".".join(target))
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("ollama_metrics.") for a in node.names
                       if a.name.startswith("ollama_metrics."))
    return {m for m in out if m and m != module}


def test_every_module_is_in_a_layer() -> None:
    unknown = {m for m in _modules() if _layer(m) not in LAYERS}
    assert not unknown, f"modules outside the layers {LAYERS}: {sorted(unknown)}"


def test_imports_only_run_downwards() -> None:
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for target in _imports(module, path, set(modules)):
            if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)) and \
                    (module, target) not in ALLOWED:
                upward.append(f"{module} imports {target}")
    assert not upward, upward


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) & set(modules) for m, p in modules.items()}
    # A package's __init__ importing its own submodules (a factory choosing one) is no circle.
    for m, targets in graph.items():
        graph[m] = {t for t in targets if not t.startswith(m + ".")}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                circles.append(" -> ".join([*path[path.index(t):], t]))
            elif t not in seen:
                visit(t, [*path, t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
    assert not circles, circles


@pytest.mark.parametrize("pair", sorted(ALLOWED))
def test_each_allowed_upward_import_still_exists(pair: tuple[str, str]) -> None:
    """An exception nobody needs any more must go from the list."""
    modules = _modules()
    module, target = pair
    assert target in _imports(module, modules[module], set(modules))
