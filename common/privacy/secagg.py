"""Secure aggregation (SecAgg, Bonawitz et al., CCS 2017) for any method's named tensors.

The server learns the sum of the masked inputs of a round's surviving clients and nothing
about any single input (docs/PRIVACY.md: threat model, round trips, bytes). Per round:

1. *Advertise keys*: client u makes two X25519 key pairs, (c_u) to encrypt shares and (s_u)
   for masks, and a 32-byte self-mask seed b_u; it sends both public keys. The server
   broadcasts the roster U1 and the threshold t.
2. *Share keys*: u splits s_u's private key and b_u into Shamir shares (t of |U1|, points =
   positions in the sorted roster) and sends each v its pair, encrypted with AES-256-GCM
   under HKDF(X25519(c_u, c_v)). The server forwards each v what is addressed to it (U2: the
   clients that shared).
3. *Masked input*: the update, clamped to [-B, B] and encoded in fixed point
   (round(x * 2^f), integers mod 2^bits), plus PRG(b_u), plus, for every other v in U2,
   +PRG(s_uv) if u < v else -PRG(s_uv), where s_uv = HKDF(X25519(s_u, s_v)) is the same
   seed for u and v, so the pairwise masks cancel in the sum. PRG = ChaCha20 keystream.
4. *Unmasking*: the server names the survivors U3 (sent masked input) and the dropped
   U2 minus U3; each survivor reveals its share of b_v for every v in U3 and of s_v for every
   dropped v, never both for one client. With t shares of each, the server removes the self
   masks of U3 and the dropped clients' pairwise masks, and decodes the sum.

f (``fixed_point_bits``) is the largest step exponent with n_max * B * 2^f < 2^(bits-1), so the
sum of ``rounds.clients_per_round`` clamped values never wraps.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import shamir

RAW = serialization.Encoding.Raw
Tensors = dict[str, torch.Tensor]
SELF_MASK, MASK_KEY = "self_mask", "mask_key"


class SecAggError(ValueError):
    """A secure-aggregation message that does not fit the protocol state."""


def fixed_point_bits(bound: float, n_max: int, ring_bits: int) -> int:
    """f: the largest integer with n_max * bound * 2^f < 2^(ring_bits - 1)."""
    f = math.floor(math.log2((2 ** (ring_bits - 1) - 1) / (n_max * bound)))
    if f < 1:
        raise SecAggError(f"ring of {ring_bits} bits has no room for {n_max} values bounded by {bound}")
    return f


def threshold(n: int, fraction: float) -> int:
    """t = floor(fraction * n) + 1, at least 2, at most n."""
    return min(n, max(2, math.floor(fraction * n) + 1))


def _dtype(bits: int):
    return np.uint32 if bits == 32 else np.uint64


def encode(tensors: Tensors, spec: dict[str, tuple[int, ...]], f: int, bits: int) -> np.ndarray:
    """The update as one ring vector, tensors in sorted name order (absent ones as zeros)."""
    parts = []
    for name in sorted(spec):
        t = tensors.get(name)
        flat = np.zeros(math.prod(spec[name]), np.float64) if t is None else t.double().reshape(-1).numpy()
        parts.append(np.rint(flat * 2.0**f).astype(np.int64))
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return joined.astype(_dtype(bits))  # two's complement wraps modulo 2^bits


def decode(vector: np.ndarray, spec: dict[str, tuple[int, ...]], f: int, bits: int) -> Tensors:
    """Signed values of a ring vector (a sum), split back into the spec's tensors (float64)."""
    signed = vector.astype(np.int32 if bits == 32 else np.int64)
    values = torch.from_numpy(signed.astype(np.float64) / 2.0**f)
    out, at = {}, 0
    for name in sorted(spec):
        n = math.prod(spec[name])
        out[name] = values[at:at + n].reshape(spec[name]).clone()
        at += n
    return out


