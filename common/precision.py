"""Where a party's model lives and in which precision: devices, dtypes and the precision rule.

Each party (the server and every client) chooses its own device and dtype: ``model.device``
and ``model.dtype`` in round.yaml are the defaults, and each process may override them
(``--device`` / ``--dtype``, or ``FEDKRSO_DEVICE`` / ``FEDKRSO_DTYPE``). So a CPU server can
coordinate GPU clients, one client can train in bfloat16 beside another in float32, and all
of them must still agree, bit for bit, on the state every round changes: the server sends its
fingerprint with every round and a client refuses to train on anything else.

The precision rule that makes that hold (docs/concepts/precision.md):

1. **The state is float32 on every party.** ``Method.state_parameters`` (every tensor a round
   delta changes, plus the seeded frozen parts of adapters) is float32 whatever the party's
   dtype; the one wider tensor is FedKSeed's per-candidate sums, float64 on every party. It starts as the checkpoint's own values, upcast exactly (a checkpoint always loads
   at its own precision, on the CPU, so new heads are drawn alike everywhere). Round deltas
   are computed canonically: FedKRSO's ``sum_k Abar_k P_k`` and FedKSeed's ``sum_k g_k z_k``
   on the CPU in float32 in a fixed order, every other method's mean delta arrives as bytes;
   the delta is then added elementwise in float32, and one IEEE addition gives the same bits
   on any CPU or GPU. Fingerprints hash these float32 tensors' CPU bytes, so they do not
   depend on the device or dtype a party computes with.
2. **Every trainable has a float32 master**: FedKRSO's B, LoRA factors, TT cores and the
   dense-trainables (head, norms) are float32 parameters with float32 Adam state.
3. **Frozen weights that no round changes are held in the party's dtype**: the embeddings and
   LM head under every method but FedAvg, the whole base model under FedIT, FFA-LoRA and FedTT.
4. **Compute runs in the party's dtype**: forward passes under ``torch.autocast`` (matrix
   products in bfloat16/float16, float32 parameters cast per operation), backward outside it.
5. **FedKRSO's projected weights** are state (rule 1) and also nearly all of the model. Under
   a low-precision dtype a party keeps their float32 masters in host memory and computes with
   a copy in its dtype on its device, rebuilt from the master after every change of the state
   (``apply``, ``restore``); local training merges ``B P`` into the copy only. The masters
   double as the pre-training snapshot, so a bfloat16 GPU client holds 2 bytes per projected
   weight on the device and 4 on the host, where float32 needs 4 on the device plus a 4-byte
   snapshot.

Why float32 state rather than low-precision weights with a fingerprint over a canonical cast:
bfloat16 keeps 8 significant bits, so adding a change smaller than half an ulp of W (about
2^-9 |W|) leaves W as it was, and a round of FedKRSO or FedAvg changes most weights by less
than that: a bfloat16 party would silently stop learning. And a party holding W in bfloat16
rounds after every round while a float32 party rounds never, so their weights drift apart:
no cast of the float32 weights reproduces the bfloat16 ones, and the fingerprint check would
have to be weakened into a tolerance. Float32 state costs host memory only where it matters
(rule 5) and keeps the check exact.

Why the delta products stay on the CPU: a matrix product on a GPU sums in another order than
the CPU's BLAS, so ``Abar @ P`` on a GPU would differ in the last bits from the server's.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .cli import DEVICE_PATTERN, DTYPE_NAMES, ENV_DEVICE, ENV_DTYPE

MASTER = "fedkrso_master"  # module attribute: the float32 host master of a low-precision weight
PLACEMENT = "fedkrso_placement"  # model attribute: the Placement it was placed with


class PlacementError(ValueError):
    """A device that is not there (``cuda`` without a GPU, ``cuda:3`` on a 2-GPU host) or a
    name that is not a device or dtype."""


def resolve_device(spec: str) -> torch.device:
    """``auto`` (cuda, else mps, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked
    against the hardware present. ``cuda`` means the current CUDA device, by index."""
    if not re.match(DEVICE_PATTERN, spec):
        raise PlacementError(f"unknown device {spec!r}: one of auto, cpu, cuda, cuda:N, mps")
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PlacementError(f"device {spec!r} asked for, but torch sees no CUDA device "
                                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise PlacementError(f"device {spec!r} asked for, but there are {torch.cuda.device_count()} "
                                 "CUDA device(s)")
        return torch.device("cuda", index)
    if spec == "mps" and not torch.backends.mps.is_available():
        raise PlacementError("device 'mps' asked for, but torch sees no MPS device")
    return torch.device(spec)


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (one of ``DTYPE_NAMES``); ``PlacementError`` otherwise."""
    if name not in DTYPE_NAMES:
        raise PlacementError(f"unknown dtype {name!r}: one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class Placement:
    """A party's device and compute dtype."""

    device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def low_precision(self) -> bool:
        """Whether the model's dtype is lower than float32 (then masters and autocast apply: the
        precision rule)."""
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes in ``dtype`` (rule 4); a no-op context in float32."""
        if not self.low_precision:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def fork_rng(self) -> contextlib.AbstractContextManager:
        """``torch.random.fork_rng`` over the CPU and, on an accelerator, this device's
        generator too, so seeding dropout for a round leaves the caller's RNGs untouched."""
        if self.device.type == "cuda":
            return torch.random.fork_rng(devices=[self.device.index], device_type="cuda")
        return torch.random.fork_rng(devices=[])

    def __str__(self) -> str:
        return f"{self.device}/{str(self.dtype).removeprefix('torch.')}"


def resolve_placement(device: str, dtype: str, device_override: str | None = None,
                      dtype_override: str | None = None) -> Placement:
    """The placement of one process: its overrides (flags, then the environment) win over
    round.yaml's ``model.device`` / ``model.dtype``."""
    device = device_override or os.environ.get(ENV_DEVICE) or device
    dtype = dtype_override or os.environ.get(ENV_DTYPE) or dtype
    return Placement(resolve_device(device), dtype_of(dtype))


def placement_of(model: nn.Module) -> Placement:
    """The placement ``place`` gave ``model``; for a model never placed, its first
    parameter's device and float32 (no autocast: it computes in its own dtype)."""
    found = getattr(model, PLACEMENT, None)
    if found is not None:
        return found
    return Placement(next(model.parameters()).device, torch.float32)


# -- the rule ------------------------------------------------------------------------------------
def master(module: nn.Module) -> torch.Tensor | None:
    """The float32 host master of ``module.weight`` (rule 5), or None when the weight is its
    own master."""
    return module.__dict__.get(MASTER)


@torch.no_grad()
def sync_compute(module: nn.Module) -> None:
    """Rebuild the low-precision compute copy of ``module.weight`` from its master."""
    m = master(module)
    if m is not None:
        module.weight.copy_(m)


@torch.no_grad()
def place(model: nn.Module, placement: Placement, keep_float32: Iterable[torch.Tensor] = (),
          mastered: Iterable[nn.Module] = ()) -> nn.Module:
    """Apply the precision rule to a prepared model, in place and one tensor at a time (no
    second copy of the model): the weights of ``mastered`` modules get a float32 host master
    and a compute copy (rule 5, low precision only); ``keep_float32`` and every parameter that
    requires grad become float32 (rules 1 and 2); every other floating parameter takes the
    placement's dtype (rule 3). Everything moves to the placement's device; floating buffers
    (rotary frequencies, position tables) keep their dtype. Tied parameters stay tied."""
    keep = {id(t) for t in keep_float32}
    masters = {id(m.weight): m for m in mastered} if placement.low_precision else {}
    for p in model.parameters():  # each tensor once, even when tied
        if id(p) in masters:
            module = masters[id(p)]
            _set_master(module, p.detach().to("cpu", torch.float32, copy=True))
            p.data = p.data.to(placement.device, placement.dtype)
        elif p.is_floating_point():
            target = torch.float32 if (id(p) in keep or p.requires_grad) else placement.dtype
            p.data = p.data.to(placement.device, target)
        else:
            p.data = p.data.to(placement.device)
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(placement.device)
    setattr(model, PLACEMENT, placement)
    return model


def _set_master(module: nn.Module, tensor: torch.Tensor) -> None:
    """A plain attribute, not a buffer: the master is not part of ``state_dict``."""
    module.__dict__[MASTER] = tensor


def bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Parameter bytes of ``model`` per dtype, plus the float32 host masters: what a party holds."""
    out: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    held = sum(m.numel() * 4 for m in masters(model))
    if held:
        out["float32_host_masters"] = held
    return out


def masters(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every float32 master copy that low-precision training keeps on ``model``'s modules."""
    for module in model.modules():
        m = master(module)
        if m is not None:
            yield m


# -- accelerator memory ------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    """Start a new peak of allocated accelerator memory (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak bytes the CUDA caching allocator handed out on ``device`` since ``reset_peak``
    (``torch.cuda.max_memory_allocated``); 0 on the CPU and on MPS, which report no peak."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return 0
