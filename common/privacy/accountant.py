"""Epsilon of a run's client-level DP, and of its sample-level DP-SGD (``sample_epsilon``),
from Google's ``dp-accounting`` (RDP accountant).

The mechanism of one round (``privacy.dp``, docs/PRIVACY.md): the sum of the clipped model
updates of the round's clients plus Gaussian noise of std z * C per coordinate, divided by a
fixed denominator. Neighbouring runs differ in one client's data *replaced* by anything else
(the number of clients is public, as it is in a federation), so the released sum moves by at
most 2C: the accountant's noise multiplier is z / 2.

Client selection is a fixed-size sample without replacement (``ClientRegistry.select``):
``m`` of the ``n`` clients the round drew from (live ones that asked for work: the pool
``select`` samples, not every live client, which would overstate the population). With ``amplification`` the selection draws from secret
randomness and each round is ``SampledWithoutReplacementDpEvent(n, m, Gaussian(z / 2))``
(Wang, Balle, Kasiviswanathan 2019, Theorem 27, which the library implements for exactly
this adjacency); without it a round is ``Gaussian(z / 2)`` for a client that took part
(q = 1), which holds whoever is selected and however. Local mode: the server sees each
client's own noisy update, so there is no sampling credit; a client's epsilon composes
``Gaussian(z / 2)`` once per round it took part in, and the run reports the client that took
part most.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024]
# sample-level: the library's series for fractional orders of a Poisson-subsampled Gaussian
# stops converging at large sampling rates (a client with few rows), so integer orders only
INTEGER_ORDERS = list(range(2, 64)) + [80, 128, 256, 512, 1024]
REPLACE_FACTOR = 2.0  # sensitivity of the sum under replacement of one client's data, in units of C


def _dpa():
    import dp_accounting  # ~2 s to import: only where DP is on

    return dp_accounting


def round_event(noise_multiplier: float, sampled: int, population: int):
    """The DpEvent of one round: ``sampled`` of ``population`` clients, or q = 1."""
    dpa = _dpa()
    gauss = dpa.GaussianDpEvent(noise_multiplier / REPLACE_FACTOR)
    if 0 < sampled < population:
        return dpa.SampledWithoutReplacementDpEvent(population, sampled, gauss)
    return gauss


def repeated(event, count: int):
    """``event`` composed ``count`` times."""
    return _dpa().SelfComposedDpEvent(event, count)


def epsilon(events: list, delta: float) -> float:
    """Epsilon of the composition of ``events`` at ``delta`` (0 for no event)."""
    if not events:
        return 0.0
    dpa = _dpa()
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    acc = rdp.RdpAccountant(ORDERS, dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def calibrate(target_epsilon: float, delta: float, rounds: int, sampled: int, population: int) -> float:
    """The smallest noise multiplier z for which ``rounds`` rounds of ``sampled`` of
    ``population`` clients end at most at ``target_epsilon``."""
    dpa = _dpa()
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    def fresh():
        return rdp.RdpAccountant(ORDERS, dpa.NeighboringRelation.REPLACE_ONE)

    def event(z: float):
        return dpa.SelfComposedDpEvent(round_event(z, sampled, population), rounds)

    return float(dpa.calibrate_dp_mechanism(fresh, event, target_epsilon, delta,
                                            dpa.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))


def sample_epsilon(rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """Sample-level epsilon of DP-SGD (``privacy.dpsgd``): ``steps`` Poisson-sampled Gaussian
    steps at rate ``rate`` with noise multiplier ``noise_multiplier`` (std over the clip), under
    add-or-remove-one-example adjacency (the relation Poisson sampling's analysis holds for)."""
    return composed_sample_epsilon(((rate, noise_multiplier, steps),), delta)


def composed_sample_epsilon(runs: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Sample-level epsilon of a ledger of DP-SGD releases: each (rate, noise multiplier,
    steps) ``steps`` Poisson-sampled Gaussian steps, all of them composed (rounds of one
    client may differ in rate: its row count changed, or another run used the same data)."""
    totals = Counter()
    for rate, sigma, steps in runs:
        if steps > 0:
            totals[(min(float(rate), 1.0), float(sigma))] += int(steps)
    return _composed(tuple(sorted(totals.items())), delta)


@functools.lru_cache(maxsize=1024)
def _composed(steps_by_step: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    if not steps_by_step:
        return 0.0
    dpa = _dpa()
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    events = []
    for (rate, sigma), steps in steps_by_step:
        gauss = dpa.GaussianDpEvent(sigma)
        step = gauss if rate >= 1.0 else dpa.PoissonSampledDpEvent(rate, gauss)
        events.append(dpa.SelfComposedDpEvent(step, steps))
    acc = rdp.RdpAccountant(INTEGER_ORDERS, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dpa.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


@dataclass
class RoundCharge:
    """What one round of central DP cost: ``sampled`` clients taken from ``population``."""

    round: int
    sampled: int
    population: int
