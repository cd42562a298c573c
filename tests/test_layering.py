"""Layering, checked by import-linter: the contracts in pyproject.toml ``[tool.importlinter]``.

``common/`` is the core and imports neither ``server/``, ``client/``, ``bench/`` nor ``sim/``; a
client never loads server code; the server never imports the client; the simulator runs the
shared client round against the server's round port (``server/port.py``, nothing else of
``server/``), never the gRPC client. The source folders install as
``fedkrso.<folder>`` (pyproject's package-dir), which import-linter cannot see from the flat
checkout, so the check runs on a mirror of the installed layout: every ``.py`` file of the
folders copied under ``<tmp>/fedkrso/``. The second test breaks the layering in a mirror on
purpose, so the check is known to bite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

FOLDERS = ("common", "server", "client", "bench", "sim")


def mirror(dest: Path) -> Path:
    """``dest/fedkrso`` laid out as installed: proto/fedkrso plus the four source folders."""
    pkg = dest / "fedkrso"
    shutil.copytree(REPO / "proto" / "fedkrso", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.proto"))
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, pkg / folder, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    return dest


def lint(root: Path) -> subprocess.CompletedProcess:
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        pytest.skip("import-linter is not installed (make install)")
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run([str(linter), "--no-logo", "--no-cache", str(REPO / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_layering_contracts_are_kept(tmp_path):
    result = lint(mirror(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("where, line, contract", [
    ("client/runner.py", "from ..server import auth", "client/ imports nothing from server/"),
    ("client/main.py", "import fedkrso.server.coordinator", "client/ imports nothing from server/"),
    ("common/config.py", "from ..client.runner import ClientError", "common/ is the core"),
    ("common/wire.py", "from fedkrso.bench import launch", "common/ is the core"),
    ("server/metrics.py", "from ..client import runner", "server/ never imports client/"),
    ("server/state.py", "from ..sim import runner", "server/ never imports client/"),
    ("sim/runner.py", "from ..client.runner import FedClient", "sim/ never imports client/"),
    ("sim/runner.py", "from ..server.coordinator import Coordinator", "sim/ reaches the server only through"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, where, line, contract):
    root = mirror(tmp_path)
    target = root / "fedkrso" / where
    target.write_text(target.read_text() + f"\n{line}  # layering violation on purpose\n")
    result = lint(root)
    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if " BROKEN" in ln]
    assert any(ln.startswith(contract) for ln in broken), result.stdout
