"""The common table every source becomes, whatever format it came from.

Three shapes, one per kind of task:

* ``classification`` / ``regression``: ``text``, an optional ``text_pair`` (sentence-pair
  tasks) and ``label``: int64 class ids, or float32 scores (STS-B);
* ``text``: ``text`` (and ``text_pair``) only, plain text for a causal LM;
* ``instruction``: ``prompt`` and ``response`` for a causal LM trained on the response only,
  plus an optional ``label`` (int64) that only groups rows when partitioning (BBC headlines
  keep their topic, so a Dirichlet split skews topics per client).

Explicit features, so an int label never becomes a float and an empty split keeps its schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset, Features, Value

from .labels import Kind


@dataclass
class SourceData:
    """A loaded source: training rows, its own dev split if it has one, and label names."""

    train: Dataset
    eval: Dataset | None
    kind: Kind
    label_names: list[str] | None = None


def _features(kind: Kind, with_pair: bool) -> Features:
    cols = {"text": Value("string")}
    if with_pair:
        cols["text_pair"] = Value("string")
    if kind != "text":
        cols["label"] = Value("int64" if kind == "classification" else "float32")
    return Features(cols)


def to_dataset(kind: Kind, text: list[str], pair: list[str] | None, label: list | None) -> Dataset:
    """The common table of a classification, regression or plain-text source: ``text``,
    ``text_pair`` when ``pair`` is given, ``label`` unless ``kind`` is plain text."""
    if kind == "instruction":
        raise ValueError("instruction rows are prompt/response pairs: use instruction_dataset")
    cols: dict[str, list] = {"text": text}
    if pair is not None:
        cols["text_pair"] = pair
    if kind != "text":
        cols["label"] = label
    return Dataset.from_dict(cols, features=_features(kind, pair is not None))


def instruction_dataset(prompt: list[str], response: list[str], label: list[int] | None = None) -> Dataset:
    """The common table of an instruction source: ``prompt``, ``response`` and, when given,
    a ``label`` that groups rows for partitioning (never a training target)."""
    cols: dict[str, list] = {"prompt": prompt, "response": response}
    features = {"prompt": Value("string"), "response": Value("string")}
    if label is not None:
        cols["label"] = label
        features["label"] = Value("int64")
    return Dataset.from_dict(cols, features=Features(features))
