"""The federated side of FedKRSO: ``FedKRSO`` hands out K seeds a round, trains a client's
intervals with ``layer``'s ``SubspaceAdapter``, says what an upload may carry (the accumulators
of the seeds a client drew), measures uploads and applies the round's mean to the projected
weights (their float32 masters where they have one). The method itself is described in the
package's docstring."""

from __future__ import annotations

import copy
import itertools
import math
import random
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...accounting import fedkrso_uplink_bytes
from ...precision import master, sync_compute
from ...privacy.geometry import RightFactor, UpdateGeometry
from ...subspace import round_seeds, stable_seed, subspace, subspace_fingerprint
from ...tensors import l2_norm
from ..base import LocalUpdate, Method, forward_loss, is_conv1d, out_in, target_linears, train_state_bytes
from .config import Config
from .layer import SubspaceAdapter


@dataclass
class _Grams:
    """``FedKRSO._grams``: per target matrix (d_m, P P^T for every seed, K r x K r, float64),
    and the stacked sub-matrices of the seed indices updates carried, built on first use."""

    model: weakref.ref
    seeds: tuple[int, ...]
    full: dict[str, tuple[int, torch.Tensor]]
    subs: dict[tuple[tuple[str, ...], tuple[int, ...]], torch.Tensor] = field(default_factory=dict)

    def sub(self, names: list[str], ks: tuple[int, ...], rank: int) -> torch.Tensor:
        """(len(names), |ks| r, |ks| r): each matrix's Gram restricted to the seeds ``ks``."""
        key = (tuple(names), ks)
        if key not in self.subs:
            rows = [k * rank + i for k in ks for i in range(rank)]
            self.subs[key] = torch.stack([self.full[n][1][rows][:, rows] for n in names])
        return self.subs[key]


