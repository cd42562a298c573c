"""Where each method's upload goes: the method's own tensors against the dense-trainables
(task head, pooler, norms, biases), from the methods' own ``update_spec`` on the real model.

``python -m fedkrso.bench.upload_parts [--protocol bench/quality.yaml] [--block sst2-iid]``

Every method of the block, with its knobs from the protocol, is prepared on the block's model
(the classification head for 2 labels) and its upload of round 0 split by tensor name:
``dense.*`` (the same for every method that trains the same dense-trainables) and the rest
(accumulators, LoRA factors, TT cores, weight deltas), in the wire dtype. The pooler's share is
shown apart: it is a 384 x 384 matrix that every method trains densely by default. FedTT+ is
shown as it starts (every core index trains) and with 1 and 2 of its 3 core indices frozen,
the most its adaptive rule can freeze. FedKRSO's figure is for the seed indices a client draws
(``intervals`` of K; here the expected count of distinct ones). Prints a table and the ratios
of the questions in docs/QUALITY.md; nothing is trained.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from .config import REPO, load_protocol


def parts(spec, block_name: str) -> list[dict]:
    from ..common.methods import METHODS
    from ..common.models import load_model
    from ..common.tensors import element_size

    block = spec.bench(next(b for b in spec.blocks if b.name == block_name))
    out = []
    for m in block.methods:
        knobs = {"name": m.name, **m.knobs()}
        variants = [("", knobs)]
        if m.name == "fedtt+":
            variants = [(" (nothing frozen)", {**knobs, "freeze_rule": "fixed", "freeze": []}),
                        (" (1 of 3 frozen)", {**knobs, "freeze_rule": "fixed", "freeze": [0]}),
                        (" (2 of 3 frozen)", {**knobs, "freeze_rule": "fixed", "freeze": [0, -1]})]
        for suffix, section in variants:
            cls = METHODS[m.name]
            cfg = cls.Config.model_validate({k: v for k, v in section.items() if k in cls.Config.model_fields})
            method = cls(cfg, run_seed=0)
            model = load_model(block.model.name, block.model.task, num_labels=2)
            method.prepare(model)
            seeds = method.round_seeds(0)
            specs = method.update_spec(model, seeds)
            size = element_size(cfg.wire_dtype)
            numel = {n: math.prod(shape) for n, shape in specs.items()}
            if m.name == "fedkrso":  # a client sends the accumulators of the indices it drew
                k, draws = cfg.k, cfg.intervals
                expected = k * (1 - (1 - 1 / k) ** draws)
                own = sum(v for n, v in numel.items() if not n.startswith("dense.")) * expected / k
            else:
                own = sum(v for n, v in numel.items() if not n.startswith("dense."))
            dense = sum(v for n, v in numel.items() if n.startswith("dense."))
            pooler = sum(v for n, v in numel.items() if n.startswith("dense.") and re.search(r"pooler", n))
            out.append({"method": m.name + suffix, "own_bytes": own * size, "dense_bytes": dense * size,
                        "pooler_bytes": pooler * size, "total_bytes": (own + dense) * size})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", type=Path, default=REPO / "bench" / "quality.yaml")
    ap.add_argument("--block", default="sst2-iid")
    args = ap.parse_args(argv)
    rows = parts(load_protocol(args.protocol), args.block)
    kib = 1024
    print(f"{'method':28} {'own KiB':>10} {'dense KiB':>10} {'of which pooler':>16} {'total KiB':>10}")
    for r in rows:
        print(f"{r['method']:28} {r['own_bytes'] / kib:10.1f} {r['dense_bytes'] / kib:10.1f} "
              f"{r['pooler_bytes'] / kib:16.1f} {r['total_bytes'] / kib:10.1f}")
    by = {r["method"]: r for r in rows}
    if "fedit" in by:
        for name in [n for n in by if n.startswith("fedtt")]:
            t, f = by[name], by["fedit"]
            print(f"FedIT / {name}: {f['total_bytes'] / t['total_bytes']:.2f}x the whole upload, "
                  f"{f['own_bytes'] / t['own_bytes']:.2f}x the adapters alone, "
                  f"{(f['total_bytes'] - f['pooler_bytes']) / (t['total_bytes'] - t['pooler_bytes']):.2f}x "
                  "without the pooler")


if __name__ == "__main__":
    main()
