"""What sample-level DP-SGD (``privacy.dp_sgd``) costs a client: time per local step and peak
memory, with and without it, for every method it applies to, side by side in one run.

``python -m fedkrso.bench.dpsgd [--model minilm] [--steps 8] [--batch 16] [--seq-len 64]``

Each arm (method x DP-SGD on/off) runs in a fresh child process with one torch thread: the
model loaded and prepared, then ``--steps`` local steps of the method's own ``train_round`` on
fixed random-token batches (``memory_arms.make_batches``; with DP-SGD each step is still one
batch of ``--batch`` rows, so the arms do the same work but for the per-example machinery).
Reported per arm: the median seconds per step (the first step, which warms up, left out),
the peak RSS growth over the prepared model (kernel high-water mark, ``memory_rss``) and,
with DP-SGD, the bytes of the per-example gradients of one step (examples x trainable
parameters x 4). Prints a table and the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil
import torch

from .memory_arms import make_batches
from .memory_rss import PeakPoller, _reset_peak_rss, _vm_hwm

# Every method DP-SGD applies to (``Method.dp_sgd_unsupported`` is None; tests/test_privacy_dpsgd.py
# checks this covers them), at the sizes of a real MiniLM run rather than tests/method_cases.py's
# tiny ones: the bench measures what DP-SGD costs at the settings docs/PRIVACY.md reports.
METHODS = {
    "fedkrso": {"name": "fedkrso", "k": 4, "rank": 8, "intervals": 2, "interval_steps": 4, "lr": 1e-3},
    "fedavg": {"name": "fedavg", "steps": 8, "lr": 1e-4},
    "fedit": {"name": "fedit", "steps": 8, "rank": 8, "alpha": 16, "lr": 1e-3},
    "ffa-lora": {"name": "ffa-lora", "steps": 8, "rank": 8, "alpha": 16, "lr": 2e-3},
}


def child(args: argparse.Namespace) -> dict:
    from ..common.methods import METHODS as REGISTRY
    from ..common.models import load_model
    from ..common.privacy.config import DPSGDSection
    from ..common.privacy.dpsgd import SampleDP

    torch.set_num_threads(1)
    name, private = args.child.split(":")
    spec = {**METHODS[name]}
    if "steps" in spec:
        spec["steps"] = args.steps
    else:
        spec["interval_steps"] = max(1, args.steps // spec["intervals"])
    cls = REGISTRY[name]
    method = cls(cls.Config(**spec), run_seed=0)
    model = load_model(args.model, "sequence-classification", num_labels=2)
    method.prepare(model)
    batches = make_batches(model.config.vocab_size, args.steps, args.batch, args.seq_len, 2, 0)
    times: list[float] = []
    sample_bytes = 0

    def timed():
        last = time.perf_counter()
        for batch in batches:
            yield batch
            now = time.perf_counter()
            times.append(now - last)
            last = now

    base = psutil.Process().memory_info().rss
    exact = _reset_peak_rss()
    poller = None if exact else PeakPoller()
    dp = SampleDP(DPSGDSection(enabled=True, clip=1.0, noise_multiplier=1.0), model, args.batch,
                  np.random.default_rng(0)) if private == "on" else None
    if dp is not None:
        privatize = dp.privatize

        def counting(params):
            nonlocal sample_bytes
            sample_bytes = max(sample_bytes, sum(p.grad_sample.numel() * p.grad_sample.element_size()
                                                 for p in params if getattr(p, "grad_sample", None) is not None))
            privatize(params)

        dp.privatize = counting
        method.optim.private = dp
        with dp:
            method.train_round(model, timed(), 0, method.round_seeds(0), "bench")
    else:
        method.train_round(model, timed(), 0, method.round_seeds(0), "bench")
    peak = _vm_hwm() if exact else poller.stop()
    steps = times[1 : args.steps]  # the time between yields: one step each, the first warms up
    return {"arm": args.child, "step_s": statistics.median(steps), "step_s_min": min(steps),
            "step_s_max": max(steps), "rss_growth": peak - base, "per_example_bytes": sample_bytes,
            "trainable": method.trainable_count(model)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for name in args.methods.split(","):
        for private in ("off", "on"):
            arm = f"{name}:{private}"
            print(f"arm {arm}", file=sys.stderr)
            cmd = [sys.executable, "-m", "fedkrso.bench.dpsgd", "--child", arm, "--model", args.model,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
            results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"{'method':10} {'step s (off)':>13} {'step s (DP-SGD)':>16} {'x':>6} {'RSS MiB (off)':>14} "
          f"{'RSS MiB (DP-SGD)':>17} {'per-example MiB':>16}")
    for name in args.methods.split(","):
        off, on = results[f"{name}:off"], results[f"{name}:on"]
        print(f"{name:10} {off['step_s']:13.3f} {on['step_s']:16.3f} {on['step_s'] / off['step_s']:6.2f} "
              f"{off['rss_growth'] / mib:14.1f} {on['rss_growth'] / mib:17.1f} {on['per_example_bytes'] / mib:16.1f}")
    text = json.dumps({"settings": vars(args) | {"child": None}, "arms": results}, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
