"""Running the bench: one Dirichlet partition, then for every method (and every learning rate
of its sweep) a real federated job of one server and one client process per shard.

``run_bench`` rewrites ``results.json``, ``results.md`` and the plot after each method, so a
long bench that is stopped still leaves the methods it finished.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..common.config import parse_config
from .config import BenchConfig, MethodSpec
from .launch import Cluster
from .plot import plot
from .report import fmt_acc, fmt_bytes, render, score, summarise, sweep_entry, targets


def partition(cfg: BenchConfig, out: Path) -> dict:
    """Split the data into ``cfg.clients`` shards plus the eval set under ``out``; the
    partition's info (shard sizes, labels)."""
    from ..common.data import load_source, make_partition, read_partition_info, save_partition

    d = cfg.data
    glue_dir = d.glue_path()
    if glue_dir is not None and not glue_dir.is_dir():
        print(f"glue_dir {glue_dir} not found: GLUE comes from the hub", flush=True)
        glue_dir = None
    src = load_source(d.source, glue_dir=glue_dir, text_column=d.text_column,
                      text_pair_column=d.text_pair_column, label_column=d.label_column)
    part = make_partition(src, cfg.clients, source=d.source, alpha=cfg.alpha, seed=cfg.seed,
                          eval_fraction=d.eval_fraction, min_size=d.min_size,
                          max_examples=d.max_examples, max_eval=d.max_eval)
    save_partition(part, out)
    return read_partition_info(out)


def round_yaml(cfg: BenchConfig, method: dict, rounds: int, data: Path, out: Path, run_name: str,
               num_labels: int) -> dict:
    return {
        "run": {"name": run_name, "seed": cfg.seed, "output_dir": str(out)},
        "model": {"name": cfg.model.name, "task": cfg.model.task, "num_labels": num_labels,
                  "max_length": cfg.model.max_length, "device": cfg.model.device, "dtype": cfg.model.dtype},
        "method": method,
        "rounds": {"total": rounds, "clients_per_round": cfg.clients_per_round,
                   "min_clients": cfg.clients_per_round, "deadline_s": cfg.deadline_s,
                   "start_timeout_s": 900.0},
        "training": {"batch_size": cfg.batch_size},
        "eval": {"data": str(data / "eval"), "batch_size": cfg.eval_batch_size},
        "server": {"listen": "127.0.0.1:0"},
    }


