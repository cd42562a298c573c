"""FedKSeed: zeroth-order full-parameter tuning with K fixed candidate seeds (docs/algorithm.md
section 7; Qin et al., arXiv 2312.06353).

theta, tuned zeroth-order (our choice, config fields): the weights of the target Linears
(FedKRSO's matrices), with ``train_biases`` their biases, and with ``train_norms`` the norms.
The task head (``dense_modules``: the classifier and the pooler feeding it) is trained
*first-order* by default (``dense_mode``): a new classification head starts random, and at a
zeroth-order learning rate it never leaves the majority class (measured: 49.3% on SST-2, the
majority share); FedKSeed's paper tunes pretrained LLMs whose output layer needs no such
start. So the head steps with AdamW (``training.optimizer``, ``dense_lr``) on the gradient of
the first of each step's two forward passes, which backpropagates through the head alone
(nothing below it requires a gradient), while the body is perturbed; ``dense_mode:
zeroth-order`` perturbs the head with the body instead.

Client step: pick a candidate k (client RNG of run seed, round, client), two forward passes at
theta +/- eps z_k, g = (L+ - L-) / (2 eps), theta -= lr g z_k; the client keeps the sum of its
g's per candidate and uploads them as ``scalars`` (K,), plus the head's change. The direction
z_k of a tensor is N(0, I) drawn in float32 on a CPU generator seeded by (candidate seed,
tensor name), and drawn again for each of a step's three passes rather than kept (memory over
CPU time, as in MeZO). Both passes run in eval mode (no dropout), so they differ only by the
perturbation.

The K candidates are fixed for the run (``seeds_per_round = False``): they travel once, to a
client that holds no state yet, not in every round. The global model is the base theta moved
by the per-candidate sums of every round's mean scalars, kept in the model as a float64
buffer (``CUMULATIVE``, the method's state with the head). A client behind by several rounds
catches up with one snapshot of that buffer and the head (``snapshot_tensors``): one summed
vector of K values, not a delta per round; it moves theta by the difference of the sums. theta
then equals the server's up to float32 rounding (the order of the additions differs), so the
state fingerprint covers the buffer and the head, which define the model, not theta's bytes.
The zeroth-order lr must stay constant (a replay of sums); defaults from the paper: K=4096,
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
from .base import LocalUpdate, Method, MethodConfig, dense_parameters, forward_loss, train_state_bytes
from .fedavg import linear_parameters

CUMULATIVE = "fedkseed_cumulative"  # model buffer: per-candidate sums of every round's mean scalars


class Config(MethodConfig):
    """FedKSeed's knobs: the run's K candidate seeds, the zeroth-order step and perturbation, and the
    head's first-order lr."""

    name: Literal["fedkseed"] = "fedkseed"
    lr: float = Field(3e-7, gt=0, description="constant zeroth-order learning rate")
    dense_lr: float | None = Field(1e-3, gt=0, description="AdamW lr of the first-order head")
    k: int = Field(4096, ge=1, le=65536, description="K: candidate seeds, fixed for the whole run")
    eps: float = Field(5e-4, gt=0, description="perturbation scale of the two forward passes")
    steps: int = Field(200, ge=1, le=1_000_000, description="zeroth-order steps per round")
    dense_mode: Literal["first-order", "zeroth-order"] = Field(
        "first-order", description="how the head, pooler and norms train: AdamW, or perturbed with the body")

    def local_steps(self) -> int:
        """Zeroth-order steps per client round (one candidate seed and two forward passes each)."""
        return self.steps


def direction(seed: int, name: str, shape: torch.Size) -> torch.Tensor:
    """z ~ N(0, I) for tensor ``name`` under candidate ``seed``, drawn in float32 on the CPU."""
    return torch.randn(shape, generator=cpu_generator("zo", seed, name), dtype=torch.float32)


