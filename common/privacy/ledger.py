"""A client's own ledger of sample-level DP-SGD (``privacy.dp_sgd``): what its data has
released, kept by the client, so that the bound holds against the server.

Every round a client trains under DP-SGD releases one update computed from Poisson samples of
its rows: ``steps`` steps at rate q with noise multiplier sigma. The server keeps a ledger too
(``server/privacy.py``), but the one bound a data owner relies on cannot rest on a server that
may lie about the settings, ask for rounds past the budget, or lose its state. So before a
round the client composes its ledger with the round it is asked to train and refuses
(``BudgetExceeded``) when epsilon would pass its budget (the client's own ``--dp-sgd-budget``,
else the run's ``dp_sgd.epsilon_budget``); after training, before the update leaves, it
records the round (written and synced first: a crash cannot lose a release that was sent).

The ledger belongs to the data, not to one run: its file (``fedkrso-client --dp-ledger``,
default ``<shard>/dp_sgd_ledger.json``) lists every release of every run on that shard, and
epsilon composes all of them. A round trained again by the same process (a restarted server
asks for it again) releases the same bytes (its batches and noise are keyed by the process's
secret) and is recorded once; another process has another secret, so its retrain is a new
release and is charged.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import accountant

VERSION = 1


class BudgetExceeded(RuntimeError):
    """Training the round would take the data's sample-level epsilon past the budget."""


@dataclass(frozen=True)
class Release:
    """One round trained under DP-SGD: ``steps`` steps at Poisson rate ``rate`` with noise
    multiplier ``noise_multiplier``, by the process ``session`` (a digest of its secret)."""

    run_id: str
    round: int
    session: str
    rate: float
    steps: int
    noise_multiplier: float

    def key(self) -> tuple[str, int, str]:
        """What identifies one release: (run, round, session); a retrain of the same round by the same
        process is charged once."""
        return self.run_id, self.round, self.session


class SampleLedger:
    """The releases of one client's data and its budget (module docstring); ``path`` None
    keeps them in memory (the simulator: one process, one run)."""

    def __init__(self, path: Path | None, run_id: str, budget: float | None, delta: float):
        self.path = path
        self.run_id = run_id
        self.budget = budget
        self.delta = delta
        self.releases: dict[tuple[str, int, str], Release] = {}
        if path is not None and path.exists():
            self._read(path)

    def _read(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            releases = [Release(**r) for r in data["releases"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"DP-SGD ledger {path} is unreadable ({err}); it holds what this data has released, "
                             "so it is not replaced: restore it, or move it aside knowingly") from None
        self.releases = {r.key(): r for r in releases}

    def release(self, round_id: int, session: str, rate: float, steps: int, noise_multiplier: float) -> Release:
        """The release of training round ``round_id`` of this ledger's run."""
        return Release(self.run_id, round_id, session, rate, steps, noise_multiplier)

    def epsilon(self, extra: Release | None = None) -> float:
        """Sample-level epsilon of every release recorded (and ``extra``), at ``delta``."""
        runs = list(self.releases.values())
        if extra is not None and extra.key() not in self.releases:
            runs.append(extra)
        return accountant.composed_sample_epsilon(((r.rate, r.noise_multiplier, r.steps) for r in runs), self.delta)

    def check(self, release: Release) -> None:
        """``BudgetExceeded`` when training ``release`` would take epsilon past the budget (a
        release already recorded costs nothing again)."""
        if self.budget is None:
            return
        after = self.epsilon(release)
        if after > self.budget:
            raise BudgetExceeded(f"round {release.round} would take this data's sample-level epsilon from "
                                 f"{self.epsilon():.4g} to {after:.4g} (delta {self.delta:g}), past the budget "
                                 f"{self.budget:g}")

    def record(self, release: Release) -> None:
        """Add ``release``, on disk before this returns (write, fsync, rename)."""
        if release.key() in self.releases:
            return
        self.releases[release.key()] = release
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump({"version": VERSION, "releases": [asdict(r) for r in self.releases.values()]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