def run_one(cfg: BenchConfig, method: dict, rounds: int, data: Path, workdir: Path,
            num_labels: int) -> list[dict]:
    """One real federated job (server + ``cfg.clients`` client processes); its metrics rows."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    run_name = workdir.name.replace("+", "plus")
    rc = round_yaml(cfg, method, rounds, data, workdir, run_name, num_labels)
    parse_config(rc, "generated round.yaml")  # fail here, not in a child process
    config = workdir / "round.yaml"
    config.write_text(yaml.safe_dump(rc, sort_keys=False))
    cluster = Cluster(workdir)
    try:
        cluster.start_server(config)
        for i in range(cfg.clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}",
                                 args=["--poll-seconds", str(cfg.poll_seconds)])
        code = cluster.wait(cfg.run_timeout_s)
        if code != 0:
            raise RuntimeError(f"server exited {code}:\n{cluster.server.text()[-3000:]}")
        # Clients that sat out the last round may still be in a long-poll or retrying a
        # server that is gone; the metrics are complete, so give them a moment, then stop.
        give_up = time.monotonic() + 10.0
        for c in cluster.clients:
            try:
                c.wait(max(0.1, give_up - time.monotonic()))
            except Exception:  # noqa: BLE001 - a lingering client does not void the metrics
                pass
    finally:
        cluster.stop()
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def analytic_state(cfg: BenchConfig, methods: list[dict], num_labels: int) -> dict[str, dict]:
    """Per method (keyed by its label): model and trainable parameters, the closed-form
    gradient + Adam state bytes and the local steps per round. Each method counts its own
    trainables (``Method.trainable_count``); the bench reports these where a client measured
    no state of its own."""
    from ..common.methods import build_method
    from ..common.models import load_model

    out: dict[str, dict] = {}
    for m in methods:
        section = {k: v for k, v in m.items() if k != "label"}
        mc = parse_config({"model": {"name": cfg.model.name, "task": cfg.model.task,
                                     "num_labels": num_labels}, "method": section}).method
        model = load_model(cfg.model.name, cfg.model.task, num_labels, cfg.seed)
        meth = build_method(mc, cfg.seed)
        meth.prepare(model)
        out[m.get("label") or mc.name] = {
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": meth.trainable_count(model),
            "state_bytes": meth.train_state_bytes_formula(model),
            "local_steps": mc.local_steps(),
        }
        del model
    return out


def method_section(spec: MethodSpec, lr: float | None) -> dict:
    section = {"name": spec.name, **spec.knobs()}
    if lr is not None:
        section["lr"] = lr
    return section


def default_lr(cfg: BenchConfig, spec: MethodSpec) -> float:
    section = method_section(spec, None)
    return parse_config({"model": {"name": cfg.model.name}, "method": section}).method.lr


def write_report(report: dict, out: Path) -> None:
    """``results.md`` and the plot of ``report`` under ``out`` (results.json is the caller's)."""
    (out / "results.md").write_text(render(report))
    plot(report, out / report["plot"])


def run_bench(cfg: BenchConfig, out: Path, command: str = "fedkrso-bench",
              log: Callable[[str], None] = print) -> dict:
    """The whole bench of ``cfg`` under ``out``: partition, analytic state, every method's
    sweep and final run; the report that results.json holds."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    log(f"partitioning {cfg.data.source} into {cfg.clients} shards (alpha={cfg.alpha}) ...")
    info = partition(cfg, data)
    causal = cfg.model.task == "causal-lm"
    num_labels = cfg.model.num_labels or info.get("num_labels") or 2
    sections = [method_section(m, (m.lrs or [None])[0]) | {"label": m.tag} for m in cfg.methods]
    state = analytic_state(cfg, sections, num_labels)
    report: dict[str, Any] = {
        "name": cfg.name, "command": command, "causal": causal, "data_source": cfg.data.source,
        "clients": cfg.clients, "alpha": cfg.alpha, "clients_per_round": cfg.clients_per_round,
        "train_rows": sum(s["size"] for s in info["shards"]), "eval_rows": info["eval"]["size"],
        "model": cfg.model.name, "task": cfg.model.task, "max_length": cfg.model.max_length,
        "batch_size": cfg.batch_size, "rounds": cfg.rounds, "sweep_rounds": cfg.sweep_rounds,
        "target_accuracy": None if causal else cfg.target_accuracy, "analytic_state": state,
        "plot": "accuracy_vs_bytes.png", "results": [], "sweep": [], "targets": [], "runtime_s": 0.0,
    }

    def save() -> None:
        report["runtime_s"] = time.monotonic() - started
        report["targets"] = targets({s["method"]: s for s in report["results"]})
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        write_report(report, out)

    for spec in cfg.methods:
        lrs = spec.lrs or [default_lr(cfg, spec)]
        st = state[spec.tag]
        chosen_lr, chosen_rows = lrs[0], None
        if len(lrs) > 1:
            sweep = []
            for lr in lrs:
                tag = f"{spec.tag}-lr{lr:g}-sweep"
                t0 = time.monotonic()
                rows = run_one(cfg, method_section(spec, lr), cfg.sweep_rounds, data, out / "runs" / tag, num_labels)
                s = summarise(spec.tag, lr, rows, st, None)
                log(f"  sweep {spec.tag} lr={lr:g}: acc {fmt_acc(s['final_accuracy'])} loss "
                    f"{s['final_eval_loss']} ({time.monotonic() - t0:.0f} s)")
                sweep.append((score(rows, causal), lr, rows, s))
            best = max(sweep, key=lambda x: x[0])
            chosen_lr = best[1]
            if cfg.sweep_rounds == cfg.rounds:
                chosen_rows = best[2]
            for _, lr, _, s in sweep:
                report["sweep"].append(sweep_entry(s, chosen=lr == chosen_lr))
        if chosen_rows is None:
            tag = f"{spec.tag}-lr{chosen_lr:g}" if chosen_lr is not None else spec.tag
            t0 = time.monotonic()
            chosen_rows = run_one(cfg, method_section(spec, chosen_lr), cfg.rounds, data,
                                  out / "runs" / tag, num_labels)
            log(f"  run {spec.tag} lr={chosen_lr}: {time.monotonic() - t0:.0f} s")
        if len(lrs) == 1:
            report["sweep"].append(sweep_entry(summarise(spec.tag, chosen_lr, chosen_rows, st, None),
                                               chosen=True))
        s = summarise(spec.tag, chosen_lr, chosen_rows, st, report["target_accuracy"])
        s["base_method"] = spec.name
        report["results"].append(s)
        log(f"{spec.tag} lr={chosen_lr:g}: final acc {fmt_acc(s['final_accuracy'])}, uplink "
            f"{fmt_bytes(s['uplink_payload_per_client_round'])}/client/round")
        save()
    save()
    return report
