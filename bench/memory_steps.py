"""Step time and gradient + optimizer-state bytes of the two arms, side by side in one
process: FedKRSO and FFT steps strictly alternate, so load from other processes on a shared
machine hits both alike.

State bytes are counted from the tensors themselves by a global optimizer post-step hook,
i.e. after the step and before ``zero_grad``, independently of what the method reports
about itself.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .memory_arms import FedKRSOArm, FFTArm, make_batches


@dataclass
class Tally:
    """What one arm's optimizer steps left behind: bytes and per-step wall times."""

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
    of one arm (FedKRSO steps two: B's and the dense-trainables'); keep the maximum."""

    def __init__(self, owner: Callable[[torch.optim.Optimizer], str]):
        self.owner = owner
        self.current: dict[str, dict[str, int]] = {}
        self.tallies: dict[str, Tally] = {}
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        step = self.current.setdefault(self.owner(opt), {"grad": 0, "adam": 0})
        for kind, n in optimizer_bytes(opt).items():
            step[kind] += n

    def end_step(self, arm: str) -> None:
        step = self.current.pop(arm, {"grad": 0, "adam": 0})
        best = self.tallies.setdefault(arm, Tally()).state_bytes
        for kind, n in step.items():
            best[kind] = max(best.get(kind, 0), n)

    def close(self) -> None:
        self._handle.remove()


class Alternating:
    """Feeds ``train_round`` its batches and, between two FedKRSO steps, runs one FFT step.

    FedKRSO step i lasts from the return of the i-th batch to the request of the next one (or
    the end of ``train_round``); the FFT step in between is timed on its own."""

    def __init__(self, batches: list[dict], fft: FFTArm, meter: StateMeter, progress):
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
        self.fft.step(batch)
        self.meter.tallies.setdefault("fft", Tally()).times.append(time.perf_counter() - start)
        self.meter.end_step("fft")
        self.returned_at = time.perf_counter()
        return batch


def measure_side_by_side(args: argparse.Namespace) -> dict[str, Tally]:
    """Per arm: the largest grad and Adam-state bytes of any step, and the step times after
    ``args.warmup`` steps."""
    from tqdm import tqdm

    krso = FedKRSOArm(args, intervals=math.ceil((args.warmup + args.steps) / args.interval_steps),
                      interval_steps=args.interval_steps, client_key="bench")
    fft = FFTArm(args)
    batches = make_batches(krso.model.config.vocab_size, args.warmup + args.steps, args.batch,
                           args.seq_len, 2, args.data_seed)
    meter = StateMeter(lambda opt: "fft" if opt is fft.opt else "fedkrso")
    try:
        with tqdm(total=krso.steps, desc="alternating steps", unit="step", file=sys.stderr) as bar:
            feed = Alternating(batches, fft, meter, bar)
            krso.train(feed)
            feed.end_fedkrso_step()
    finally:
        meter.close()
    for tally in meter.tallies.values():
        tally.times = tally.times[args.warmup:]
    return meter.tallies
