"""Client-level DP on the client's side: clip the model update, add local noise; and the noise
multiplier a config resolves to (given, or calibrated to a target epsilon).

The server's side (central noise, the accountant, the budget) is ``server/privacy.py``; the
geometry of each method's model update is ``privacy.geometry``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

import numpy as np
import torch

from . import accountant
from .config import DPSection, PrivacySection
from .geometry import Tensors, UpdateGeometry


def noise_multiplier(dp: DPSection, rounds: int, clients_per_round: int) -> float:
    """z: as configured, or the smallest one for which ``rounds`` rounds end at
    ``dp.target_epsilon`` (central with amplification: at the planned sampling rate
    clients_per_round / population; otherwise q = 1, every round charged in full)."""
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    if dp.mode == "central" and dp.amplification:
        sampled, population = clients_per_round, max(dp.population, clients_per_round)
    else:
        sampled = population = 1
    return _calibrated(dp.target_epsilon, dp.delta, rounds, sampled, population)


@functools.lru_cache(maxsize=32)
def _calibrated(target: float, delta: float, rounds: int, sampled: int, population: int) -> float:
    return accountant.calibrate(target, delta, rounds, sampled, population)


def secret_rng(secret: bytes, *parts: object) -> np.random.Generator:
    """A Philox generator keyed by HMAC-SHA256(secret, parts): unpredictable to anyone without
    ``secret``, yet the same for the same parts, so a client that trains a round again sends
    the same noisy bytes (one release, not two independent ones)."""
    key = hmac.new(secret, ":".join(map(str, parts)).encode(), hashlib.sha256).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(key[:16], "little")))


def privatize(privacy: PrivacySection, geometry: UpdateGeometry, tensors: Tensors, noise_multiplier: float,
              rng: np.random.Generator) -> tuple[Tensors, float, int]:
    """A client's update made ready for a private round: (tensors, its model-update norm before
    clipping and the number of values the secure-aggregation clamp cut, both of which stay on
    the client).

    With secure aggregation every tensor of the spec is sent (absent ones as zeros, so every
    client's masked vector has one layout) and clamped to the value bound first: clipping after
    the clamp only scales down, so the clamp still holds, and the clip is the last change before
    the noise, so the bound C holds exactly for what is noised."""
    out = {k: v.double() for k, v in tensors.items()}
    sa, dp = privacy.secure_aggregation, privacy.dp
    clamped = 0
    if sa.enabled:
        out = {n: out[n] if n in out else torch.zeros(shape, dtype=torch.float64)
               for n, shape in geometry.spec.items()}
        out = {n: t.clamp(-sa.value_bound, sa.value_bound) for n, t in out.items()}
    norm = geometry.norm(out)
    if dp.enabled:
        out, norm = geometry.clip(out, dp.clip)
    if dp.mode == "local":
        for name, z in geometry.noise(noise_multiplier * dp.clip, rng).items():
            out[name] = out.get(name, torch.zeros_like(z)) + z
        if sa.enabled:  # post-processing of a local-DP release: still private
            out = {n: t.clamp(-sa.value_bound, sa.value_bound) for n, t in out.items()}
    return {k: v.float() for k, v in out.items()}, norm, clamped
