"""Client memory and step time: FedKRSO local training versus plain full fine-tuning (FFT).

    python -m fedkrso.bench.memory [--steps 14] [--threads N]

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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..common.methods.fedkrso import Config, FedKRSO
from ..common.models import load_model

TASK = "sequence-classification"
TARGET_STATE_RATIO = 0.05
TARGET_TIME_RATIO = 0.8


@dataclass
class Tally:
    """What one method's optimizer steps left behind: bytes and per-step wall times."""

    state_bytes: dict[str, int] = field(default_factory=dict)  # kind -> bytes, max over steps
    times: list[float] = field(default_factory=list)


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def optimizer_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the gradients of ``opt``'s parameters and of every tensor in its state."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = sum(tensor_bytes(v) for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"grad": sum(tensor_bytes(p.grad) for p in params), "adam": state}


class StateMeter:
    """Global optimizer post-step hook: per step, sum grad and state bytes over the optimizers
    of one method (FedKRSO steps two: B's and the dense-trainables'); keep the maximum."""

    def __init__(self, owner: Callable[[torch.optim.Optimizer], str]):
        self.owner = owner
        self.current: dict[str, dict[str, int]] = {}
        self.tallies: dict[str, Tally] = {}
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        step = self.current.setdefault(self.owner(opt), {"grad": 0, "adam": 0})
        for kind, n in optimizer_bytes(opt).items():
            step[kind] += n

    def end_step(self, method: str) -> None:
        step = self.current.pop(method, {"grad": 0, "adam": 0})
        best = self.tallies.setdefault(method, Tally()).state_bytes
        for kind, n in step.items():
            best[kind] = max(best.get(kind, 0), n)

    def close(self) -> None:
        self._handle.remove()


def make_batches(vocab: int, n: int, batch: int, length: int, num_labels: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (batch, length), generator=gen)
        labels = torch.randint(0, num_labels, (batch,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def fedkrso_setup(args) -> tuple[nn.Module, FedKRSO]:
    model = load_model(args.model, TASK, num_labels=2)
    intervals = math.ceil((args.warmup + args.steps) / args.interval_steps)
    cfg = Config(k=args.k, rank=args.rank, intervals=intervals,
                 interval_steps=args.interval_steps, lr=args.lr)
    method = FedKRSO(cfg, run_seed=0)
    method.prepare(model)
    return model, method


def fft_setup(args) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = load_model(args.model, TASK, num_labels=2)
    model.requires_grad_(True)
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=args.fft_lr)


def fft_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


class Alternating:
    """Feeds ``train_round`` its batches and, between two FedKRSO steps, runs one FFT step.

    FedKRSO step i lasts from the return of the i-th batch to the request of the next one (or
    the end of ``train_round``); the FFT step in between is timed on its own."""

    def __init__(self, batches: list[dict], fft: tuple[nn.Module, torch.optim.Optimizer],
                 meter: StateMeter, progress):
        self.batches, self.fft, self.meter, self.progress = batches, fft, meter, progress
        self.i = 0
        self.returned_at: float | None = None

    def end_fedkrso_step(self) -> None:
        if self.returned_at is not None:
            self.meter.tallies.setdefault("fedkrso", Tally()).times.append(
                time.perf_counter() - self.returned_at)
            self.meter.end_step("fedkrso")
            self.progress.update(1)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        self.end_fedkrso_step()
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        start = time.perf_counter()
        fft_step(*self.fft, batch)
        self.meter.tallies.setdefault("fft", Tally()).times.append(time.perf_counter() - start)
        self.meter.end_step("fft")
        self.returned_at = time.perf_counter()
        return batch


def measure_side_by_side(args) -> dict[str, Tally]:
    from tqdm import tqdm

    krso_model, method = fedkrso_setup(args)
    fft = fft_setup(args)
    batches = make_batches(krso_model.config.vocab_size, args.warmup + args.steps, args.batch,
                           args.seq_len, 2, args.data_seed)
    meter = StateMeter(lambda opt: "fft" if opt is fft[1] else "fedkrso")
    total = method.cfg.local_steps()
    try:
        with tqdm(total=total, desc="alternating steps", unit="step", file=sys.stderr) as bar:
            feed = Alternating(batches, fft, meter, bar)
            method.train_round(krso_model, feed, 0, method.round_seeds(0), "bench")
            feed.end_fedkrso_step()
    finally:
        meter.close()
    for tally in meter.tallies.values():
        tally.times = tally.times[args.warmup:]
    return meter.tallies


# -- memory: one fresh child process per method ------------------------------------------------


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


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


def rss_child(args) -> dict:
    """Run ``args.rss_steps`` training steps of one method in this fresh process; report the
    peak RSS growth over the loaded state and the bytes autograd saved per step."""
    if args.child == "fft":
        model, opt = fft_setup(args)
    else:
        args.warmup, args.steps, args.interval_steps = 0, args.rss_steps, args.rss_steps
        model, method = fedkrso_setup(args)
    batches = make_batches(model.config.vocab_size, args.rss_steps, args.batch, args.seq_len, 2,
                           args.data_seed)
    saved = SavedTensors(model)
    base = psutil.Process().memory_info().rss
    exact = _reset_peak_rss()
    poller = None if exact else PeakPoller()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        if args.child == "fft":
            for batch in saved.feed(batches):
                fft_step(model, opt, batch)
        else:
            method.train_round(model, saved.feed(batches), 0, method.round_seeds(0), "rss")
    peak = _vm_hwm() if exact else poller.stop()
    saved.end_step()
    return {"rss_growth": peak - base, "exact": exact, "saved_bytes": saved.peak}


MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_child(args, method: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "fedkrso.bench.memory", "--child", method,
           "--model", args.model, "--threads", str(args.threads), "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--k", str(args.k), "--rank", str(args.rank),
           "--rss-steps", str(args.rss_steps), "--data-seed", str(args.data_seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(args) -> dict[str, dict]:
    """Per method: saved activations and peak RSS growth, the latter both with glibc's default
    malloc (freed heap memory is kept, so fragmentation shows) and with every allocation of
    64 KiB or more served by mmap (returned to the OS on free: the peak of live tensors)."""
    out: dict[str, dict] = {}
    for method in ("fedkrso", "fft"):
        print(f"memory child runs: {method}", file=sys.stderr)
        default = measure_child(args, method, {})
        mmapped = measure_child(args, method, MMAP_ENV)
        out[method] = {"saved_bytes": mmapped["saved_bytes"], "rss_default": default["rss_growth"],
                       "rss_mmap": mmapped["rss_growth"],
                       "exact": default["exact"] and mmapped["exact"]}
    return out


# -- report ------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def iqr(values: list[float]) -> str:
    if len(values) < 4:
        return "n/a"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}-{q3:.3f}"


def report(tallies: dict[str, Tally], rss: dict[str, dict], args) -> str:
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
        f"model={args.model} batch={args.batch} seq_len={args.seq_len} threads={args.threads} "
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
    ap.add_argument("--skip-memory", action="store_true",
                    help="skip the memory child runs (saved activations, RSS)")
    ap.add_argument("--child", choices=["fedkrso", "fft"], help=argparse.SUPPRESS)
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
        rss = {m: dict(nan, exact=True) for m in ("fedkrso", "fft")}
    else:
        rss = measure_memory(args)
    tallies = measure_side_by_side(args)
    print(report(tallies, rss, args))


if __name__ == "__main__":
    main()
