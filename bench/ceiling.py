"""The centralized ceiling of a quality protocol: the same model fine-tuned in one place on the
union of the clients' training rows, so that every federated figure can be read as a gap to it.

Per block of a protocol (``--protocol``), on the block's own partitions (the same shards,
validation split and eval split as its federated cells, written there when missing): full
fine-tuning with the block's FedAvg settings (its knobs, dense lr and optimizer setting:
AdamW, weight decay, warmup, schedule, gradient clipping) from one AdamW that lives for the
whole run, evaluated on the validation split every ``--eval-every`` steps and stopped when the
validation metric has not improved for ``--patience`` evaluations (or after ``--max-epochs``).
The lr is chosen on the validation split (the block's FedAvg lrs, or ``--lrs``, on the first
seed; a tie goes to the better mean of the last 3 readings, ``choose_lr``); each seed's figure
is then its eval-split metric at the step of its best validation metric (and, beside it, the
last one). Every run is a cell under
``<out>/<block>/ceiling/cells/``, so running the command again resumes; a run cut off mid-way
resumes from its last evaluation (``resume.safetensors`` in its work folder: the model,
AdamW's state, the RNG and the curve so far, no pickle; the same curve as an uninterrupted run, tests/test_ceiling.py).

    python -m fedkrso.bench.ceiling --protocol bench/converged.yaml --out results/converged
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ..common import cli
from ..common.logs import quiet_libraries
from .cells import Cell, round_yaml, save_json
from .config import BenchConfig, MethodSpec, load_protocol
from .protocol import block_config
from .report import higher_is_better
from .runner import partition, task_metric
from .stats import mean_std

METHOD = "fedavg"


def _tokens(split, tokenizer, fmt):
    from ..common.data import tokenize

    return tokenize(split, tokenizer, fmt)


def _save_point(path: Path, model, opt, step: int, progress: dict) -> None:
    """The run's point after ``step``, atomically, in one safetensors file (no pickle): the
    model's and AdamW's tensors and the RNG state, with everything else (the step, AdamW's
    groups and scalars, ``progress``: settings and curve) as JSON in the file's metadata."""
    import torch
    from safetensors.torch import save_file

    from ..server.state import atomic_write

    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors["rng"] = torch.get_rng_state()
    opt_state = opt.state_dict()
    scalars: dict[str, dict] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {"step": step, "groups": opt_state["param_groups"], "scalars": scalars, **progress}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"point": json.dumps(meta)}))


def _point_settings(path: Path) -> dict | None:
    """The settings a saved point was trained with (None: unreadable, e.g. an older format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("point", "null") or "null").get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def _load_point(path: Path, model, opt) -> dict:
    """Restore what ``_save_point`` wrote into ``model``, ``opt`` and the RNG; returns its JSON part."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["point"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = [g | {"betas": tuple(g["betas"])} if "betas" in g else g for g in meta["groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng"])
    return meta


