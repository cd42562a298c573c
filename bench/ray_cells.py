"""Where a bench's result cells run, and what the bench shows while they do.

``CellPool`` runs the cells of a phase (the lr sweep, then the reported runs) one after
another in this process, as the bench always did; ``RayCellPool`` (``fedkrso-bench --ray``)
runs them as Ray tasks, each granted the CPUs its run computes with (``threads`` for a
simulated run, one per client process for ``runner: processes``), so a cluster runs as many
at once as it has room for. Either way a cell is ``cells.run_cell``: the same round.yaml, the
same ``cell.json``, loaded instead of run when it finished before, so a stopped bench
resumes exactly as before. On several machines ``--out`` must be a folder every node sees
at the same path (the cells write there).

Several benches (the blocks of a protocol) may share one Ray cluster side by side (``Slots``):
each takes CPUs for a run only while no earlier block waits for them, so the first block ends
as early as it would alone and the later ones fill what it leaves idle (the last runs of a
phase, a block waiting for the lrs of another).

``Progress`` prints, while cells run, the runs done and left and each run's rounds as they
close with the bench's metric (read from the run's own ``metrics.jsonl``), every ``every``
seconds at most (a run resumed from an earlier sitting says after which round, once, instead of
its earlier rounds again; a run kept from before prints none), and once a run has trained in
this sitting, about how long the rest takes at this sitting's pace: its wall time per run's
worth trained, a resumed run counting the share of its wall time that fell in this sitting (so
runs side by side count as they ran; runs kept from before, or made from a sweep twin, do not
set the pace). A rough figure: runs of different methods differ. With a protocol's blocks side
by side the estimate is the protocol's, on a line of its own after each run (a block's own pace
would count the time it waited for CPUs).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .cells import Cell, kept_rounds, run_cell
from .config import BenchConfig
from .demo import new_rows

Log = Callable[[str], None]


class Progress:
    """Runs done and left, and the rounds of the runs in flight (module docstring)."""

    def __init__(self, total: int, log: Log, every: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 overall: Progress | None = None, metric: str | None = None):
        self.total, self.log, self.every, self.clock = total, log, every, clock
        # a protocol's blocks side by side: the estimate is the whole protocol's (a block's own
        # pace would count the time it waited for CPUs other blocks held)
        self.overall = overall
        # the figure a round line shows: the bench's metric, else the first of these a row has
        self.figures = (f"eval_{metric}",) * bool(metric) + ("eval_accuracy", "eval_loss", "eval_f1")
        self.done = 0
        self.started, self.trained = clock(), 0.0
        self._flying: dict[str, tuple[Path, int, int]] = {}  # tag -> (metrics file, rounds, rows shown)
        self._lock = threading.Lock()

    def plan_more(self, runs: int) -> None:
        """``runs`` more than planned (a sweep past an edge of its grid), here and overall."""
        with self._lock:
            self.total += runs
        if self.overall is not None:
            self.overall.plan_more(runs)

    def start(self, cell: Cell, out: Path, kept: int = 0) -> None:
        """Watch the cell's rounds past the ``kept`` ones its run keeps from before
        (``cells.kept_rounds``): a resumed run says once after which round it goes on."""
        metrics = out / "cells" / cell.tag / "metrics.jsonl"
        with self._lock:
            self._flying[cell.tag] = (metrics, cell.rounds, kept)
        if 0 < kept < cell.rounds:
            rows, _ = new_rows(metrics, 0)
            figure = self._figure(rows[kept - 1]) if len(rows) >= kept else ""
            self.log(f"    {cell.tag}: resumes after round {kept}/{cell.rounds} {figure}".rstrip())

    def _figure(self, row: dict) -> str:
        return next((f"{k} {row[k]:.4g}" for k in self.figures if isinstance(row.get(k), float)), "")

    def poll(self) -> None:
        """Print the rounds that closed since the last poll."""
        with self._lock:
            for tag, (metrics, rounds, shown) in list(self._flying.items()):
                try:
                    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
                except OSError:
                    continue
                for line in lines[shown:]:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line being written: read it next time
                        break
                    shown += 1
                    self.log(f"    {tag}: round {row.get('round', shown - 1) + 1}/{rounds} closed "
                             f"{self._figure(row)}".rstrip())
                self._flying[tag] = (metrics, rounds, shown)

    def finish(self, cell: Cell, result: dict, loaded: bool) -> None:
        self.poll()
        with self._lock:
            self._flying.pop(cell.tag, None)
            self.done += 1
            if not (loaded or "replayed_from" in result):
                # a resumed run: the share of its wall time that fell in this sitting
                sitting = result.get("last_sitting_seconds")
                self.trained += sitting / result["seconds"] if sitting is not None and result["seconds"] > 0 else 1.0
            left = self.total - self.done
            pace = (self.clock() - self.started) / self.trained if self.trained else None
        how = ((f"restored from {result['restored']['from']}" if "restored" in result else "kept from before")
               if loaded else f"{result['seconds']:.0f} s")
        eta = f"; about {_duration(pace * left)} more at this sitting's pace" if pace and left else ""
        self.log(f"  [{self.done}/{self.total} runs done, {left} left{eta if self.overall is None else ''}] "
                 f"{cell.tag} ({how})")
        if self.overall is not None:
            self.overall.finish(cell, result, loaded)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _stamp(out: Path, cell: Cell) -> int | None:
    """When the cell's result was written (None: not yet): unchanged after a call, it was loaded."""
    try:
        return (out / "cells" / cell.tag / "cell.json").stat().st_mtime_ns
    except OSError:
        return None


