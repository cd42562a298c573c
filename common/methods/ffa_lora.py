"""FFA-LoRA: LoRA with A frozen at its seeded random init; only B and the dense-trainables
are trained and sent (docs/algorithm.md section 7).

With A identical on every party and never changing, averaging B is exact:
mean(B) A = mean(B A), so FedIT's aggregation discordance disappears and the upload halves
(about). Injection, the seeded A and ``export`` are FedIT's (see ``fedit``); the alpha / r
scaling is kept at FedIT's default rather than the paper's larger one, so the two compare
at equal settings.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from ..privacy.geometry import RightFactor, UpdateGeometry
from .fedit import ADAPTER, FedIT, lora_layers
from .fedit import Config as FedITConfig


class Config(FedITConfig):
    """FFA-LoRA's knobs: FedIT's, under its own name."""

    name: Literal["ffa-lora"] = "ffa-lora"


class FFALoRA(FedIT):
    name = "ffa-lora"
    Config = Config
    cfg: Config
    train_a = False

    def update_geometry(self, model: nn.Module, seeds: list[int]) -> UpdateGeometry:
        """Exact: B's change dB moves the merged weight by (alpha / r) dB A, with A frozen and
        the same on every party (``privacy.geometry``, right factors)."""
        spec = self.update_spec(model, seeds)
        scale = self.cfg.alpha / self.cfg.rank
        factors = []
        for name, layer in lora_layers(model).items():
            key = f"delta.{name}.lora_B.{ADAPTER}.weight"
            if key in spec:
                a = layer.lora_A[ADAPTER].weight.detach().float().cpu()
                factors.append(RightFactor([key], [self.cfg.rank], scale * a))
        return UpdateGeometry(spec, factors)
