"""What every fedkrso command does alike: ``--version``, exit codes in ``--help``, and a bad
flag or a missing file answered by one line on stderr and exit status 2.

Each command builds its parser with ``parser(prog, doc, exit_codes)`` and reports a usage
error with ``fail(prog, message)``; neither imports torch, so ``--help``, ``--version`` and a
bad flag answer at once.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path
from typing import NoReturn

USAGE = 2  # a bad flag, a missing or invalid input file: the documented status of every command
# the placement flags' names and their environment variables (what they mean: common/precision.py)
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
ENV_DEVICE = "FEDKRSO_DEVICE"
ENV_DTYPE = "FEDKRSO_DTYPE"


def version() -> str:
    """The installed fedkrso version (``unknown`` when run from a bare checkout)."""
    try:
        return metadata.version("fedkrso")
    except metadata.PackageNotFoundError:
        return "unknown"


def fail(prog: str, message: str, code: int = USAGE) -> NoReturn:
    """``prog: message`` on stderr, then exit ``code`` (2 unless told otherwise). A missing
    file or a bad flag is one line; a config with several bad fields lists each on its own."""
    print(f"{prog}: {str(message).strip()}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: message (see --help)``) instead of the usage
    block, still exit status 2."""

    def error(self, message: str) -> NoReturn:
        """A usage error: the message and a pointer to --help on stderr, exit code ``USAGE`` (2)."""
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(USAGE)


def parser(prog: str, doc: str | None, exit_codes: dict[int, str]) -> Parser:
    """A command's parser: ``doc`` as the description, ``--version``, and the exit codes
    (always including 2 for usage errors) listed at the end of ``--help``."""
    codes = {USAGE: "bad flags, or a missing or invalid input file", **exit_codes}
    epilog = "exit codes:\n" + "\n".join(f"  {c:<4}{what}" for c, what in sorted(codes.items()))
    p = Parser(prog=prog, description=doc, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{prog} {version()}")
    return p


def add_log_args(p: argparse.ArgumentParser, level: str = "info") -> None:
    """``--log-level`` and ``--log-json``, alike for every command that logs (``logs.configure``)."""
    p.add_argument("--log-level", default=level, help="least severe events logged: debug, info, warning or error")
    p.add_argument("--log-json", action="store_true", default=None,
                   help="JSON log lines even on a terminal (they are JSON whenever stderr is not one)")


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` for a command line (defaults: the environment, then
    round.yaml; common/precision.py resolves them)."""
    parser.add_argument("--device", help=f"cpu, cuda, cuda:N, mps or auto (overrides model.device; "
                        f"default ${ENV_DEVICE})")
    parser.add_argument("--dtype", choices=DTYPE_NAMES,
                        help=f"compute dtype (overrides model.dtype; default ${ENV_DTYPE})")


def require_file(prog: str, path: str | Path, what: str) -> Path:
    """``path`` as a Path when it is a file; else the one-line usage failure."""
    p = Path(path)
    if not p.is_file():
        fail(prog, f"{what} not found: {p}")
    return p


def require_dir(prog: str, path: str | Path, what: str) -> Path:
    """``path`` as a Path when it is a folder; else the one-line usage failure."""
    p = Path(path)
    if not p.is_dir():
        fail(prog, f"{what} not found: {p}")
    return p
