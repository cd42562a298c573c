"""Running the bench: per seed one partition (shards, a validation split carved from the
training rows, the eval split), then for every method an lr sweep scored on the validation
split and the chosen lr's runs on every seed, scored on the eval split.

Every run is a result cell (``cells.py``): finished cells are loaded, not run again, and
``run_bench`` rewrites ``results.json``, ``results.md`` and the plot after each phase, so a long
bench that is stopped still reports what it finished and resumes where it stopped. The cells
of a phase (every method's sweep, then every method's reported runs) go to a pool
(``ray_cells.py``): one after another here, or as Ray tasks with ``--ray``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..common.config import parse_config
from .cells import Cell, method_section, release_state
from .config import BenchConfig, MethodSpec
from .plot import plot
from .ray_cells import CellPool, Progress
from .report import aggregate, answers, differences, render, summarise, sweep_score


def partition(cfg: BenchConfig, seed: int, out: Path) -> dict:
    """Shards, ``val`` (carved from the training rows before they are split, stratified) and
    ``eval`` (the source's dev split, or carved) under ``out``, all from ``seed``; reused when
    it is there already. The partition's info (sizes, labels)."""
    from ..common.data import load_source, make_partition, read_partition_info, save_partition
    from ..common.data.partition import label_groups, stratified_split, subsample

    if (out / "partition.json").is_file() and (not cfg.val_fraction or (out / "val").is_dir()):
        return read_partition_info(out) | {"val_rows": _rows(out / "val")}
    d = cfg.data
    glue_dir = d.glue_path()
    if glue_dir is not None and not glue_dir.is_dir():
        print(f"glue_dir {glue_dir} not found: GLUE comes from the hub", flush=True)
        glue_dir = None
    src = load_source(d.source, glue_dir=glue_dir, text_column=d.text_column,
                      text_pair_column=d.text_pair_column, label_column=d.label_column,
                      prompt_column=d.prompt_column, response_column=d.response_column)
    val = None
    if cfg.val_fraction:
        train_idx, val_idx = stratified_split(label_groups(src.train, src.kind)[0], cfg.val_fraction, seed)
        val = src.train.select(val_idx)
        val = val.select(subsample(len(val), d.max_eval, "max-val", seed))
        src.train = src.train.select(train_idx)
    part = make_partition(src, cfg.clients, source=d.source, alpha=cfg.alpha, seed=seed,
                          eval_fraction=d.eval_fraction, min_size=d.min_size,
                          max_examples=d.max_examples, max_eval=d.max_eval,
                          client_eval_fraction=d.client_eval_fraction)
    save_partition(part, out)
    if val is not None:  # under its name only when whole: a run cut off here redoes it, not reuses half
        tmp = out / ".val.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out / "val", ignore_errors=True)
        val.save_to_disk(str(tmp))
        os.replace(tmp, out / "val")
    return read_partition_info(out) | {"val_rows": len(val) if val is not None else 0}


def _rows(split: Path) -> int:
    from ..common.data import load_split

    return len(load_split(split)) if split.is_dir() else 0


def past_edge(lrs: list[float], scores: dict[float, float]) -> float | None:
    """The lr to sweep next when the best-scoring of ``lrs`` (the first of a tie, as the sweep
    chooses) is the lowest or the highest of them: one step of the grid beyond it (the ratio of
    the two outermost lrs on that side); None when the choice lies inside the grid."""
    if len(lrs) < 2:
        return None
    best = max(lrs, key=lambda lr: scores[lr])
    low, high = sorted(lrs)[:2], sorted(lrs)[-2:]
    if best == high[1]:
        return float(f"{high[1] * high[1] / high[0]:.12g}")  # 4e-3, not 0.004000000000000001
    if best == low[0]:
        return float(f"{low[0] * low[0] / low[1]:.12g}")
    return None


def default_lr(cfg: BenchConfig, spec: MethodSpec) -> float:
    return parse_config({"model": {"name": cfg.model.name}, "method": method_section(spec, None)}).method.lr


def task_metric(cfg: BenchConfig, info: dict) -> str:
    """The metric the bench reports and selects by (``BenchConfig.metric``)."""
    from ..common.metrics import primary_metric

    if cfg.metric:
        return cfg.metric
    if cfg.model.task == "causal-lm":
        return "loss"
    return primary_metric(cfg.data.source, info.get("kind") == "regression")


def write_report(report: dict, out: Path) -> None:
    """``results.md`` and the plot of ``report`` under ``out`` (results.json is the caller's)."""
    (out / "results.md").write_text(render(report))
    plot(report, out / report["plot"])


def run_bench(cfg: BenchConfig, out: Path, command: str = "fedkrso-bench",
              log: Callable[[str], None] = print, pool: type[CellPool] = CellPool,
              overall: Progress | None = None) -> dict:
    """The whole bench of ``cfg`` under ``out``; the report that results.json holds. ``pool``:
    where the cells run (``RayCellPool``: as Ray tasks, several at once); ``overall``: the
    protocol's progress, when its blocks run side by side."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    data = {s: out / "data" / f"seed{s}" for s in cfg.seeds}
    log(f"partitioning {cfg.data.source} into {cfg.clients} shards (alpha={cfg.alpha}), seeds {cfg.seeds} ...")
    infos = {s: partition(cfg, s, data[s]) for s in cfg.seeds}
    info = infos[cfg.seeds[0]]
    num_labels = cfg.model.num_labels or info.get("num_labels") or 2
    metric = task_metric(cfg, info)
    split = "val" if cfg.val_fraction else "eval"
    report: dict[str, Any] = {
        "name": cfg.name, "command": command, "metric": metric, "select_by": cfg.select_by,
        "data_source": cfg.data.source, "clients": cfg.clients, "alpha": cfg.alpha,
        "clients_per_round": cfg.clients_per_round, "train_rows": sum(s["size"] for s in info["shards"]),
        "val_rows": info["val_rows"], "eval_rows": info["eval"]["size"], "model": cfg.model.name,
        "task": cfg.model.task, "max_length": cfg.model.max_length, "batch_size": cfg.batch_size,
        "rounds": cfg.rounds, "sweep_rounds": cfg.sweep_rounds, "seeds": cfg.seeds, "runner": cfg.runner,
        "optimizer": cfg.optimizer, "plot": "metric_vs_bytes.png", "results": {}, "sweep": [],
        "differences": {}, "answers": [], "runtime_s": 0.0,
    }

    def save() -> None:
        report["runtime_s"] = time.monotonic() - started
        report["differences"] = differences(report["results"], metric)
        report["answers"] = answers(report["results"], report["differences"], metric)
        from ..server.state import atomic_write  # here: this module stays light

        # whole or not at all: a protocol's blocks side by side read it from other threads
        atomic_write(out / "results.json", (json.dumps(report, indent=2) + "\n").encode())
        write_report(report, out)

    sweeps = {spec.tag: spec.lrs for spec in cfg.methods if spec.lrs and len(spec.lrs) > 1}

    def sweep_scores(spec: MethodSpec, lrs: list[float], swept: dict[str, dict]) -> dict[float, float]:
        """Each lr's sweep score, the mean over the sweep seeds (higher is better)."""
        scores = {}
        for lr in lrs:
            runs = [swept[Cell(spec, lr, s, cfg.sweep_rounds, split).tag] for s in cfg.seeds[: cfg.sweep_seeds]]
            values = [sweep_score(r, cfg.select_by, metric) for r in runs]
            scores[lr] = sum(values) / len(values)
        return scores

    progress = Progress(cfg.planned_runs(), log, overall=overall, metric=metric)
    cells = pool(progress)

    def run_phase(phase: list[Cell]) -> list[dict]:
        """The phase's cells through the pool (at once where it can), each logged with its figure."""
        results = cells.run(cfg, phase, data, out, num_labels)
        summaries = []
        for c, result in zip(phase, results):
            summary = summarise(result, metric)
            log(f"  {c.spec.tag} lr={c.lr:g} seed={c.seed} on {c.split}: {metric} {summary['final']} "
                f"({result['seconds']:.0f} s)")
            summaries.append(summary)
        return summaries

    # the lr sweeps of every method (past an edge of its grid where extend_edges asks), then
    # every method's reported runs at its chosen lr
    swept_lrs = {tag: list(lrs) for tag, lrs in sweeps.items()}
    phase = [Cell(spec, lr, s, cfg.sweep_rounds, split) for spec in cfg.methods if spec.tag in sweeps
             for lr in spec.lrs for s in cfg.seeds[: cfg.sweep_seeds]]
    swept: dict[str, dict] = {}
    for extension in range(cfg.extend_edges + 1):
        swept |= {c.tag: r for c, r in zip(phase, run_phase(phase))}
        if extension == cfg.extend_edges:
            break
        phase = []
        for spec in cfg.methods:
            if spec.tag in sweeps:
                beyond = past_edge(swept_lrs[spec.tag], sweep_scores(spec, swept_lrs[spec.tag], swept))
                if beyond is not None:
                    log(f"  {spec.tag}: the sweep chose an edge of its lrs; lr {beyond:g} swept too (extend_edges)")
                    swept_lrs[spec.tag].append(beyond)
                    phase += [Cell(spec, beyond, s, cfg.sweep_rounds, split) for s in cfg.seeds[: cfg.sweep_seeds]]
        if not phase:
            break
        progress.plan_more(len(phase))
    chosen = {}
    for spec in cfg.methods:
        lrs = swept_lrs.get(spec.tag) or spec.lrs or [default_lr(cfg, spec)]
        chosen[spec.tag] = lrs[0]
        if spec.tag in sweeps:
            scores = sweep_scores(spec, lrs, swept)
            chosen[spec.tag] = max(lrs, key=lambda lr: scores[lr])
            for lr in lrs:
                if lr != chosen[spec.tag]:
                    for s in cfg.seeds[: cfg.sweep_seeds]:
                        release_state(out, Cell(spec, lr, s, cfg.sweep_rounds, split))
            for lr in lrs:
                shown = scores[lr] if scores[lr] != float("-inf") else None
                if shown is not None and metric in ("loss", "perplexity"):
                    shown = -shown
                report["sweep"].append({"method": spec.tag, "lr": lr, "seeds": cfg.seeds[: cfg.sweep_seeds],
                                        "score": shown, "chosen": lr == chosen[spec.tag]})
            save()
    phase = [Cell(spec, chosen[spec.tag], seed, cfg.rounds, "eval") for spec in cfg.methods for seed in cfg.seeds]
    reported = {c.tag: r for c, r in zip(phase, run_phase(phase))}
    for spec in cfg.methods:
        entry = {"method": spec.tag, "base_method": spec.name, "knobs": spec.knobs(), "lr": chosen[spec.tag],
                 "seeds": {}}
        report["results"][spec.tag] = entry
        for seed in cfg.seeds:
            entry["seeds"][seed] = reported[Cell(spec, chosen[spec.tag], seed, cfg.rounds, "eval").tag]
            entry["aggregate"] = aggregate(entry)
    save()
    return report
