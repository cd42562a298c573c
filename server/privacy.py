"""The server's side of client-level DP (``privacy.dp``): the central noise, the fixed
denominator, the accountant's ledger, the epsilon budget and the metrics fields.

Central mode: every accepted update is clipped again here in the space of the model update
(a client that skipped its clip is bounded all the same; with secure aggregation the server
cannot see updates, so it relies on honest clients, the threat model of docs/PRIVACY.md), the
round's *sum* gets Gaussian noise of std z * C on every coordinate of the subspace the updates
reach (``UpdateGeometry.noise``), and the result is divided by ``rounds.clients_per_round``,
fixed whoever submitted. The noise comes from a Philox generator seeded with 128 bits of the
operating system's entropy, unknown to clients and never saved. Local mode: clients noised
their own updates; the server only averages (uniform weights) and counts participations.

Sample-level DP-SGD (``privacy.dp_sgd``) runs inside the clients; the server keeps a ledger of
what each client's rounds released (per round: the Poisson rate of the rows its update
reported and its steps, at least the method's local steps), reports the largest sample-level
epsilon in every row and stops the run before a round would take a selected client past
``dp_sgd.epsilon_budget``. Each client keeps its own ledger too and refuses a round past its
budget (``common/privacy/ledger.py``): the bound a data owner relies on does not rest on the
server.

The ledger (one entry per closed round, and each client's participations) is saved with every
round commit, so a resumed run reports the same epsilon and keeps its budget.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter

import numpy as np
import structlog
import torch
from torch import nn

from ..common.aggregate import StreamingAggregator
from ..common.config import RunConfig
from ..common.methods import Method
from ..common.privacy import accountant
from ..common.privacy.dp import noise_multiplier
from ..common.privacy.dpsgd import sampling_rate
from ..common.privacy.geometry import UpdateGeometry
from .rounds import RoundState

log = structlog.get_logger("fedkrso.server")
Tensors = dict[str, torch.Tensor]
LOCAL_TAIL = 8.0  # standard deviations of the noise's norm above its mean an honest update may reach


class PrivacyGuard:
    """Client-level DP of one run on the server (module docstring); inert when DP is off."""

    def __init__(self, cfg: RunConfig, method: Method, model: nn.Module):
        self.cfg = cfg
        self.dp = cfg.privacy.dp
        self.method, self.model = method, model
        self.z = noise_multiplier(self.dp, cfg.rounds.total, cfg.rounds.clients_per_round) if self.dp.enabled else 0.0
        self.charges: list[accountant.RoundCharge] = []
        self.participation: dict[str, int] = {}
        self.sgd = cfg.privacy.dp_sgd
        self.sgd_ledger: dict[str, list[tuple[int, float, int]]] = {}  # client -> (round, rate, steps) per round
        self._rng = np.random.Generator(np.random.Philox(secrets.randbits(128)))
        self._geometry: tuple[int, UpdateGeometry] | None = None
        self._population: dict[int, int] = {}  # round -> the clients its selection drew from
        if self.dp.enabled:
            log.info("dp_enabled", mode=self.dp.mode, clip=self.dp.clip, noise_multiplier=round(self.z, 6),
                     delta=self.dp.delta, budget=self.dp.epsilon_budget, amplification=self.dp.amplification,
                     calibrated_to=self.dp.target_epsilon)

    @property
    def central(self) -> bool:
        """Whether client-level DP is central (the server clips and noises the sum)."""
        return self.dp.mode == "central"

    @property
    def secret_selection(self) -> bool:
        """Amplification by sampling holds only if nobody can predict the selection."""
        return self.central and self.dp.amplification

    # -- the ledger ------------------------------------------------------------------------------
    def state(self) -> dict:
        """What survives a restart: the accountant's charges, each client's participation and the DP-
        SGD ledger."""
        out = {"charges": [[c.round, c.sampled, c.population] for c in self.charges],
               "participation": dict(self.participation)}
        if self.sgd.enabled:
            out["dp_sgd"] = {"ledger": {c: [list(e) for e in entries] for c, entries in self.sgd_ledger.items()}}
        return out

    def load(self, state: dict) -> None:
        """Restore what ``state`` saved."""
        self.charges = [accountant.RoundCharge(*c) for c in state.get("charges", [])]
        self.participation = {k: int(v) for k, v in state.get("participation", {}).items()}
        sgd = state.get("dp_sgd", {})
        self.sgd_ledger = {c: [(int(r), float(q), int(n)) for r, q, n in entries]
                           for c, entries in sgd.get("ledger", {}).items()}
        for c, steps in sgd.get("steps", {}).items():  # a state saved before the per-round ledger
            rate = sampling_rate(self.cfg.training.batch_size, int(sgd.get("rows", {}).get(c, 1)))
            self.sgd_ledger.setdefault(c, []).append((-1, rate, int(steps)))

    # -- sample-level DP-SGD (privacy.dp_sgd, common/privacy/dpsgd.py) ----------------------------
    def sample_epsilon(self, client: str, next_rows: int | None = None) -> float:
        """Client ``client``'s sample-level epsilon after its recorded rounds (and, with
        ``next_rows``, one more round of the method's local steps on that many rows)."""
        entries = [(q, n) for _, q, n in self.sgd_ledger.get(client, [])]
        if next_rows is not None:
            entries.append((sampling_rate(self.cfg.training.batch_size, next_rows), self.method.cfg.local_steps()))
        return accountant.composed_sample_epsilon(((q, self.sgd.noise_multiplier, n) for q, n in entries),
                                                  self.sgd.delta)

    def _sgd_over_budget(self, selected_rows: dict[str, int]) -> tuple[str, float] | None:
        """The client (of ``selected_rows``: client -> its declared rows) whose sample-level
        epsilon the next round would take furthest past the DP-SGD budget, with that epsilon;
        None when every one stays within it, or there is no budget."""
        budget = self.sgd.epsilon_budget
        if not self.sgd.enabled or budget is None:
            return None
        after = {c: self.sample_epsilon(c, rows) for c, rows in selected_rows.items()}
        worst = max(after, key=after.get, default=None)
        return None if worst is None or after[worst] <= budget else (worst, after[worst])

    def may_join(self, round_id: int, client: str, rows: int) -> bool:
        """Whether a replacement ``client`` may join round ``round_id`` under the DP-SGD budget
        (the round's other clients were checked when it opened); logs when it may not."""
        over = self._sgd_over_budget({client: rows})
        if over is None:
            return True
        log.warning("replacement_over_budget", round=round_id, client=client, epsilon_after_round=round(over[1], 6),
                    budget=self.sgd.epsilon_budget)
        return False

    def _sgd_allows(self, round_id: int, selected_rows: dict[str, int]) -> bool:
        over = self._sgd_over_budget(selected_rows)
        if over is None:
            return True
        worst, after = over
        log.warning("privacy_budget_reached", round=round_id, kind="dp_sgd", client=worst,
                    epsilon=round(self.sample_epsilon(worst), 6),
                    epsilon_after_next_round=round(after, 6), budget=self.sgd.epsilon_budget, delta=self.sgd.delta)
        return False

    def _events(self, extra: accountant.RoundCharge | None = None) -> list:
        """The ledger as DpEvents, identical rounds composed as one self-composition."""
        if self.central:
            counts = Counter((c.sampled, c.population) for c in self.charges + ([extra] if extra else []))
        else:
            counts = Counter({(1, 1): max(self.participation.values(), default=0) + (1 if extra else 0)})
        return [accountant.repeated(accountant.round_event(self.z, s, n), k) for (s, n), k in sorted(counts.items()) if k]

    def epsilon(self, extra: accountant.RoundCharge | None = None) -> float:
        """The run's epsilon so far (with ``extra``: had one more round been charged)."""
        return accountant.epsilon(self._events(extra), self.dp.delta) if self.dp.enabled else 0.0

    def _charge_of(self, round_id: int, sampled: int, population: int) -> accountant.RoundCharge:
        if not self.secret_selection:
            sampled = population = 1  # no sampling credit: the round is charged in full
        return accountant.RoundCharge(round_id, sampled, max(population, sampled))

    def allows(self, round_id: int, sampled: int, population: int, selected_rows: dict[str, int] | None = None) -> bool:
        """Whether round ``round_id``, ``sampled`` of the ``population`` clients its selection drew from
        (live ones that asked for work), stays within
        the epsilon budget, and under DP-SGD within every selected client's sample-level budget
        (``selected_rows``: client -> its declared rows); logs ``privacy_budget_reached`` when not."""
        self._population[round_id] = population
        if not self._sgd_allows(round_id, selected_rows or {}):
            return False
        budget = self.dp.epsilon_budget
        if not self.dp.enabled or budget is None:
            return True
        after = self.epsilon(self._charge_of(round_id, sampled, population))
        if after <= budget:
            return True
        log.warning("privacy_budget_reached", round=round_id, epsilon=round(self.epsilon(), 6),
                    epsilon_after_next_round=round(after, 6), budget=budget, delta=self.dp.delta)
        return False

    # -- a round ---------------------------------------------------------------------------------
    def geometry(self, rs: RoundState) -> UpdateGeometry:
        """The update geometry of round ``rs`` (the subspace its updates reach), built once a round."""
        if self._geometry is None or self._geometry[0] != rs.round:
            self._geometry = (rs.round, self.method.update_geometry(self.model, rs.seeds))
        return self._geometry[1]

    def update_bound(self, rs: RoundState, configured: float | None) -> float | None:
        """The largest model-update norm an update of ``rs`` may have: ``configured``
        (``server.max_update_norm``), except in local mode, where every honest update carries
        its own noise of norm about z C sqrt(D) (D = ``UpdateGeometry.dimension``, 1,400 for
        FedKRSO on MiniLM at epsilon 8: far past any fixed bound). There it is what the clip
        and the noise allow: C + z C (sqrt(D) + 8). The noise's norm is z C times a
        1-Lipschitz function of a standard Gaussian whose mean is at most sqrt(D), so it
        exceeds z C (sqrt(D) + 8) with probability below exp(-32) (Gaussian concentration):
        no honest update is refused, and one that is larger was not clipped or noised as
        the run says."""
        if not (self.dp.enabled and not self.central):
            return configured
        c = self.dp.clip
        return c + self.z * c * (math.sqrt(self.geometry(rs).dimension) + LOCAL_TAIL)

    def screen(self, rs: RoundState, tensors: Tensors) -> Tensors:
        """Central mode: an accepted update clipped again in model-update space (idempotent for
        a client that clipped)."""
        if not self.central:
            return tensors
        clipped, _ = self.geometry(rs).clip(tensors, self.dp.clip)
        return clipped

    def release(self, rs: RoundState) -> Tensors:
        """The closing round's mean (``aggregate``), charged to the ledger; empty, and free,
        for a round that failed (nothing was released)."""
        if rs.failed:
            return {}
        mean = self.aggregate(rs, rs.aggregator)
        self.charge(rs)
        return mean

    def aggregate(self, rs: RoundState, agg: StreamingAggregator) -> Tensors:
        """The round's released mean: without DP the aggregator's own; central mode the sum plus
        noise over the fixed denominator; local mode the uniform mean."""
        if not self.dp.enabled:
            return agg.result()
        if not self.central:
            return {n: (s / agg.count).float() for n, s in sorted(agg.sums.items())}
        total = dict(agg.sums)
        for name, z in self.geometry(rs).noise(self.z * self.dp.clip, self._rng).items():
            total[name] = total[name] + z if name in total else z
        m = self.cfg.rounds.clients_per_round
        return {n: (s / m).float() for n, s in sorted(total.items())}

    def charge(self, rs: RoundState) -> None:
        """Record round ``rs`` in the ledger (central: its sample of the clients it drew from, q = 1 when
        a restart lost the pool size; local: each submitter's participation)."""
        if self.sgd.enabled:  # what each update released: its rows' rate, its steps (never fewer than planned)
            steps = self.method.cfg.local_steps()
            for client, sub in rs.submissions.items():
                rate = sampling_rate(self.cfg.training.batch_size, int(sub.num_samples))
                self.sgd_ledger.setdefault(client, []).append((rs.round, rate, max(int(sub.steps), steps)))
        if not self.dp.enabled:
            return
        sampled = len(rs.selected | rs.dropped)
        if self.central:
            self.charges.append(self._charge_of(rs.round, sampled, self._population.pop(rs.round, sampled)))
        for client in rs.submissions:
            self.participation[client] = self.participation.get(client, 0) + 1

    def row(self, next_population: int) -> dict:
        """The metrics fields of the round just charged."""
        out = self._sgd_row()
        if not self.dp.enabled:
            return out
        nxt = self._charge_of(len(self.charges), self.cfg.rounds.clients_per_round, next_population)
        eps, after = self.epsilon(), self.epsilon(nxt)
        last = self.charges[-1] if self.charges and self.central else None
        return {"dp_mode": self.dp.mode, "dp_epsilon": eps, "dp_delta": self.dp.delta,
                "dp_noise_multiplier": self.z, "dp_clip": self.dp.clip,
                "dp_sampling_rate": last.sampled / last.population if last else 1.0,
                "dp_epsilon_after_next_round": after, "dp_epsilon_budget": self.dp.epsilon_budget,
                "dp_budget_stop": self.dp.epsilon_budget is not None and after > self.dp.epsilon_budget, **out}

    def _sgd_row(self) -> dict:
        """DP-SGD's fields: the largest sample-level epsilon of any client so far, its client's
        Poisson rate, and the mechanism's settings."""
        if not self.sgd.enabled:
            return {}
        eps = {c: self.sample_epsilon(c) for c in self.sgd_ledger}
        worst = max(eps, key=eps.get, default=None)
        return {"dp_sgd_epsilon": eps[worst] if worst else 0.0, "dp_sgd_delta": self.sgd.delta,
                "dp_sgd_noise_multiplier": self.sgd.noise_multiplier, "dp_sgd_clip": self.sgd.clip,
                "dp_sgd_sampling_rate": self.sgd_ledger[worst][-1][1] if worst else 0.0,
                "dp_sgd_epsilon_budget": self.sgd.epsilon_budget}
