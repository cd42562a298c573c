"""FedAvg-FFT: full fine-tuning with Adam, the quality and byte ceiling (docs/algorithm.md section 7).

Trainable set (our choice, each part a config field): full fine-tuning means every weight,
so by default the weights of every Linear the target patterns select (the same matrices
FedKRSO projects), every embedding table (``train_embeddings``; a tied LM head is the same
tensor and travels once) and the dense-trainables: task head, norms and the target Linears'
biases (``train_biases``, the same knob and default as every method's). With
``train_embeddings: false`` FedAvg trains exactly the parameters FedKRSO can reach, the
like-for-like comparison of the same matrices.

A client takes ``steps`` Adam steps and uploads the change of every trained tensor
(``delta.<param>`` and ``dense.<param>``); the server averages them and every party adds the
mean, which is FedAvg on weights expressed as deltas. Default lr 3e-5, the usual full
fine-tuning rate; the benchmarks sweep it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from .base import MethodConfig, out_in, target_linears
from .delta import DeltaMethod


class Config(MethodConfig):
    """FedAvg's knobs: full fine-tuning of every linear weight (and, by default, the embeddings) with Adam."""

    name: Literal["fedavg"] = "fedavg"
    lr: float = Field(3e-5, gt=0, description="Adam learning rate of every trained weight")
    steps: int = Field(16, ge=1, le=100_000, description="local Adam steps per round")
    train_embeddings: bool = Field(True, description="train (and send) every nn.Embedding table: "
                                   "full fine-tuning; false = only what FedKRSO can reach")

    def local_steps(self) -> int:
        """Adam steps per client round."""
        return self.steps


def linear_parameters(
    model: nn.Module, patterns: list[str], biases: bool
) -> dict[str, nn.Parameter]:
    """Weights (and biases if asked) of the Linear-like modules selected by ``patterns``."""
    targets = target_linears(model, patterns)
    if not targets:
        raise ValueError(f"no Linear module matches target_modules={patterns}")
    out: dict[str, nn.Parameter] = {}
    for name, module in targets.items():
        out[f"{name}.weight"] = module.weight
        if biases and module.bias is not None:
            out[f"{name}.bias"] = module.bias
    return out


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of every ``nn.Embedding`` (token, position, segment tables), by parameter name."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


class FedAvg(DeltaMethod):
    name = "fedavg"
    Config = Config
    cfg: Config

    def trainable(self, model: nn.Module, seeds: list[int] | None = None) -> dict[str, nn.Parameter]:
        """Every targeted linear weight, and every embedding table when ``train_embeddings`` (biases
        are dense)."""
        params = linear_parameters(model, self.cfg.target_modules, biases=False)  # biases are dense
        if self.cfg.train_embeddings:
            params.update(embedding_parameters(model))
        return params

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0) -> int:
        """uplink = (sum_m d_m d_n + sum_e V_e h_e [embeddings] + dense [head, norms, biases]) * b:
        the trained weights' size."""
        numel = 0
        dense = self.dense(model)
        for name, module in target_linears(model, self.cfg.target_modules).items():
            d_m, d_n = out_in(module)
            if f"{name}.weight" not in dense:
                numel += d_m * d_n
        if self.cfg.train_embeddings:
            numel += sum(p.numel() for n, p in embedding_parameters(model).items() if n not in dense)
        numel += sum(p.numel() for p in dense.values())
        return self.wire_bytes(numel)
