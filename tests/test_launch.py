"""Warm starts (bench/launch.py's ``start``, bench/zygote.py): a child forked from the zygote
runs ``python -m module args`` as a cold start would (argv, environment, folder, log, exit
status, signals, a fresh ``random`` stream, no gRPC before its own imports), and a request the
zygote cannot serve faithfully starts cold."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from conftest import wait_until
from fedkrso.bench import launch

PROBE = '''
import json, os, random, sys, time
print(json.dumps({"argv": sys.argv[1:], "name": __name__, "cwd": os.getcwd(), "x": os.environ.get("PROBE_X"),
                  "grpc": any(m == "grpc" or m.startswith("grpc.") for m in sys.modules),
                  "torch": "torch" in sys.modules, "random": random.random(),
                  "verbosity": sys.modules["transformers"].logging.get_verbosity() if "transformers" in sys.modules else None}),
      flush=True)
what = sys.argv[1]
if what == "exit":
    sys.exit(int(sys.argv[2]))
if what == "raise":
    raise ValueError("probe failed on purpose")
if what == "sleep":
    time.sleep(600)
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    (tmp_path / "probe_child.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)  # `python -m probe_child` finds it in the working folder
    monkeypatch.setenv(launch.WARM_START, "1")

    def run(*args: str, env: dict | None = None, name: str = "probe"):
        return launch.start("probe_child", list(args), tmp_path / f"{name}.log", env=env)

    def seen(name: str = "probe") -> dict:
        return json.loads((tmp_path / f"{name}.log").read_text().splitlines()[0])

    return run, seen, tmp_path


def test_a_warm_child_runs_the_module_as_python_dash_m_would(probe):
    run, seen, where = probe
    proc = run("exit", "0", env={"PROBE_X": "42"})
    assert isinstance(proc, launch.WarmProcess) and proc.wait(60) == 0 and proc.poll() == 0
    got = seen()
    assert got["argv"] == ["exit", "0"] and got["name"] == "__main__" and got["x"] == "42"
    assert got["cwd"] == str(where)
    assert got["torch"] and not got["grpc"]  # the zygote's imports, and never gRPC before the fork
    other = run("exit", "0", name="other")
    other.wait(60)
    assert seen("other")["random"] != got["random"]  # each child seeded afresh, not the zygote's stream


def test_a_warm_child_exits_and_dies_as_a_cold_one_would(probe):
    run, seen, where = probe
    assert run("exit", "3").wait(60) == 3
    failed = run("raise", name="raise")
    assert failed.wait(60) == 1
    assert "ValueError: probe failed on purpose" in (where / "raise.log").read_text()
    sleeper = run("sleep", name="sleep")
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(0.5)
    assert sleeper.poll() is None
    sleeper.send_signal(signal.SIGSTOP)  # signals reach the child itself (tests pause and kill servers)
    sleeper.send_signal(signal.SIGCONT)
    sleeper.kill()
    assert sleeper.wait(60) == -signal.SIGKILL
    sleeper.kill()  # reaped: a second kill is a no-op, as Popen's is


def test_a_child_gets_the_libraries_as_imported_with_its_own_environment(probe, monkeypatch):
    """transformers reads TRANSFORMERS_VERBOSITY when imported: a child asking for another value
    than the first zygote imported with is forked from a zygote of its own."""
    run, seen, _ = probe
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)  # the bench's commands, run in this process, set it
    plain = run("exit", "0", name="plain")
    debug = run("exit", "0", env={"TRANSFORMERS_VERBOSITY": "debug"}, name="debug")
    assert plain.wait(120) == 0 and debug.wait(120) == 0 and debug._zygote is not plain._zygote
    assert (seen("plain")["verbosity"], seen("debug")["verbosity"]) == (30, 10)  # logging.WARNING, DEBUG
    assert seen("debug")["torch"]


def test_a_zygote_that_died_is_replaced_and_its_orphans_still_end(probe, monkeypatch):
    run, seen, _ = probe
    orphan = run("sleep", name="orphan")
    first = orphan._zygote
    first.proc.kill()  # the zygote gone: its child goes on, its exit status can no longer be known
    first.proc.wait(60)
    wait_until(lambda: first.gone, 60, "the reader to see the zygote gone")
    after = run("exit", "0", name="after")  # a new zygote
    assert isinstance(after, launch.WarmProcess) and after._zygote is not first and after.wait(120) == 0
    assert orphan.poll() is None
    orphan.kill()
    wait_until(lambda: orphan.poll() is not None, 60, "the orphan to end")
    assert orphan.poll() == 255  # ended, its status lost with its zygote
    monkeypatch.setenv(launch.WARM_START, "0")
    off = run("exit", "0", name="off")
    assert isinstance(off, subprocess.Popen) and off.wait(120) == 0 and not seen("off")["torch"]


def test_the_zygote_never_imports_grpc():
    out = subprocess.run([sys.executable, "-c", "import sys; from fedkrso.bench import zygote; zygote.preload(); "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))"],
                         capture_output=True, text=True, timeout=300, env=launch.child_env())
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
