"""At what federation size client-level DP stops drowning the signal: the noise central DP puts
on a round's mean update against the measured size of an honest mean update.

``python -m fedkrso.bench.dp_noise [--protocol bench/privacy.yaml] [--epsilon 8] [--out runs/dp-noise]``

The setting is the DP protocol's (``bench/privacy.yaml``: MiniLM-L6 on SST-2, 10 IID clients,
the clip C of its DP blocks, its rounds and delta, each method at the largest lr of its sweep).
Every client trains round 0 from the base model with the method's own code; each update is
clipped to C in the space of the model update (``UpdateGeometry.clip``, as DP does), and their
mean is the honest signal of a round of 10 clients.

For m clients a round (every client every round, q = 1, as in the protocol), the accountant's
noise multiplier z for the run's rounds at the target epsilon does not depend on m, and the
released mean carries noise of norm about z C sqrt(D) / m (D = ``UpdateGeometry.dimension``,
the dimensions the noise fills). The signal is the norm of the mean of m clipped updates,
E ||mean||^2 = ||mu||^2 + tr(Sigma) / m; ``mu`` and ``tr(Sigma)`` are estimated without bias
from the 10 measured updates ((m ||mean||^2 - avg ||x_i||^2) / (m - 1) for ||mu||^2), so the
signal for 100 to 10,000 clients is an extrapolation of IID clients like these, and the noise
is exact; so is the round size at which the two are equal (``crossover``). Writes
``dp_noise.json`` and prints the table of docs/PRIVACY.md (rerunning reads the saved methods).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .config import REPO, load_protocol
from .cells import method_section
from .norms import partition

SIZES = (10, 100, 1_000, 10_000)


def measure(cfg_dict: dict, data: Path, clip: float) -> dict:
    """Round 0 of every shard of ``data`` with the method of ``cfg_dict``: the clipped updates'
    norms, their mean's norm, the estimates of ||mu|| and tr(Sigma), and D."""
    from ..common.config import parse_config
    from ..common.data import load_split
    from ..common.participant import Participant, Shared
    from ..sim.runner import shard_folders

    cfg = parse_config(cfg_dict)
    shared = Shared.load(cfg)
    seeds = shared.method.round_seeds(0)
    geometry = shared.method.update_geometry(shared.model, seeds)
    total, squares, raw = {}, [], []
    for name, path in shard_folders(data).items():
        update = Participant(cfg, name, load_split(path), shared).train(0, seeds)
        clipped, norm = geometry.clip({k: v.double() for k, v in update.tensors.items()}, clip)
        raw.append(norm)
        squares.append(geometry.norm(clipped) ** 2)
        for k, v in clipped.items():
            total[k] = total[k] + v if k in total else v.clone()
    m = len(squares)
    mean_sq = geometry.norm({k: v / m for k, v in total.items()}) ** 2
    mu_sq = max((m * mean_sq - sum(squares) / m) / (m - 1), 0.0)
    return {"clients": m, "dimension": geometry.dimension, "raw_norms": raw,
            "mean_norm": math.sqrt(mean_sq), "mu_norm": math.sqrt(mu_sq),
            "trace_sigma": max(sum(squares) / m - mu_sq, 0.0)}


def rows(results: dict, z: float, clip: float) -> list[dict]:
    out = []
    for method, r in results.items():
        for m in SIZES:
            signal = math.sqrt(r["mu_norm"] ** 2 + r["trace_sigma"] / m)
            noise = z * clip * math.sqrt(r["dimension"]) / m
            out.append({"method": method, "clients": m, "signal": signal, "noise": noise, "ratio": noise / signal})
    return out


def crossover(r: dict, z: float, clip: float) -> float:
    """The clients a round at which the noise's norm on the mean equals the signal's:
    (z C sqrt(D) / m)^2 = ||mu||^2 + tr(Sigma) / m, a quadratic in m."""
    k2, mu2, t = (z * clip) ** 2 * r["dimension"], r["mu_norm"] ** 2, r["trace_sigma"]
    return (-t + math.sqrt(t * t + 4 * mu2 * k2)) / (2 * mu2) if mu2 > 0 else math.inf


def table(results: dict, z: float, clip: float) -> str:
    lines = ["| method | D | raw update norm (median) | mean of 10 clipped | clients a round | signal | "
             "noise on the mean | noise / signal |", "|---|---|---|---|---|---|---|---|"]
    for row in rows(results, z, clip):
        r = results[row["method"]]
        raw = sorted(r["raw_norms"])[len(r["raw_norms"]) // 2]
        lines.append(f"| {row['method']} | {r['dimension']:,} | {raw:.3g} | {r['mean_norm']:.3g} | "
                     f"{row['clients']:,} | {row['signal']:.3g} | {row['noise']:.3g} | {row['ratio']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-dp-noise", description=__doc__.split("\n")[0])
    p.add_argument("--protocol", default=str(REPO / "bench" / "privacy.yaml"))
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--out", default="runs/dp-noise")
    args = p.parse_args(argv)
    from ..common import logs
    from ..common.privacy import accountant

    logs.configure("warning")
    torch.set_num_threads(1)
    protocol = load_protocol(Path(args.protocol))
    bench = next(b for b in map(protocol.bench, protocol.blocks) if b.privacy.get("dp"))
    dp = bench.privacy["dp"]
    clip, delta = float(dp["clip"]), float(dp.get("delta", 1e-5))
    z = accountant.calibrate(args.epsilon, delta, bench.rounds, 1, 1)
    out = Path(args.out).resolve()
    setting = {"source": bench.data.source, "clients": bench.clients, "alpha": bench.alpha,
               "min_size": bench.data.min_size, "max_examples": bench.data.max_examples,
               "glue_dir": bench.data.glue_path()}
    labels = partition(setting, out / "data")
    results_path = out / "dp_noise.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results = saved.get("methods", {})
    for spec in bench.methods:
        if spec.name in results:
            continue
        started = time.monotonic()
        cfg = {"run": {"name": "dp-noise", "seed": 0, "output_dir": str(out / spec.name)},
               "model": {"name": bench.model.name, "task": bench.model.task, "max_length": bench.model.max_length,
                         "num_labels": labels},
               "method": method_section(spec, max(spec.lrs)), "training": {"batch_size": bench.batch_size}}
        results[spec.name] = {**measure(cfg, out / "data", clip), "lr": max(spec.lrs),
                              "seconds": round(time.monotonic() - started, 1)}
        print(spec.name, {k: v for k, v in results[spec.name].items() if k != "raw_norms"}, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"epsilon": args.epsilon, "delta": delta, "rounds": bench.rounds,
                                            "clip": clip, "noise_multiplier": z, "methods": results}, indent=2))
    print(f"epsilon {args.epsilon:g} at delta {delta:g} over {bench.rounds} rounds, q = 1: z = {z:.4g}, C = {clip:g}")
    print(table(results, z, clip))
    for method, r in results.items():
        print(f"{method}: noise = signal at about {crossover(r, z, clip):,.0f} clients a round")


if __name__ == "__main__":
    main()
