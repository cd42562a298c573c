"""The training side: a saved split back from disk, and its token rows drawn into batches.

Clients read a shard with ``load_split`` (and their held-out split with ``load_client_eval``),
tokenise it once (``tokens.tokenize``) and draw from ``batches``, which reshuffles every epoch
with its own generator, never the global RNG, so a client's batch order depends only on its
seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk

from .partition import EVAL_DIR, stage_rng
from .tokens import Tokens


def load_split(path: str | os.PathLike) -> Dataset:
    """A shard or eval split written by ``fedkrso-partition``."""
    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"no dataset at {path}; write one with `fedkrso-partition --out {path.parent}`"
        )
    data = load_from_disk(str(path))
    if not isinstance(data, Dataset):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected one split")
    return data


def load_client_eval(shard: str | os.PathLike) -> Dataset | None:
    """The held-out split a shard keeps of its own rows (``<shard>/eval``, written by
    ``fedkrso-partition --client-eval-fraction``), or None when it has none."""
    path = Path(shard) / EVAL_DIR
    return load_split(path) if (path / "dataset_info.json").is_file() else None


def batches(tokens: Tokens, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless CPU batches of ``tokens``: each epoch visits every row once in a fresh order
    (the last batch of an epoch may be smaller). The order comes from a generator seeded with
    ``seed`` alone, so the same seed gives the same stream on every machine."""
    if len(tokens) == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    rng = stage_rng("batches", seed)
    while True:
        order = rng.permutation(len(tokens))
        for start in range(0, len(order), batch_size):
            yield tokens.batch(order[start : start + batch_size].tolist())
