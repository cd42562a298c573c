"""Secure aggregation (SecAgg, Bonawitz et al., CCS 2017) for any method's named tensors.

The server learns the sum of the masked inputs of a round's surviving clients and nothing
about any single input (docs/PRIVACY.md: threat model, round trips, bytes). Per round:

1. *Advertise keys*: client u makes two X25519 key pairs, (c_u) to encrypt shares and (s_u)
   for masks, and a 32-byte self-mask seed b_u; it sends both public keys. The server refuses
   a key that cannot agree (``usable_key``) or that another client advertised, and broadcasts
   the roster U1 and the threshold t. u refuses a t below its own configured fraction of |U1|
   (at least one half) and treats a peer whose keys cannot agree or repeat another's as bad.
2. *Share keys*: u splits s_u's private key and b_u into Shamir shares (t of |U1|, points =
   positions in the sorted roster) and sends each v its pair, encrypted with AES-256-GCM
   under HKDF(X25519(c_u, c_v)), with a SHA-256 commitment to each of the two shares
   (``commitment``). The server forwards each v what is addressed to it (U2: who shared).
3. *Confirm shares*: v checks each pair it got (it decrypts, holds two field elements that
   match their commitments, the sender's keys are good) and reports the senders whose pair
   was bad. The server fixes one masking set for everyone (``masking_set``): no member masks
   with a member it disputes, and a client fewer than t members hold a good share of leaves.
4. *Masked input*: the update, clamped to [-B, B] and encoded in fixed point
   (round(x * 2^f), integers mod 2^bits), plus PRG(b_u), plus, for every undisputed other
   member v, +PRG(s_uv) if u < v else -PRG(s_uv), where s_uv = HKDF(X25519(s_u, s_v)) is the
   same seed for u and v, so the pairwise masks cancel in the sum. PRG = ChaCha20 keystream.
5. *Unmasking*: the server names the survivors U3 (sent masked input) and the dropped members;
   each survivor reveals its good share of b_v for every v in U3 and of s_v for every dropped
   v, never both for one client. The server keeps a revealed share only if it matches its
   owner's commitment, so with t of each it rebuilds exactly what honest owners shared: it
   removes the self masks of U3 and the dropped clients' pairwise masks, and decodes the sum.

f (``fixed_point_bits``) is the largest step exponent with n_max * B * 2^f < 2^(bits-1), so the
sum of ``rounds.clients_per_round`` clamped values never wraps.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Iterable, Mapping
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
P25519 = 2**255 - 19


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
    """The shared secret of an X25519 agreement between ``private`` and ``peer_public``, through HKDF
    with ``info``."""
    return _hkdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), info)


def context(run_id: str, round_id: int, what: str) -> bytes:
    """The HKDF info of one use (``what``) of a key agreement in one round of one run: no secret serves
    two rounds or two uses."""
    return f"fedkrso-secagg|{what}|{run_id}|{round_id}".encode()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """``key``'s raw 32 private bytes (what a secret share splits)."""
    return key.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    """``key``'s raw 32-byte public key, as advertised."""
    return key.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def pair_mask(mine: X25519PrivateKey, me: str, other: str, other_public: bytes, ctx: bytes, n: int,
              bits: int) -> np.ndarray:
    """The pairwise mask ``me`` adds for ``other``: +PRG(s) if me < other else -PRG(s)."""
    mask = prg(agree(mine, other_public, ctx), n, bits)
    return mask if me < other else (-mask).astype(mask.dtype)


def usable_key(public: bytes) -> bool:
    """A 32-byte X25519 public key that agrees. A low-order point agrees on the all-zero
    secret whatever the private key (everyone could compute it); ``cryptography`` refuses
    such an exchange, which is the check."""
    if len(public) != 32:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def key_point(public: bytes) -> int:
    """The curve point a public key names: X25519 ignores the top bit and reads x modulo
    2^255 - 19, so two encodings of one point compare equal here."""
    return (int.from_bytes(public, "little") & ((1 << 255) - 1)) % P25519