def train(cfg: BenchConfig, spec: MethodSpec, lr: float, seed: int, data: Path, workdir: Path, num_labels: int,
          metric: str, eval_every: int, patience: int, max_epochs: float, log=print,
          settings: dict | None = None) -> dict:
    """One centralized run (module docstring): the curve of (step, validation, eval) figures;
    it resumes from ``workdir/resume.safetensors`` when that was saved with the same ``settings``."""
    import torch
    from datasets import concatenate_datasets

    from ..common.config import parse_config
    from ..common.data import batches, load_split
    from ..common.evaluate import evaluate
    from ..common.methods.base import forward_loss
    from ..common.methods.optim import Optimization
    from ..common.participant import Shared
    from ..common.subspace import stable_seed

    workdir.mkdir(parents=True, exist_ok=True)
    run_cfg = parse_config(round_yaml(cfg, Cell(spec, lr, seed, 1, "val"), data, workdir, num_labels))
    shared = Shared.load(run_cfg)
    model, method = shared.model, shared.method
    fmt = run_cfg.token_format()
    union = concatenate_datasets([load_split(p) for p in sorted(data.glob("shard*"), key=lambda p: int(p.name[5:]))
                                  if p.name[5:].isdigit()])
    train_tokens = _tokens(union, shared.tokenizer, fmt)
    val_tokens = _tokens(load_split(data / "val"), shared.tokenizer, fmt)
    eval_tokens = _tokens(load_split(data / "eval"), shared.tokenizer, fmt)
    steps_per_epoch = math.ceil(len(train_tokens) / cfg.batch_size)
    max_steps = max(eval_every, int(max_epochs * steps_per_epoch))
    optim = Optimization(run_cfg.training.optimizer, steps_per_round=max_steps, total_rounds=1)
    seeds = method.round_seeds(0)
    own, dense = method.own(model, seeds), method.dense(model)
    opt = optim.adamw([(own.values(), method.cfg.lr), (dense.values(), method.cfg.dense_lr or method.cfg.lr)])
    model.train()
    torch.manual_seed(stable_seed("ceiling-dropout", seed) % (2**63))  # dropout: the same run on every machine
    data_iter = batches(train_tokens, cfg.batch_size, seed=seed)
    key = f"eval_{metric}"
    better = (lambda a, b: a > b) if higher_is_better(metric) else (lambda a, b: a < b)
    curve: list[dict] = []
    best, since_best, losses, first, before = None, 0, [], 0, 0.0
    point_file = workdir / "resume.safetensors"
    if point_file.is_file() and _point_settings(point_file) == json.loads(json.dumps(settings)):
        saved = _load_point(point_file, model, opt)  # cut off mid-run with these settings: go on from there
        curve, best, since_best, first = saved["curve"], saved["best"], saved["since_best"], saved["step"]
        before = curve[-1]["seconds"] if curve else 0.0
        for _ in range(first):  # the batches already trained on
            next(data_iter)
        log(f"    resumed at step {first}")
    started = time.monotonic() - before
    for step in range(first, max_steps):
        loss = forward_loss(model, next(data_iter))
        loss.backward()
        optim.step([opt], 0, step)
        optim.zero_grad([opt])
        losses.append(loss.item())
        if (step + 1) % eval_every and step + 1 < max_steps:
            continue
        with torch.no_grad():
            val = evaluate(model, val_tokens, cfg.eval_batch_size)
            ev = evaluate(model, eval_tokens, cfg.eval_batch_size)
        point = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3),
                 "train_loss": sum(losses) / len(losses), "val": val[key], "eval": ev[key],
                 "seconds": round(time.monotonic() - started, 1)}
        curve.append(point)
        losses = []
        log(f"    step {point['step']} (epoch {point['epoch']:.2f}): train loss {point['train_loss']:.4f}, "
            f"val {metric} {point['val']:.4f}, eval {point['eval']:.4f}")
        model.train()
        if best is None or better(point["val"], best["val"]):
            best, since_best = point, 0
        else:
            since_best += 1
            if since_best >= patience:
                break
        _save_point(point_file, model, opt, step + 1,
                    {"settings": settings, "curve": curve, "best": best, "since_best": since_best})
    result = {"method": METHOD, "lr": lr, "seed": seed, "metric": metric, "eval_every": eval_every,
            "patience": patience, "max_epochs": max_epochs, "steps_per_epoch": steps_per_epoch,
            "train_rows": len(train_tokens), "best": best, "last": curve[-1], "curve": curve,
            "stopped": "plateau" if since_best >= patience else "max_epochs",
            "seconds": time.monotonic() - started}
    point_file.unlink(missing_ok=True)
    return result


def _cell(path: Path, wanted: dict, run) -> dict:
    """The finished cell at ``path`` when it was run with ``wanted``; else run it and keep it."""
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("settings") == wanted:
            return done
    result = run() | {"settings": wanted}
    save_json(path, result)
    return result


def choose_lr(sweep: dict[float, dict], metric: str) -> float:
    """The lr of the best validation figure among ``sweep``'s runs (lr -> run, in the order
    tried); on a tie (a few hundred validation rows make exact ties of MCC or accuracy
    likely), the better mean of the run's last 3 validation readings, then the first tried."""
    sign = 1 if higher_is_better(metric) else -1

    def key(lr: float) -> tuple[float, float]:
        tail = [p["val"] for p in sweep[lr]["curve"][-3:]]
        return sign * sweep[lr]["best"]["val"], sign * sum(tail) / len(tail)

    return max(sweep, key=key)


