"""FedKRSO's knobs (round.yaml's ``method`` section with ``name: fedkrso``); the documentation
build lists each with its description."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import MethodConfig


class Config(MethodConfig):
    """FedKRSO's knobs: K seeds a round, the subspace rank r, I intervals of J steps (one seed each),
    and AdamW's lr of B."""

    name: Literal["fedkrso"] = "fedkrso"
    k: int = Field(4, ge=1, le=4096, description="K: seeds (subspaces) handed out per round")
    rank: int = Field(8, ge=1, le=4096, description="r: rows of each subspace P")
    intervals: int = Field(2, ge=1, le=4096, description="I: intervals per round, one seed each")
    interval_steps: int = Field(8, ge=1, le=100_000, description="J: optimizer steps per interval")

    def local_steps(self) -> int:
        """Optimizer steps per client round: I x J."""
        return self.intervals * self.interval_steps
