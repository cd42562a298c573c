"""FFA-LoRA: LoRA with A frozen at its seeded random init; only B and the dense-trainables
are trained and sent (ALGORITHM.md section 7).

With A identical on every party and never changing, averaging B is exact:
mean(B) A = mean(B A), so FedIT's aggregation discordance disappears and the upload halves
(about). Injection, the seeded A and ``export`` are FedIT's (see ``fedit``); the alpha / r
scaling is kept at FedIT's default rather than the paper's larger one, so the two compare
at equal settings.
"""

from __future__ import annotations

from typing import Literal

from .fedit import Config as FedITConfig
from .fedit import FedIT


class Config(FedITConfig):
    name: Literal["ffa-lora"] = "ffa-lora"


class FFALoRA(FedIT):
    name = "ffa-lora"
    Config = Config
    cfg: Config
    train_a = False
