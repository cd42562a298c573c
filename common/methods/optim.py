"""The one optimizer setting every method trains with (round.yaml ``training.optimizer``).

Every first-order part of every method (FedKRSO's B and dense-trainables, FedAvg's weights,
LoRA and TT adapters, FedKSeed's head) steps with AdamW under one schedule, so methods differ
only in *what* they train, never in how:

* AdamW with decoupled ``weight_decay`` on matrices; biases and norm weights (1-D tensors) are
  never decayed (the usual transformers practice);
* ``schedule`` over the run's local steps (``rounds.total`` x the method's local steps per
  round): ``warmup`` is the share spent rising linearly from 0, then the learning rate stays
  (``constant``) or decays to 0 (``linear``, ``cosine``). A client in round t at local step j
  is at global step ``t * steps_per_round + j``, so every client of a round uses the same lr;
* ``max_grad_norm`` clips the joint gradient norm of everything a step trains.

The defaults (no decay, constant, no clipping) are plain Adam at the method's lr. FedKSeed's
zeroth-order lr stays constant whatever the schedule: its global model is a replay of per-seed
sums scaled by that lr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class OptimizerConfig(BaseModel):
    """round.yaml's ``training.optimizer``: one setting of AdamW for every method (decay, warmup,
    schedule, clipping)."""

    model_config = ConfigDict(extra="forbid")

    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (matrices only)")
    warmup: float = Field(0.0, ge=0, lt=1, description="share of the run's local steps warming up from lr 0")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="lr after warmup: constant, or decaying to 0 by the run's last step")
    max_grad_norm: float | None = Field(None, gt=0, description="clip the joint gradient norm per step")


class Optimization:
    """AdamW optimizers and the lr schedule of one method in one run."""

    def __init__(self, cfg: OptimizerConfig, steps_per_round: int, total_rounds: int):
        self.cfg = cfg
        self.private = None  # a privacy.dpsgd.SampleDP while a DP-SGD round trains
        self.steps_per_round = steps_per_round
        self.total_steps = max(1, steps_per_round * total_rounds)

    def factor(self, round_id: int, step: int) -> float:
        """The lr multiplier at local step ``step`` of round ``round_id``."""
        t = round_id * self.steps_per_round + step
        warm = int(self.cfg.warmup * self.total_steps)
        if t < warm:
            return (t + 1) / warm
        if self.cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (t - warm) / max(self.total_steps - warm, 1))
        if self.cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def adamw(self, parts: Iterable[tuple[Iterable[nn.Parameter], float]]) -> torch.optim.AdamW | None:
        """One AdamW over ``(parameters, lr)`` parts; matrices decay, 1-D tensors do not."""
        groups = []
        for params, lr in parts:
            params = list(params)
            for decay, members in ((self.cfg.weight_decay, [p for p in params if p.dim() >= 2]),
                                   (0.0, [p for p in params if p.dim() < 2])):
                if members:
                    groups.append({"params": members, "lr": lr, "base_lr": lr, "weight_decay": decay})
        return torch.optim.AdamW(groups) if groups else None

    def step(self, optimizers: Iterable[torch.optim.Optimizer | None], round_id: int, step: int) -> None:
        """Clip (if configured), set the scheduled lr, step every optimizer. Under DP-SGD the
        gradients are first replaced by the privatized ones (per-example clip, noise)."""
        optimizers = [o for o in optimizers if o is not None]
        if self.private is not None:
            self.private.privatize([p for o in optimizers for g in o.param_groups for p in g["params"]])
        elif self.cfg.max_grad_norm is not None:
            params = [p for o in optimizers for g in o.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        factor = self.factor(round_id, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            opt.step()

    @staticmethod
    def zero_grad(optimizers: Iterable[torch.optim.Optimizer | None]) -> None:
        """Zero (set to None) the gradients of every optimizer given; None entries are skipped."""
        for opt in optimizers:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
