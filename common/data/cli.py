"""``fedkrso-partition``: a source to client shards plus an eval split, from the shell."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ..cli import fail, parser
from . import SOURCES_HELP

if TYPE_CHECKING:
    from .partition import PartitionInfo

PROG = "fedkrso-partition"

log = structlog.get_logger(__name__)


def summary_table(info: PartitionInfo) -> str:
    """Shard, size and label histogram, one line each, for a person to eyeball the skew."""
    if info.label_names:
        heads = info.label_names
    elif info.bin_edges:
        heads = [f"<={e:.2f}" for e in info.bin_edges[1:]]
    else:
        heads = []
    widths = [max(len(h), 5) for h in heads]
    splits = [*info.shards, *(info.client_eval or []), info.eval]
    name_width = max(8, *(len(s.name) + 1 for s in splits))
    lines = [(f"{'split':<{name_width}}{'size':>7}  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))).rstrip()]
    for split in splits:
        hist = split.label_histogram or []
        cells = "  ".join(str(c).rjust(w) for c, w in zip(hist, widths))
        lines.append(f"{split.name:<{name_width}}{split.size:>7}  {cells}".rstrip())
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = parser(PROG, "Split a dataset into federated client shards plus an eval split, written under --out "
               "as shard0..N-1 and eval (datasets.save_to_disk) with partition.json.",
               {0: "written", 2: "bad flags; a missing, unreadable or unusable source; --out already holds a "
                "partition"})
    p.add_argument("--source", default="bbc", help=SOURCES_HELP)
    p.add_argument("--glue-dir", type=Path,
                   help="local GLUE folder (without it glue:<TASK> loads from the hub)")
    p.add_argument("--text-column", default="text", help="file/hub text column")
    p.add_argument("--text-pair-column", help="file/hub second-sentence column")
    p.add_argument("--label-column", default="label",
                   help="file/hub label column; absent = plain text for a causal LM")
    p.add_argument("--prompt-column",
                   help="file/hub prompt column: with --response-column, instruction rows for a causal LM")
    p.add_argument("--response-column", help="file/hub response column (the tokens the loss covers)")
    p.add_argument("--clients", type=int, default=3, help="number of client shards")
    p.add_argument("--alpha", type=float,
                   help="Dirichlet label-skew concentration (small = skewed); omit for IID")
    p.add_argument("--seed", type=int, default=0, help="the same seed, source and flags give the same shards")
    p.add_argument("--min-size", type=int, default=10, help="fewest training rows per shard")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share carved out for eval when the source has no dev split")
    p.add_argument("--client-eval-fraction", type=float, default=0.1,
                   help="share of each shard held out as that client's own eval split "
                        "(<out>/shardN/eval); 0 = none")
    p.add_argument("--max-examples", type=int, help="cap on training rows (random subsample)")
    p.add_argument("--max-eval", type=int, help="cap on eval rows (random subsample)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> None:
    """``fedkrso-partition``: split a data source into client shards and an evaluation split."""
    args = _parser().parse_args(argv)
    from .labels import DataSourceError  # datasets and torch load after the parse: --help answers at once
    from .partition import make_partition, save_partition
    from .sources import load_source

    try:
        data = load_source(
            args.source,
            glue_dir=args.glue_dir,
            text_column=args.text_column,
            text_pair_column=args.text_pair_column,
            label_column=args.label_column,
            prompt_column=args.prompt_column,
            response_column=args.response_column,
        )
        log.info("source_loaded", source=args.source, kind=data.kind, train=len(data.train),
                 dev=None if data.eval is None else len(data.eval))
        part = make_partition(
            data,
            args.clients,
            source=args.source,
            alpha=args.alpha,
            seed=args.seed,
            eval_fraction=args.eval_fraction,
            min_size=args.min_size,
            max_examples=args.max_examples,
            max_eval=args.max_eval,
            client_eval_fraction=args.client_eval_fraction,
        )
        save_partition(part, args.out)
    except (DataSourceError, ValueError, FileExistsError, FileNotFoundError) as err:
        fail(PROG, err)
    print(summary_table(part.info))


if __name__ == "__main__":
    main()
