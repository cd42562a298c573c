"""The two arms the memory bench compares, built alike for every measurement: FedKRSO's real
engine and plain full fine-tuning (FFT), on the same fixed batches of random token ids.

An arm holds its model and trains it on a stream of batches (``train``). FedKRSO's
``train_round`` runs its own loop, so an FFT arm also steps one batch at a time (``step``):
the side-by-side timing runs FFT steps inside the iterator that feeds ``train_round``.

Both arms are placed like a party of a run (``--device``, ``--dtype``; common/precision.py):
FedKRSO's projected weights as float32 host masters plus compute copies in the dtype, its
B and dense-trainables float32; FFT trains every weight, so all of them are float32 masters
and only the compute (autocast) is in the dtype.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from ..common.methods.base import forward_loss
from ..common.methods.fedkrso import Config, FedKRSO
from ..common.models import load_model
from ..common.precision import Placement, place, resolve_placement

TASK = "sequence-classification"


def make_batches(vocab: int, n: int, batch: int, length: int, num_labels: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, vocab, (batch, length), generator=gen)
        labels = torch.randint(0, num_labels, (batch,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


class Arm(Protocol):
    model: nn.Module

    def train(self, batches: Iterator[dict]) -> None:
        """Train ``model`` on ``batches``, one optimizer step per batch, until they run out
        or the arm's steps are done."""


def placement(args: argparse.Namespace) -> Placement:
    return resolve_placement("cpu", "float32", getattr(args, "device", None), getattr(args, "dtype", None))


class FedKRSOArm:
    """``FedKRSO.train_round`` (K seeds, rank r, SubspaceAdapter, Adam on B and on the
    dense-trainables): ``intervals`` intervals of ``interval_steps`` steps each."""

    def __init__(self, args: argparse.Namespace, intervals: int, interval_steps: int, client_key: str):
        self.model = load_model(args.model, getattr(args, "task", TASK), num_labels=2)
        cfg = Config(k=args.k, rank=args.rank, intervals=intervals, interval_steps=interval_steps, lr=args.lr)
        self.method = FedKRSO(cfg, run_seed=0)
        self.method.prepare(self.model)
        self.method.place(self.model, placement(args))
        self.client_key = client_key

    @property
    def steps(self) -> int:
        return self.method.cfg.local_steps()

    def train(self, batches: Iterator[dict]) -> None:
        self.method.train_round(self.model, batches, 0, self.method.round_seeds(0), self.client_key)


class FFTArm:
    """torch.optim.Adam on every parameter of the model, in train mode."""

    def __init__(self, args: argparse.Namespace):
        self.model = load_model(args.model, getattr(args, "task", TASK), num_labels=2)
        self.model.requires_grad_(True)
        place(self.model, placement(args))  # every weight trains: all float32 masters
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.fft_lr)

    def step(self, batch: dict) -> float:
        loss = forward_loss(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def train(self, batches: Iterator[dict]) -> None:
        for batch in batches:
            self.step(batch)


def fedkrso_run(args: argparse.Namespace, steps: int) -> FedKRSOArm:
    """FedKRSO for a run of exactly ``steps`` steps: one interval, so the round ends when the
    batches do (a memory run is a few steps, fewer than an interval)."""
    return FedKRSOArm(args, intervals=1, interval_steps=steps, client_key="rss")


def fft_run(args: argparse.Namespace, steps: int) -> FFTArm:
    """FFT for a run of ``steps`` steps: it steps once per batch it is given."""
    return FFTArm(args)


# name -> an arm that trains a given number of steps; the names the report's columns carry
ARMS = {"fedkrso": fedkrso_run, "fft": fft_run}