class CellPool:
    """The cells of a phase one after another, in this process."""

    side_by_side = False  # a protocol's blocks run one after another

    def __init__(self, progress: Progress):
        self.progress = progress

    def run(self, cfg: BenchConfig, cells: list[Cell], data: dict[int, Path], out: Path,
            num_labels: int) -> list[dict]:
        results = []
        for cell in cells:
            before = _stamp(out, cell)
            self.progress.start(cell, out, kept_rounds(cfg, cell, data[cell.seed], out, num_labels))
            stop = threading.Event()
            watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True)
            watcher.start()
            try:
                result = run_cell(cfg, cell, data[cell.seed], out, num_labels)
            finally:
                stop.set()
                watcher.join()
            self.progress.finish(cell, result, before is not None and _stamp(out, cell) == before)
            results.append(result)
        return results

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.progress.every):
            self.progress.poll()


def _cell_cpus(cfg: BenchConfig) -> float:
    """What one run computes with: a simulated run's torch threads, or one per client process
    (the server's process mostly waits)."""
    return float(cfg.threads if cfg.runner == "sim" else cfg.clients)


class Stopped(RuntimeError):
    """Another bench sharing the cluster failed: this one stopped (its runs resume later)."""


class Slots:
    """A Ray cluster's CPUs shared by benches side by side, by priority (module docstring): a
    bench (lower ``priority`` first) takes CPUs for its next run only when they are free and no
    bench before it waits; it waits from ``want`` (every bench at the start) until it has sent
    its phase's runs. ``stop`` (a bench failed) makes every other bench stop at its next step."""

    def __init__(self, cpus: float):
        self.cpus = self.free = cpus
        self.stopped = False
        self._wanting: set[int] = set()
        self._cond = threading.Condition()

    def want(self, priority: int) -> None:
        with self._cond:
            self._wanting.add(priority)

    def take(self, priority: int, cpus: float) -> bool:
        """CPUs for one run of the bench ``priority``, if it is its turn (else False: it waits)."""
        cpus = min(cpus, self.cpus)  # a run wider than the cluster goes when the cluster is idle
        with self._cond:
            self._wanting.add(priority)
            if priority != min(self._wanting) or self.free < cpus:
                return False
            self.free -= cpus
            return True

    def done_wanting(self, priority: int) -> None:
        with self._cond:
            self._wanting.discard(priority)
            self._cond.notify_all()

    def give(self, cpus: float) -> None:
        with self._cond:
            self.free += min(cpus, self.cpus)
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


class RayCellPool(CellPool):
    """The cells of a phase as Ray tasks (module docstring); connect to Ray first. With
    ``slots``, a run is sent when the bench's turn for CPUs comes; without, all at once."""

    side_by_side = True  # a protocol's blocks may share the cluster (protocol.py)

    def __init__(self, progress: Progress, slots: Slots | None = None, priority: int = 0):
        super().__init__(progress)
        self.slots, self.priority = slots, priority

    @staticmethod
    def cluster_cpus() -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1.0))

    def run(self, cfg: BenchConfig, cells: list[Cell], data: dict[int, Path], out: Path,
            num_labels: int) -> list[dict]:
        import ray

        cpus = _cell_cpus(cfg)
        task = ray.remote(run_cell).options(num_cpus=cpus, max_retries=0)
        slots = self.slots
        waiting, refs, kept = list(cells), {}, {}
        results: dict[str, dict] = {}
        try:
            while waiting or refs:
                if slots is not None and slots.stopped:
                    raise Stopped("stopped: a bench beside it failed")
                while waiting and (slots is None or slots.take(self.priority, cpus)):
                    cell = waiting.pop(0)
                    kept[cell.tag] = _stamp(out, cell)
                    rounds = kept_rounds(cfg, cell, data[cell.seed], out, num_labels)  # before the run writes more
                    refs[task.remote(cfg, cell, data[cell.seed], out, num_labels)] = cell
                    self.progress.start(cell, out, rounds)
                if not waiting and slots is not None:
                    slots.done_wanting(self.priority)
                if not refs:  # every CPU is another bench's: wait for one to come free
                    slots.wait(self.progress.every)
                    continue
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.progress.every)
                self.progress.poll()
                for ref in ready:
                    cell = refs.pop(ref)
                    if slots is not None:
                        slots.give(cpus)
                    try:
                        results[cell.tag] = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:  # the run's own failure, its log tail included
                        raise RuntimeError(f"{cell.tag}: {err.cause if err.cause else err}") from None
                    self.progress.finish(cell, results[cell.tag], kept[cell.tag] is not None
                                         and _stamp(out, cell) == kept[cell.tag])
        finally:
            for ref in refs:  # a failure: the runs still going stop (each resumes from its last round)
                ray.cancel(ref)
                if slots is not None:
                    slots.give(cpus)
            if slots is not None:  # also when the phase had no run: it waits for nothing now
                slots.done_wanting(self.priority)
        return [results[c.tag] for c in cells]
