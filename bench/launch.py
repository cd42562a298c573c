"""Start real server and client processes (for the demo, the bench and end-to-end tests).

Processes are started with ``subprocess`` (never fork after gRPC started), each with one
torch thread, and the server reports its bound port through ``--port-file``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
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
        cmd = [sys.executable, "-m", module, "--config", str(config),
               "--port-file", str(port_file), *args]
        self.server = Proc(name, subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                                  env=child_env(env)), log)
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
        cmd = [sys.executable, "-m", "fedkrso.client.main", "--server", f"127.0.0.1:{self.port}",
               "--data", str(data), "--name", name, "--report", str(self.workdir / f"{name}.json"), *args]
        proc = Proc(name, subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                           env=child_env(env)), log)
        self.clients.append(proc)
        return proc

    def wait(self, timeout: float) -> int:
        """Wait for the server to finish; returns its exit code."""
        return self.server.wait(timeout)

    def stop(self) -> None:
        for p in [*self.clients, *([self.server] if self.server else [])]:
            p.kill()
