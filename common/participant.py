"""One client's side of a round, without the transport: the unit that the gRPC client and the
in-process simulator both drive.

A ``Participant`` holds the global weights W^t between rounds. For a round it

1. catches up to the round's target state: the aggregated deltas of the rounds it lacks
   (``apply_delta``) or a snapshot (``load_snapshot``), then checks the rebuilt state against
   the server's fingerprint (``verify``);
2. checks that it rebuilt the round's random objects (subspaces, directions) as the server did
   (``check_plan``);
3. when client evaluation is due (``eval.client_every``), evaluates W^t on its own held-out
   rows (``evaluate``): the figures travel in the update's header;
4. trains with the method on its own data (``train``): it snapshots the method's state, trains,
   takes the change, restores the snapshot bit for bit (so it is back at W^t before the next
   global delta) and returns the update cast to the wire dtype with its digest.

Its shard (and held-out split) is tokenised once, when the participant is made
(``data.tokenize``, cached beside the shard), not in every batch of every round.

Every random choice of a round is keyed by (run seed, round, client key): batch order, dropout
and the method's own choices, so a client that trains a round again produces the same bytes,
and a simulated client produces what its distributed twin would. Under DP-SGD the batches and
the step noise are keyed by the client's secret instead (the server must not know who was
drawn), and under secure aggregation so are the method's own choices (``choice_key``): the
same on a retrain of the same process and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
import torch
from torch import nn

from fedkrso.v1 import coordinator_pb2 as pb

from .accounting import payload_bytes
from .config import RunConfig
from .data import batches, tokenize
from .evaluate import client_metrics, evaluate
from .methods import Method
from .models import load_model, load_tokenizer, model_fingerprint
from .precision import Placement, bytes_by_dtype, peak_bytes, placement_of, reset_peak, resolve_placement
from .privacy.dp import noise_multiplier, privatize, secret_rng
from .privacy.dpsgd import SampleDP, expected_batch, poisson_batches, sampling_rate
from .privacy.ledger import Release, SampleLedger
from .privacy.secagg import fixed_point_bits
from .subspace import stable_seed
from .tensors import DTYPES
from .update import UpdateRecord
from .wire import tensor_batches, update_digest


log = structlog.get_logger("fedkrso.participant")


class ParticipantError(RuntimeError):
    """A state under which a client must not go on: another base model, a rebuilt state or
    subspace that differs from the server's, a delta that does not fit."""


@dataclass
class PreparedUpdate:
    """A trained update in the wire dtype, with what its header reports."""

    round: int
    tensors: dict[str, torch.Tensor]
    digest: str
    num_samples: int
    loss: float
    steps: int
    seeds_used: list[int] = field(default_factory=list)
    train_seconds: float = 0.0
    train_state_bytes: int = 0
    eval_metrics: dict[str, float] = field(default_factory=dict)  # of W^round, on held-out rows
    eval_examples: int = 0  # 0: the client did not evaluate this round
    accelerator_peak_bytes: int = 0  # peak allocated on the party's accelerator while training
    withhold_figures: bool = False  # a privacy mode: the header carries none of the figures above
    withhold_draws: bool = False  # secure aggregation: the header does not name the seeds drawn

    def record(self, peak_rss_bytes: int) -> UpdateRecord:
        """What this update's header reports (``common.update``), as this client sends it.

        Under a privacy mode (``withhold_figures``) only what the protocol needs: the client's
        loss, timings, memory and evaluation would reach the server one client at a time
        (docs/PRIVACY.md, "What each party can read"). Under secure aggregation
        (``withhold_draws``) not even the seeds it drew: its draws are keyed by its own secret
        (``Participant.choice_key``)."""
        full = UpdateRecord(self.round, self.digest, self.num_samples, self.steps, len(self.tensors), self.loss,
                            self.train_seconds, peak_rss_bytes, self.train_state_bytes, tuple(self.seeds_used),
                            tuple(sorted(self.eval_metrics.items())), self.eval_examples,
                            self.accelerator_peak_bytes)
        return full.redacted(figures=self.withhold_figures, draws=self.withhold_draws)

    def header(self, run_id: str, peak_rss_bytes: int) -> pb.UpdateHeader:
        """The UpdateHeader that opens this update's SubmitUpdate stream (``record``)."""
        return self.record(peak_rss_bytes).header(run_id)

    def requests(self, run_id: str, peak_rss_bytes: int, chunk: int) -> Iterator[pb.SubmitUpdateRequest]:
        """The SubmitUpdate stream: the header, then the tensors in batches of <= ``chunk`` bytes."""
        yield pb.SubmitUpdateRequest(header=self.header(run_id, peak_rss_bytes))
        for batch in tensor_batches(self.tensors, None, chunk):
            yield pb.SubmitUpdateRequest(tensors=batch)


