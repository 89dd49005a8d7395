"""The layout is the architecture: imports flow one way (CLI -> control plane -> streams -> pure core).

Checked on the source text (module-level imports, `TYPE_CHECKING` blocks included), so a cycle or
a data-plane module reaching up into the config schema fails here, not in a reviewer's head.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "portway"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """portway modules imported at module level (functions' lazy imports are not edges)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("portway"):
                found.add(node.module)
                for alias in node.names:
                    found.add(f"{node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("portway"))
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    # Packages re-export their modules; an edge into a package's __init__ is not a cycle source.
    packages = {n for n in graph if (SRC.parent / n.replace(".", "/") / "__init__.py").exists()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node] - packages):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "forbidden", ["portway.config", "portway.admission", "portway.server", "portway.app", "portway.cli"]
)
def test_data_plane_does_not_reach_up(forbidden: str) -> None:
    for name, deps in _graph().items():
        if name.startswith("portway.stream"):
            bad = sorted(d for d in deps if d == forbidden or d.startswith(forbidden + "."))
            assert not bad, f"{name} imports {bad}: the data plane must not depend on {forbidden}"


def test_importing_the_data_plane_loads_no_schema_or_geoip() -> None:
    code = (
        "import sys, portway.stream.tcp, portway.stream.udp\n"
        "names = ('pydantic', 'maxminddb', 'yaml', 'click', 'portway.config')\n"
        "heavy = sorted(m for m in names if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
