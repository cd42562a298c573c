"""The warm start: one process that imports torch, transformers and datasets once, then forks a
server, client or simulator process per request (``bench/launch.py``'s ``start``).

A server, client or ``fedkrso-sim`` process spends most of its start-up importing torch,
transformers and datasets (about 4 s of a core each here, against a second or so of its own
imports and model loading on a tiny model). The test suite starts hundreds of them, so with
``FEDKRSO_WARM_START=1`` (which it sets) ``launch.start`` asks this process instead: it was started
with ``subprocess`` like any other, imported those libraries (and nothing of gRPC: a fork after
gRPC started is unsafe, so it is never imported here, and the child imports it after the fork)
and forks a child that runs ``python -m <module> <args>`` from there: its own environment,
working folder and log file, stdin on /dev/null, ``random`` and NumPy's global generator seeded
afresh (not the zygote's state), exit code or signal reported back as ``Popen`` reports it.
The children are real processes of the real entry points; only the imports are shared.

The parent's end is ``warm`` (and ``Zygote``, ``WarmProcess``): one zygote per starting process
and per environment the libraries import with, since a forked child keeps the values its zygote
imported with (``IMPORT_TIME_ENV``; ``logs.quiet_libraries`` sets some in the bench's own
process); up to four, a zygote that has gone replaced, a request started cold where its zygote
failed to start. Its children's exit statuses come from the zygote, which reaps them; a child
whose zygote died goes on, and is reported ended (status 255) once it has.

The protocol, one JSON object per line: requests on stdin (``{"id", "module", "args", "env",
"cwd", "log", "err", "append"}``; stderr goes to ``err`` where given, else to ``log``), answers
on stdout (``{"id", "pid"}`` once forked, ``{"id", "error"}`` if the fork failed, ``{"pid",
"returncode"}`` when a child ends). End of stdin (the parent has
gone) ends the zygote; its children go on, as ``Popen``'s would.

    python -m fedkrso.bench.zygote      # started by launch.py, not by hand
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path

WARM_START = "FEDKRSO_WARM_START"  # "1": bench/launch.py starts processes here

# What a child would import anyway and what takes long: libraries only. Never grpc (see above);
# never fedkrso's own modules (they import grpc, and a child should run the code on disk).
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.models.bert.modeling_bert",
           "transformers.models.llama.modeling_llama", "datasets", "numpy", "safetensors.torch",
           "sklearn.metrics", "scipy.stats", "peft", "structlog", "pydantic", "yaml")

# Prefixes of the environment variables the preloaded libraries may read when imported: a request
# that sets any of them otherwise than a zygote imported with goes to a zygote of its own
# (``warm``), since a forked child keeps what its zygote imported with.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_", "TORCH", "PYTORCH_", "OMP_", "MKL_",
                   "KMP_", "OPENBLAS_", "CUDA_", "TOKENIZERS_", "PYTHON", "LD_")


def argv(module: str, args: list) -> list[str]:
    """The command line a start of ``module`` stands for: ``python -m module args``."""
    return [sys.executable, "-m", module, *map(str, args)]


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` a preloaded library may have read at import (``IMPORT_TIME_ENV``)."""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


# -- the zygote (this module, run as a process) -----------------------------------------------
def preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library not installed: its children import nothing of it either
            pass
    if any(m == "grpc" or m.startswith("grpc.") for m in sys.modules):
        raise SystemExit("zygote: a preloaded library imported grpc; forking after that is unsafe")


def _send(obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def _become(req: dict) -> None:
    """In the forked child: take the request's streams, folder, environment and argv, as
    ``python -m`` would have them (the module then runs from ``main``, so the interpreter
    ends the child as it ends any process: non-daemon threads joined, atexit run, streams
    flushed, an uncaught error printed with exit code 1)."""
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if req.get("append") else os.O_TRUNC)
    log = os.open(req["log"], mode, 0o644)
    err = os.open(req["err"], mode, 0o644) if req.get("err") else log
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(err, 2)
    for fd in {null, log, err}:
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    import random

    random.seed()  # from the OS, as a fresh interpreter does: children must not share a stream
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = [req["module"], *req["args"]]
    sys.path[0] = req["cwd"]  # what `python -m` puts first


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _send({"pid": pid, "returncode": code})


def serve() -> dict | None:
    """Fork a child per request until stdin ends (module docstring): None in the zygote when
    the parent has gone, the request in each child."""
    wakeup = os.pipe()
    os.set_blocking(wakeup[1], False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd is written
    signal.set_wakeup_fd(wakeup[1])
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "request")
    sel.register(wakeup[0], selectors.EVENT_READ, "child")
    children: set[int] = set()
    pending = b""
    _send({"ready": os.getpid()})
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "child":
                os.read(wakeup[0], 4096)
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                return None  # the parent has gone: the children go on (as Popen's do)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                req = json.loads(line)
                try:
                    pid = os.fork()
                except OSError as err:
                    _send({"id": req["id"], "error": str(err)})
                    continue
                if pid == 0:
                    sel.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for fd in wakeup:
                        os.close(fd)
                    return req
                children.add(pid)
                _send({"id": req["id"], "pid": pid})
        _reap(children)  # after every wake-up: an exit, a request or the 1 s tick