def unusable(keys: Mapping[str, tuple[bytes, bytes]]) -> set[str]:
    """The clients of a roster whose keys must not be used: a key that cannot agree, or a point
    that another client's key names too (a mask key copied from v makes u's masks for v and
    for the copier cancel inside u's own input)."""
    owners: dict[int, set[str]] = {}
    bad = {c for c, pk in keys.items() if not all(usable_key(k) for k in pk)}
    for client, pk in keys.items():
        for key in pk:
            owners.setdefault(key_point(key), set()).add(client)
    return bad.union(*(o for o in owners.values() if len(o) > 1))


def commitment(run_id: str, round_id: int, owner: str, holder: str, kind: str, share: bytes) -> bytes:
    """SHA-256 binding ``owner``'s share of one secret to its ``holder``: the holder checks
    what it decrypts against it, the server what the holder reveals, so a revealed share is
    the one its owner made. A share is a uniform element of GF(2^521 - 1): its hash says
    nothing about it."""
    return hashlib.sha256(context(run_id, round_id, f"commit|{kind}|{owner}>{holder}") + share).digest()


@dataclass
class Roster:
    """The clients that advertised keys (sorted ids; share point = position + 1) and t."""

    keys: dict[str, tuple[bytes, bytes]]  # id -> (cipher public key, mask public key)
    t: int

    def point(self, client: str) -> int:
        """``client``'s Shamir evaluation point: its 1-based rank among the roster's ids."""
        return sorted(self.keys).index(client) + 1


@dataclass(frozen=True)
class SealedShare:
    """One share pair on its way from its owner to one holder: the AES-GCM ciphertext (empty
    when the holder's keys cannot be used) and the owner's commitment to each share."""

    ciphertext: bytes
    mask_key_commitment: bytes
    self_mask_commitment: bytes


def pair(u: str, v: str) -> tuple[str, str]:
    """The unordered pair {u, v}, as the sets of disputed pairs hold it."""
    return (u, v) if u < v else (v, u)


