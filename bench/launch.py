"""Start real server, client and simulator processes (for the demo, the bench and end-to-end
tests).

Processes are started with ``subprocess`` (never fork after gRPC started), each with one
torch thread, and the server reports its bound port through ``--port-file``.

With ``FEDKRSO_WARM_START=1`` in the environment (the test suite sets it, ``tests/conftest.py``)
``start`` forks each process from a zygote that imported torch, transformers and datasets once
(``bench/zygote.py``, which says how and when it starts cold instead). Off by default: a forked
child's resident memory includes every page the zygote imported, so the bench's and the demo's
memory figures come from cold starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .zygote import WARM_START, WarmProcess, argv, warm

__all__ = ["WARM_START", "Cluster", "Proc", "WarmProcess", "child_env", "run", "start"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def start(module: str, args: list[str], log: Path, env: dict[str, str] | None = None, append: bool = False,
          err: Path | None = None):
    """``python -m module args`` with ``child_env(env)``, stdout to ``log`` and stderr there too
    or to ``err``: a ``subprocess.Popen``, or a ``WarmProcess`` forked by the zygote (module
    docstring)."""
    env = child_env(env)
    zygote = warm(env)
    if zygote is not None:
        try:
            return zygote.spawn(module, args, env, log, append, err)
        except OSError as error:
            print(f"launch: {error}; starting it cold", file=sys.stderr)
    mode = "a" if append else "w"
    with Path(log).open(mode) as out:
        errors = Path(err).open(mode) if err else None
        try:
            return subprocess.Popen(argv(module, args), stdout=out,
                                    stderr=errors or subprocess.STDOUT, env=env)
        finally:
            if errors:
                errors.close()


def run(module: str, args: list[str], workdir: Path, name: str, timeout: float,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``start`` it and wait, as ``subprocess.run(..., capture_output=True, text=True)`` would:
    its stdout and stderr kept as ``<workdir>/<name>.out`` and ``.err`` and returned; killed
    after ``timeout`` seconds (``subprocess.TimeoutExpired``)."""
    out, err = Path(workdir) / f"{name}.out", Path(workdir) / f"{name}.err"
    code = wait_or_kill(start(module, args, out, env, err=err), timeout)
    return subprocess.CompletedProcess(argv(module, args), code, out.read_text(errors="replace"),
                                       err.read_text(errors="replace"))


def wait_or_kill(proc, timeout: float) -> int:
    """``proc``'s exit code, or killed after ``timeout`` seconds (``subprocess.TimeoutExpired``
    raised then), as ``subprocess.run`` does."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(60)
        raise


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen | WarmProcess
    log: Path

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """One server and its clients, with logs under ``workdir``."""

    workdir: Path
    server: Proc | None = None
    port: int = 0
    clients: list[Proc] = field(default_factory=list)

    def start_server(self, config: Path, args: list[str] = (), timeout: float = 180.0,
                     env: dict | None = None, name: str = "server", module: str = "fedkrso.server.main") -> int:
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log = self.workdir / f"{name}.log"
        self.server = Proc(name, start(module, ["--config", str(config), "--port-file", str(port_file), *args],
                                       log, env), log)
        give_up = time.monotonic() + timeout
        while not port_file.exists():
            if self.server.popen.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.server.text()[-4000:]}")
            if time.monotonic() > give_up:
                raise TimeoutError(f"server did not start:\n{self.server.text()[-4000:]}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        return self.port

    def start_client(self, data: Path, name: str, args: list[str] = (), env: dict | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        proc = Proc(name, start("fedkrso.client.main", ["--server", f"127.0.0.1:{self.port}", "--data", str(data),
                                                         "--name", name, "--report", str(self.workdir / f"{name}.json"),
                                                         *args], log, env), log)
        self.clients.append(proc)
        return proc

    def wait(self, timeout: float) -> int:
        """Wait for the server to finish; returns its exit code."""
        return self.server.wait(timeout)

    def stop(self) -> None:
        for p in [*self.clients, *([self.server] if self.server else [])]:
            p.kill()
