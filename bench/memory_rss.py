"""Memory of one arm's training, each in a fresh child process so that neither arm inherits
the other's heap: the bytes autograd saves for backward per step, and the peak RSS growth
over the loaded state.

The peak is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs), or
psutil polling where that reset is refused. It is taken twice: with glibc's default malloc,
which keeps freed heap memory and so shows fragmentation, and with
``MALLOC_MMAP_THRESHOLD_=65536``, where every tensor lives in its own mapping and the peak
tracks live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import psutil
import torch
from torch import nn

from ..common.accounting import vm_hwm_bytes
from .memory_arms import ARMS, make_batches

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    hwm = vm_hwm_bytes()
    if hwm is None:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return hwm


class PeakPoller:
    """Fallback peak-RSS sampler (every 2 ms) where the kernel's high-water mark can't be reset."""

    def __init__(self):
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.proc.memory_info().rss)


class SavedTensors:
    """Autograd's saved tensors (saved_tensors_hooks): bytes of the distinct storages one
    forward keeps for backward, the model's own weights excluded; the maximum over steps."""

    def __init__(self, model: nn.Module):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.step: dict[int, int] = {}
        self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.weights:
            self.step[storage.data_ptr()] = storage.nbytes()
        return t

    def end_step(self) -> None:
        self.peak = max(self.peak, sum(self.step.values()))
        self.step.clear()

    def feed(self, batches: list[dict]) -> Iterator[dict]:
        for batch in batches:
            self.end_step()
            yield batch


def rss_child(args: argparse.Namespace) -> dict:
    """Run ``args.rss_steps`` training steps of the arm ``args.child`` in this fresh process;
    report the peak RSS growth over the loaded state and the bytes autograd saved per step."""
    arm = ARMS[args.child](args, args.rss_steps)
    batches = make_batches(arm.model.config.vocab_size, args.rss_steps, args.batch, args.seq_len, 2,
                           args.data_seed)
    saved = SavedTensors(arm.model)
    base = psutil.Process().memory_info().rss
    exact = _reset_peak_rss()
    poller = None if exact else PeakPoller()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        arm.train(saved.feed(batches))
    peak = _vm_hwm() if exact else poller.stop()
    saved.end_step()
    return {"rss_growth": peak - base, "exact": exact, "saved_bytes": saved.peak}


def measure_child(args: argparse.Namespace, arm: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "fedkrso.bench.memory", "--child", arm,
           "--model", args.model, "--threads", str(args.threads), "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--k", str(args.k), "--rank", str(args.rank),
           "--rss-steps", str(args.rss_steps), "--data-seed", str(args.data_seed),
           *(["--device", args.device] if args.device else []), *(["--dtype", args.dtype] if args.dtype else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """Per arm: saved activations and peak RSS growth, the latter both with glibc's default
    malloc (freed heap memory is kept, so fragmentation shows) and with every allocation of
    64 KiB or more served by mmap (returned to the OS on free: the peak of live tensors)."""
    out: dict[str, dict] = {}
    for arm in ARMS:
        print(f"memory child runs: {arm}", file=sys.stderr)
        default = measure_child(args, arm, {})
        mmapped = measure_child(args, arm, MMAP_ENV)
        out[arm] = {"saved_bytes": mmapped["saved_bytes"], "rss_default": default["rss_growth"],
                    "rss_mmap": mmapped["rss_growth"],
                    "exact": default["exact"] and mmapped["exact"]}
    return out
