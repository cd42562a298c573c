"""FedKRSO: federated K-seed random subspace optimization (ALGORITHM.md sections 2 to 5).

Each projected matrix W (d_m x d_n, nn.Linear convention) is trained as W + B P, where P
(r x d_n) is rebuilt from a seed and B (d_m x r) is the only trainable part. The layer never
forms W + B P nor a full-size gradient: a forward hook adds ``(x P^T) B^T`` to the frozen
layer's output, so autograd keeps the r-column ``x P^T`` for B's gradient and
``grad_B = grad_W P^T`` comes out of the chain rule without grad_W ever existing.

Choices the paper leaves open (each a config field): K fresh seeds per round; a seed drawn
uniformly per interval from a client RNG keyed by (run seed, round, client); B and its Adam
state reset every interval; the dense-trainables keep one Adam state for the whole round.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..subspace import round_seeds, stable_seed, subspace, subspace_fingerprint
from .base import LocalUpdate, Method, MethodConfig, forward_loss, out_in, target_linears


class Config(MethodConfig):
    name: Literal["fedkrso"] = "fedkrso"
    k: int = Field(4, ge=1, le=4096, description="K: seeds (subspaces) handed out per round")
    rank: int = Field(8, ge=1, description="r: rows of each subspace P")
    intervals: int = Field(2, ge=1, description="I: intervals per round, one seed each")
    interval_steps: int = Field(8, ge=1, description="J: optimizer steps per interval")

    def local_steps(self) -> int:
        return self.intervals * self.interval_steps


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


class SubspaceAdapter:
    """Trainable B (d_m x r) in a fixed subspace P for each target module, via forward hooks.

    ``start(seed)`` draws P for every target and zeroes B; ``merge()`` folds ``B P`` into the
    frozen weight in place and returns the B's; ``close()`` removes the hooks."""

    def __init__(self, targets: dict[str, nn.Module], rank: int):
        self.targets = targets
        self.rank = rank
        self.p: dict[str, torch.Tensor] = {}
        self.b: dict[str, nn.Parameter] = {}
        self._hooks = [m.register_forward_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            if name not in self.b:
                return output
            xp = F.linear(inputs[0], self.p[name])  # x P^T: (..., r), all autograd keeps for B
            return output + F.linear(xp, self.b[name].to(xp.dtype))

        return hook

    def start(self, seed: int) -> list[nn.Parameter]:
        for name, module in self.targets.items():
            d_m, d_n = out_in(module)
            w = module.weight
            self.p[name] = subspace(seed, name, self.rank, d_n, device=w.device, dtype=w.dtype)
            self.b[name] = nn.Parameter(torch.zeros(d_m, self.rank, device=w.device))
        return list(self.b.values())

    @torch.no_grad()
    def merge(self) -> dict[str, torch.Tensor]:
        """W += B P for every target; returns the B's (float32) and deactivates them."""
        out = {}
        for name, module in self.targets.items():
            b = self.b.pop(name).detach()
            delta = b.to(self.p[name].dtype) @ self.p.pop(name)
            module.weight.add_(delta.T if _is_conv1d(module) else delta)
            out[name] = b.float()
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class FedKRSO(Method):
    name = "fedkrso"
    Config = Config
    cfg: Config

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        found = target_linears(model, self.cfg.target_modules)
        if not found:
            raise ValueError(f"no Linear module matches target_modules={self.cfg.target_modules}")
        return found

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.targets(model)  # fail early on a pattern that selects nothing

    def round_seeds(self, round_id: int) -> list[int]:
        return round_seeds(self.run_seed, round_id, self.cfg.k)

    def plan_fingerprint(self, model: nn.Module, seeds: list[int]) -> str:
        shapes = {n: out_in(m) for n, m in self.targets(model).items()}
        return subspace_fingerprint(seeds, shapes, self.cfg.rank)

    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {f"{n}.weight": m.weight for n, m in self.targets(model).items()}
        state.update(self.dense(model))
        return state

    def update_spec(self, model: nn.Module, seeds: list[int]) -> dict[str, tuple[int, ...]]:
        spec: dict[str, tuple[int, ...]] = {}
        for k in range(len(seeds)):
            for n, m in self.targets(model).items():
                spec[f"acc.{k}.{n}"] = (out_in(m)[0], self.cfg.rank)
        spec.update(self.dense_spec(self.dense(model)))
        return spec

    def required_names(self, model: nn.Module, seeds: list[int]) -> set[str]:
        """Dense deltas always; accumulators only for the seeds a client drew."""
        return set(self.dense_spec(self.dense(model)))

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0) -> int:
        """uplink = K_used * r * sum_m d_m * b + dense * b (ALGORITHM.md section 6)."""
        sum_dm = sum(out_in(m)[0] for m in self.targets(model).values())
        dense = sum(p.numel() for p in self.dense(model).values())
        return self.wire_bytes(n_seeds_used * self.cfg.rank * sum_dm + dense)

    def seed_choices(self, round_id: int, client_key: str) -> list[int]:
        """Seed index per interval: uniform, from a client RNG of (run seed, round, client)."""
        rng = random.Random(stable_seed("intervals", self.run_seed, round_id, client_key))
        return [rng.randrange(self.cfg.k) for _ in range(self.cfg.intervals)]

    def train_round(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, torch.Tensor]],
        round_id: int,
        seeds: list[int],
        client_key: str,
    ) -> LocalUpdate:
        model.train()
        dense = self.dense(model)
        dense_start = {n: p.detach().clone() for n, p in dense.items()}
        dense_opt = self.dense_optimizer(dense)
        adapter = SubspaceAdapter(self.targets(model), self.cfg.rank)
        acc: dict[str, torch.Tensor] = {}
        losses: list[float] = []
        try:
            for k in self.seed_choices(round_id, client_key):
                b_opt = torch.optim.Adam(adapter.start(seeds[k]), lr=self.cfg.lr)
                for _ in range(self.cfg.interval_steps):
                    loss = forward_loss(model, next(batches))
                    loss.backward()
                    b_opt.step()
                    b_opt.zero_grad(set_to_none=True)
                    if dense_opt:
                        dense_opt.step()
                        dense_opt.zero_grad(set_to_none=True)
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
        )

    @torch.no_grad()
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        """W += sum_k Abar_k P_k, summed in float32 on the CPU in seed order, so every party
        that applies the same Abar bytes reaches the same W bytes."""
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
                w = module.weight
                w.add_((total.T if _is_conv1d(module) else total).to(w.device, w.dtype))
        self.apply_dense(model, delta)