def prg(seed: bytes, n: int, bits: int) -> np.ndarray:
    """n ring elements: the ChaCha20 keystream of key ``seed`` (nonce 0)."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (n * bits // 8)), dtype=_dtype(bits)).copy()


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    return _hkdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), info)


def context(run_id: str, round_id: int, what: str) -> bytes:
    return f"fedkrso-secagg|{what}|{run_id}|{round_id}".encode()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def pair_mask(mine: X25519PrivateKey, me: str, other: str, other_public: bytes, ctx: bytes, n: int,
              bits: int) -> np.ndarray:
    """The pairwise mask ``me`` adds for ``other``: +PRG(s) if me < other else -PRG(s)."""
    mask = prg(agree(mine, other_public, ctx), n, bits)
    return mask if me < other else (-mask).astype(mask.dtype)


@dataclass
class Roster:
    """The clients that advertised keys (sorted ids; share point = position + 1) and t."""

    keys: dict[str, tuple[bytes, bytes]]  # id -> (cipher public key, mask public key)
    t: int

    def point(self, client: str) -> int:
        return sorted(self.keys).index(client) + 1


def _pack(*fields: bytes) -> bytes:
    return b"".join(len(x).to_bytes(2, "big") + x for x in fields)


def _unpack(data: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 2], "big")
        out.append(data[at + 2:at + 2 + n])
        at += 2 + n
    return out


@dataclass
class ClientSession:
    """One client's side of one round's protocol (the four steps of the module docstring)."""

    run_id: str
    round: int
    me: str
    bits: int
    cipher: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    mask: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    roster: Roster | None = None
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (mask-key share, seed share)

    def advertise(self) -> tuple[bytes, bytes]:
        return public_bytes(self.cipher), public_bytes(self.mask)

    def _channel(self, other: str) -> AESGCM:
        return AESGCM(agree(self.cipher, self.roster.keys[other][0], context(self.run_id, self.round, "share")))

    def share(self, roster: Roster) -> dict[str, bytes]:
        """Encrypted share pairs for every other client of ``roster`` (own pair kept)."""
        if self.me not in roster.keys:
            raise SecAggError("this client is not in the round's roster")
        self.roster = roster
        xs = [roster.point(c) for c in sorted(roster.keys)]
        s_shares = shamir.split(private_bytes(self.mask), xs, roster.t)
        b_shares = shamir.split(self.seed, xs, roster.t)
        out = {}
        for other in sorted(roster.keys):
            x = roster.point(other)
            if other == self.me:
                self.held[self.me] = (s_shares[x], b_shares[x])
                continue
            nonce = os.urandom(12)
            aad = context(self.run_id, self.round, f"{self.me}>{other}")
            out[other] = nonce + self._channel(other).encrypt(nonce, _pack(s_shares[x], b_shares[x]), aad)
        return out

    def receive(self, ciphertexts: dict[str, bytes]) -> None:
        """Decrypt the share pairs addressed to this client (the senders are U2)."""
        for sender, blob in ciphertexts.items():
            if sender not in self.roster.keys or sender == self.me:
                raise SecAggError(f"share from {sender!r}, who is not another client of the roster")
            aad = context(self.run_id, self.round, f"{sender}>{self.me}")
            try:
                s_share, b_share = _unpack(self._channel(sender).decrypt(blob[:12], blob[12:], aad))
            except (InvalidTag, ValueError):
                raise SecAggError(f"share from {sender!r} does not decrypt") from None
            self.held[sender] = (s_share, b_share)

    def masked(self, vector: np.ndarray) -> np.ndarray:
        """y = x + PRG(b_u) + the pairwise masks with every other client that shared (U2)."""
        y = vector + prg(self.seed, len(vector), self.bits)
        ctx = context(self.run_id, self.round, "mask")
        for other in sorted(self.held):
            if other != self.me:
                y += pair_mask(self.mask, self.me, other, self.roster.keys[other][1], ctx, len(vector), self.bits)
        return y

    def reveal(self, survivors: list[str], dropped: list[str]) -> list[tuple[str, str, bytes]]:
        """(owner, kind, share): seed shares of the survivors, mask-key shares of the dropped.
        Refuses a request that would reveal both for one client, or names too few survivors."""
        if set(survivors) & set(dropped):
            raise SecAggError("a client cannot be both a survivor and dropped")
        if len(survivors) < self.roster.t:
            raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {self.roster.t}")
        out = [(v, SELF_MASK, self.held[v][1]) for v in survivors if v in self.held]
        out += [(v, MASK_KEY, self.held[v][0]) for v in dropped if v in self.held]
        return out


def unmask(total: np.ndarray, roster: Roster, survivors: list[str], dropped: list[str],
           shares: dict[tuple[str, str], dict[int, bytes]], run_id: str, round_id: int, bits: int) -> np.ndarray:
    """The sum of the survivors' inputs from the sum of their masked inputs: minus each
    survivor's self mask (its seed rebuilt from t shares) and minus what each survivor added
    for each dropped client (the dropped client's mask key rebuilt from t shares)."""
    out = total.copy()
    n, ctx = len(total), context(run_id, round_id, "mask")
    for v in survivors:
        out -= prg(shamir.combine(shares[(v, SELF_MASK)], roster.t), n, bits)
    for v in dropped:
        key = X25519PrivateKey.from_private_bytes(shamir.combine(shares[(v, MASK_KEY)], roster.t))
        for w in survivors:  # w added pair_mask(w, v) = -pair_mask(v, w): add v's side back
            out += pair_mask(key, v, w, roster.keys[w][1], ctx, n, bits)
    return out
