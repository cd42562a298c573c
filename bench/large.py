"""A billion-parameter model on the CPU: the server's and a client's peak RSS and the bytes of a
round, FedKRSO against full fine-tuning (docs/BENCH.md, "A 1.1B LLaMA-shaped model").

    python -m fedkrso.bench.large [--out results/large] [--client-dtypes bfloat16,float32]

1. Builds TinyLlama-1.1B's shape from a config (random weights, bfloat16 safetensors, no
   download) and plain text shards (``bench/llama.py``).
2. FedKRSO, measured party by party: for each client dtype, the client's round 0 and then
   the server's, each alone in a fresh process (``bench/large_party``: the code of
   ``fedkrso-client`` and of the coordinator, without the transport), so the machine holds one
   copy of the model at a time: batch 1, ``--seq-len`` tokens, K=4, r=8, one interval of 2
   steps. The client trains, builds its update, applies the round's delta and fingerprints the
   state; the server (``--server-dtype``, float32 by default: one float32 copy) applies the
   same delta, must reach the same fingerprint, and writes its checkpoint and the final
   model. Peak RSS is each process's VmHWM (it counts the checkpoint's mapped pages, page
   cache the kernel can reclaim); the anonymous RSS, sampled, leaves them out. The bytes are
   the update's and the delta's payload and the update's gRPC messages. (A real
   ``fedkrso-server`` with a ``fedkrso-client`` needs both at once; ``bench/gpu_check.py``
   runs that on a larger machine, and the test suite on tiny models.)
3. Full fine-tuning cannot be run whole on this machine (about 18 GB for Adam alone in the
   client; the FedAvg client and server about 26 and 26 GB more): its figures at 1.1B are the
   closed forms of ``bench/llama.analytic``, checked against arms measured at reduced depth:
   FFT and FedKRSO training steps (``bench/llama_arms``, fresh processes) on the same shape
   with ``--arm-layers`` layers, whose peak RSS is then extrapolated linearly in the layer
   count (every layer is the same size) to the full depth. A run or an arm starts only when
   the machine has its closed-form memory (plus a margin) available; otherwise it is skipped,
   saying so, and the report keeps the closed form.

Writes ``large.json`` and ``large.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from .launch import child_env
from .llama import Shape, analytic, llama_model, text_shards, write_report, write_round_yaml
from .scale import RssSampler
from .llama_arms import measure

GIB = 2**30


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.2f} MB"


def party(role: str, config: Path, out: Path, extra: list[str]) -> dict:
    """``bench/large_party`` in a fresh process, its anonymous RSS sampled from outside."""
    cmd = [sys.executable, "-m", "fedkrso.bench.large_party", role, "--config", str(config), "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    sampler = RssSampler(proc.pid, every=0.2)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=7200)
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{role} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1]) | {"peak_anon": sampler.peak_anon}


def fedkrso_parties(args, shape: Shape, out: Path) -> list[dict]:
    """For each client dtype: the client's round, then the server's, one process at a time."""
    model = llama_model(out / f"model-{shape.layers}", shape)
    data = text_shards(out / "text", clients=1)
    method = {"name": "fedkrso", "k": args.k, "rank": args.rank, "intervals": 1, "interval_steps": 2, "lr": 1e-4}
    config = write_round_yaml(out / "round", model, method, clients=1, rounds=1, batch=1, max_length=args.seq_len)
    a = analytic(shape, args.k, args.rank)
    runs = []
    for dtype in args.client_dtypes.split(","):
        need = 1.25 * (a["fedkrso_client_bf16" if dtype == "bfloat16" else "fedkrso_client_fp32"] + GIB)
        if psutil.virtual_memory().available < max(need, 1.25 * (a["fedkrso_server_fp32"] + GIB)):
            print(f"FedKRSO parties with a {dtype} client skipped: {gib(need)} not available", flush=True)
            continue
        work = out / f"fedkrso-{dtype}"
        print(f"FedKRSO client ({dtype}), alone", flush=True)
        c = party("client", config, work / "client", ["--data", str(data / "shard0"), "--dtype", dtype])
        print(f"FedKRSO server ({args.server_dtype}), alone", flush=True)
        srv = party("server", config, work / "server", ["--delta", str(work / "client" / "delta.safetensors"),
                                                       "--dtype", args.server_dtype])
        if srv["state_fingerprint"] != c["state_fingerprint"]:
            raise RuntimeError(f"the {dtype} client and the {args.server_dtype} server disagree on the state")
        runs.append({"client_dtype": dtype, "server_dtype": args.server_dtype, "client": c, "server": srv})
    return runs


def reduced_arms(args, shape: Shape, out: Path) -> dict:
    """Peak RSS of the FFT and FedKRSO arms at each reduced depth, extrapolated to full depth."""
    layers = [int(x) for x in args.arm_layers.split(",")]
    arms: dict[str, dict] = {}
    for arm in ("fedkrso", "fft"):
        points = {}
        for n in layers:
            small = shape.with_layers(n)
            need = 1.5 * (16 * small.total if arm == "fft" else 8 * small.total)
            if psutil.virtual_memory().available < need:
                print(f"arm {arm} at {n} layers skipped: {gib(need)} not available", flush=True)
                continue
            print(f"arm {arm} at {n} layers", flush=True)
            path = llama_model(out / f"model-{n}", small)
            got = measure(arm, str(path), device="cpu", dtype=args.arm_dtype, batch=1, seq_len=args.seq_len,
                          steps=2, warmup=1, k=args.k, rank=args.rank, threads=args.threads)
            points[n] = got
        entry: dict = {"points": {n: {"peak_rss": p["peak_rss"], "loaded_rss": p["loaded_rss"],
                                      "parameters": p["parameters"], "median_step_seconds": p["median_step_seconds"]}
                                  for n, p in points.items()}}
        if len(points) >= 2:
            (n0, a), (n1, b) = sorted(points.items())[:2]
            per_layer = (b["peak_rss"] - a["peak_rss"]) / (n1 - n0)
            entry["per_layer"] = per_layer
            entry["extrapolated_peak_rss"] = a["peak_rss"] + per_layer * (shape.layers - n0)
        arms[arm] = entry
    return arms


def render(report: dict) -> str:
    s, a = report["shape"], report["analytic"]
    lines = [f"model: LLaMA-shaped, hidden {s['hidden']}, {s['layers']} layers, intermediate {s['intermediate']}, "
             f"{s['heads']} heads ({s['kv_heads']} KV), vocab {s['vocab']}: {a['parameters']:,} parameters",
             "", "| party | measured peak RSS | closed form (weights + training state) |", "|---|---|---|"]
    for run in report["fedkrso_runs"]:
        c, srv, cd = run["client"], run["server"], run["client_dtype"]
        lines.append(f"| FedKRSO client ({cd}) | {gib(c['peak_rss'])} (anonymous {gib(c['peak_anon'])}) | "
                     f"{gib(a['fedkrso_client_bf16' if cd == 'bfloat16' else 'fedkrso_client_fp32'])} |")
        lines.append(f"| FedKRSO server ({run['server_dtype']}), after that client | {gib(srv['peak_rss'])} "
                     f"(anonymous {gib(srv['peak_anon'])}) | {gib(a['fedkrso_server_fp32'])} |")
    fft = report["arms"].get("fft", {})
    lines.append(f"| FFT (Adam) training, float32 masters | {gib(fft.get('extrapolated_peak_rss'))} extrapolated "
                 f"| {gib(a['fft_arm_fp32'])} |")
    lines.append(f"| FedAvg client (FFT + start copy + snapshot) | not run | {gib(a['fedavg_client_fp32'])} |")
    lines.append(f"| FedAvg server | not run | {gib(a['fedavg_server_fp32'])} |")
    lines += ["", "| client | up payload | up messages | down payload (next round) | train (2 steps) | "
              "same state as the server |", "|---|---|---|---|---|---|"]
    for run in report["fedkrso_runs"]:
        c = run["client"]
        lines.append(f"| FedKRSO, {run['client_dtype']} | {mb(c['uplink_payload_bytes'])} | "
                     f"{mb(c['uplink_message_bytes'])} | {mb(c['downlink_payload_bytes'])} | "
                     f"{c['train_seconds']:.1f} s | {c['state_fingerprint'][:12]} = server |")
    lines += ["", f"closed forms: FedKRSO uplink {mb(a['fedkrso_uplink'])}, downlink after a round "
              f"{mb(a['fedkrso_downlink'])} (one seed drawn); FedAvg {mb(a['fedavg_uplink'])} each way", "", "| arm | layers | peak RSS | RSS loaded | step |",
              "|---|---|---|---|---|"]
    for arm, entry in report["arms"].items():
        for n, p in entry["points"].items():
            lines.append(f"| {arm} | {n} | {gib(p['peak_rss'])} | {gib(p['loaded_rss'])} | "
                         f"{p['median_step_seconds']:.2f} s |")
        if "per_layer" in entry:
            lines.append(f"| {arm} | {report['shape']['layers']} (extrapolated, {gib(entry['per_layer'])}/layer) | "
                         f"{gib(entry['extrapolated_peak_rss'])} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedkrso.bench.large", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/large")
    ap.add_argument("--layers", type=int, default=22, help="depth of the full model")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--server-dtype", default="float32")
    ap.add_argument("--client-dtypes", default="bfloat16,float32")
    ap.add_argument("--arm-layers", default="2,4", help="reduced depths of the FFT/FedKRSO arms")
    ap.add_argument("--arm-dtype", default="float32", help="compute dtype of the arms")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-runs", action="store_true")
    ap.add_argument("--skip-arms", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = Shape().with_layers(args.layers)
    started = time.monotonic()
    report = {"command": "python -m fedkrso.bench.large " + " ".join(sys.argv[1:] if argv is None else argv),
              "shape": asdict(shape), "analytic": analytic(shape, args.k, args.rank),
              "fedkrso_runs": [] if args.skip_runs else fedkrso_parties(args, shape, out),
              "arms": {} if args.skip_arms else reduced_arms(args, shape, out)}
    report["seconds"] = time.monotonic() - started
    write_report(out, "large", report, render)


if __name__ == "__main__":
    main()