class FedKSeed(Method):
    name = "fedkseed"
    Config = Config
    cfg: Config
    seeds_per_round = False
    dp_unsupported = (
        "FedKSeed's model update is lr * sum_k g_k z_k over K directions z_k the size of the model: its exact norm "
        "needs the K x K Gram matrix of the directions (K model-sized draws per round) and no cheap bound on the "
        "directions' spectral norm holds with certainty, while a bound on the scalars g alone would give epsilon "
        "another meaning than for every other method")
    dp_sgd_unsupported = (
        "FedKSeed's body steps are zeroth-order (two forward passes per direction, no gradient): DP-SGD's "
        "per-example gradient clip has nothing to clip there; a per-example clip of the projected-gradient "
        "scalars would be another mechanism (not built)")

    @property
    def first_order_dense(self) -> bool:
        """Whether the task head trains first-order (AdamW) and is uploaded densely."""
        return self.cfg.dense_mode == "first-order"

    def head(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The first-order part: the task head (``dense_modules``), unless ``dense_mode`` says
        zeroth-order."""
        if not self.first_order_dense:
            return {}
        return dense_parameters(model, self.cfg.model_copy(update={"train_norms": False}), biases=False)

    def dense(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What trains densely and travels whole: the first-order head."""
        return self.head(model)

    def theta(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The perturbed tensors: target weights (and biases), norms, and the head unless it
        is first-order."""
        theta = linear_parameters(model, self.cfg.target_modules, self.cfg.train_biases)
        head = self.head(model)
        theta.update({n: p for n, p in dense_parameters(model, self.cfg, biases=False).items() if n not in head})
        return theta

    def prepare(self, model: nn.Module) -> None:
        """theta is frozen for autograd (it only changes under no_grad); the head trains."""
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.head(model).values():
            p.requires_grad_(True)
        if not hasattr(model, CUMULATIVE):
            model.register_buffer(CUMULATIVE, torch.zeros(self.cfg.k, dtype=torch.float64), persistent=False)
        self.theta(model)  # fail early on a pattern that selects nothing

    def round_seeds(self, round_id: int) -> list[int]:
        """The K candidates: the same list every round."""
        return [stable_seed("fedkseed-candidate", self.run_seed, i) for i in range(self.cfg.k)]

    def plan_fingerprint(self, model: nn.Module, seeds: list[int]) -> str:
        """Proof of the same directions: z of the smallest perturbed tensor for every seed."""
        name, p = min(self.theta(model).items(), key=lambda item: item[1].numel())
        return fingerprint((f"{s}:{name}", direction(s, name, p.shape)) for s in seeds)

    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The zeroth-order weights, the head and the per-seed cumulative scalars: what a fingerprint
        covers."""
        state: dict[str, torch.Tensor] = dict(self.theta(model))
        state.update(self.head(model))
        state[CUMULATIVE] = getattr(model, CUMULATIVE)
        return state

    def state_fingerprint(self, model: nn.Module) -> str:
        """Over what defines the model: the per-candidate sums and the head (module docstring)."""
        state = dict(self.head(model))
        state[CUMULATIVE] = getattr(model, CUMULATIVE)
        return fingerprint(sorted(state.items()))

    def snapshot_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """One summed vector and the head: what takes a lagging client to the current model."""
        out = {k: v.detach().clone() for k, v in self.head(model).items()}
        out[CUMULATIVE] = getattr(model, CUMULATIVE).clone()
        return out

    def snapshot_spec(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """What a snapshot carries: the head and the K cumulative scalars, from which the weights are
        rebuilt by replay."""
        spec = {k: tuple(v.shape) for k, v in self.head(model).items()}
        spec[CUMULATIVE] = (self.cfg.k,)
        return spec

    @torch.no_grad()
    def load_snapshot(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """theta moves by the difference of the sums; the head and the sums are copied."""
        mine = getattr(model, CUMULATIVE)
        self._move(model, self.round_seeds(0), tensors[CUMULATIVE].double() - mine)
        mine.copy_(tensors[CUMULATIVE])
        params = self.head(model)
        for name, value in tensors.items():
            if name != CUMULATIVE:
                params[name].copy_(value)

    def trainable_count(self, model: nn.Module) -> int:
        """Only the first-order head has gradients; theta moves by zeroth-order steps alone."""
        return sum(p.numel() for p in self.head(model).values())

    def update_spec(self, model: nn.Module, seeds: list[int]) -> dict[str, tuple[int, ...]]:
        """One scalar per candidate seed (``scalars``) and the head's dense changes."""
        spec: dict[str, tuple[int, ...]] = {"scalars": (len(seeds),)}
        spec.update(self.dense_spec(self.head(model)))
        return spec

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0, seeds: list[int] | None = None) -> int:
        """uplink = (K + head) * b: one scalar per candidate seed, plus the head's change."""
        return self.wire_bytes(self.cfg.k + sum(p.numel() for p in self.head(model).values()))

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
        """||lr sum_k g_k z_k|| for z_k ~ N(0, I_D) over theta's D elements (with the
        first-order head's deltas beside it), as
        ``lr sqrt(D) ||g||_2``: exact in expectation of the square (E z_k.z_l = D [k = l]) and
        concentrated around it for a model's D (the cross terms are O(sqrt D) against D), so it
        costs nothing instead of drawing every used direction again."""
        d = sum(p.numel() for p in self.theta(model).values())
        zeroth = self.cfg.lr * math.sqrt(d) * l2_norm([tensors["scalars"]])
        return math.hypot(zeroth, l2_norm(t for n, t in tensors.items() if n != "scalars"))  # + the head's deltas

    @staticmethod
    @torch.no_grad()
    def perturb(theta: dict[str, nn.Parameter], seed: int, scale: float) -> None:
        """Move every weight of ``theta`` by ``scale`` times seed ``seed``'s direction (drawn again,
        never stored)."""
        for name, p in theta.items():
            p.add_(direction(seed, name, p.shape).to(p), alpha=scale)

    def train_round(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, torch.Tensor]],
        round_id: int,
        seeds: list[int],
        client_key: str,
    ) -> LocalUpdate:
        """Zeroth-order steps over ``batches``: per step one of the client's keyed candidate seeds, two
        perturbed forward passes, the projected gradients summed per seed."""
        model.eval()
        theta, head, eps, lr = self.theta(model), self.head(model), self.cfg.eps, self.cfg.lr
        start = {n: p.detach().clone() for n, p in head.items()}
        opt = self.dense_optimizer(head)
        scalars = [0.0] * len(seeds)
        losses: list[float] = []
        peak_state = 0
        choices = self.step_choices(round_id, client_key, len(seeds))
        cumulative = getattr(model, CUMULATIVE)  # kept equal to the sums that moved theta
        for j, k in zip(range(self.cfg.steps), choices):
            batch = next(batches)
            self.perturb(theta, seeds[k], eps)
            with torch.set_grad_enabled(opt is not None):  # the head's gradient, on the + pass
                loss_plus = forward_loss(model, batch)
                if opt is not None:
                    loss_plus.backward()
            plus = loss_plus.item()
            self.perturb(theta, seeds[k], -2 * eps)
            with torch.no_grad():
                minus = forward_loss(model, batch).item()
            g = (plus - minus) / (2 * eps)
            self.perturb(theta, seeds[k], eps - lr * g)  # back to theta, then the step
            if opt is not None:
                self.optim.step([opt], round_id, j)
                peak_state = max(peak_state, train_state_bytes(opt))
                self.optim.zero_grad([opt])
            scalars[k] += g
            cumulative[k] += g
            losses.append((plus + minus) / 2)
        sent = torch.tensor(scalars, dtype=torch.float32)
        tensors = {"scalars": sent}
        tensors.update(self.dense_deltas(head, start))
        return LocalUpdate(
            tensors=tensors,
            loss=sum(losses) / len(losses),
            steps=len(losses),
            seeds_used=[s for s, g in zip(seeds, sent.tolist()) if g != 0.0],  # of the float32 sent
            train_state_bytes=peak_state,
        )

    @torch.no_grad()
    def _move(self, model: nn.Module, seeds: list[int], sums: torch.Tensor) -> None:
        """theta -= lr * sum_k sums_k z_k, summed in float32 on the CPU in candidate order."""
        used = [k for k in range(len(seeds)) if sums[k] != 0]
        for name, p in self.theta(model).items():
            total = torch.zeros(p.shape, dtype=torch.float32)
            for k in used:
                total.add_(direction(seeds[k], name, p.shape), alpha=float(sums[k]))
            p.sub_((total * self.cfg.lr).to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        """theta -= lr * sum_k gbar_k z_k; the sums buffer += gbar; the head += its mean change."""
        if "scalars" in delta:  # absent from the empty delta of a round that failed
            gbar = delta["scalars"].float().cpu()
            self._move(model, seeds, gbar)
            getattr(model, CUMULATIVE).add_(gbar.double())
        self.apply_dense(model, delta)