def masking_set(clients: Iterable[str], complaints: Mapping[str, Iterable[str]],
                t: int) -> tuple[list[str], set[tuple[str, str]]]:
    """The clients that mask in a round and the disputed pairs among them, from what the
    ``clients`` that confirmed their shares complained of (``complaints[u]``: the senders
    whose share pair to u was bad).

    The server tells every member the same outcome, so the pairwise masks cancel: a pair in
    which either side complained is disputed and neither masks with the other (a client that
    sends bad shares to everyone loses all its pairs; a false accuser only its own). A client
    that fewer than t members hold a good share of, itself included, could not have its
    secrets rebuilt: it leaves, and the count is taken again over the rest until every member
    has t. Leaving only lowers counts, so this is the largest such set in any order."""
    members = set(clients)
    refused = {u: set(complaints.get(u, ())) for u in members}
    while short := {v for v in members if sum(u == v or v not in refused[u] for u in members) < t}:
        members -= short
    return sorted(members), {pair(u, v) for u in members for v in refused[u] if v in members}


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
    """One client's side of one round's protocol (the five steps of the module docstring).

    Whatever a peer sends, the session goes on: a peer whose keys or share pair are bad is a
    complaint, which the server turns into a disputed pair. What only a lying server can send
    (a threshold below this client's ``fraction`` of the roster, too few clients, a masking set
    or an unmasking request that contradicts what this client saw) raises ``SecAggError``:
    the client leaves the round, revealing nothing more."""

    run_id: str
    round: int
    me: str
    bits: int
    fraction: float  # the configured threshold fraction: the least t this client accepts
    cipher: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    mask: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    roster: Roster | None = None
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> good (mask-key, seed) shares
    bad_keys: set[str] = field(default_factory=set)  # peers of the roster whose keys cannot be used
    senders: set[str] = field(default_factory=set)  # peers whose share pairs the server forwarded
    complaints: list[str] = field(default_factory=list)  # senders whose key or share pair was bad
    members: list[str] = field(default_factory=list)  # the masking set
    partners: list[str] = field(default_factory=list)  # the members this client masks with

    def advertise(self) -> tuple[bytes, bytes]:
        """The two public keys this client advertises: (cipher key for the shares' channel, mask key
        for the pairwise masks)."""
        return public_bytes(self.cipher), public_bytes(self.mask)

    def _channel(self, other: str) -> AESGCM:
        return AESGCM(agree(self.cipher, self.roster.keys[other][0], context(self.run_id, self.round, "share")))

    def _check_roster(self, roster: Roster) -> None:
        """Refuse a roster that misstates this client's keys or whose t would let fewer than
        this client's fraction of it (at least one half) rebuild a secret: t shares of b_u
        from clients told u survived and t of s_u from clients told u dropped need 2t > n
        clients, one of them this client's honest peers, who refuse the second request."""
        n, least = len(roster.keys), max(2, math.floor(self.fraction * len(roster.keys)) + 1)
        if roster.keys.get(self.me) != self.advertise():
            raise SecAggError("the roster does not carry this client's keys")
        if not least <= roster.t <= n:
            raise SecAggError(f"threshold t={roster.t} for a roster of {n}: this client needs "
                              f"{least} <= t <= {n} (a fraction of at least {self.fraction:g})")

    def share(self, roster: Roster) -> dict[str, SealedShare]:
        """Sealed share pairs for every other client of ``roster`` (own pair kept); a peer
        whose keys cannot be used gets its commitments and no ciphertext."""
        self._check_roster(roster)
        self.roster, self.bad_keys = roster, unusable(roster.keys) - {self.me}
        xs = [roster.point(c) for c in sorted(roster.keys)]
        s_shares = shamir.split(private_bytes(self.mask), xs, roster.t)
        b_shares = shamir.split(self.seed, xs, roster.t)
        out = {}
        for other in sorted(roster.keys):
            x = roster.point(other)
            if other == self.me:
                self.held[self.me] = (s_shares[x], b_shares[x])
                continue
            commits = (commitment(self.run_id, self.round, self.me, other, MASK_KEY, s_shares[x]),
                       commitment(self.run_id, self.round, self.me, other, SELF_MASK, b_shares[x]))
            sealed = b""
            if other not in self.bad_keys:
                nonce = os.urandom(12)
                aad = context(self.run_id, self.round, f"{self.me}>{other}")
                sealed = nonce + self._channel(other).encrypt(nonce, _pack(s_shares[x], b_shares[x]), aad)
            out[other] = SealedShare(sealed, *commits)
        return out

    def receive(self, sealed: Mapping[str, SealedShare]) -> list[str]:
        """Keep the good share pairs addressed to this client; the senders of the others are
        its complaints (a peer's bad data never stops this client). Too few senders to reach
        t, or a sender outside the roster, is the server's doing: refused."""
        strangers = set(sealed) - (set(self.roster.keys) - {self.me})
        if strangers:
            raise SecAggError(f"shares from {len(strangers)} client(s) that are not other clients of the roster")
        if len(sealed) + 1 < self.roster.t:
            raise SecAggError(f"{len(sealed) + 1} client(s) shared keys (this one included), fewer than the "
                              f"threshold t={self.roster.t}")
        self.senders = set(sealed)
        self.complaints = sorted(v for v, s in sealed.items() if not self._accept(v, s))
        return self.complaints

    def _accept(self, sender: str, sealed: SealedShare) -> bool:
        """Whether ``sender``'s pair is good (its keys usable, it decrypts, it holds two field
        elements matching their commitments); a good pair is kept."""
        if sender in self.bad_keys:
            return False
        aad = context(self.run_id, self.round, f"{sender}>{self.me}")
        try:
            fields = _unpack(self._channel(sender).decrypt(sealed.ciphertext[:12], sealed.ciphertext[12:], aad))
        except (InvalidTag, ValueError):
            return False
        commits = (sealed.mask_key_commitment, sealed.self_mask_commitment)
        if len(fields) != 2 or not all(shamir.valid_share(f) for f in fields) or any(
                commitment(self.run_id, self.round, sender, self.me, kind, f) != c
                for kind, f, c in zip((MASK_KEY, SELF_MASK), fields, commits)):
            return False
        self.held[sender] = (fields[0], fields[1])
        return True

    def confirm(self, members: list[str], excluded: list[str]) -> None:
        """Take the masking set the server announced (``excluded``: the members this client
        disputes) once it agrees with what this client saw: this client is a member, there
        are at least t, every other member sent it a share pair, every member it complained
        of is excluded, and one partner at least is left (masking with nobody, its input
        would be readable as soon as its self mask is removed)."""
        ms, ex, t = set(members), set(excluded), self.roster.t
        if self.me not in ms:
            raise SecAggError("the masking set leaves this client out")
        if len(ms) < t:
            raise SecAggError(f"a masking set of {len(ms)} client(s), fewer than the threshold t={t}")
        others = ms - {self.me}
        if not others <= self.senders or not ex <= others:
            raise SecAggError("the masking set names a client that sent this client no share pair")
        if not set(self.complaints) & ms <= ex:
            raise SecAggError("the masking set pairs this client with a peer whose share pair it refused")
        if not others - ex:
            raise SecAggError("the masking set leaves this client no peer to mask with")
        self.members, self.partners = sorted(ms), sorted(others - ex)

    def masked(self, vector: np.ndarray) -> np.ndarray:
        """y = x + PRG(b_u) + the pairwise masks with every partner (the masking set's members
        this client does not dispute)."""
        if not self.partners:
            raise SecAggError("no masking set confirmed")
        y = vector + prg(self.seed, len(vector), self.bits)
        ctx = context(self.run_id, self.round, "mask")
        for other in self.partners:
            y += pair_mask(self.mask, self.me, other, self.roster.keys[other][1], ctx, len(vector), self.bits)
        return y

    def reveal(self, survivors: list[str], dropped: list[str]) -> list[tuple[str, str, bytes]]:
        """(owner, kind, share): seed shares of the survivors, mask-key shares of the dropped,
        of the good pairs this client holds. Refuses a request that would reveal both for one
        client, names too few survivors, leaves this client out, or does not split the masking
        set."""
        sv, dr, t = set(survivors), set(dropped), self.roster.t
        if sv & dr:
            raise SecAggError("a client cannot be both a survivor and dropped")
        if sv | dr != set(self.members) or self.me not in sv:
            raise SecAggError("survivors and dropped are not the masking set, this client among the survivors")
        if len(sv) < t:
            raise SecAggError(f"{len(sv)} survivors, fewer than the threshold {t}")
        out = [(v, SELF_MASK, self.held[v][1]) for v in sorted(sv) if v in self.held]
        out += [(v, MASK_KEY, self.held[v][0]) for v in sorted(dr) if v in self.held]
        return out