def ceiling(cfg: BenchConfig, out: Path, lrs: list[float] | None, eval_every: int, patience: int,
            max_epochs: float, log=print) -> dict:
    """The block's ceiling under ``out`` (the block's folder): lr chosen on the validation
    split, then every seed; the summary written to ``out/ceiling/ceiling.json``."""
    spec = next((m for m in cfg.methods if m.name == METHOD), None)
    if spec is None:
        raise SystemExit(f"fedkrso-bench ceiling: block {cfg.name} runs no {METHOD}: its settings are the ceiling's")
    lrs = lrs or spec.lrs or [spec.model_extra.get("lr", 3e-5)]
    data = {s: out / "data" / f"seed{s}" for s in cfg.seeds}
    infos = {s: partition(cfg, s, data[s]) for s in cfg.seeds}
    if not infos[cfg.seeds[0]].get("val_rows"):
        raise SystemExit("fedkrso-bench ceiling: the block has no validation split (val_fraction) to stop on")
    info = infos[cfg.seeds[0]]
    num_labels = cfg.model.num_labels or info.get("num_labels") or 2
    metric = task_metric(cfg, info)
    settings = {"eval_every": eval_every, "patience": patience, "max_epochs": max_epochs,
                "knobs": spec.knobs(), "optimizer": cfg.optimizer, "batch_size": cfg.batch_size}
    cells = out / "ceiling" / "cells"

    def run(lr: float, seed: int) -> dict:
        tag = f"{METHOD}-lr{lr:g}-s{seed}"
        log(f"  ceiling {tag}")
        result = _cell(cells / f"{tag}.json", settings | {"lr": lr, "seed": seed},
                       lambda: train(cfg, spec, lr, seed, data[seed], out / "ceiling" / "work" / tag, num_labels,
                                     metric, eval_every, patience, max_epochs, log,
                                     settings | {"lr": lr, "seed": seed}))
        log(f"  ceiling {tag}: best val {metric} {result['best']['val']:.4f} at step {result['best']['step']} "
            f"(eval {result['best']['eval']:.4f}), stopped by {result['stopped']}")
        return result

    sweep = {lr: run(lr, cfg.seeds[0]) for lr in lrs}
    chosen = choose_lr(sweep, metric)
    runs = {s: run(chosen, s) for s in cfg.seeds}
    at_best = [r["best"]["eval"] for r in runs.values()]
    at_last = [r["last"]["eval"] for r in runs.values()]
    summary = {"block": cfg.name, "method": METHOD, "metric": metric, "settings": settings,
               "sweep": [{"lr": lr, "val": sweep[lr]["best"]["val"], "step": sweep[lr]["best"]["step"],
                          "chosen": lr == chosen} for lr in lrs],
               "lr": chosen, "seeds": {s: {k: r[k] for k in ("best", "last", "stopped", "seconds", "curve")}
                                       for s, r in runs.items()},
               "at_best_val": mean_std(at_best), "at_last": mean_std(at_last)}
    (out / "ceiling" / "ceiling.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = cli.parser("python -m fedkrso.bench.ceiling", __doc__, {0: "every block's ceiling is done", 2: "usage error"})
    p.add_argument("--protocol", required=True, type=Path, help="the protocol YAML whose blocks get a ceiling")
    p.add_argument("--out", required=True, type=Path, help="the protocol's output folder (shared with its cells)")
    p.add_argument("--blocks", nargs="+", help="only these blocks (default: every block that runs fedavg)")
    p.add_argument("--lrs", nargs="+", type=float, help="lrs to choose from (default: the block's fedavg lrs)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds to report (default: the block's); the lr is "
                   "chosen on the first")
    p.add_argument("--eval-every", type=int, default=100, help="optimizer steps between evaluations")
    p.add_argument("--patience", type=int, default=5, help="evaluations without a better validation metric "
                   "before stopping")
    p.add_argument("--max-epochs", type=float, default=5.0, help="passes over the union of the training rows, at most")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the ceiling of every chosen block of the protocol, resumable."""
    args = parse_args(argv)
    quiet_libraries()  # no datasets bar per saved partition in a log file
    protocol = load_protocol(args.protocol)
    for block in protocol.blocks:
        if args.blocks and block.name not in args.blocks:
            continue
        cfg = block_config(protocol, block.name, args.out, strict=False)
        if args.seeds:
            cfg = cfg.model_copy(update={"seeds": args.seeds})
        if not any(m.name == METHOD for m in cfg.methods):
            continue
        print(f"block {block.name}: centralized ceiling ({METHOD} settings, union of {cfg.clients} shards)", flush=True)
        s = ceiling(cfg, args.out / block.name, args.lrs, args.eval_every, args.patience, args.max_epochs)
        print(f"block {block.name}: ceiling {s['metric']} {s['at_best_val']['mean']:.4f} "
              f"± {s['at_best_val']['std']:.4f} at lr {s['lr']:g} over seeds {list(s['seeds'])}", flush=True)


if __name__ == "__main__":
    main()
