"""Honest update sizes per method, for the defaults of ``server.max_update_norm`` / ``clip_norm``.

``python -m fedkrso.bench.norms --out runs/norms [--rounds 2] [--methods fedkrso,fedavg]``

Every method of ``bench/sst2.yaml`` (its knobs, at the *largest* learning rate of its sweep:
the largest honest steps the bench takes) runs a few rounds in the simulator (``fedkrso-sim``:
every client in one process, the real coordinator and client-side round) in two settings:

* ``demo``: the ``make demo`` setting, MiniLM on BBC News, 3 Dirichlet(0.5) shards, all three
  clients per round, max_length 128;
* ``bench``: the bench setting, MiniLM on SST-2, 10 Dirichlet(0.5) shards, 4 clients per round,
  max_length 64.

The size of an update is what the server bounds: ``method.update_norm``, the L2 norm of the
change of the model's weights the update implies (per_client ``update_norm`` in
metrics.jsonl), so one bound means the same for every method. Nothing is refused or clipped
while measuring. Writes ``norms.json`` and prints a table (max, median, min per method and
setting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import yaml

from .config import DEFAULT_CONFIG, load_bench_config
from .cells import method_section

HERE = Path(__file__).resolve().parent


def settings(bench_config: Path) -> dict[str, dict]:
    """name -> (partition arguments, round.yaml parts) of the demo and the bench setting."""
    demo = yaml.safe_load((HERE / "demo.yaml").read_text())
    bench = load_bench_config(bench_config)
    return {
        "demo": {"source": "bbc", "clients": 3, "per_round": 3, "alpha": 0.5, "min_size": 50,
                 "max_examples": None, "glue_dir": None, "model": demo["model"],
                 "batch_size": demo["training"]["batch_size"]},
        "bench": {"source": bench.data.source, "clients": bench.clients, "per_round": bench.clients_per_round,
                  "alpha": bench.alpha, "min_size": bench.data.min_size, "max_examples": bench.data.max_examples,
                  "glue_dir": bench.data.glue_path(), "batch_size": bench.batch_size,
                  "model": {"name": bench.model.name, "task": bench.model.task, "max_length": bench.model.max_length}},
    }


def partition(setting: dict, out: Path) -> int:
    """The setting's shards under ``out``; the number of labels."""
    from ..common.data import load_source, make_partition, read_partition_info, save_partition

    if not (out / "partition.json").exists():
        glue = setting["glue_dir"] if setting["glue_dir"] and Path(setting["glue_dir"]).is_dir() else None
        src = load_source(setting["source"], glue_dir=glue)
        save_partition(make_partition(src, setting["clients"], source=setting["source"], alpha=setting["alpha"],
                                      seed=0, min_size=setting["min_size"], max_examples=setting["max_examples"],
                                      max_eval=50), out)
    return read_partition_info(out)["num_labels"]


def measure(setting: dict, method: dict, data: Path, out: Path, rounds: int, num_labels: int) -> list[float]:
    """Run the simulator; every accepted update's size."""
    from ..common.config import parse_config
    from ..sim.runner import Simulation

    model = {k: v for k, v in setting["model"].items() if k != "labels"}
    cfg = parse_config({
        "run": {"name": out.name.replace("+", "plus"), "seed": 0, "output_dir": str(out)},
        "model": {**model, "num_labels": num_labels},
        "method": method,
        "rounds": {"total": rounds, "clients_per_round": setting["per_round"], "min_clients": 1},
        "training": {"batch_size": setting["batch_size"], "max_weight_share": None},
        "server": {"max_update_norm": None, "clip_norm": None},
    })
    rows = asyncio.run(Simulation(cfg, data).run())
    return [c["update_norm"] for r in rows for c in r["per_client"].values()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-norms", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/norms")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the bench config (methods, their lrs)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", default="demo,bench")
    p.add_argument("--methods", help="comma-separated labels (default: every method of the bench config)")
    args = p.parse_args(argv)
    import torch

    from ..common import logs

    logs.configure("warning")
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    results_path = out / "norms.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    specs = load_bench_config(args.config).methods
    wanted = set(args.methods.split(",")) if args.methods else None
    for name, setting in settings(Path(args.config)).items():
        if name not in args.settings.split(","):
            continue
        data = out / f"data-{name}"
        num_labels = partition(setting, data)
        for spec in specs:
            if wanted and spec.tag not in wanted:
                continue
            lr = max(spec.lrs) if spec.lrs else None
            started = time.monotonic()
            norms = measure(setting, method_section(spec, lr), data, out / f"{name}-{spec.name}", args.rounds,
                            num_labels)
            results.setdefault(name, {})[spec.name] = {
                "lr": lr, "updates": len(norms), "max": max(norms), "median": statistics.median(norms),
                "min": min(norms), "seconds": round(time.monotonic() - started, 1)}
            print(name, spec.name, results[name][spec.name], flush=True)
            out.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"{'setting':8} {'method':9} {'lr':>8} {'updates':>7} {'max':>10} {'median':>10} {'min':>10}")
    for name, by_method in results.items():
        for method, r in by_method.items():
            print(f"{name:8} {method:9} {r['lr'] or 0:8.1e} {r['updates']:7d} {r['max']:10.4g} "
                  f"{r['median']:10.4g} {r['min']:10.4g}")


if __name__ == "__main__":
    main()
