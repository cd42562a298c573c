"""One training arm on a (LLaMA-shaped) causal LM, in a fresh process: peak memory and step time.

    python -m fedkrso.bench.llama_arms --arm fedkrso --model DIR [--device cuda] [--dtype bfloat16]
        [--batch 4] [--seq-len 512] [--steps 6] [--warmup 2] [--k 4] [--rank 8]

Arms, each placed like a party of a run (common/precision.py):

* ``fedkrso``: ``FedKRSO.train_round`` itself (K seeds, rank r, one interval of every step:
  the fused subspace layer, Adam on B and on the norms);
* ``fedit``: ``FedIT.train_round`` itself (LoRA of rank r on the same matrices, Adam);
* ``fft``: full fine-tuning, Adam on every parameter: float32 masters, compute in the dtype.

Printed as one JSON line: the peak since the model was placed (on CUDA the bytes the caching
allocator handed out, ``torch.cuda.max_memory_allocated``, so the weights count; on the CPU
the process's high-water RSS, reset after loading, and the RSS once loaded), per-step wall
times (the device synchronised at each step boundary; warmup steps dropped), and parameter
bytes by dtype. A fresh process per arm, so no arm inherits another's allocations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import torch

from ..common.cli import add_placement_args
from ..common.methods import build_method
from ..common.methods.base import forward_loss
from ..common.models import load_model
from ..common.precision import bytes_by_dtype, peak_bytes, place, reset_peak, resolve_placement
from .memory_rss import _reset_peak_rss, _vm_hwm

ARMS = ("fedkrso", "fedit", "fft")


def random_batches(vocab: int, n: int, batch: int, length: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (batch, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


class Clock:
    """Yields the batches and stamps the time at each step boundary, the device synchronised."""

    def __init__(self, batches: list[dict], device: torch.device):
        self.batches, self.device, self.stamps = batches, device, []

    def stamp(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            self.stamp()
            yield batch

    def step_seconds(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])][warmup:]


def run_arm(args: argparse.Namespace) -> dict:
    placement = resolve_placement("cpu", "float32", args.device, args.dtype)
    model = load_model(args.model, "causal-lm")
    steps = args.warmup + args.steps
    method = None
    if args.arm == "fft":
        model.requires_grad_(True)
        place(model, placement)
    else:
        knobs = ({"k": args.k, "rank": args.rank, "intervals": 1, "interval_steps": steps}
                 if args.arm == "fedkrso" else {"rank": args.rank, "steps": steps})
        from ..common.config import parse_config

        cfg = parse_config({"model": {"name": args.model, "task": "causal-lm"},
                            "method": {"name": args.arm, "lr": 1e-4, **knobs}})
        method = build_method(cfg.method, 0)
        method.prepare(model)
        method.place(model, placement)
    model.train()
    batches = random_batches(model.config.vocab_size, steps, args.batch, args.seq_len)
    loaded_rss = psutil.Process().memory_info().rss
    exact = _reset_peak_rss()
    reset_peak(placement.device)
    clock = Clock(batches, placement.device)
    if method is None:
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        losses = []
        for batch in clock:
            loss = forward_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        loss = sum(losses) / len(losses)
    else:
        loss = method.train_round(model, iter(clock), 0, method.round_seeds(0), "arm").loss
    clock.stamp()
    times = clock.step_seconds(args.warmup)
    return {
        "arm": args.arm, "placement": str(placement), "batch": args.batch, "seq_len": args.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": (method.trainable_count(model) if method is not None
                      else sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "bytes_by_dtype": bytes_by_dtype(model), "loss": loss,
        "accelerator_peak_bytes": peak_bytes(placement.device),
        "loaded_rss": loaded_rss, "peak_rss": _vm_hwm() if exact else None,
        "step_seconds": times, "median_step_seconds": sorted(times)[len(times) // 2] if times else None,
    }


def measure(arm: str, model: str, *, device: str, dtype: str, batch: int, seq_len: int, steps: int,
            warmup: int, k: int = 4, rank: int = 8, threads: int | None = None, timeout: float = 3600) -> dict:
    """``run_arm`` in a fresh child process; its JSON line."""
    cmd = [sys.executable, "-m", "fedkrso.bench.llama_arms", "--arm", arm, "--model", model, "--device", device,
           "--dtype", dtype, "--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(steps),
           "--warmup", str(warmup), "--k", str(k), "--rank", str(rank)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"arm {arm} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(prog="python -m fedkrso.bench.llama_arms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", choices=ARMS, required=True)
    ap.add_argument("--model", required=True, help="folder of a causal LM (bench/llama.py builds one)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8, help="FedKRSO r and FedIT's LoRA rank")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    add_placement_args(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run_arm(args)))


if __name__ == "__main__":
    main()
