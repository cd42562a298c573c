"""A billion-parameter model on the CPU: the server's and a client's peak RSS and the bytes of a
round, FedKRSO against full fine-tuning (docs/BENCH.md, "A 1.1B LLaMA-shaped model").

    python -m fedkrso.bench.large [--out results/large] [--client-dtypes bfloat16,float32]

1. Builds TinyLlama-1.1B's shape from a config (random weights, bfloat16 safetensors, no
   download) and plain text shards (``bench/llama.py``).
2. FedKRSO, measured whole: for each client dtype, a real run of one ``fedkrso-server``
   (``--server-dtype``, float32 by default: a CPU server holds one float32 copy) and one
   ``fedkrso-client`` process for 2 rounds, batch 1, ``--seq-len`` tokens, K=4, r=8, one
   interval of 2 steps. The server's peak RSS is its VmHWM sampled until it exits, the
   client's the peak RSS it reports in its update; the bytes are the metrics rows'.
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
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from .llama import Shape, analytic, federated_run, llama_model, text_shards, write_report
from .llama_arms import measure

GIB = 2**30


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.2f} MB"


def fedkrso_runs(args, shape: Shape, out: Path) -> list[dict]:
    model = llama_model(out / f"model-{shape.layers}", shape)
    data = text_shards(out / "text", clients=1)
    method = {"name": "fedkrso", "k": args.k, "rank": args.rank, "intervals": 1, "interval_steps": 2, "lr": 1e-4}
    runs = []
    a = analytic(shape, args.k, args.rank)
    for dtype in args.client_dtypes.split(","):
        # the closed forms plus half a GiB of runtime per process; the checkpoint's mapped
        # pages are page cache the kernel can reclaim, not counted
        need = 1.25 * (a["fedkrso_server_fp32"] + a["fedkrso_client_bf16" if dtype == "bfloat16"
                                                    else "fedkrso_client_fp32"] + GIB)
        if psutil.virtual_memory().available < need:
            print(f"FedKRSO run with a {dtype} client skipped: {gib(need)} not available", flush=True)
            continue
        print(f"FedKRSO run: server {args.server_dtype}, client {dtype}", flush=True)
        res = federated_run(out / f"run-fedkrso-{dtype}", model, data, method, clients=1, rounds=2, batch=1,
                            max_length=args.seq_len, server_args=["--dtype", args.server_dtype],
                            client_args=["--dtype", dtype])
        runs.append({
            "client_dtype": dtype, "server_dtype": args.server_dtype, "seconds": res.seconds,
            "server_peak_rss": res.server_peak_rss, "server_peak_anon": res.server_peak_anon,
            "client_peak_rss": max(r["client_peak_rss_bytes"] for r in res.rows),
            "server_bytes": res.placed["server"].get("bytes"), "client_bytes": res.placed["shard0"].get("bytes"),
            "rounds": [{k: r.get(k) for k in ("round", "uplink_payload_bytes_per_client",
                                              "uplink_wire_bytes_per_client", "downlink_payload_bytes_per_client",
                                              "downlink_wire_bytes_per_client", "client_train_seconds",
                                              "round_seconds", "client_train_state_bytes")} for r in res.rows],
        })
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
        cd = run["client_dtype"]
        lines.append(f"| FedKRSO server ({run['server_dtype']}, with a {cd} client) | {gib(run['server_peak_rss'])} "
                     f"(anonymous {gib(run['server_peak_anon'])}) | {gib(a['fedkrso_server_fp32'])} |")
        lines.append(f"| FedKRSO client ({cd}) | {gib(run['client_peak_rss'])} | "
                     f"{gib(a['fedkrso_client_bf16' if cd == 'bfloat16' else 'fedkrso_client_fp32'])} |")
    fft = report["arms"].get("fft", {})
    lines.append(f"| FFT (Adam) training, float32 masters | {gib(fft.get('extrapolated_peak_rss'))} extrapolated "
                 f"| {gib(a['fft_arm_fp32'])} |")
    lines.append(f"| FedAvg client (FFT + start copy + snapshot) | not run | {gib(a['fedavg_client_fp32'])} |")
    lines.append(f"| FedAvg server | not run | {gib(a['fedavg_server_fp32'])} |")
    lines += ["", "| round | FedKRSO up payload | up wire | down payload | down wire | FedAvg up = down (closed form) |",
              "|---|---|---|---|---|---|"]
    for r in (report["fedkrso_runs"] or [{"rounds": []}])[0]["rounds"]:
        lines.append(f"| {r['round']} | {mb(r['uplink_payload_bytes_per_client'])} | {mb(r['uplink_wire_bytes_per_client'])}"
                     f" | {mb(r['downlink_payload_bytes_per_client'])} | {mb(r['downlink_wire_bytes_per_client'])} | "
                     f"{mb(a['fedavg_uplink'])} |")
    lines += ["", f"closed-form FedKRSO uplink {mb(a['fedkrso_uplink'])}, downlink after a round "
              f"{mb(a['fedkrso_downlink'])} (one seed drawn)", "", "| arm | layers | peak RSS | RSS loaded | step |",
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
              "fedkrso_runs": [] if args.skip_runs else fedkrso_runs(args, shape, out),
              "arms": {} if args.skip_arms else reduced_arms(args, shape, out)}
    report["seconds"] = time.monotonic() - started
    write_report(out, "large", report, render)


if __name__ == "__main__":
    main()