# -- the parent's end -----------------------------------------------------------------------
class WarmProcess:
    """A child of the zygote: the part of ``subprocess.Popen`` the launcher's callers use
    (``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``terminate``),
    its exit status as the zygote reaped it."""

    def __init__(self, zygote: "Zygote", pid: int, args: list[str]):
        self.pid, self.args, self.returncode = pid, args, None
        self._zygote = zygote

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.returncode(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._zygote.exited(self.pid).wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet: the pid is still this child's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """This process's zygote (``bench/zygote.py``), spoken to over its stdin and stdout; a
    reader thread collects the pids it forked and their exit statuses."""

    def __init__(self, env: dict[str, str]):
        self.imported_env = import_time_env(env)
        self.proc = subprocess.Popen([sys.executable, "-m", "fedkrso.bench.zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self._lock = threading.Lock()
        self._next = 0
        self._answers: dict[int, dict] = {}
        self._codes: dict[int, int] = {}
        self._events: dict[int, threading.Event] = {}
        self._changed = threading.Condition()
        self.ready = False
        self.gone = False
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()
        with self._changed:
            self._changed.wait_for(lambda: self.ready or self.gone, timeout=300)
        if not self.ready:
            self.proc.kill()
            raise RuntimeError("the zygote did not start")

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._changed:
                if "ready" in msg:
                    self.ready = True
                elif "returncode" in msg:
                    self._codes[msg["pid"]] = msg["returncode"]
                    self.exited(msg["pid"]).set()
                else:
                    self._answers[msg["id"]] = msg
                self._changed.notify_all()
        with self._changed:  # the zygote has gone: no exit status will come for its children
            self.gone = True
            for event in self._events.values():
                event.set()
            self._changed.notify_all()

    def exited(self, pid: int) -> threading.Event:
        with self._lock:
            return self._events.setdefault(pid, threading.Event())

    def returncode(self, pid: int) -> int | None:
        if pid in self._codes:
            return self._codes[pid]
        if self.gone:  # its exit status is lost with the zygote: alive or not is all one can tell
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return 255
            return 255 if state in ("Z", "X") else None
        return None

    def spawn(self, module: str, args: list[str], env: dict[str, str], log: Path, append: bool,
              err: Path | None = None) -> WarmProcess:
        with self._lock:
            self._next += 1
            rid = self._next
            req = {"id": rid, "module": module, "args": [str(a) for a in args], "env": env, "cwd": os.getcwd(),
                   "log": str(Path(log).resolve()), "err": str(Path(err).resolve()) if err else None, "append": append}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        with self._changed:
            self._changed.wait_for(lambda: rid in self._answers or self.gone, timeout=60)
            answer = self._answers.pop(rid, None)
        if answer is None or "pid" not in answer:
            raise OSError(f"the zygote did not start {module}: {(answer or {}).get('error', 'no answer')}")
        return WarmProcess(self, answer["pid"], argv(module, args))

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # end of its input: it exits, its children go on
        except OSError:
            pass


# This process's zygotes by the environment they imported with (IMPORT_TIME_ENV); None: that
# one failed to start. Keyed by pid too: a forked copy of this process does not share them.
_zygotes: dict[tuple[int, frozenset], Zygote | None] = {}
_zygote_lock = threading.Lock()
MAX_ZYGOTES = 4


def warm(env: dict[str, str]) -> Zygote | None:
    """A zygote of ``env``'s import-time environment when warm starts are on, else None."""
    if os.environ.get(WARM_START) != "1":
        return None
    key = (os.getpid(), frozenset(import_time_env(env).items()))
    with _zygote_lock:
        if key in _zygotes and _zygotes[key] is not None and _zygotes[key].gone:
            del _zygotes[key]  # it died (killed with its process group, say): a new one
        if key not in _zygotes and len(_zygotes) < MAX_ZYGOTES:
            try:
                _zygotes[key] = Zygote(env)
                atexit.register(_zygotes[key].close)
            except (OSError, RuntimeError) as err:
                print(f"launch: cold starts for this environment, its zygote failed ({err})", file=sys.stderr)
                _zygotes[key] = None
        z = _zygotes.get(key)
    return z if z is not None and not z.gone else None


def main() -> None:
    preload()
    req = serve()
    if req is None:
        return
    _become(req)
    import runpy

    runpy._run_module_as_main(req["module"])  # what `python -m` runs (its exit is the interpreter's)


if __name__ == "__main__":
    main()
