"""Registry of federated methods: one module (or package) per method, all of the same shape (see base)."""

from __future__ import annotations

from .base import LocalUpdate, Method, MethodConfig
from .optim import OptimizerConfig
from .fedavg import FedAvg
from .fedit import FedIT
from .fedkrso import FedKRSO
from .fedkseed import FedKSeed
from .fedtt import FedTT, FedTTPlus
from .ffa_lora import FFALoRA

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a ``Method`` class to the registry under its ``name`` (round.yaml's ``method.name``)."""
    METHODS[cls.name] = cls
    return cls


for _cls in (FedKRSO, FedAvg, FedIT, FFALoRA, FedKSeed, FedTT, FedTTPlus):
    register(_cls)


def get_method(name: str) -> type[Method]:
    """The registered ``Method`` class named ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; one of {sorted(METHODS)}") from None


def build_method(cfg: MethodConfig, run_seed: int, optimizer: OptimizerConfig | None = None,
                 total_rounds: int = 1) -> Method:
    """The method of ``cfg``, training with ``optimizer`` over a run of ``total_rounds`` (the
    schedule's length); ``RunConfig.build_method()`` passes a round.yaml's."""
    return get_method(cfg.name)(cfg, run_seed, optimizer, total_rounds)


__all__ = ["METHODS", "LocalUpdate", "Method", "MethodConfig", "OptimizerConfig", "build_method", "get_method",
           "register"]
