"""One row per registered method: the small settings every table-driven test runs it with.

PEFT's flat table of test cases. A row's ``small`` is the method at a tiny size (a round takes
a fraction of a second on conftest's tiny models; the defaults are for real models), its
``learn`` the overrides under which a few rounds on one fixed batch lower a tiny random model's
loss (larger learning rates than the defaults). tests/test_methods.py checks that the table
covers the registry, so a new method is one row here; tests/test_methods.py,
test_precision.py, test_export.py and the privacy tests all read it.

Not here, on purpose: tests/test_golden.py's settings (its recorded fingerprints were made with
them, so they never move; the simulator is compared with the same job there) and bench/'s (real
model sizes, chosen per experiment).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    small: dict  # knobs that keep a round to a fraction of a second on a tiny model
    learn: dict  # overrides of ``small`` under which three rounds on one batch lower its loss


CASES: dict[str, Case] = {
    # k = 3 seeds drawn twice (intervals): clients draw different seeds, so keyed choices are tested
    "fedkrso": Case({"k": 3, "rank": 2, "intervals": 2, "interval_steps": 2}, {"lr": 3e-2}),
    "fedavg": Case({"steps": 3}, {"lr": 3e-3}),
    "fedit": Case({"steps": 3, "rank": 4}, {"lr": 3e-2, "train_biases": False}),
    "ffa-lora": Case({"steps": 3, "rank": 4}, {"lr": 3e-2, "train_biases": False}),
    # each zeroth-order step moves theta by -lr g z with g ~ grad.z, so for a small enough lr
    # every step lowers the loss on the batch it was taken on (dL ~ -lr g^2); with dropout off
    # and fixed seeds the trajectory is deterministic, so the weak check is not flaky
    "fedkseed": Case({"k": 32, "steps": 6, "lr": 1e-3}, {"lr": 1e-3, "steps": 40}),
    "fedtt": Case({"steps": 3, "bottleneck": 8, "tt_rank": 3}, {"lr": 3e-2}),
    "fedtt+": Case({"steps": 3, "bottleneck": 8, "tt_rank": 3}, {"lr": 3e-2}),
}


def small(name: str, **overrides) -> dict:
    """round.yaml's ``method`` section for ``name`` at its small settings, plus ``overrides``."""
    return {"name": name, **CASES[name].small, **overrides}

