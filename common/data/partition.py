"""Partitioning: a source's training rows into client shards plus an eval split, on disk.

``fedkrso-partition`` splits a source's training data into client shards, IID or with
Dirichlet label skew (Hsu et al., 2019: each class is divided among the clients in proportions
drawn from Dir(alpha), so a small alpha gives each client a few dominant classes), and writes
``<out>/shard0 .. shard{N-1}``, ``<out>/eval`` and ``<out>/partition.json``. With a client
eval fraction each shard also keeps a held-out split of its own rows, ``<out>/shardN/eval``,
stratified like the server's and never trained on: what a client evaluates the global model
on when the data owner gives the server no evaluation data. Every random choice uses its own
``numpy.random.Generator`` seeded from ``stable_seed(stage, seed)``, so a partition is
reproducible on any machine and changing one knob (``--max-examples``) does not reshuffle
unrelated stages (the eval split).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
from datasets import Dataset
from pydantic import BaseModel, ConfigDict, Field

from ..subspace import stable_seed
from .labels import Kind
from .table import SourceData

log = structlog.get_logger(__name__)

PARTITION_FILE = "partition.json"
EVAL_DIR = "eval"
REGRESSION_BINS = 5  # quantile bins that stand in for classes when skewing or stratifying scores
DIRICHLET_TRIES = 100  # re-draws before falling back to moving examples into small shards


def stage_rng(stage: str, seed: int) -> np.random.Generator:
    """The generator of one random stage (eval split, shards, batch order), independent of
    every other stage and of the global RNG."""
    return np.random.default_rng(stable_seed("data", stage, seed))


def label_groups(data: Dataset, kind: Kind) -> tuple[np.ndarray, list[float] | None]:
    """(group id per row, regression bin edges or None): classes (an instruction source's
    grouping label too), score quantile bins, or a single group for rows without a label
    (plain text, most instruction sources: there Dirichlet skew becomes quantity skew)."""
    if "label" not in data.column_names:
        return np.zeros(len(data), dtype=np.int64), None
    labels = np.asarray(data["label"])
    if kind != "regression":
        return labels.astype(np.int64), None
    edges = np.quantile(labels, np.linspace(0.0, 1.0, REGRESSION_BINS + 1))
    return np.searchsorted(edges[1:-1], labels, side="right").astype(np.int64), edges.tolist()


def stratified_split(
    groups: np.ndarray, fraction: float, seed: int, stage: str = "eval-split", at_least: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) row indices with ``max(round(fraction * n), at_least)`` eval rows, each
    group in proportion (largest remainders get the rounding), drawn by ``stage``'s generator."""
    rng = stage_rng(stage, seed)
    ids = np.unique(groups)
    members = [rng.permutation(np.flatnonzero(groups == g)) for g in ids]
    exact = np.array([fraction * len(m) for m in members])
    take = np.floor(exact).astype(int)
    short = max(int(round(fraction * len(groups))), at_least) - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    eval_idx = np.concatenate([m[:k] for m, k in zip(members, take)])
    train_idx = np.concatenate([m[k:] for m, k in zip(members, take)])
    return np.sort(train_idx), np.sort(eval_idx)


def _rebalance(shards: list[np.ndarray], min_size: int, rng: np.random.Generator) -> None:
    # Move random rows from the largest shard to the smallest until all reach min_size; the
    # caller checked n >= clients * min_size, so the largest always has rows to spare.
    while min(len(s) for s in shards) < min_size:
        sizes = [len(s) for s in shards]
        small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
        give = min(min_size - sizes[small], sizes[big] - min_size)
        moved = rng.choice(sizes[big], size=give, replace=False)
        shards[small] = np.concatenate([shards[small], shards[big][moved]])
        shards[big] = np.delete(shards[big], moved)


