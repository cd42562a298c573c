"""FedTT's and FedTT+'s knobs (round.yaml's ``method`` section with ``name: fedtt`` or
``fedtt+``); the documentation build lists each with its description."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import MethodConfig

DEFAULT_ADAPTER_MODULES = [
    r"\.attention\.output\.dense$",  # BERT/RoBERTa attention output
    r"\.(layer|layers)\.\d+\.output\.dense$",  # BERT/RoBERTa feed-forward output
    r"\.attn\.c_proj$",  # GPT-2 attention output
    r"\.mlp\.c_proj$",  # GPT-2 feed-forward output
    r"\.self_attn\.o_proj$",  # LLaMA/Mistral/Qwen attention output
    r"\.mlp\.down_proj$",  # LLaMA/Mistral/Qwen feed-forward output
]


class Config(MethodConfig):
    """FedTT's knobs: where the adapters go, their bottleneck, the TT shape and ranks, and the Adam
    setting of the cores."""

    name: Literal["fedtt"] = "fedtt"
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the TT cores")
    steps: int = Field(16, ge=1, le=100_000, description="local Adam steps per round")
    adapter_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ADAPTER_MODULES),
        description="regexes over module names: adapters go after these modules' outputs",
    )
    bottleneck: int = Field(64, ge=1, le=65536, description="m: adapter width (h -> m -> h)")
    tt_rank: int = Field(5, ge=1, le=1024, description="TT rank between consecutive cores")
    cores: int = Field(3, ge=2, le=16, description="cores per TT matrix (factors of h and of m)")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="act in y + U act(D y)")

    def local_steps(self) -> int:
        """Adam steps per client round."""
        return self.steps


class PlusConfig(Config):
    """FedTT+'s knobs: FedTT's and the rule that freezes cores (``freeze_rule``, ``freeze``)."""

    name: Literal["fedtt+"] = "fedtt+"
    freeze_rule: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive: freeze slow-moving core indices round by round; fixed: `freeze`")
    freeze: list[int] = Field(
        default_factory=lambda: [0, -1],
        description="fixed rule: core indices frozen in both TT matrices of each adapter (negative: from end)",
    )
    freeze_ratio: float = Field(0.25, gt=0, lt=1, description="adaptive: freeze the slowest core index when "
                                "its relative change is below this share of the fastest one's")
    max_frozen: int | None = Field(None, ge=0, description="adaptive: at most this many frozen core "
                                   "indices (default: all but one)")

    @model_validator(mode="after")
    def _some_core_trains(self) -> PlusConfig:
        if any(not -self.cores <= i < self.cores for i in self.freeze):
            raise ValueError(f"freeze indices must lie in [-{self.cores}, {self.cores})")
        if len({i % self.cores for i in self.freeze}) == self.cores:
            raise ValueError("freeze leaves no core trainable")
        if self.max_frozen is not None and self.max_frozen >= self.cores:
            raise ValueError(f"max_frozen must leave a core trainable (< {self.cores})")
        return self
