"""The habits every command shares, one table for all of them, run as real processes:
``--version``; exit codes listed in ``--help``; a bad flag and a missing input file answered
by exit status 2 and one line on stderr (no traceback). Plus the demo's row-by-row table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedkrso.bench.launch import child_env
from fedkrso.common.cli import version

BIN = Path(sys.executable).parent
# command -> (how to start it, the arguments it requires, given valid-looking values)
COMMANDS = {
    "fedkrso-server": ([str(BIN / "fedkrso-server")], ["--config", "{tmp}/round.yaml"]),
    "fedkrso-client": ([str(BIN / "fedkrso-client")], ["--server", "127.0.0.1:9", "--data", "{tmp}"]),
    "fedkrso-partition": ([str(BIN / "fedkrso-partition")], ["--out", "{tmp}/p"]),
    "fedkrso-bench": ([str(BIN / "fedkrso-bench")], []),
    "fedkrso-sim": ([str(BIN / "fedkrso-sim")], ["--config", "{tmp}/round.yaml", "--data-root", "{tmp}"]),
    "fedkrso-export": ([str(BIN / "fedkrso-export")], ["--run", "{tmp}", "--out", "{tmp}/x"]),
    "fedkrso-demo": ([sys.executable, "-m", "fedkrso.bench.demo"], []),
}
# (command, arguments naming a missing input, what the one line must say)
MISSING = [
    ("fedkrso-server", ["--config", "{tmp}/missing.yaml"], "config not found: {tmp}/missing.yaml"),
    ("fedkrso-server", ["--config", "{tmp}/bad-eval.yaml"], "eval.data: no evaluation split at {tmp}/missing"),
    ("fedkrso-client", ["--server", "127.0.0.1:9", "--data", "{tmp}/missing"], "data not found: {tmp}/missing"),
    ("fedkrso-client", ["--server", "127.0.0.1:9", "--data", "{tmp}", "--ca", "{tmp}/ca.pem"],
     "--ca not found: {tmp}/ca.pem"),
    ("fedkrso-partition", ["--source", "csv:{tmp}/missing.csv", "--out", "{tmp}/p"], "{tmp}/missing.csv not found"),
    ("fedkrso-bench", ["--config", "{tmp}/missing.yaml"], "bench config not found: {tmp}/missing.yaml"),
    ("fedkrso-bench", ["--report-only", "{tmp}/missing"], "bench results not found: {tmp}/missing/results.json"),
    ("fedkrso-sim", ["--config", "{tmp}/missing.yaml", "--data-root", "{tmp}"], "config not found"),
    ("fedkrso-sim", ["--config", "{tmp}/round.yaml", "--data-root", "{tmp}/missing"], "data root not found"),
    ("fedkrso-export", ["--run", "{tmp}/missing", "--out", "{tmp}/x"], "run folder not found: {tmp}/missing"),
    ("fedkrso-export", ["--run", "{tmp}", "--out", "{tmp}/x"], "no run state at {tmp}/state"),
    ("fedkrso-export", ["--artifact", "{tmp}", "--out", "{tmp}/x"], "no artifact at {tmp} (no manifest.json)"),
    ("fedkrso-demo", ["--config", "{tmp}/missing.yaml"], "config not found: {tmp}/missing.yaml"),
]


def run(command: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    start, _ = COMMANDS[command]
    argv = start + [a.format(tmp=tmp) for a in args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=child_env(), cwd=tmp)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A folder with a valid round.yaml and one whose eval.data is missing."""
    base = "model: {name: minilm}\nmethod: {name: fedkrso}\n"
    (tmp_path / "round.yaml").write_text(base)
    (tmp_path / "bad-eval.yaml").write_text(base + f"eval: {{data: {tmp_path}/missing}}\n")
    return tmp_path


def assert_one_line(proc: subprocess.CompletedProcess, prog: str, says: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{prog}: ") and says in lines[0], lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_version_help_and_a_bad_flag(command, tmp):
    proc = run(command, ["--version"], tmp)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{command} {version()}", proc.stdout + proc.stderr
    assert version() != "unknown"
    proc = run(command, ["--help"], tmp)
    assert proc.returncode == 0
    codes = proc.stdout[proc.stdout.index("exit codes:"):]
    assert "  0 " in codes and "  2 " in codes
    proc = run(command, [*COMMANDS[command][1], "--no-such-flag"], tmp)
    assert_one_line(proc, command, "unrecognized arguments: --no-such-flag")


@pytest.mark.parametrize(("command", "args", "says"), MISSING, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(MISSING)])
def test_a_missing_input_is_one_line_and_exit_2(command, args, says, tmp):
    assert_one_line(run(command, args, tmp), command, says.format(tmp=tmp))


def test_the_demo_prints_each_row_as_it_is_written(tmp_path):
    """What the demo does while the server runs: read the rows appended to metrics.jsonl
    (whole lines only: a line being written waits) and print each in the table's format."""
    from fedkrso.bench.demo import new_rows
    from fedkrso.server.metrics import RowPrinter, format_table

    rows = [{"round": r, "num_clients": 2, "uplink_payload_bytes_per_client": 1_970_000 + r,
             "train_loss": 1.5 / (r + 1), "eval_accuracy": 0.5 + r / 10, "round_seconds": 12.5} for r in range(3)]
    path = tmp_path / "metrics.jsonl"
    assert new_rows(path, 0) == ([], 0)
    line0, line1 = (json.dumps(r) + "\n" for r in rows[:2])
    path.write_text(line0 + line1[:10])  # the second row is half written
    got, offset = new_rows(path, 0)
    assert got == rows[:1] and offset == len(line0)
    with path.open("a") as f:
        f.write(line1[10:] + json.dumps(rows[2]) + "\n")
    got, offset = new_rows(path, offset)
    assert got == rows[1:] and offset == path.stat().st_size
    printer = RowPrinter()
    printed = [line for r in rows for line in printer.lines(r)]
    table = format_table(rows).splitlines()
    assert len(printed) == len(table) == 5
    cells = [line.split() for i, line in enumerate(printed) if i != 1]  # line 1: the rule under the header
    assert cells == [line.split() for i, line in enumerate(table) if i != 1]  # same cells, same order


PROBE = """
import importlib, sys
from importlib.metadata import entry_points
scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
# the demo runs as ``python -m fedkrso.bench.demo`` (COMMANDS); every other command must be an entry point
target = "fedkrso.bench.demo:main" if sys.argv[1] == "fedkrso-demo" else scripts[sys.argv[1]]
module, _, func = target.partition(":")
for flags in (["--help"], ["--version"], ["--no-such-flag"]):
    sys.argv[1:] = flags
    try:
        getattr(importlib.import_module(module), func)()
    except SystemExit:
        pass
print("HEAVY", sorted(m for m in ("torch", "transformers", "datasets", "grpc", "ray") if m in sys.modules))
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_version_and_a_bad_flag_load_no_heavy_library(command, tmp_path):
    """--help, --version and a bad flag answer before torch, transformers, datasets, gRPC or Ray
    load (common/cli.py's promise: they answer at once, not after seconds of imports)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, command], capture_output=True, text=True, timeout=120,
                          env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-500:]