def partition_indices(
    groups: np.ndarray, clients: int, alpha: float | None, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Disjoint, covering, sorted index arrays, one per client.

    ``alpha=None`` is IID (a random permutation cut into near-equal parts). Otherwise each
    group's rows are divided in proportions drawn from Dir(alpha); a draw that leaves a
    shard under ``min_size`` is re-drawn (up to DIRICHLET_TRIES times), then topped up."""
    n = len(groups)
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be > 0 (or None for IID), got {alpha}")
    if n < clients * min_size:
        raise ValueError(
            f"{n} training examples cannot give {clients} clients {min_size} each; "
            "lower --min-size or --clients"
        )
    rng = stage_rng("partition", seed)
    if alpha is None:
        shards = np.array_split(rng.permutation(n), clients)
    else:
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        for _ in range(DIRICHLET_TRIES):
            parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
            for idx in members:
                idx = rng.permutation(idx)
                cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx))
                for shard, piece in zip(parts, np.split(idx, cuts.astype(int))):
                    shard.append(piece)
            shards = [np.concatenate(p) for p in parts]
            if min(len(s) for s in shards) >= min_size:
                break
    shards = list(shards)
    _rebalance(shards, min_size, rng)
    return [np.sort(s) for s in shards]


def subsample(n: int, k: int | None, stage: str, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic random ``k`` of ``n`` rows (all when k is None)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(stage_rng(stage, seed).choice(n, size=k, replace=False))


class SplitInfo(BaseModel):
    """One split of a partition as partition.json records it: its name, rows and label histogram."""

    name: str
    size: int
    label_histogram: list[int] | None = Field(
        None, description="rows per class (per score bin for regression); None for plain text"
    )


class PartitionInfo(BaseModel):
    """partition.json: how a folder of shards was made, and what is in it."""

    model_config = ConfigDict(extra="forbid")

    source: str
    kind: Kind
    label_names: list[str] | None = Field(None, description="index = class id")
    num_labels: int | None = Field(None, description="model head size: classes, 1 for regression")
    bin_edges: list[float] | None = Field(None, description="score bins of the histograms")
    clients: int
    alpha: float | None = Field(None, description="Dirichlet concentration; None = IID")
    seed: int
    min_size: int
    eval_from: Literal["dev", "carved"]
    eval_fraction: float | None = Field(None, description="share carved out; None for a dev split")
    max_examples: int | None = None
    max_eval: int | None = None
    shards: list[SplitInfo] = Field(description="training rows of each client")
    eval: SplitInfo
    client_eval_fraction: float = Field(
        0.0, description="share of each shard held out as its own eval split (0: none)")
    client_eval: list[SplitInfo] | None = Field(
        None, description="each shard's held-out split, <out>/shardN/eval; None without one")

    def dump(self) -> str:
        """The JSON written to partition.json. Without client eval splits their two fields are
        left out, so such a partition.json reads exactly as before they existed."""
        skip = {"client_eval_fraction", "client_eval"} if not self.client_eval_fraction else set()
        return self.model_dump_json(indent=2, exclude=skip) + "\n"


@dataclass
class Partition:
    """What partitioning made: one dataset per shard, the server's evaluation split, the info written
    as partition.json, and per shard a held-out evaluation split when asked for."""

    shards: list[Dataset]
    eval: Dataset
    info: PartitionInfo
    client_eval: list[Dataset] = field(default_factory=list)  # per shard, when held out


def _histogram(groups: np.ndarray | None, num_groups: int) -> list[int] | None:
    return None if groups is None else np.bincount(groups, minlength=num_groups).tolist()


def make_partition(
    data: SourceData,
    clients: int,
    *,
    source: str = "",
    alpha: float | None = None,
    seed: int = 0,
    eval_fraction: float = 0.1,
    min_size: int = 1,
    max_examples: int | None = None,
    max_eval: int | None = None,
    client_eval_fraction: float = 0.0,
) -> Partition:
    """Client shards and an eval split of ``data``: the source's dev split if it has one,
    else a stratified ``eval_fraction`` carved out before ``max_examples`` caps training.

    With ``client_eval_fraction`` every shard then holds out that share of its own rows
    (stratified, at least one row) as the client's eval split; ``min_size`` counts a shard's
    rows before that."""
    train, evalset = data.train, data.eval
    if evalset is None:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        groups = label_groups(train, data.kind)[0]
        train_idx, eval_idx = stratified_split(groups, eval_fraction, seed)
        train, evalset = train.select(train_idx), train.select(eval_idx)
    train = train.select(subsample(len(train), max_examples, "max-examples", seed))
    evalset = evalset.select(subsample(len(evalset), max_eval, "max-eval", seed))

    if len(evalset) == 0:
        raise ValueError("the eval split is empty; raise --eval-fraction or --max-eval")
    groups, edges = label_groups(train, data.kind)
    counted = "label" in train.column_names
    if not counted:
        eval_groups = None
    elif edges is None:
        eval_groups = label_groups(evalset, data.kind)[0]
    else:  # the eval split's scores, binned on the training split's edges
        eval_groups = np.searchsorted(edges[1:-1], np.asarray(evalset["label"]), side="right")
    shard_idx = partition_indices(groups, clients, alpha, seed, min_size)
    held_idx = hold_out(shard_idx, groups, client_eval_fraction, seed)
    if held_idx:
        shard_idx = [idx[~np.isin(idx, held)] for idx, held in zip(shard_idx, held_idx)]
    width = len(data.label_names) if data.label_names else REGRESSION_BINS

    def split_info(name: str, idx: np.ndarray) -> SplitInfo:
        return SplitInfo(name=name, size=len(idx), label_histogram=_histogram(groups[idx] if counted else None, width))

    info = PartitionInfo(
        source=source,
        kind=data.kind,
        label_names=data.label_names,
        num_labels={"classification": width, "regression": 1}.get(data.kind),
        bin_edges=edges,
        clients=clients,
        alpha=alpha,
        seed=seed,
        min_size=min_size,
        eval_from="dev" if data.eval is not None else "carved",
        eval_fraction=None if data.eval is not None else eval_fraction,
        max_examples=max_examples,
        max_eval=max_eval,
        shards=[split_info(f"shard{i}", idx) for i, idx in enumerate(shard_idx)],
        eval=SplitInfo(name=EVAL_DIR, size=len(evalset),
                       label_histogram=_histogram(eval_groups, width)),
        client_eval_fraction=client_eval_fraction,
        client_eval=[split_info(f"shard{i}/{EVAL_DIR}", idx) for i, idx in enumerate(held_idx)] or None,
    )
    return Partition([train.select(idx) for idx in shard_idx], evalset, info,
                     [train.select(idx) for idx in held_idx])


def hold_out(shard_idx: list[np.ndarray], groups: np.ndarray, fraction: float, seed: int) -> list[np.ndarray]:
    """Each shard's held-out rows (sorted row indices): a stratified ``fraction`` of the
    shard, at least one row, drawn by the shard's own generator so shards do not share draws;
    none at all when ``fraction`` is 0."""
    if not fraction:
        return []
    if not 0 < fraction < 1:
        raise ValueError(f"client_eval_fraction must be in [0, 1), got {fraction}")
    held = []
    for i, idx in enumerate(shard_idx):
        if len(idx) < 2:
            raise ValueError(f"shard{i} has {len(idx)} row(s): too few to hold any out; "
                             "raise --min-size or set --client-eval-fraction 0")
        _, local = stratified_split(groups[idx], fraction, seed, stage=f"client-eval-{i}", at_least=1)
        held.append(idx[local])
    return held


def save_partition(part: Partition, out: str | os.PathLike) -> Path:
    """Write shards, eval split and partition.json under ``out``.

    A folder holding an earlier partition is replaced whole (stale ``shardN`` folders from a
    run with more clients would otherwise look like clients); any other non-empty folder is
    refused rather than mixed into."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / PARTITION_FILE).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {PARTITION_FILE}; refusing")
        for old in out.iterdir():
            if old.is_dir() and (old.name == EVAL_DIR or re.fullmatch(r"shard\d+", old.name)):
                shutil.rmtree(old)
        (out / PARTITION_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)
    for shard, meta in zip(part.shards, part.info.shards):
        shard.save_to_disk(str(out / meta.name))
    for held, meta in zip(part.client_eval, part.info.client_eval or []):
        held.save_to_disk(str(out / meta.name))
    part.eval.save_to_disk(str(out / EVAL_DIR))
    (out / PARTITION_FILE).write_text(part.info.dump())
    log.info("partition_written", out=str(out), shards=len(part.shards), eval=len(part.eval),
             client_eval=[len(h) for h in part.client_eval] or None)
    return out


def read_partition_info(directory: str | os.PathLike) -> dict:
    """partition.json of a partition folder, validated, as a plain dict."""
    path = Path(directory) / PARTITION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PARTITION_FILE} in {directory}; run fedkrso-partition")
    return PartitionInfo.model_validate_json(path.read_text()).model_dump(mode="json")
