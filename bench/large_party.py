"""One party of a FedKRSO round on a large model, alone in a fresh process: the client's round
or the server's, so their peak memory is measured one after the other (``bench/large.py``).

    python -m fedkrso.bench.large_party client --config round.yaml --data SHARD --dtype bfloat16 --out DIR
    python -m fedkrso.bench.large_party server --config round.yaml --dtype float32 --out DIR --delta DIR/delta.safetensors

The client does what ``fedkrso-client`` does in round 0, with the same code
(``common.participant``): load, fingerprint and place the base model, train the round, build
the update in the wire dtype, then catch up: apply the round's delta (its own update as the
one-client mean, in the wire dtype, as the server would stream it) and fingerprint the state.
It writes that delta. The server does what the coordinator does with it: load and place its
copy, apply the delta, fingerprint, write the state checkpoint and the final model. Each
prints one JSON line: its peak RSS (VmHWM), bytes by dtype, and the figures of the round; the
two state fingerprints must be equal, whatever dtype each party used.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..common.accounting import message_bytes, payload_bytes, seeds_bytes
from ..common.aggregate import StreamingAggregator
from ..common.config import load_config
from ..common.data import load_split
from ..common.participant import Participant, Shared
from ..common.precision import bytes_by_dtype, resolve_placement
from ..common.tensors import DTYPES
from .memory_rss import _vm_hwm


def client(args: argparse.Namespace, cfg) -> dict:
    from safetensors.torch import save_file

    placement = resolve_placement(cfg.model.device, cfg.model.dtype, args.device, args.dtype)
    started = time.monotonic()
    shared = Shared.load(cfg, placement=placement)
    loaded = time.monotonic() - started
    participant = Participant(cfg, "shard0", load_split(args.data), shared)
    seeds = shared.method.round_seeds(0)
    update = participant.train(0, seeds)
    up_message = sum(message_bytes(m) for m in update.requests("large", 0, cfg.server.max_chunk_bytes))
    agg = StreamingAggregator()
    agg.add({k: v.float() for k, v in update.tensors.items()}, update.num_samples)
    wire = DTYPES[cfg.method.wire_dtype]
    delta = {k: v.to(wire) for k, v in agg.result().items()}  # what the server streams back
    save_file(delta, str(Path(args.out) / "delta.safetensors"))
    participant.apply_delta(0, seeds, delta)
    return {"role": "client", "placement": str(placement), "load_seconds": loaded,
            "train_seconds": update.train_seconds, "steps": update.steps, "seeds_used": len(update.seeds_used),
            "uplink_payload_bytes": payload_bytes(update.tensors), "uplink_message_bytes": up_message,
            "downlink_payload_bytes": payload_bytes(delta) + 2 * seeds_bytes(len(seeds)),
            "train_state_bytes": update.train_state_bytes, "bytes_by_dtype": bytes_by_dtype(shared.model),
            "state_fingerprint": shared.method.state_fingerprint(shared.model), "peak_rss": _vm_hwm()}


def server(args: argparse.Namespace, cfg) -> dict:
    from safetensors.torch import load_file

    from ..server.results import save_final
    from ..server.state import write_tensors

    placement = resolve_placement(cfg.model.device, cfg.model.dtype, args.device, args.dtype)
    started = time.monotonic()
    shared = Shared.load(cfg, placement=placement)
    loaded = time.monotonic() - started
    method, model = shared.method, shared.model
    method.apply(model, method.round_seeds(0), load_file(args.delta))
    fp = method.state_fingerprint(model)
    out = Path(args.out)
    write_tensors(out / "checkpoint-000001.safetensors", method.state_parameters(model))
    save_final(cfg, method, model, out, fp)
    return {"role": "server", "placement": str(placement), "load_seconds": loaded,
            "bytes_by_dtype": bytes_by_dtype(model), "state_fingerprint": fp, "peak_rss": _vm_hwm()}


def main(argv: list[str] | None = None) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(prog="python -m fedkrso.bench.large_party", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=("client", "server"))
    ap.add_argument("--config", required=True, help="the run's round.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", help="client: its shard")
    ap.add_argument("--delta", help="server: the round's delta the client wrote")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    print(json.dumps((client if args.role == "client" else server)(args, cfg)))


if __name__ == "__main__":
    main()
