"""The architecture, held by tests: sub-packages in layers, no import cycle, no module too long.

The graph counts every ``import`` of a fedbench module anywhere in a file, function-level imports
included: a lazy import still couples two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
# Where each installed package's files live (setuptools package-dir in pyproject.toml).
PACKAGE_DIRS = {"fedbench": REPO / "fedbench", "fedbench.baselines": REPO / "baselines",
                "fedbench.tasks": REPO / "tasks"}
# Sub-packages from the bottom up: each may import only those on lower lines.
LAYERS = [
    ["fedbench.errors"],
    ["fedbench.core"],  # spec, registry, results, hashing, formatting, metrics
    ["fedbench.data"],  # datasets, partitioners, data sources
    ["fedbench.models"],  # backbones, feature cache, task models
    ["fedbench.federation"],  # method interface, engine, channel, evaluation, local training
    ["fedbench.baselines", "fedbench.tasks"],  # the registered methods and tasks
    ["fedbench.harness"],  # one run end to end, sweeps, protocols
    ["fedbench.board"],  # leaderboard, validate, check, compare
    ["fedbench.cli"],
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedbench"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fedbench")}
    return {m for m in found if m in MODULES}


GRAPH = {name: imported(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    state: dict[str, str] = {}

    def visit(node: str, path: tuple[str, ...]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join((*path[path.index(nxt):], nxt))
            if nxt not in state:
                visit(nxt, (*path, nxt))
        state[node] = "done"

    for start in sorted(GRAPH):
        if start not in state:
            visit(start, (start,))


def test_sub_packages_import_only_the_layers_below():
    assert set(LEVEL) == {layer(m) for m in MODULES if m != "fedbench"}
    wrong = sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if m != "fedbench"
                   for d in deps if layer(d) != layer(m) and LEVEL[layer(d)] >= LEVEL[layer(m)])
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines(name):
    assert len(MODULES[name].read_text(encoding="utf-8").splitlines()) <= 500


def test_the_graph_sees_real_edges():
    # the test above would pass on an empty graph: check it finds imports it must find
    assert "fedbench.board.rows" in GRAPH["fedbench.board.html"]
    assert "fedbench.board.leaderboard" not in GRAPH["fedbench.board.html"]
    assert "fedbench.federation.method" in GRAPH["fedbench.baselines.fedavg"]
    assert "fedbench.models.backbones" in GRAPH["fedbench.harness.run"]  # a function-level import
