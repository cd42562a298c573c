"""FedKSeed: zeroth-order full-parameter tuning with K fixed candidate seeds (ALGORITHM.md
section 7; Qin et al., arXiv 2312.06353).

theta (our choice, config fields): the weights and biases of the target Linears (FedKRSO's
matrices) and, with ``zo_dense`` (default), the dense-trainables (head, norms), which are then
tuned zeroth-order like the rest rather than by Adam: nothing is ever backpropagated, no
gradient or optimizer state exists, and the upload is K scalars whatever the model size.
Embeddings stay frozen, as for every method here.

Client step: pick a candidate k (client RNG of run seed, round, client), two forward passes at
theta +/- eps z_k, g = (L+ - L-) / (2 eps), theta -= lr g z_k; the client keeps the sum of its
g's per candidate and uploads them as ``scalars`` (K,). The direction z_k of a tensor is
N(0, I) drawn in float32 on a CPU generator seeded by (candidate seed, tensor name), and drawn
again for each of a step's three passes rather than kept (memory over CPU time, as in MeZO).
Both passes run in eval mode (no dropout), so they differ only by the perturbation.

Server and clients replay theta -= lr * sum_k gbar_k z_k (CPU float32, candidate order) for
every k with gbar_k != 0, which needs a constant lr. Defaults are the paper's: K=4096,
eps=5e-4, lr 3e-7, 200 local steps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..subspace import cpu_generator, fingerprint, stable_seed
from ..tensors import l2_norm
from .base import LocalUpdate, Method, MethodConfig, forward_loss
from .fedavg import linear_parameters


class Config(MethodConfig):
    name: Literal["fedkseed"] = "fedkseed"
    lr: float = Field(3e-7, gt=0, description="constant zeroth-order learning rate")
    k: int = Field(4096, ge=1, le=65536, description="K: candidate seeds, fixed for the whole run")
    eps: float = Field(5e-4, gt=0, description="perturbation scale of the two forward passes")
    steps: int = Field(200, ge=1, le=1_000_000, description="zeroth-order steps per round")
    train_biases: bool = Field(True, description="perturb the target Linears' biases too")
    zo_dense: bool = Field(True, description="tune the dense-trainables zeroth-order too")

    def local_steps(self) -> int:
        return self.steps


def direction(seed: int, name: str, shape: torch.Size) -> torch.Tensor:
    """z ~ N(0, I) for tensor ``name`` under candidate ``seed``, drawn in float32 on the CPU."""
    return torch.randn(shape, generator=cpu_generator("zo", seed, name), dtype=torch.float32)


class FedKSeed(Method):
    name = "fedkseed"
    Config = Config
    cfg: Config

    def theta(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The perturbed tensors, in model order."""
        theta = linear_parameters(model, self.cfg.target_modules, self.cfg.train_biases)
        if self.cfg.zo_dense:
            theta.update(self.dense(model))
        return theta

    def prepare(self, model: nn.Module) -> None:
        """Everything frozen for autograd: theta only ever changes under no_grad."""
        for p in model.parameters():
            p.requires_grad_(False)
        self.theta(model)  # fail early on a pattern that selects nothing

    def round_seeds(self, round_id: int) -> list[int]:
        """The K candidates: the same list every round."""
        return [stable_seed("fedkseed-candidate", self.run_seed, i) for i in range(self.cfg.k)]

    def plan_fingerprint(self, model: nn.Module, seeds: list[int]) -> str:
        """Proof of the same directions: z of the smallest perturbed tensor for every seed."""
        name, p = min(self.theta(model).items(), key=lambda item: item[1].numel())
        return fingerprint((f"{s}:{name}", direction(s, name, p.shape)) for s in seeds)

    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return dict(self.theta(model))

    def trainable_count(self, model: nn.Module) -> int:
        """Nothing is trained with gradients: theta moves by zeroth-order steps alone."""
        return 0

    def update_spec(self, model: nn.Module, seeds: list[int]) -> dict[str, tuple[int, ...]]:
        return {"scalars": (len(seeds),)}

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0) -> int:
        """uplink = K * b: one scalar per candidate seed, whatever the model."""
        return self.wire_bytes(self.cfg.k)

    def step_choices(self, round_id: int, client_key: str, k: int) -> Iterator[int]:
        """Candidate index per step: uniform, from a client RNG of (run seed, round, client)."""
        rng = random.Random(stable_seed("fedkseed-steps", self.run_seed, round_id, client_key))
        while True:
            yield rng.randrange(k)

    def drawn_candidates(self, round_id: int, client_key: str, k: int) -> set[int]:
        """The candidate indices a client's ``steps`` steps draw in round ``round_id``."""
        choices = self.step_choices(round_id, client_key, k)
        return {next(choices) for _ in range(self.cfg.steps)}

    def keyed_update_problem(self, model: nn.Module, seeds: list[int], round_id: int, client_key: str,
                             tensors: dict[str, torch.Tensor], seeds_used: list[int]) -> str | None:
        """Non-zero scalars only for candidates the client's steps drew; ``seeds_used`` the
        seeds of the non-zero scalars, in candidate order."""
        scalars = tensors["scalars"]
        nonzero = [int(i) for i in torch.nonzero(scalars).flatten()]
        drawn = self.drawn_candidates(round_id, client_key, len(seeds))
        stray = [k for k in nonzero if k not in drawn]
        if stray:
            return (f"non-zero scalar for candidate {stray[0]}, which client {client_key!r} did not draw in "
                    f"round {round_id}")
        if list(seeds_used) != [seeds[k] for k in nonzero]:
            return "seeds_used does not list the seeds of the non-zero scalars"
        return None

    def update_norm(self, model: nn.Module, seeds: list[int], tensors: dict[str, torch.Tensor]) -> float:
        """||lr sum_k g_k z_k|| for z_k ~ N(0, I_D) over theta's D elements, as
        ``lr sqrt(D) ||g||_2``: exact in expectation of the square (E z_k.z_l = D [k = l]) and
        concentrated around it for a model's D (the cross terms are O(sqrt D) against D), so it
        costs nothing instead of drawing every used direction again."""
        d = sum(p.numel() for p in self.theta(model).values())
        return self.cfg.lr * math.sqrt(d) * l2_norm([tensors["scalars"]])

    @staticmethod
    def perturb(theta: dict[str, nn.Parameter], seed: int, scale: float) -> None:
        for name, p in theta.items():
            p.add_(direction(seed, name, p.shape).to(p), alpha=scale)

    @torch.no_grad()
    def train_round(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, torch.Tensor]],
        round_id: int,
        seeds: list[int],
        client_key: str,
    ) -> LocalUpdate:
        model.eval()
        theta, eps, lr = self.theta(model), self.cfg.eps, self.cfg.lr
        scalars = [0.0] * len(seeds)
        losses: list[float] = []
        choices = self.step_choices(round_id, client_key, len(seeds))
        for _, k in zip(range(self.cfg.steps), choices):
            batch = next(batches)
            self.perturb(theta, seeds[k], eps)
            plus = forward_loss(model, batch).item()
            self.perturb(theta, seeds[k], -2 * eps)
            minus = forward_loss(model, batch).item()
            g = (plus - minus) / (2 * eps)
            self.perturb(theta, seeds[k], eps - lr * g)  # back to theta, then the step
            scalars[k] += g
            losses.append((plus + minus) / 2)
        sent = torch.tensor(scalars, dtype=torch.float32)
        return LocalUpdate(
            tensors={"scalars": sent},
            loss=sum(losses) / len(losses),
            steps=len(losses),
            seeds_used=[s for s, g in zip(seeds, sent.tolist()) if g != 0.0],  # of the float32 sent
        )

    @torch.no_grad()
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        """theta -= lr * sum_k gbar_k z_k, summed in float32 on the CPU in candidate order."""
        gbar = delta["scalars"].float().cpu()
        used = [k for k in range(len(seeds)) if gbar[k] != 0]
        for name, p in self.theta(model).items():
            total = torch.zeros(p.shape, dtype=torch.float32)
            for k in used:
                total.add_(direction(seeds[k], name, p.shape), alpha=gbar[k].item())
            p.sub_((total * self.cfg.lr).to(device=p.device, dtype=p.dtype))