def _rebuild(shares: dict[int, bytes], t: int, owner: str, what: str) -> bytes:
    try:
        return shamir.combine(shares, t)
    except shamir.ShamirError as err:
        raise SecAggError(f"the shares of {owner!r}'s {what} rebuild nothing: {err}") from None


def unmask(total: np.ndarray, roster: Roster, survivors: list[str], dropped: list[str],
           disputed: set[tuple[str, str]], shares: dict[tuple[str, str], dict[int, bytes]], run_id: str,
           round_id: int, bits: int) -> np.ndarray:
    """The sum of the survivors' inputs from the sum of their masked inputs: minus each
    survivor's self mask (its seed rebuilt from t shares) and minus what each survivor added
    for each dropped client it does not dispute (the dropped client's mask key rebuilt from t
    shares). Raises ``SecAggError`` naming a client whose shares rebuild no secret, or not
    the mask key it advertised: shares it made of something else."""
    out = total.copy()
    n, ctx = len(total), context(run_id, round_id, "mask")
    for v in survivors:
        out -= prg(_rebuild(shares.get((v, SELF_MASK), {}), roster.t, v, "self-mask seed"), n, bits)
    for v in dropped:
        key = X25519PrivateKey.from_private_bytes(_rebuild(shares.get((v, MASK_KEY), {}), roster.t, v, "mask key"))
        if public_bytes(key) != roster.keys[v][1]:
            raise SecAggError(f"the shares of {v!r}'s mask key rebuild another key than the one it advertised")
        for w in survivors:  # w added pair_mask(w, v) = -pair_mask(v, w): add v's side back
            if pair(v, w) not in disputed:
                out += pair_mask(key, v, w, roster.keys[w][1], ctx, n, bits)
    return out
