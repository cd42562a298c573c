"""Which modules of a transformers model a method adapts: linear-like layers (nn.Linear and
GPT-2's transposed Conv1D), norms, and selection by module-name patterns."""

from __future__ import annotations

import re

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed (in x out)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (LayerNorm or RMSNorm, by type or class name)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or "LayerNorm" in name or "RMSNorm" in name


def out_in(module: nn.Module) -> tuple[int, int]:
    """(d_m, d_n) of a linear-like module in nn.Linear convention (out x in)."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_conv1d(module) else tuple(w.shape)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def target_linears(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """Linear-like modules whose names match ``patterns``, in model order."""
    return {n: m for n, m in model.named_modules() if is_linear(m) and _matches(n, patterns)}
