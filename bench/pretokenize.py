"""``python -m fedkrso.bench.pretokenize``: what tokenising a shard once saves a client per round.

A client used to tokenise every batch of every round (``tokenise_every_batch``, kept here as
the reference the token rows must equal); now it tokenises its shard once (``Dataset.map``,
cached beside the shard) and pads the rows of each batch (``Tokens.batch``). On one BBC shard
and the packaged MiniLM this prints, per client round of ``--steps`` batches: the time spent
producing batches both ways, the one-off tokenisation (and its cached reload), and with
``--train`` the whole round (FedKRSO local training on those batches) both ways.
Single-threaded torch, as a client runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..common.data import TokenFormat, load_source, load_split, make_partition, save_partition, tokenize
from ..common.data.feed import batches
from ..common.data.partition import stage_rng
from ..common.models import load_tokenizer


def tokenise_every_batch(dataset, tokenizer, task: str, max_length: int, batch_size: int,
                         seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of ``data.feed.batches`` as they were made before token rows: the same order,
    one tokenizer call per batch, padded to the batch's longest row."""
    rng = stage_rng("batches", seed)
    while True:
        order = rng.permutation(len(dataset))
        for start in range(0, len(order), batch_size):
            rows = dataset[order[start:start + batch_size].tolist()]
            enc = tokenizer(rows["text"], rows.get("text_pair"), padding="longest", truncation=True,
                            max_length=max_length, return_tensors="pt")
            keys = ("input_ids", "attention_mask") + (() if task == "causal-lm" else ("token_type_ids",))
            batch = {k: enc[k] for k in keys if k in enc}
            if task == "causal-lm":
                batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            else:
                batch["labels"] = torch.tensor(rows["label"])
            yield batch


def timed(make: Callable[[int], None], rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` calls of ``make(round)`` (after one warm-up call)."""
    make(-1)
    out = []
    for r in range(rounds):
        started = time.perf_counter()
        make(r)
        out.append(time.perf_counter() - started)
    return out


def _ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):8.1f} ms (median of {len(values)}; min {1000 * min(values):.1f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedkrso.bench.pretokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--rows", type=int, default=600, help="rows of the client's shard (BBC News)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="batches a client round draws")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--train", action="store_true", help="also time whole rounds of FedKRSO training")
    p.add_argument("--train-rounds", type=int, default=4, help="pairs of whole rounds timed with --train")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    task, fmt = "sequence-classification", TokenFormat("sequence-classification", args.max_length)
    with tempfile.TemporaryDirectory(prefix="fedkrso-pretokenize-") as tmp:
        source = load_source("bbc")
        save_partition(make_partition(source, 1, seed=0, max_examples=args.rows, max_eval=8), Path(tmp))
        shard = load_split(Path(tmp) / "shard0")
        started = time.perf_counter()
        tokens = tokenize(shard, tokenizer, fmt)
        first = time.perf_counter() - started
        started = time.perf_counter()
        tokenize(load_split(Path(tmp) / "shard0"), tokenizer, fmt)
        reload = time.perf_counter() - started

        def old(seed: int) -> None:
            stream = tokenise_every_batch(shard, tokenizer, task, args.max_length, args.batch_size, seed)
            for _ in range(args.steps):
                next(stream)

        def new(seed: int) -> None:
            stream = batches(tokens, args.batch_size, seed)
            for _ in range(args.steps):
                next(stream)

        old_s, new_s = timed(old, args.rounds), timed(new, args.rounds)
        print(f"shard: {len(shard)} BBC articles, {args.model}, max_length {args.max_length}, "
              f"batch {args.batch_size}, {args.steps} batches per round, torch threads 1")
        print(f"one-off tokenisation of the shard (Dataset.map): {1000 * first:.1f} ms; "
              f"reload from its cache: {1000 * reload:.1f} ms")
        print(f"batches per round, tokenised every batch: {_ms(old_s)}")
        print(f"batches per round, pre-tokenised:         {_ms(new_s)}")
        saved = statistics.median(old_s) - statistics.median(new_s)
        print(f"saved per client round: {1000 * saved:.1f} ms "
              f"({statistics.median(old_s) / statistics.median(new_s):.1f}x less time producing batches)")
        if args.train:
            _train_rounds(args, shard, tokens, tokenizer, task, source.label_names)


def _train_rounds(args, shard, tokens, tokenizer, task, names) -> None:
    from ..common.config import parse_config
    from ..common.models import load_model

    steps = args.steps // 2
    cfg = parse_config({"model": {"name": args.model, "num_labels": len(names)},
                        "method": {"name": "fedkrso", "k": 4, "rank": 8, "intervals": 2, "interval_steps": steps}})
    method = cfg.build_method()
    model = load_model(args.model, task, len(names), 0)
    method.prepare(model)
    seeds = method.round_seeds(0)
    snapshot = method.snapshot(model)

    def round_with(stream) -> None:
        method.train_round(model, stream, 0, seeds, "client")
        method.restore(model, snapshot)

    old_s, new_s = [], []
    for r in range(-1, args.train_rounds):  # alternating, so load on the host hits both alike
        for times, stream in ((old_s, tokenise_every_batch(shard, tokenizer, task, args.max_length,
                                                           args.batch_size, r)),
                              (new_s, batches(tokens, args.batch_size, r))):
            started = time.perf_counter()
            round_with(stream)
            if r >= 0:  # round -1 warms up
                times.append(time.perf_counter() - started)
    paired = [o - n for o, n in zip(old_s, new_s)]
    print(f"whole FedKRSO round ({2 * steps} local steps), tokenised every batch: {_ms(old_s)}")
    print(f"whole FedKRSO round ({2 * steps} local steps), pre-tokenised:         {_ms(new_s)}")
    print(f"saved per client round (median of paired rounds): {1000 * statistics.median(paired):.1f} ms "
          f"({100 * statistics.median(paired) / statistics.median(old_s):.1f}% of the round); "
          f"pairs: {', '.join(f'{1000 * d:.0f}' for d in paired)} ms")


if __name__ == "__main__":
    main()
