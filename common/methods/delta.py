"""Methods whose upload is the change of the parameters they train with AdamW (``DeltaMethod``):
FedAvg, FedIT, FFA-LoRA, FedTT and FedTT+. Each says which parameters it trains
(``trainable``); the round, the upload (``delta.<param>`` plus the dense deltas) and ``apply``
are here, once, so the server's aggregation is plain FedAvg on exactly those tensors."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

from .base import LocalUpdate, Method, forward_loss, train_state_bytes


class DeltaMethod(Method):
    """A method whose upload is the change of the parameters it trains with Adam: FedAvg (the
    weights themselves), FedIT and FFA-LoRA (LoRA factors), FedTT (tensor-train cores).

    A client uploads ``delta.<param>`` = trained - start for every parameter of
    ``trainable(model)``, plus the dense deltas; ``apply`` adds the weighted-mean delta, so the
    server's aggregation is plain FedAvg on exactly those tensors. One Adam state covers the
    round, with ``lr`` for the method's own parameters and ``dense_lr`` for the dense ones."""

    @abstractmethod
    def trainable(self, model: nn.Module, seeds: list[int] | None = None) -> dict[str, nn.Parameter]:
        """The method's own parameters trained in a round with ``seeds``, or with ``None`` every
        one it may train in some round (dense-trainables are added apart); ``seeds`` matter only
        where a round's plan picks the parameters (FedTT+)."""

    def own(self, model: nn.Module, seeds: list[int] | None = None) -> dict[str, nn.Parameter]:
        """``trainable`` minus any parameter a dense pattern also claims (sent once, as dense)."""
        dense = self.dense(model)
        return {n: p for n, p in self.trainable(model, seeds).items() if n not in dense}

    def every_own(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Every parameter the method may train in some round (its whole changing state)."""
        return self.own(model, None)

    def prepare(self, model: nn.Module) -> None:
        """Mark every parameter the method may train as requiring gradients."""
        super().prepare(model)
        for p in self.every_own(model).values():
            p.requires_grad_(True)

    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter the method may train, its own and the dense ones: the state a fingerprint
        covers and a snapshot carries."""
        state: dict[str, torch.Tensor] = dict(self.every_own(model))
        state.update(self.dense(model))
        return state

    def trainable_count(self, model: nn.Module) -> int:
        """Elements trained in a round (round 0's plan): the method's own parameters and the dense ones."""
        return sum(p.numel() for p in (self.own(model, self.round_seeds(0)) | self.dense(model)).values())

    def update_spec(self, model: nn.Module, seeds: list[int]) -> dict[str, tuple[int, ...]]:
        """``delta.<name>`` for each own parameter the round's plan trains, and ``dense.<name>`` for
        each dense one."""
        spec = {f"delta.{n}": tuple(p.shape) for n, p in self.own(model, seeds).items()}
        spec.update(self.dense_spec(self.dense(model)))
        return spec

    def train_round(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, torch.Tensor]],
        round_id: int,
        seeds: list[int],
        client_key: str,
    ) -> LocalUpdate:
        """Train the round's parameters with AdamW on ``batches`` and return the change of each
        (``delta.*``, ``dense.*``)."""
        model.train()
        own, dense = self.own(model, seeds), self.dense(model)
        for name, p in self.every_own(model).items():
            p.requires_grad_(name in own)  # a round's plan may leave some of them out
        start = self.start_values(own | dense)
        opt = self.optim.adamw([(own.values(), self.cfg.lr), (dense.values(), self.cfg.dense_lr or self.cfg.lr)])
        losses: list[float] = []
        peak_state = 0
        for j in range(self.cfg.local_steps()):
            loss = forward_loss(model, next(batches))
            loss.backward()
            self.optim.step([opt], round_id, j)
            peak_state = max(peak_state, train_state_bytes(opt))
            self.optim.zero_grad([opt])
            losses.append(loss.item())
        tensors = self.deltas(own, start, "delta.")
        tensors.update(self.dense_deltas(dense, start))
        return LocalUpdate(tensors=tensors, loss=sum(losses) / len(losses), steps=len(losses),
                           train_state_bytes=peak_state)

    @torch.no_grad()
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        """p += mean delta for every sent parameter (a plain add: same bytes, same result)."""
        params = dict(model.named_parameters())
        for key, d in delta.items():
            if key.startswith("delta."):
                p = params[key[len("delta."):]]
                p.add_(d.to(device=p.device, dtype=p.dtype))
        self.apply_dense(model, delta)
