"""No import circle inside ``fedkrso.server``, not even one hidden behind ``TYPE_CHECKING``.

The update intake and secure aggregation once imported the coordinator for its type while the
coordinator imported them: a circle that only ``if TYPE_CHECKING`` kept from failing at import
time, and the sign that they reached into the coordinator's state. They see the open-round
ledger now (``server/ledger.py``). This test reads every module of ``server/`` with ``ast``
(so an import under ``TYPE_CHECKING`` or inside a function counts too), builds the graph of
imports between them and fails naming a cycle if there is one. The second test shows it bites.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = "fedkrso.server"


def server_imports(folder: Path) -> dict[str, set[str]]:
    """module -> the ``fedkrso.server`` modules it imports, anywhere in its source."""
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        found: set[str] = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and (node.module or "").startswith(PACKAGE + "."):
                    targets = [node.module[len(PACKAGE) + 1:]]
                else:
                    continue
            elif isinstance(node, ast.Import):
                targets = [a.name[len(PACKAGE) + 1:] for a in node.names if a.name.startswith(PACKAGE + ".")]
            else:
                continue
            found |= {t.split(".")[0] for t in targets} & modules
        graph[name] = found - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_server_has_no_import_cycle():
    graph = server_imports(REPO / "server")
    assert {"coordinator", "intake", "secagg", "ledger", "port"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_a_type_checking_import_back_is_a_cycle(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    for p in (REPO / "server").glob("*.py"):
        (folder / p.name).write_text(p.read_text())
    intake = folder / "intake.py"
    intake.write_text(intake.read_text() + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                      "    from .coordinator import Coordinator\n")
    cycle = find_cycle(server_imports(folder))
    assert cycle is not None and {"intake", "coordinator"} <= set(cycle), cycle