@dataclass
class Shared:
    """The base model, its tokenizer and the method object, prepared and placed once. Several
    simulated participants may share one (they differ only in data and in the state they
    train). ``identity`` is the base model's fingerprint as loaded (``model_fingerprint``)."""

    model: nn.Module
    tokenizer: object
    method: Method
    identity: str = ""

    @classmethod
    def load(cls, cfg: RunConfig, model_spec: str | None = None, placement: Placement | None = None) -> Shared:
        """Load the base model on the CPU at its checkpoint's precision, fingerprint it,
        prepare it for the method, then place it (precision rule, device): one copy of the
        model at any time. ``placement`` defaults to round.yaml's device and dtype."""
        m = cfg.model
        spec = model_spec or m.name
        placement = placement or resolve_placement(m.device, m.dtype)
        method = cfg.build_method()
        model = load_model(spec, m.task, m.num_labels, cfg.run.seed, revision=m.revision)
        identity = model_fingerprint(model)
        method.prepare(model)
        method.place(model, placement)
        log.info("model_placed", model=spec, placement=str(placement), bytes=bytes_by_dtype(model))
        return cls(model, load_tokenizer(spec, m.revision), method, identity)


def _counted(items: Iterator, tick: Callable[[], None] | None) -> Iterator:
    for item in items:
        if tick is not None:
            tick()
        yield item


