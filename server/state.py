"""Run state on disk, so a server that crashes or restarts resumes the same run.

Layout under ``<run.output_dir>/state/``; tensors are safetensors, everything else JSON, and
every file is written atomically (``atomic_write``: tmp file, fsync, ``os.replace``, fsync of
the folder), so a crash at any instant leaves either the old or the new version of a file:

- ``manifest.json``: run_id, the run's config (what shapes the results, ``shaping_config``;
  ``fedkrso-export`` rebuilds the model from it), completed rounds, each round's seeds and
  state fingerprint, the accepted update digests, the latest checkpoint, the method's plan
  state (what it decided from earlier rounds, e.g. FedTT+'s frozen cores), and the metrics row
  of the last completed round (``last_row``: written into metrics.jsonl only after its
  evaluation, so a crash in
  between must not lose it). Writing it is the commit point of a round.
- ``round-RRRRRR.safetensors``: round R's aggregated delta in the wire dtype, byte for byte
  ``RoundDelta.tensors``; replaying it reproduces the state fingerprint the manifest records.
  Every round's delta is kept, so the model after any round can be rebuilt (``rebuild``).
- ``checkpoint-RRRRRR.safetensors``: ``method.state_parameters`` after R rounds, every
  ``server.checkpoint_every`` rounds (only the latest is kept), so a restart replays at most
  that many deltas.
- ``open_round.json`` + ``open-RRRRRR-T.jsonl`` + ``open-RRRRRR-NNNN.safetensors``: the round
  in progress (seeds, selection, deadline left, accepted submissions, every client's traffic
  so far), the journal of what changed since that record was written (``open_round.py``: a
  line per save, fsynced, O(what changed)), and its aggregator's running state. The JSON
  names the journal and the last journal line names the tensor file written just before it.
  The coordinator saves before acknowledging an update, so an acknowledged update is never
  lost, and after each finished download, so a client that downloaded before a crash and
  submits after it keeps its downlink bytes. ``open_round.py`` builds and merges the
  records; this module writes and reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file as load_tensor_file
from safetensors.torch import save_file as save_tensor_file
from torch import nn

from ..common.config import TRANSPORT_FIELDS, RunConfig
from ..common.methods import Method
from .open_round import OpenSave, SavePlanner, merge
from .rounds import RoundState

log = structlog.get_logger("fedkrso.server")
FORMAT = 3  # 2: the open round's traffic is its own record (every client, not only submitters); 3: its journal
READABLE_FORMATS = (2, FORMAT)  # a format-2 open round has no journal: read as it is
Tensors = dict[str, torch.Tensor]


class StateError(RuntimeError):
    """Saved state that cannot be resumed (another run, or a replay that does not reproduce
    the recorded fingerprints); the message says what to do."""


def shaping_config(cfg: RunConfig) -> dict:
    """Every setting that shapes the results, as JSON. Left out: where the server listens, its
    credentials, its output folder and where metrics are reported (a restart may move the
    port, rotate certificates or add a tracker and still resume the same run),
    ``model.device`` and ``model.dtype`` (each party's own; the state is float32 on all,
    common/precision.py), an unset ``model.revision``, a privacy section with nothing on and an
    ``privacy.dp_sgd`` that is off (older run ids still hold), and the transport's limits (``config.TRANSPORT_FIELDS``:
    timeouts, connection and Join limits)."""
    shaping = cfg.model_dump(mode="json", exclude={"security": True, "run": {"output_dir", "report_to"},
                                                    "server": TRANSPORT_FIELDS, "model": {"device", "dtype"}})
    if shaping["model"].get("revision") is None:
        shaping["model"].pop("revision", None)
    if not cfg.privacy.any:  # a run without privacy keeps the identity it had before the section
        shaping.pop("privacy", None)
    elif not cfg.privacy.dp_sgd.enabled:  # ... and one without DP-SGD the identity it had before it
        shaping["privacy"].pop("dp_sgd", None)
    return shaping


def run_identity(cfg: RunConfig | dict) -> str:
    """``<run name>-<hash>`` of ``shaping_config`` (of a config, or of that dict itself)."""
    shaping = shaping_config(cfg) if isinstance(cfg, RunConfig) else cfg
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"{shaping['run']['name']}-{digest}"


def atomic_write(path: Path, data: bytes | Callable[[Path], None]) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function that writes the file it is given)
    so that a crash leaves the old or the new file, never a torn one: the data is fsynced in a
    tmp file before the rename, the folder after it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` as sorted JSON, atomically (a crash leaves the old file or the new one)."""
    atomic_write(path, json.dumps(obj, sort_keys=True).encode())