class FedKRSO(Method):
    name = "fedkrso"
    Config = Config
    cfg: Config
    _gram_cache: _Grams | None = None

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The linear modules projected (``target_modules``); ``ValueError`` when none matches."""
        found = target_linears(model, self.cfg.target_modules)
        if not found:
            raise ValueError(f"no Linear module matches target_modules={self.cfg.target_modules}")
        return found

    def prepare(self, model: nn.Module) -> None:
        """The base preparation, failing early on a ``target_modules`` that selects nothing."""
        super().prepare(model)
        self.targets(model)  # fail early on a pattern that selects nothing

    def round_seeds(self, round_id: int) -> list[int]:
        """The K seeds of round ``round_id``, from the run seed (docs/algorithm.md)."""
        return round_seeds(self.run_seed, round_id, self.cfg.k)

    def plan_fingerprint(self, model: nn.Module, seeds: list[int]) -> str:
        """A digest of the round's subspaces (seeds, shapes, rank): client and server check they drew
        the same."""
        shapes = {n: out_in(m) for n, m in self.targets(model).items()}
        return subspace_fingerprint(seeds, shapes, self.cfg.rank)

    def mastered(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every projected matrix: nearly all of the model, and the state (precision rule 5)."""
        return self.targets(model)

    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The projected weights (their float32 masters where the party computes with a
        low-precision copy) and the dense-trainables."""
        state = {f"{n}.weight": _state_weight(m) for n, m in self.targets(model).items()}
        state.update(self.dense(model))
        return state

    def training_snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Training changes a mastered weight's compute copy only, never its master, so what
        it can change of the state is the dense-trainables and the weights without a master."""
        keep = {f"{n}.weight" for n, m in self.targets(model).items() if master(m) is not None}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.state_parameters(model).items()
                if k not in keep}

    @torch.no_grad()
    def restore(self, model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
        """Put the state back, then rebuild every compute copy from its master (training
        merged B P into the copies)."""
        super().restore(model, snapshot)
        for module in self.targets(model).values():
            sync_compute(module)

    def trainable_count(self, model: nn.Module) -> int:
        """One interval trains B (d_m x r) for every target plus the dense-trainables."""
        sum_dm = sum(out_in(m)[0] for m in self.targets(model).values())
        return self.cfg.rank * sum_dm + sum(p.numel() for p in self.dense(model).values())

    def update_spec(self, model: nn.Module, seeds: list[int]) -> dict[str, tuple[int, ...]]:
        """``acc.<k>.<module>`` (d_m x r) for each of the round's seeds and targets, and the dense changes."""
        spec: dict[str, tuple[int, ...]] = {}
        for k in range(len(seeds)):
            for n, m in self.targets(model).items():
                spec[f"acc.{k}.{n}"] = (out_in(m)[0], self.cfg.rank)
        spec.update(self.dense_spec(self.dense(model)))
        return spec

    def update_geometry(self, model: nn.Module, seeds: list[int]) -> UpdateGeometry:
        """Exact: the accumulators of matrix m for every seed, side by side (A, d_m x K r),
        change W_m by A [P_1; ...; P_K] (``privacy.geometry``, right factors). A Conv1D's
        change is the transpose, of the same norm."""
        factors = []
        for name, module in self.targets(model).items():
            d_n = out_in(module)[1]
            stacked = torch.cat([subspace(seed, name, self.cfg.rank, d_n) for seed in seeds])
            factors.append(RightFactor([f"acc.{k}.{name}" for k in range(len(seeds))],
                                       [self.cfg.rank] * len(seeds), stacked))
        return UpdateGeometry(self.update_spec(model, seeds), factors)

    def required_names(self, model: nn.Module, seeds: list[int]) -> set[str]:
        """Dense deltas always; accumulators only for the seeds a client drew."""
        return set(self.dense_spec(self.dense(model)))

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0) -> int:
        """uplink = K_used * r * sum_m d_m * b + dense * b (docs/algorithm.md section 6)."""
        sum_dm = sum(out_in(m)[0] for m in self.targets(model).values())
        dense = sum(p.numel() for p in self.dense(model).values())
        return fedkrso_uplink_bytes(sum_dm, n_seeds_used, self.cfg.rank, dense, self.wire_bytes(1))

    def seed_choices(self, round_id: int, client_key: str) -> list[int]:
        """Seed index per interval: uniform, from a client RNG of (run seed, round, client)."""
        rng = random.Random(stable_seed("intervals", self.run_seed, round_id, client_key))
        return [rng.randrange(self.cfg.k) for _ in range(self.cfg.intervals)]

    def allowed_update_names(self, model: nn.Module, seeds: list[int], round_id: int, client_key: str) -> set[str]:
        """The dense deltas and the accumulators of the seed indices this client drew."""
        drawn = set(self.seed_choices(round_id, client_key))
        return {n for n in self.update_spec(model, seeds) if not n.startswith("acc.") or int(n.split(".")[1]) in drawn}

    def keyed_update_problem(self, model: nn.Module, seeds: list[int], round_id: int, client_key: str,
                             tensors: dict[str, torch.Tensor], seeds_used: list[int]) -> str | None:
        """A client trains one interval per drawn index and sends an accumulator for each:
        exactly the drawn indices, and ``seeds_used`` their seeds in index order."""
        drawn = sorted(set(self.seed_choices(round_id, client_key)))
        sent = sorted({int(n.split(".")[1]) for n in tensors if n.startswith("acc.")})
        stray = [k for k in sent if k not in drawn]
        if stray:
            return (f"accumulator for seed index {stray[0]}, which client {client_key!r} did not draw in round "
                    f"{round_id} (it drew {drawn})")
        if sent != drawn:
            return f"accumulators for seed indices {sent}, but client {client_key!r} drew {drawn} in round {round_id}"
        if list(seeds_used) != [seeds[k] for k in drawn]:
            return f"seeds_used does not list the seeds of the accumulators sent (indices {drawn})"
        return None

    def update_norm(self, model: nn.Module, seeds: list[int], tensors: dict[str, torch.Tensor]) -> float:
        """||sum_k A_k P_k||_F per matrix (the weight change ``apply`` makes), with the dense
        deltas: each matrix's norm from the (K r x K r) Gram matrices, never the d_m x d_n delta
        (``product_norm_sq``: sum((A^T A) * (P P^T)), P P^T from ``_grams``). Matrices of the
        same height that carry the same seeds are batched: a few operations per update, not a
        few per matrix (the server sizes every update it receives)."""
        grams = self._grams(model, seeds)
        groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name, (d_m, _) in grams.full.items():
            ks = tuple(k for k in range(len(seeds)) if f"acc.{k}.{name}" in tensors)
            if ks:
                groups.setdefault((d_m, ks), []).append(name)
        total = 0.0
        for (_, ks), names in groups.items():
            a = torch.cat([torch.stack([tensors[f"acc.{k}.{n}"] for n in names]) for k in ks], dim=2).double()
            total += float((a.transpose(1, 2) @ a).mul_(grams.sub(names, ks, self.cfg.rank)).sum())
        dense = l2_norm(t for n, t in tensors.items() if n.startswith("dense."))
        return math.sqrt(total + dense * dense)

    def _grams(self, model: nn.Module, seeds: list[int]) -> _Grams:
        """P P^T of every target matrix under ``seeds``, drawn once per model and seeds and
        kept: the server sizes every update of a round against the same subspaces, and drawing
        them again for each update cost more than the rest of its checks."""
        cached = self._gram_cache
        if cached is None or cached.model() is not model or cached.seeds != tuple(seeds):
            full = {}
            for name, module in self.targets(model).items():
                d_m, d_n = out_in(module)
                p = torch.cat([subspace(s, name, self.cfg.rank, d_n) for s in seeds]).double()
                full[name] = (d_m, p @ p.T)
            cached = self._gram_cache = _Grams(weakref.ref(model), tuple(seeds), full)
        return cached

    def train_round(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, torch.Tensor]],
        round_id: int,
        seeds: list[int],
        client_key: str,
    ) -> LocalUpdate:
        """I intervals, each on the seed its keyed choice draws: J AdamW steps of a fresh B in that
        seed's subspace (with the dense-trainables), B summed into that seed's accumulator."""
        model.train()
        dense = self.dense(model)
        dense_start = self.start_values(dense)
        dense_opt = self.dense_optimizer(dense)
        adapter = SubspaceAdapter(self.targets(model), self.cfg.rank, per_example=self.optim.private is not None)
        acc: dict[str, torch.Tensor] = {}
        losses: list[float] = []
        peak_state = 0
        try:
            for i, k in enumerate(self.seed_choices(round_id, client_key)):
                b_opt = self.optim.adamw([(adapter.start(seeds[k]), self.cfg.lr)])
                for j in range(self.cfg.interval_steps):
                    loss = forward_loss(model, next(batches))
                    loss.backward()
                    self.optim.step([b_opt, dense_opt], round_id, i * self.cfg.interval_steps + j)
                    peak_state = max(peak_state, train_state_bytes(b_opt, dense_opt))
                    self.optim.zero_grad([b_opt, dense_opt])
                    losses.append(loss.item())
                for name, b in adapter.merge().items():
                    key = f"acc.{k}.{name}"
                    acc[key] = acc[key] + b if key in acc else b
        finally:
            adapter.close()
        acc.update(self.dense_deltas(dense, dense_start))
        used = sorted({int(key.split(".")[1]) for key in acc if key.startswith("acc.")})
        return LocalUpdate(
            tensors=acc,
            loss=sum(losses) / len(losses),
            steps=len(losses),
            seeds_used=[seeds[k] for k in used],
            train_state_bytes=peak_state,
        )

    @torch.no_grad()
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        """W += sum_k Abar_k P_k: the product summed in float32 on the CPU in seed order (a GPU
        product would round differently), then added elementwise to the float32 state weight
        where it lives, so every party that applies the same Abar bytes reaches the same W
        bytes on any device. A low-precision compute copy is then rebuilt from its master."""
        for name, module in self.targets(model).items():
            d_m, d_n = out_in(module)
            total = None
            for k, seed in enumerate(seeds):
                a = delta.get(f"acc.{k}.{name}")
                if a is None:
                    continue
                term = a.float().cpu() @ subspace(seed, name, self.cfg.rank, d_n)
                total = term if total is None else total + term
            if total is not None:
                w = _state_weight(module)
                w.add_((total.T if is_conv1d(module) else total).to(w.device, w.dtype))
                sync_compute(module)
        self.apply_dense(model, delta)

    def export(self, model: nn.Module) -> nn.Module:
        """The model itself, or, where the projected weights have float32 masters, a view of
        it that carries the masters instead of the low-precision copies: the saved model holds
        the state, not its rounding. No tensor is copied (the other weights are shared)."""
        targets = {n: m for n, m in self.targets(model).items() if master(m) is not None}
        if not targets:
            return model
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        for module in targets.values():
            memo[id(master(module))] = master(module)
            memo[id(module.weight)] = nn.Parameter(master(module), requires_grad=False)
        return copy.deepcopy(model, memo)


def _state_weight(module: nn.Module) -> torch.Tensor:
    """The state of a projected module: its weight, or that weight's float32 master."""
    m = master(module)
    return module.weight if m is None else m