class Participant:
    """One client's model state, data and round logic (module docstring)."""

    def __init__(self, cfg: RunConfig, key: str, dataset, shared: Shared, eval_dataset=None,
                 ledger: SampleLedger | None = None):
        """``ledger``: where this client's DP-SGD releases are recorded and its budget checked
        (``privacy.ledger``; default: in memory, the run's ``dp_sgd.epsilon_budget``)."""
        self.cfg = cfg
        self.key = key  # keys the client's RNGs: batch order, dropout, seed choices
        self.dataset = dataset
        self.shared = shared
        self.have = 0  # rounds applied: the participant holds W^have
        self.fixed_seeds: list[int] = []  # a method with run-long seeds sends them once
        fmt = cfg.token_format()
        self.tokens = tokenize(dataset, shared.tokenizer, fmt)
        held_out = eval_dataset is not None and len(eval_dataset) > 0
        self.eval_tokens = tokenize(eval_dataset, shared.tokenizer, fmt) if held_out else None
        self.secret = secrets.token_bytes(32)  # keys this client's local DP noise (never leaves it)
        sgd = cfg.privacy.dp_sgd
        self.ledger = ledger or SampleLedger(None, "", sgd.epsilon_budget, sgd.delta)

    @property
    def choice_key(self) -> str:
        """What keys the method's own random choices (FedKRSO's seed per interval, FedKSeed's
        candidate per step). The client's id otherwise, so the server can recompute and check
        them (``Method.keyed_update_problem``); under secure aggregation a key derived from
        this client's secret, because the server recomputing them would know which client
        drew each seed, and where one client alone drew a seed the unmasked sum for it is that
        client's accumulator (docs/PRIVACY.md, section 2)."""
        if self.cfg.privacy.secure_aggregation.enabled:
            return hmac.new(self.secret, b"method-choices", hashlib.sha256).hexdigest()[:32]
        return self.key

    @property
    def model(self) -> nn.Module:
        """The model this participant trains (shared with others in a simulator)."""
        return self.shared.model

    @property
    def method(self) -> Method:
        """The run's method object."""
        return self.shared.method

    @property
    def num_samples(self) -> int:
        """Rows of the client's training shard (declared at join)."""
        return len(self.dataset)

    @property
    def eval_samples(self) -> int:
        """Rows of the held-out split (0: none), declared at join: the server's bound on the
        example count of this client's evaluations."""
        return 0 if self.eval_tokens is None else len(self.eval_tokens)

    # -- catching up ---------------------------------------------------------------------------
    def check_base(self, server_fingerprint: str, spec: str) -> None:
        """Refuse to go on when the base model this client loaded is not the server's."""
        fp = self.shared.identity
        if fp != server_fingerprint:
            raise ParticipantError(f"base model {spec!r} differs from the server's (fingerprint "
                                   f"{fp[:12]} != {server_fingerprint[:12]}); refusing to train")

    def seeds(self, sent: list[int]) -> list[int]:
        """The seeds of a round header or delta: those sent, or, for a method whose seeds are
        fixed for the run (sent once, to a client holding none), the ones kept from then."""
        if self.method.seeds_per_round:
            return list(sent)
        if sent:
            self.fixed_seeds = list(sent)
        if not self.fixed_seeds:
            raise ParticipantError("the server sent no seeds and none were received before")
        return self.fixed_seeds

    def delta_spec(self, seeds: list[int]) -> dict[str, tuple[int, ...]]:
        """Names and shapes a round delta with ``seeds`` may carry (a mean of updates)."""
        return self.method.update_spec(self.model, seeds)

    def state_spec(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of a snapshot (the method's ``snapshot_tensors``)."""
        return self.method.snapshot_spec(self.model)

    def state_bytes(self) -> int:
        """Bytes of that state in its own dtypes: what a snapshot carries."""
        return payload_bytes(self.method.state_parameters(self.model))

    def apply_delta(self, round_id: int, seeds: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Apply round ``round_id``'s aggregated delta with the method's ``apply``, as the server
        did, after checking that it is the next round and that every tensor fits and is finite."""
        if round_id != self.have:
            raise ParticipantError(f"delta for round {round_id} but the client holds round {self.have}")
        spec = self.delta_spec(seeds)
        for name, t in tensors.items():
            if name not in spec or tuple(t.shape) != tuple(spec[name]):
                raise ParticipantError(f"delta of round {round_id}: tensor {name!r} does not fit this model")
            if not torch.isfinite(t).all():
                raise ParticipantError(f"delta of round {round_id}: tensor {name!r} has non-finite values")
        self.method.apply(self.model, seeds, {k: v.float() for k, v in tensors.items()})
        self.have = round_id + 1

    def load_snapshot(self, round_id: int, tensors: dict[str, torch.Tensor]) -> None:
        """Take the state of round ``round_id`` whole (catch-up by snapshot), once it fits the model."""
        spec = self.state_spec()
        if set(tensors) != set(spec) or any(tuple(t.shape) != spec[k] for k, t in tensors.items()):
            raise ParticipantError(f"snapshot of round {round_id} does not fit this model")
        self.method.load_snapshot(self.model, tensors)
        self.have = round_id

    def verify(self, target_round: int, state_fingerprint: str) -> str:
        """The rebuilt state must be the server's: same round, same fingerprint."""
        if self.have != target_round:
            raise ParticipantError(f"caught up to round {self.have}, server expects {target_round}")
        fp = self.method.state_fingerprint(self.model)
        if fp != state_fingerprint:
            raise ParticipantError(f"rebuilt state at round {self.have} differs from the server's "
                                   f"({fp[:12]} != {state_fingerprint[:12]})")
        return fp

    # -- training ------------------------------------------------------------------------------
    def check_plan(self, round_id: int, seeds: list[int], plan_fingerprint: str) -> None:
        """Refuse to train when the round's random objects rebuilt here differ from the server's."""
        if self.method.plan_fingerprint(self.model, seeds) != plan_fingerprint:
            raise ParticipantError(f"rebuilt subspaces for round {round_id} differ from the server's")

    def evaluate(self, round_id: int) -> tuple[dict[str, float], int]:
        """(metrics, examples) of W^have on the held-out rows when round ``round_id`` is due
        for client evaluation (``eval.client_every``); ({}, 0) when not, or without held-out
        rows. No RNG is drawn, so training afterwards is what it would have been without."""
        e = self.cfg.eval
        if not e.client_due(round_id) or self.eval_tokens is None:
            return {}, 0
        metrics = evaluate(self.model, self.eval_tokens, e.batch_size, e.max_examples)
        m = self.cfg.model
        return client_metrics(metrics, m.task, m.num_labels), int(metrics["eval_examples"])

    def train(self, round_id: int, seeds: list[int], tick: Callable[[], None] | None = None) -> PreparedUpdate:
        """Local training for round ``round_id`` from W^have, after evaluating W^have when
        due; the model is back at W^have after."""
        t, run_seed = self.cfg.training, self.cfg.run.seed
        eval_metrics, eval_examples = self.evaluate(round_id)
        placement = placement_of(self.model)
        snapshot = self.method.training_snapshot(self.model)
        sgd = self.cfg.privacy.dp_sgd
        release = self._release(round_id, self.method.cfg.local_steps()) if sgd.enabled else None
        if release is not None:
            self.ledger.check(release)  # BudgetExceeded: this data's own budget, whatever the server says
        if sgd.enabled:  # Poisson batches from the client's secret: the server cannot tell who was drawn
            data = poisson_batches(self.tokens, t.batch_size, secret_rng(self.secret, "dp-sgd-sample", run_seed, round_id))
        else:
            data = batches(self.tokens, t.batch_size, seed=stable_seed("batches", run_seed, round_id, self.key))
        started = time.perf_counter()
        was_training = self.model.training
        reset_peak(placement.device)
        try:
            with placement.fork_rng(), self._dp_sgd(round_id) as private:
                # dropout: the same update whenever it is (re)trained
                torch.manual_seed(stable_seed("dropout", run_seed, round_id, self.key) % (2**63))
                if private is not None:
                    data = private.batches(data)
                update = self.method.train_round(self.model, _counted(data, tick), round_id, seeds, self.choice_key)
            accelerator_peak = peak_bytes(placement.device)
        finally:
            self.method.restore(self.model, snapshot)
            self.model.train(was_training)
        train_seconds = time.perf_counter() - started
        if release is not None:  # recorded before the update can leave this client
            self.ledger.record(dataclasses.replace(release, steps=private.steps))
        tensors = self.privatize(round_id, seeds, {k: v.detach().cpu() for k, v in update.tensors.items()})
        wire = DTYPES[self.cfg.method.wire_dtype]
        tensors = {k: v.detach().to(wire).cpu() for k, v in tensors.items()}  # canonical bytes
        p = self.cfg.privacy
        return PreparedUpdate(round=round_id, tensors=tensors, digest=update_digest(tensors),
                              num_samples=self.num_samples, loss=update.loss, steps=update.steps,
                              seeds_used=list(update.seeds_used), train_seconds=train_seconds,
                              train_state_bytes=update.train_state_bytes, eval_metrics=eval_metrics,
                              eval_examples=eval_examples, accelerator_peak_bytes=accelerator_peak,
                              withhold_figures=p.any, withhold_draws=p.secure_aggregation.enabled)

    def _release(self, round_id: int, steps: int) -> Release:
        """What training round ``round_id`` under DP-SGD releases of this client's data."""
        session = hashlib.sha256(self.secret).hexdigest()[:16]  # names this process, reveals nothing of the secret
        rate = sampling_rate(self.cfg.training.batch_size, len(self.tokens))
        return self.ledger.release(round_id, session, rate, steps, self.cfg.privacy.dp_sgd.noise_multiplier)

    @contextlib.contextmanager
    def _dp_sgd(self, round_id: int) -> Iterator[SampleDP | None]:
        """DP-SGD for this round's local steps (``privacy.dp_sgd``): Opacus hooks on the model
        and the privatizing step on the method's optimizer while it trains; None when off."""
        sgd = self.cfg.privacy.dp_sgd
        if not sgd.enabled:
            yield None
            return
        rows = len(self.tokens)
        private = SampleDP(sgd, self.model, expected_batch(self.cfg.training.batch_size, rows),
                           secret_rng(self.secret, "dp-sgd-noise", self.cfg.run.seed, round_id))
        optim = self.method.optim
        with private:
            optim.private = private
            try:
                yield private
            finally:
                optim.private = None
        log.info("update_dp_sgd", round=round_id, steps=private.steps, rows=rows,
                 sampling_rate=round(sampling_rate(self.cfg.training.batch_size, rows), 6),
                 noise_multiplier=sgd.noise_multiplier, clip=sgd.clip)

    def _as_sent(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values the server sums for ``tensors`` (float64): cast to float32 and the wire
        dtype (``train``) and, under secure aggregation, rounded to its fixed-point ring
        (``privacy.secagg.encode``, whose step follows from the config as the server's does)."""
        wire = DTYPES[self.cfg.method.wire_dtype]
        out = {n: t.float().to(wire).double() for n, t in tensors.items()}
        sa = self.cfg.privacy.secure_aggregation
        if sa.enabled:
            step = 2.0 ** fixed_point_bits(sa.value_bound, self.cfg.rounds.clients_per_round, sa.ring_bits)
            out = {n: torch.round(t * step) / step for n, t in out.items()}
        return out

    def privatize(self, round_id: int, seeds: list[int], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Clip (and in local mode noise) the update in the space of the model update, and give
        it the full layout secure aggregation masks (``privacy.dp.privatize``). The norm before
        clipping and the count of values the clamp cut are logged here and never sent."""
        p = self.cfg.privacy
        if not (p.dp.enabled or p.secure_aggregation.enabled):
            return tensors
        z = noise_multiplier(p.dp, self.cfg.rounds.total, self.cfg.rounds.clients_per_round) if p.dp.enabled else 0.0
        geometry = self.method.update_geometry(self.model, seeds)
        rng = secret_rng(self.secret, "dp-noise", self.cfg.run.seed, round_id)
        out, norm, clamped = privatize(p, geometry, tensors, z, rng, self._as_sent)
        log.info("update_privatized", round=round_id, dp=p.dp.mode, norm=round(norm, 6),
                 clipped=p.dp.enabled and norm > p.dp.clip, clamped_values=clamped)
        return out