def write_tensors(path: Path, tensors: Tensors) -> None:
    """Straight from the tensors to the file (``save_file`` writes each tensor's memory as it
    is): a checkpoint of a billion-parameter state is not first built as bytes in memory."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_tensor_file(tensors, str(tmp)))


def read_tensors(path: Path) -> Tensors:
    """The tensors of a safetensors file."""
    return load_tensor_file(str(path))


def move_aside(out: Path) -> Path | None:
    """Move an old ``state/`` and ``metrics.jsonl`` into ``<out>/previous-<time>/`` (for
    ``--fresh``, or when a run starts from scratch over an older run's metrics)."""
    old = [p for p in (out / "state", out / "metrics.jsonl") if p.exists()]
    if not old:
        return None
    dest = out / time.strftime("previous-%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        shutil.move(str(p), str(dest / p.name))
    log.info("state_moved_aside", to=str(dest), moved=[p.name for p in old])
    return dest


@dataclass
class History:
    """What ``rebuild`` replays: each round's seeds, the state fingerprint recorded after every
    round (key = rounds completed, 0 = the base), a reader of round deltas and, optionally, a
    checkpoint (``state_parameters`` after ``checkpoint_round`` rounds)."""

    seeds: dict[int, list[int]]
    state_fingerprints: dict[int, str]
    delta: Callable[[int], Tensors]
    checkpoint_round: int = 0
    checkpoint: Callable[[], Tensors] | None = None


def rebuild(method: Method, model: nn.Module, history: History, rounds: int, refusal: str,
            visit: Callable[[int, Tensors], None] | None = None) -> int:
    """Bring ``model`` (the base model, prepared for ``method``) to its state after ``rounds``
    completed rounds: the checkpoint when it lies at or before ``rounds``, then the round
    deltas from there. The base and every rebuilt state are checked against the recorded
    fingerprints (``StateError`` naming the round, then ``refusal``: what the caller does about
    it). ``visit(round, delta)`` sees each delta applied. Returns the round replay started at.

    The server's resume (``Coordinator._resume``) and ``fedkrso-export`` both rebuild with
    this, so an export is the very model a resumed server would hold."""
    def check(r: int) -> None:
        fp = method.state_fingerprint(model)
        if fp != history.state_fingerprints[r]:
            what = "the base model's state" if r == 0 else f"the state rebuilt at round {r}"
            raise StateError(f"{what} has fingerprint {fp[:12]}, the saved run recorded "
                             f"{history.state_fingerprints[r][:12]}; {refusal}")

    if rounds not in history.state_fingerprints:
        raise StateError(f"no state recorded after {rounds} round(s); {refusal}")
    check(0)
    start = history.checkpoint_round if history.checkpoint and 0 < history.checkpoint_round <= rounds else 0
    if start:
        method.restore(model, history.checkpoint())
        check(start)
    for r in range(start, rounds):
        delta = history.delta(r)
        method.apply(model, history.seeds[r], delta)
        check(r + 1)
        if visit is not None:
            visit(r, delta)
    return start


@dataclass
class SavedRun:
    """What ``RunStore.load`` found: the manifest, decoded, and the open round if any."""

    completed: int
    seeds: dict[int, list[int]]
    state_fingerprints: dict[int, str]
    accepted_digests: dict[tuple[int, str], str]
    checkpoint_round: int
    last_row: dict | None
    plan_state: dict
    privacy: dict
    open_round: dict | None
    open_tensors: Tensors


class RunStore:
    """Reads and writes one run's ``state/`` folder. Writes are serialised by a lock: they
    come from the event loop and from worker threads."""

    def __init__(self, root: Path, run_id: str, config: dict | None = None, base: dict | None = None):
        self.root = root
        self.run_id = run_id
        self.config = config  # shaping_config of the run, kept in the manifest
        self.base = base  # models.base_identity of the base model, kept in the manifest
        self.manifest: dict = {}
        self._open_agg: tuple[str | None, dict | None] = (None, None)  # (tensor file, meta)
        self.planner = SavePlanner()  # whole record or journal line (open_round.py)
        self._journal: BinaryIO | None = None  # the open round's journal, open for appending
        self._lock = threading.Lock()

    @property
    def manifest_path(self) -> Path:
        """The run's manifest: completed rounds, seeds, fingerprints, checkpoint."""
        return self.root / "manifest.json"

    @property
    def open_path(self) -> Path:
        """The open round's record (and its journal lines, ``open_round.py``)."""
        return self.root / "open_round.json"

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> SavedRun | None:
        """The saved run, or None when there is none. Refuses another run's state."""
        if not self.manifest_path.exists():
            return None
        m = json.loads(self.manifest_path.read_text())
        if m.get("run_id") != self.run_id:
            raise StateError(f"{self.root} holds the state of run {m.get('run_id')!r}, but this config is "
                             f"run {self.run_id!r}; restart with --fresh to move the old state aside")
        if m.get("format") not in READABLE_FORMATS:
            raise StateError(f"{self.manifest_path}: state format {m.get('format')!r}, expected {FORMAT}")
        m["format"] = FORMAT  # what this server writes from now on
        self.manifest = m
        open_round, open_tensors = None, {}
        if self.open_path.exists():
            o = json.loads(self.open_path.read_text())
            if o.get("run_id") == self.run_id and o["round"] == m["completed"]:  # else: it closed
                open_round = merge(o, self._journal_lines(o.get("journal")))
                if open_round["tensors"]:
                    open_tensors = read_tensors(self.root / open_round["tensors"])
                self._open_agg = (open_round["tensors"], open_round["aggregator"])
        return SavedRun(
            completed=m["completed"],
            seeds={int(r): s for r, s in m["seeds"].items()},
            state_fingerprints={int(r): fp for r, fp in m["state_fingerprints"].items()},
            accepted_digests={(int(r), c): d for r, by in m["accepted_digests"].items() for c, d in by.items()},
            checkpoint_round=m["checkpoint"]["round"] if m["checkpoint"] else 0,
            last_row=m["last_row"],
            plan_state=m.get("plan_state", {}),
            privacy=m.get("privacy", {}),
            open_round=open_round,
            open_tensors=open_tensors,
        )

    def _journal_lines(self, name: str | None) -> list[dict]:
        """The complete lines of an open round's journal (a torn last line was never
        acknowledged: left out)."""
        path = self.root / name if name else None
        if path is None or not path.exists():
            return []
        *complete, _torn = path.read_bytes().split(b"\n")
        return [json.loads(line) for line in complete]

    def delta(self, round_id: int) -> Tensors:
        """The mean update of round ``round_id``, as committed when it closed."""
        return read_tensors(self.root / f"round-{round_id:06d}.safetensors")

    def checkpoint(self) -> Tensors:
        """The state tensors of the last checkpoint."""
        return read_tensors(self.root / self.manifest["checkpoint"]["file"])

    def history(self, saved: SavedRun) -> History:
        """What ``rebuild`` needs of this saved run."""
        return History(saved.seeds, saved.state_fingerprints, self.delta, saved.checkpoint_round,
                       self.checkpoint if saved.checkpoint_round else None)

    # -- writing -----------------------------------------------------------------------------
    def start(self, initial_fingerprint: str) -> None:
        """A new run: an empty manifest holding the base state's fingerprint."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = {"format": FORMAT, "run_id": self.run_id, "config": self.config, "base_model": self.base, "completed": 0, "seeds": {},
                         "state_fingerprints": {"0": initial_fingerprint}, "accepted_digests": {},
                         "checkpoint": None, "last_row": None}
        with self._lock:
            write_json(self.manifest_path, self.manifest)

    def commit_round(self, round_id: int, seeds: list[int], delta: Tensors, state_fingerprint: str,
                     digests: dict[str, str], row: dict, checkpoint: Tensors | None,
                     plan_state: dict | None = None, privacy: dict | None = None) -> None:
        """Round ``round_id`` closed: its delta (and a checkpoint when one is due), then the
        manifest that makes it count, then drop the open round it replaces."""
        with self._lock:
            write_tensors(self.root / f"round-{round_id:06d}.safetensors", delta)
            m = self.manifest
            previous = m["checkpoint"]
            if checkpoint is not None:
                name = f"checkpoint-{round_id + 1:06d}.safetensors"
                write_tensors(self.root / name, checkpoint)
                m["checkpoint"] = {"round": round_id + 1, "file": name}
            for key, value in (("config", self.config), ("base_model", self.base)):
                if m.get(key) is None:  # state written before the manifest kept them
                    m[key] = value
            m["completed"] = round_id + 1
            m["seeds"][str(round_id)] = list(seeds)
            m["state_fingerprints"][str(round_id + 1)] = state_fingerprint
            m["accepted_digests"][str(round_id)] = dict(digests)
            m["last_row"] = row
            m["plan_state"] = plan_state or {}
            m["privacy"] = privacy or {}
            write_json(self.manifest_path, m)
            if checkpoint is not None and previous:
                (self.root / previous["file"]).unlink(missing_ok=True)
            self._close_journal()
            self.open_path.unlink(missing_ok=True)
            self._drop_open_files(keep=())
            self._open_agg = (None, None)

    def plan_open(self, rs: RoundState, with_aggregate: bool, now: float | None = None) -> OpenSave:
        """What saving the open round ``rs`` writes, taken now, on the event loop (while the
        caller holds ``fold_lock``): nothing the loop changes later leaks into the write, which
        ``write_open`` does in a worker thread. The aggregate goes too when ``with_aggregate``
        (an update was folded), else the last saved aggregate stays. ``now``: the run's clock
        (``clock.py``; default the host's), against which the deadline is saved as remaining."""
        return self.planner.plan(rs, with_aggregate, time.monotonic() if now is None else now)

    def write_open(self, save: OpenSave) -> None:
        """Write ``save`` (``plan_open``): the aggregator's tensors first, then the whole record
        with a new empty journal, or a journal line; both name the tensor file."""
        with self._lock:
            try:
                if save.aggregator is not None:
                    tensors, meta = save.aggregator
                    name = f"open-{save.round:06d}-{meta['count']:04d}.safetensors"
                    write_tensors(self.root / name, tensors)
                    self._open_agg = (name, meta)
                name, meta = self._open_agg
                if save.record is not None:
                    self._start_journal(save, name, meta)
                else:
                    self._journal.write(json.dumps({**save.line, "tensors": name, "aggregator": meta},
                                                   sort_keys=True).encode() + b"\n")
                    self._journal.flush()
                    os.fsync(self._journal.fileno())
            except BaseException:
                self.planner.journal_open = False  # the next save writes the whole record
                self._close_journal()
                raise
            self._drop_open_files(keep=(name, self._journal_name))

    def _start_journal(self, save: OpenSave, tensors: str | None, meta: dict | None) -> None:
        """A new, empty journal (a name the record on disk does not hold), then the record
        that names it."""
        self._close_journal()
        journal = f"open-{save.round:06d}-{time.time_ns()}.jsonl"
        atomic_write(self.root / journal, b"")
        write_json(self.open_path, {**save.record, "run_id": self.run_id, "tensors": tensors, "aggregator": meta,
                                    "journal": journal})
        self._journal = open(self.root / journal, "ab")  # noqa: SIM115 - kept open for the round's appends
        self.planner.journal_open = True

    @property
    def _journal_name(self) -> str | None:
        return Path(self._journal.name).name if self._journal is not None else None

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _drop_open_files(self, keep: Collection[str | None]) -> None:
        """Tensor files and journals of the open round other than ``keep``."""
        for p in self.root.glob("open-*"):
            if p.name not in keep:
                p.unlink(missing_ok=True)
