"""mkdocs hook: let mkdocstrings read the sources under their installed names.

The source folders sit flat at the top of the repository and install as ``fedkrso.<folder>``
(pyproject's package-dir). Griffe reads sources statically and cannot follow setuptools'
editable finder past the top package, so this hook lays the installed layout out in a
temporary folder of symlinks (``fedkrso/common -> common`` ...) and gives that folder to the
Python handler as its search path, before the handler first loads a module.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

REPO = Path(__file__).resolve().parents[2]
# pyproject's [tool.setuptools.package-dir], beside the generated protobuf package
LAYOUT = {"common": "common", "server": "server", "client": "client", "bench": "bench", "sim": "sim",
          "v1": "proto/fedkrso/v1", "__init__.py": "proto/fedkrso/__init__.py"}

_root: Path | None = None


@event_priority(100)  # before the mkdocstrings plugin sets its handlers up
def on_config(config):
    global _root
    _root = Path(tempfile.mkdtemp(prefix="fedkrso-docs-"))
    pkg = _root / "fedkrso"
    pkg.mkdir()
    for name, source in LAYOUT.items():
        (pkg / name).symlink_to(REPO / source)
    handlers = config.plugins["mkdocstrings"].config.handlers
    handlers.setdefault("python", {})["paths"] = [str(_root)]
    return config


def on_shutdown():
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)
