"""``python -m fedkrso.bench.sim_vs_ray --config round.yaml --data-root DIR [--actors 2]
[--repeats 2]``: one run of a round.yaml in the in-process simulator and on a local Ray with
an actor pool (``fedkrso-sim --backend ray``), alternately, side by side: wall time of the
whole command (Ray's start included) and of the run itself, the peak of the summed resident
memory of the command's process tree (for Ray: the driver, Ray's own processes and the
actors), each actor's own peak (its VmHWM), and whether both reached the same state
fingerprints after every round (they must, with one torch thread per actor).

Exit codes: 0 done (fingerprints equal), 1 fingerprints differ, 2 a bad flag or missing file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .launch import child_env
from .report import fmt_bytes
from .sim_vs_processes import TreeMemory, fingerprints, write_config


def run_once(base: dict, data: Path, out: Path, extra: list[str]) -> dict:
    config = write_config(base, out)
    cmd = [sys.executable, "-m", "fedkrso.sim.main", "--config", str(config), "--data-root", str(data),
           "--threads", "1", "--log-json", *extra]
    started = time.monotonic()
    with (out / "sim.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env())
        mem = TreeMemory(proc.pid)
        stdout, _ = proc.communicate()
        peak = mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; see {out / 'sim.log'}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": time.monotonic() - started, "run_s": summary["seconds"], "tree_peak_rss": peak,
            "actors": summary.get("actors", []), "fingerprints": fingerprints(out)}


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedkrso.bench.sim_vs_ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", default="results/sim_vs_ray")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    base, data, out = yaml.safe_load(Path(args.config).read_text()), Path(args.data_root), Path(args.out)
    arms = {"in-process": [], f"ray, {args.actors} actors": []}
    extra = {"in-process": [], f"ray, {args.actors} actors": ["--backend", "ray", "--actors", str(args.actors),
                                                            "--cpus-per-actor", "1"]}
    for r in range(args.repeats):
        for arm in arms:  # alternately, so a drift of the machine's load hits both
            res = run_once(base, data, out / f"{arm.split(',')[0]}-{r}", extra[arm])
            arms[arm].append(res)
            print(f"{arm} #{r + 1}: {res['wall_s']:.1f} s wall, run {res['run_s']:.1f} s, tree peak "
                  f"{fmt_bytes(res['tree_peak_rss'])}", flush=True)
    rows = ["| arm | wall s (whole command) | run s | peak RSS, process tree | peak RSS per actor |",
            "|---|---|---|---|---|"]
    for arm, runs in arms.items():
        per_actor = [a["peak_rss_bytes"] for res in runs for a in res["actors"] if a.get("alive")]
        actor_col = (f"{fmt_bytes(min(per_actor))} - {fmt_bytes(max(per_actor))}" if per_actor else "-")
        rows.append(f"| {arm} | {spread([x['wall_s'] for x in runs])} | {spread([x['run_s'] for x in runs])} | "
                    f"{fmt_bytes(max(x['tree_peak_rss'] for x in runs))} | {actor_col} |")
    same = len({tuple(res["fingerprints"]) for runs in arms.values() for res in runs}) == 1
    rows.append(f"\nstate fingerprints after every round: {'identical across every run' if same else 'DIFFER'} "
                f"({args.repeats} repeats per arm, mean ± std)")
    text = "\n".join(rows)
    (out / "sim_vs_ray.md").write_text(text + "\n")
    (out / "sim_vs_ray.json").write_text(json.dumps(arms, indent=2) + "\n")
    print(text)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
