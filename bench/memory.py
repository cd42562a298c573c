"""Client memory and step time: FedKRSO local training versus plain full fine-tuning (FFT).

    python -m fedkrso.bench.memory [--steps 14] [--threads N] [--device cuda] [--dtype bfloat16]

Both methods train the packaged MiniLM-L6 classifier on the same fixed batches (random token
ids, batch 16, length 128, fixed seed) in train mode (dropout on, as in real training).
FedKRSO runs the real engine, ``FedKRSO.train_round`` (K=4, r=8, SubspaceAdapter, Adam on B
and on the dense-trainables); FFT is torch.optim.Adam on every parameter. Reported per method:

* gradient + optimizer-state bytes, counted exactly from tensors: the ``.grad`` of every
  parameter an optimizer steps (all of them are alive together when backward ends) and every
  tensor in its Adam state (exp_avg, exp_avg_sq, step), read by a global optimizer post-step
  hook, i.e. after the step and before ``zero_grad``;
* in a fresh child process per method, ``--rss-steps`` training steps: the bytes autograd
  saves for backward per step (distinct storages seen by ``saved_tensors_hooks``, the model's
  weights excluded), and the peak RSS growth over the loaded state: the kernel's high-water
  mark (VmHWM, reset through /proc/self/clear_refs; psutil polling where that is refused)
  minus the RSS at that moment. RSS is taken twice: with glibc's default malloc, which keeps
  freed heap memory and so shows fragmentation, and with ``MALLOC_MMAP_THRESHOLD_=65536``,
  where every tensor lives in its own mapping and the peak tracks live tensors;
* mean and median step time over ``--steps`` steps after ``--warmup``, the two methods
  strictly alternating step by step in one process (FFT steps run inside the iterator that
  feeds ``train_round``), and the median of the ratios of adjacent steps: a burst of load
  from other processes on a shared machine hits both steps of a pair alike, so that median is
  the figure the target is checked on. A FedKRSO step time includes its share of interval
  ends (W += B P, fresh P and Adam state).

Targets (issue "FedKRSO training engine"): gradient + optimizer state <= 5% of FFT; step time
<= 0.8x FFT.

The two arms are built in ``memory_arms``, measured side by side in ``memory_steps`` and in
child processes in ``memory_rss``; this module is the command line and the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch

from ..common.cli import add_placement_args
from .memory_arms import ARMS
from .memory_rss import measure_memory, rss_child
from .memory_steps import Tally, measure_side_by_side

TARGET_STATE_RATIO = 0.05
TARGET_TIME_RATIO = 0.8


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def iqr(values: list[float]) -> str:
    if len(values) < 4:
        return "n/a"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}-{q3:.3f}"


def report(tallies: dict[str, Tally], rss: dict[str, dict], args: argparse.Namespace) -> str:
    """The table, FedKRSO against FFT row by row, and the verdict on the two targets."""
    krso, fft = tallies["fedkrso"], tallies["fft"]

    def state(t: Tally) -> int:
        return t.state_bytes["grad"] + t.state_bytes["adam"]

    rows = [
        ("gradient bytes", lambda t, m: t.state_bytes["grad"], mib),
        ("Adam state bytes", lambda t, m: t.state_bytes["adam"], mib),
        ("gradient + optimizer state", lambda t, m: state(t), mib),
        ("autograd saved activations", lambda t, m: rss[m]["saved_bytes"], mib),
        ("peak RSS growth, glibc malloc", lambda t, m: rss[m]["rss_default"], mib),
        ("peak RSS growth, mmap >=64KiB", lambda t, m: rss[m]["rss_mmap"], mib),
        ("step time, mean", lambda t, m: statistics.fmean(t.times), lambda v: f"{v * 1e3:,.0f} ms"),
        ("step time, median", lambda t, m: statistics.median(t.times),
         lambda v: f"{v * 1e3:,.0f} ms"),
    ]
    lines = [
        f"model={args.model} device={args.device or 'cpu'} dtype={args.dtype or 'float32'} "
        f"batch={args.batch} seq_len={args.seq_len} threads={args.threads} "
        f"K={args.k} r={args.rank} J={args.interval_steps} timed_steps={len(krso.times)} "
        f"(after {args.warmup} warmup, alternating) rss_steps={args.rss_steps}"
        f"{'' if all(r['exact'] for r in rss.values()) else ' rss=polled'}",
        f"{'':30} {'FedKRSO':>14} {'FFT':>14} {'FedKRSO/FFT':>12}",
    ]
    for label, get, fmt in rows:
        a, b = get(krso, "fedkrso"), get(fft, "fft")
        lines.append(f"{label:30} {fmt(a):>14} {fmt(b):>14} {a / b:>12.3f}")
    pairs = [a / b for a, b in zip(krso.times, fft.times, strict=True)]
    lines.append(f"{'step time, adjacent pairs':30} {'':>29} {statistics.median(pairs):>12.3f}"
                 f"  (median of {len(pairs)}; IQR {iqr(pairs)})")
    state_ratio = state(krso) / state(fft)
    time_ratio = statistics.median(pairs)
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    lines.append(f"target grad+optimizer state <= {TARGET_STATE_RATIO:.0%} of FFT: "
                 f"{state_ratio:.2%} ({verdict(state_ratio <= TARGET_STATE_RATIO)})")
    lines.append(f"target step time <= {TARGET_TIME_RATIO}x FFT (median adjacent-pair ratio): "
                 f"{time_ratio:.3f}x ({verdict(time_ratio <= TARGET_TIME_RATIO)})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fedkrso.bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="alias, folder or hub id")
    ap.add_argument("--steps", type=int, default=14, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--rss-steps", type=int, default=3, help="steps of each memory child run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="FedKRSO K: seeds per round")
    ap.add_argument("--rank", type=int, default=8, help="FedKRSO r: rows of each P")
    ap.add_argument("--interval-steps", type=int, default=8, help="FedKRSO J: steps per seed")
    ap.add_argument("--lr", type=float, default=3e-4, help="FedKRSO Adam lr on B and dense")
    ap.add_argument("--fft-lr", type=float, default=3e-5, help="FFT Adam lr")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch.set_num_threads for every run (default: usable cores)")
    ap.add_argument("--data-seed", type=int, default=0)
    add_placement_args(ap)
    ap.add_argument("--skip-memory", action="store_true",
                    help="skip the memory child runs (saved activations, RSS)")
    ap.add_argument("--child", choices=sorted(ARMS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.steps, args.rss_steps, args.batch, args.seq_len) < 1 or args.warmup < 0:
        ap.error("--steps, --rss-steps, --batch, --seq-len must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(rss_child(args)))
        return
    if args.skip_memory:
        nan = {"saved_bytes": math.nan, "rss_default": math.nan, "rss_mmap": math.nan}
        rss = {arm: dict(nan, exact=True) for arm in ARMS}
    else:
        rss = measure_memory(args)
    tallies = measure_side_by_side(args)
    print(report(tallies, rss, args))


if __name__ == "__main__":
    main()
