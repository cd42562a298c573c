"""Byte accounting, all in one place: the formulas, the per-client traffic meter of a round,
and the efficiency figure.

Three layers are reported for every transfer:

* payload: raw tensor bytes, plus ``SEED_BYTES`` per seed on the downlink;
* message: serialized protobuf bytes plus gRPC's 5-byte frame per message (``message_bytes``);
* wire: bytes actually read from and written to the TCP socket, measured per connection by the
  server's byte-counting relay (``server/relay.py``, which fills ``ConnCounters``). That
  includes HTTP/2 framing, headers, flow control, pings and (when on) TLS records. Where no
  socket was measured (an in-process simulation, a connection lost to a restart) the wire
  figure is ``None``: not measured, never a copy of the message figure.

Each method states its own upload formula (``Method.upload_bytes_formula``) in terms of its
parameters; the FedKRSO one is here because docs/algorithm.md and the tests quote it.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import torch
from torch import nn

from .tensors import element_size


def peak_rss_bytes() -> int:
    """This process's peak resident memory: the kernel's high-water mark of its own image
    (VmHWM). Not ``ru_maxrss``, which also holds the RSS of the process that forked it, folded
    in at exec (a client started by a 1.6 GB test worker reported 1.6 GB); that where /proc is
    missing."""
    hwm = vm_hwm_bytes()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm_bytes() -> int | None:
    """VmHWM of /proc/self/status in bytes; None where the kernel does not report it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

SEED_BYTES = 8  # a seed travels as one uint64
GRPC_FRAME_BYTES = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes


def payload_bytes(tensors: dict[str, torch.Tensor], dtype: str | None = None) -> int:
    """Raw tensor bytes of ``tensors`` sent in ``dtype`` (their own dtype when None)."""
    return sum(t.numel() * (element_size(dtype) if dtype else t.element_size()) for t in tensors.values())


def seeds_bytes(n_seeds: int) -> int:
    """Payload bytes of ``n_seeds`` seeds on the wire (``SEED_BYTES`` each)."""
    return n_seeds * SEED_BYTES


def message_bytes(msg) -> int:
    """Serialized size of one gRPC message, including its 5-byte length prefix."""
    return msg.ByteSize() + GRPC_FRAME_BYTES


def fedkrso_uplink_bytes(sum_dm: int, k_used: int, rank: int, dense: int, b: int) -> int:
    """docs/algorithm.md section 6: ``K_used * r * sum_m d_m * b + dense * b`` (tensor payload)."""
    return k_used * rank * sum_dm * b + dense * b


def full_model_bytes(model: nn.Module, b: int = 4) -> int:
    """Bytes of every parameter at ``b`` bytes per element: one FedAvg exchange, one way."""
    return sum(p.numel() for p in model.parameters()) * b


def wire_efficiency(payload: int, wire: int | None) -> float | None:
    """Payload bytes / bytes on the wire (like nanoGPT's MFU: achieved over the limit).

    1.0 means every byte on the socket was tensor data; the gap is protobuf field tags and
    names, gRPC frames, HTTP/2 frames and headers, flow control and TLS overhead. None when
    the wire was not measured."""
    if wire is None:
        return None
    return payload / wire if wire else 0.0


@dataclass
class ConnCounters:
    """Bytes through one relayed TCP connection, per direction."""

    client: str
    up: int = 0  # client -> server
    down: int = 0  # server -> client
    open: bool = True


@dataclass
class SocketMark:
    """Where a connection's counters stood when a transfer began."""

    counters: ConnCounters
    up: int
    down: int

    @classmethod
    def now(cls, counters: ConnCounters | None) -> SocketMark | None:
        """A mark at the connection's counters as they stand now; None when they are not measured."""
        return None if counters is None else cls(counters, counters.up, counters.down)

    def same_connection(self, counters: ConnCounters | None) -> bool:
        """Whether ``counters`` are those of the connection this mark was taken on (a reconnect makes
        new ones)."""
        return counters is self.counters


@dataclass
class Traffic:
    """What one client exchanged in one round, at the three layers (``None`` wire: not
    measured). ``numbers()`` is what persists across a server restart; the live socket marks
    do not."""

    down_payload: int = 0
    down_message: int = 0
    down_wire: int | None = None
    up_payload: int = 0
    up_message: int = 0
    up_wire: int | None = None
    download: SocketMark | None = field(default=None, repr=False)

    NUMBERS = ("down_payload", "down_message", "down_wire", "up_payload", "up_message", "up_wire")

    def numbers(self) -> dict:
        """The byte counts of ``NUMBERS`` as a dict (a metrics row's per-client part, and what a saved
        open round keeps)."""
        return {k: getattr(self, k) for k in self.NUMBERS}

    def add_down(self, payload: int, message: int) -> None:
        """Count one message sent down: its tensor payload and its serialized size."""
        self.down_payload += payload
        self.down_message += message


def round_traffic(per_client: list[Traffic], fedavg_bytes: int) -> dict:
    """The byte fields of a round's metrics row from its aggregated clients' traffic.

    Payload and message bytes are summed over every client. Wire bytes are summed over the
    clients whose socket was measured in that direction, and the per-client wire mean and the
    efficiencies use those same clients (their payload against their wire), so a client whose
    connection was lost to a restart makes the figure cover fewer clients, never a wrong one.
    ``*_wire_clients`` says how many clients each wire figure covers."""
    n = max(len(per_client), 1)
    row: dict = {}
    measured: dict[str, tuple[int, int]] = {}
    for direction, prefix in (("uplink", "up"), ("downlink", "down")):
        payload = sum(getattr(t, f"{prefix}_payload") for t in per_client)
        covered = [t for t in per_client if getattr(t, f"{prefix}_wire") is not None]
        wire = sum(getattr(t, f"{prefix}_wire") for t in covered) if covered else None
        covered_payload = sum(getattr(t, f"{prefix}_payload") for t in covered)
        row[f"{direction}_payload_bytes"] = payload
        row[f"{direction}_message_bytes"] = sum(getattr(t, f"{prefix}_message") for t in per_client)
        row[f"{direction}_wire_bytes"] = wire
        row[f"{direction}_wire_clients"] = len(covered)
        row[f"{direction}_payload_bytes_per_client"] = payload / n
        row[f"{direction}_wire_bytes_per_client"] = None if wire is None else wire / len(covered)
        row[f"{direction}_wire_efficiency"] = wire_efficiency(covered_payload, wire)
        measured[direction] = (covered_payload, wire or 0)
    both = [measured[d] for d in ("uplink", "downlink") if row[f"{d}_wire_bytes"] is not None]
    row["wire_efficiency"] = (wire_efficiency(sum(p for p, _ in both), sum(w for _, w in both))
                              if both else None)
    row["fedavg_equivalent_bytes"] = 2 * fedavg_bytes * len(per_client)
    return row
