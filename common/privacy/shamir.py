"""Shamir secret sharing over GF(p), p = 2^521 - 1 (a Mersenne prime): a 32-byte secret as
a field element, ``t`` of ``n`` shares rebuild it, fewer than ``t`` say nothing about it.

Secure aggregation shares two 32-byte secrets per client (its mask private key and its
self-mask seed), so n is at most a few hundred and plain Python integers are fast enough.
Coefficients come from ``secrets`` (the operating system's CSPRNG), never from a seeded RNG.
Share points x are 1..n (the client's position in the round's sorted roster), never 0.
"""

from __future__ import annotations

import secrets

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    """Shares that cannot rebuild a secret (too few, repeated or invalid points)."""


def split(secret: bytes, xs: list[int], t: int) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs``, any ``t`` of which rebuild it."""
    if not 1 <= t <= len(xs):
        raise ShamirError(f"threshold {t} outside [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and non-zero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def valid_share(share: bytes) -> bool:
    """A share as ``split`` makes it: SHARE_BYTES bytes naming a field element."""
    return len(share) == SHARE_BYTES and int.from_bytes(share, "big") < PRIME


def combine(shares: dict[int, bytes], t: int, size: int = 32) -> bytes:
    """The secret (``size`` bytes) from at least ``t`` shares: Lagrange interpolation at 0
    over the first ``t`` points."""
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares, {t} needed")
    points = sorted(shares.items())[:t]
    xs = [x for x, _ in points]
    if len(set(xs)) != t or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and non-zero")
    secret = 0
    for i, (xi, yb) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + int.from_bytes(yb, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise ShamirError("the shares do not rebuild a secret of this size")
    return secret.to_bytes(size, "big")
