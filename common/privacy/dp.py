"""Client-level DP on the client's side: clip the model update, add local noise; and the noise
multiplier a config resolves to (given, or calibrated to a target epsilon).

The server's side (central noise, the accountant, the budget) is ``server/privacy.py``; the
geometry of each method's model update is ``privacy.geometry``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable

import numpy as np
import torch

from . import accountant
from .config import DPSection, PrivacySection
from .geometry import Tensors, UpdateGeometry

Quantizer = Callable[[Tensors], Tensors]  # the values as they will travel (float64 in, float64 out)


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
              rng: np.random.Generator, quantize: Quantizer = lambda t: t) -> tuple[Tensors, float, int]:
    """A client's update made ready for a private round: (tensors, its model-update norm before
    clipping and the number of values the secure-aggregation clamp cut, both of which stay on
    the client).

    With secure aggregation every tensor of the spec is sent (absent ones as zeros, so every
    client's masked vector has one layout) and clamped to the value bound first: clipping after
    the clamp only scales down, so the clamp still holds. In central mode the clip is the last
    change before the server's noise, and what the client sends is rounded after it
    (``quantize``: the wire dtype, and secure aggregation's fixed-point ring), which can push
    the norm past C; so the clip is made on the values as they will travel
    (``clip_quantized``) and the bound C holds exactly for what is summed. In local mode the
    noise follows the clip on the client, and rounding after the noise is post-processing."""
    out = {k: v.double() for k, v in tensors.items()}
    sa, dp = privacy.secure_aggregation, privacy.dp
    clamped = 0
    if sa.enabled:
        out = {n: out[n] if n in out else torch.zeros(shape, dtype=torch.float64)
               for n, shape in geometry.spec.items()}
        clamped = sum(int((t.abs() > sa.value_bound).sum()) for t in out.values())
        out = {n: t.clamp(-sa.value_bound, sa.value_bound) for n, t in out.items()}
    norm = geometry.norm(out)
    if dp.enabled:
        out, norm = geometry.clip(out, dp.clip)
    if dp.mode == "central":
        out = clip_quantized(geometry, out, dp.clip, quantize)
    if dp.mode == "local":
        for name, z in geometry.noise(noise_multiplier * dp.clip, rng).items():
            out[name] = out.get(name, torch.zeros_like(z)) + z
        if sa.enabled:  # post-processing of a local-DP release: still private
            out = {n: t.clamp(-sa.value_bound, sa.value_bound) for n, t in out.items()}
    return {k: v.float() for k, v in out.items()}, norm, clamped


def clip_quantized(geometry: UpdateGeometry, tensors: Tensors, bound: float, quantize: Quantizer,
                   tries: int = 12) -> Tensors:
    """``tensors`` scaled so that, rounded as they will travel (``quantize``), their model
    update's norm is at most ``bound``: each try scales the update a little further below the
    bound and checks the rounded values again, so a rounding that lifted the norm over it is
    absorbed. The caller sends what this returns, and the path it takes applies ``quantize``'s
    rounding exactly once; past ``tries`` the update is zero, which fits any bound."""
    for i in range(tries):
        norm = geometry.norm(quantize(tensors))
        if norm <= bound:
            return tensors
        shrink = bound / norm * (1.0 - 2.0 ** (i + 1 - tries))
        tensors = {n: t * shrink for n, t in tensors.items()}
    return {n: torch.zeros_like(t) for n, t in tensors.items()}
