"""The prepared GPU measurement: FedKRSO against full fine-tuning (Adam) and FedIT on a 1.1B
LLaMA-shaped model in bfloat16, then a short federated run of a server and 2 GPU clients.

    python -m fedkrso.bench.gpu_check --out results/gpu            # on a CUDA machine
    python -m fedkrso.bench.gpu_check --out /tmp/gpu-dry --dry-run # here: CPU, tiny model

1. The model: TinyLlama-1.1B's shape from a config (random weights in bfloat16, no download;
   ``--tiny``: hidden 64, 2 layers) and plain text shards (``bench/llama.py``).
2. Three arms, each in a fresh process (``bench/llama_arms.py``) placed like a party of a run
   on ``--device`` in ``--dtype`` (default cuda, bfloat16; common/precision.py), at
   ``--batch`` x ``--seq-len`` (default 4 x 512): FedKRSO's ``train_round`` (K=4, r=8),
   full fine-tuning with Adam (float32 masters of every weight) and FedIT's ``train_round``
   (LoRA rank 8). Per arm: ``torch.cuda.max_memory_allocated`` over the training steps (the
   weights included) and the median step time after ``--warmup`` steps, synchronised.
   An arm that runs out of memory is reported as such; the others still run.
3. A real federated run on that machine: one ``fedkrso-server`` (``--server-dtype``, float32)
   and 2 ``fedkrso-client`` processes, all on ``--device``, the clients in ``--dtype``,
   ``--rounds`` rounds of FedKRSO at the same batch and length. Every process must exit 0 and
   both clients end at the server's final state fingerprint; reported per round: the clients'
   accelerator peaks (from their updates), the bytes and the seconds.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``; a dry run writes the same.
The device budget of a session is short: on an H200 the whole script takes a few minutes
(most of it building and loading the 1.1B model); ``--skip-federated`` and ``--arms`` trim it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from .llama import Shape, federated_run, llama_model, text_shards, write_report
from .llama_arms import ARMS, measure

PAPER_CLIENT_GB = 2.7  # FedKRSO paper: client memory of FedKRSO fine-tuning, about 2.7 GB


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "python": platform.python_version(),
           "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpus=torch.cuda.device_count())
    return env


def run_arms(args, model: Path) -> dict[str, dict]:
    out = {}
    for arm in args.arms.split(","):
        print(f"arm {arm}: {args.device}/{args.dtype}, batch {args.batch} x {args.seq_len}", flush=True)
        try:
            out[arm] = measure(arm, str(model), device=args.device, dtype=args.dtype, batch=args.batch,
                               seq_len=args.seq_len, steps=args.steps, warmup=args.warmup, k=4, rank=8,
                               timeout=args.timeout)
        except RuntimeError as err:  # e.g. CUDA out of memory: keep the other arms
            tail = str(err).strip().splitlines()[-1] if str(err).strip() else "failed"
            out[arm] = {"arm": arm, "error": tail}
            print(f"arm {arm} failed: {tail}", flush=True)
    return out


def run_federated(args, model: Path, out: Path) -> dict:
    data = text_shards(out / "text", clients=2, words=args.seq_len + 64)
    method = {"name": "fedkrso", "k": 4, "rank": 8, "intervals": 1, "interval_steps": 2, "lr": 1e-4}
    res = federated_run(out / "run", model, data, method, clients=2, rounds=args.rounds, batch=args.batch,
                        max_length=args.seq_len, timeout=args.timeout,
                        server_args=["--device", args.device, "--dtype", args.server_dtype],
                        client_args=["--device", args.device, "--dtype", args.dtype])
    keys = ("round", "client_accelerator_peak_bytes", "client_peak_rss_bytes", "uplink_payload_bytes_per_client",
            "downlink_payload_bytes_per_client", "uplink_wire_bytes_per_client", "client_train_seconds",
            "round_seconds", "state_fingerprint")
    return {"seconds": res.seconds, "server_peak_rss": res.server_peak_rss, "placed": res.placed,
            "rounds": [{k: r.get(k) for k in keys} | {"per_client_accelerator_peak_bytes": {
                c: v.get("accelerator_peak_bytes") for c, v in r["per_client"].items()}} for r in res.rows]}


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.2f} MB"


def render(report: dict) -> str:
    a = report["args"]
    lines = [f"# GPU check: {report['model']}", "",
             f"environment: `{json.dumps(report['environment'])}`", "",
             f"placement {a['device']}/{a['dtype']}, batch {a['batch']} x {a['seq_len']} tokens, "
             f"{a['steps']} timed steps after {a['warmup']} warmup", "",
             "| arm | peak accelerator memory | peak RSS (CPU runs) | median step | trainable |", "|---|---|---|---|---|"]
    for arm, r in report["arms"].items():
        if "error" in r:
            lines.append(f"| {arm} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {arm} | {gb(r['accelerator_peak_bytes'] or None)} | {gb(r['peak_rss'])} | "
                     f"{r['median_step_seconds']:.3f} s | {r['trainable']:,} |")
    krso = report["arms"].get("fedkrso", {})
    if krso.get("accelerator_peak_bytes"):
        lines += ["", f"FedKRSO client peak {gb(krso['accelerator_peak_bytes'])} against the paper's about "
                  f"{PAPER_CLIENT_GB} GB (its model, batch and length may differ: compare the shape of the gap "
                  "to full fine-tuning, not the digits)."]
    fed = report.get("federated")
    if fed:
        lines += ["", f"federated run: server + 2 clients, {len(fed['rounds'])} rounds, {fed['seconds']:.0f} s; "
                  f"server peak RSS {gb(fed['server_peak_rss'])}", "",
                  "| round | client accelerator peak | client peak RSS | up payload/client | down payload/client "
                  "| client train | round |", "|---|---|---|---|---|---|---|"]
        for r in fed["rounds"]:
            lines.append(f"| {r['round']} | {gb(r['client_accelerator_peak_bytes'] or None)} | "
                         f"{gb(r['client_peak_rss_bytes'])} | {mb(r['uplink_payload_bytes_per_client'])} | "
                         f"{mb(r['downlink_payload_bytes_per_client'])} | {r['client_train_seconds']:.1f} s | "
                         f"{r['round_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fedkrso.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--server-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the federated run")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--tiny", action="store_true", help="a tiny LLaMA (hidden 64, 2 layers) instead of 1.1B")
    ap.add_argument("--dry-run", action="store_true",
                    help="--device cpu --tiny, batch 2 x 64, 2 steps: proves the script end to end without a GPU")
    ap.add_argument("--skip-federated", action="store_true")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for one arm or the federated run")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny, args.batch, args.seq_len, args.steps = "cpu", True, 2, 64, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    shape = Shape().tiny() if args.tiny else Shape()
    print(f"building the model ({shape.total:,} parameters)", flush=True)
    model = llama_model(out / ("model-tiny" if args.tiny else "model"), shape)
    report = {"command": "python -m fedkrso.bench.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": f"LLaMA-shaped, {shape.total:,} parameters ({shape.layers} layers, hidden {shape.hidden})",
              "environment": environment(args.device), "args": vars(args)}
    report["arms"] = run_arms(args, model)
    if not args.skip_federated:
        print("federated run: server + 2 clients", flush=True)
        report["federated"] = run_federated(args, model, out)
    report["seconds"] = time.monotonic() - started
    write_report(out, "gpu_check", report, render)


if __name__ == "__main__":
    main()
