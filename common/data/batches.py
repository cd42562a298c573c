"""The training side: a saved split back from disk, tokenised into batches.

Clients read a shard with ``load_split`` and draw from ``batches``, which reshuffles every epoch
with its own generator, never the global RNG, so a client's batch order depends only on its
seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from datasets import Dataset, load_from_disk

from ..models import Task
from .partition import stage_rng

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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


def encode(
    rows: dict[str, list], tokenizer: PreTrainedTokenizerBase, task: Task, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenise a column-dict of rows (``dataset[i:j]``) into one padded batch with labels.

    Classification labels come out int64 (cross-entropy), regression scores float32 (MSE,
    which transformers picks from the dtype); for a causal LM the labels are the input ids
    with padding set to -100 so padding never counts in the loss, and ``token_type_ids`` are
    left out: decoders have no segments, and GPT-2 would add a token embedding for them."""
    enc = tokenizer(
        rows["text"],
        rows.get("text_pair"),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    keys = ("input_ids", "attention_mask") + (() if task == "causal-lm" else ("token_type_ids",))
    batch = {k: enc[k] for k in keys if k in enc}
    if task == "causal-lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    elif "label" not in rows:
        raise ValueError("sequence-classification needs a 'label' column; this split has none")
    else:
        batch["labels"] = torch.tensor(rows["label"])
    return batch


def batches(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    max_length: int,
    batch_size: int,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless CPU batches: each epoch visits every row once in a fresh order (the last batch
    of an epoch may be smaller). The order comes from a generator seeded with ``seed`` alone,
    so the same seed gives the same stream on every machine."""
    if len(dataset) == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    rng = stage_rng("batches", seed)
    while True:
        order = rng.permutation(len(dataset))
        for start in range(0, len(order), batch_size):
            rows = dataset[order[start : start + batch_size].tolist()]
            yield encode(rows, tokenizer, task, max_length)
