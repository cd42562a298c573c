"""``fedkrso-export``: a run's model after any saved round, and its seed-replay artifact.

  fedkrso-export --run RUN_DIR [--round N] --out DIR    the model after round N (default: the last)
  fedkrso-export --run RUN_DIR --artifact DIR           the run as a seed-replay artifact
  fedkrso-export --artifact DIR --out DIR [--round N]   the model after round N, from an artifact

RUN_DIR is a server's run.output_dir; round N is row N of its metrics.jsonl. The model is
rebuilt from the base model and the saved round deltas and checked against the state
fingerprint the run recorded for that round. DIR/model loads with plain transformers
(AutoModelFor<task>.from_pretrained); FedIT and FFA-LoRA also get DIR/peft, a PEFT adapter
(PeftModel.from_pretrained(base, DIR/peft)); FedTT keeps its adapters in
DIR/model/adapters.safetensors (fedkrso.common.methods.fedtt.load_adapters(model, DIR/model)).
The artifact is safetensors and JSON: the base model's identity, every round's seeds and
aggregated delta, and a manifest with hashes and per-round fingerprints.
"""

from __future__ import annotations

import json
import sys

from ..common import logs
from ..common.cli import add_log_args, fail, parser, require_dir

PROG = "fedkrso-export"
REFUSED = 3


def parse_args(argv: list[str] | None = None):
    p = parser(PROG, __doc__, {0: "written", REFUSED: "refused: the rebuilt model does not match the recorded "
                                                       "fingerprints, or an artifact file does not match its hash"})
    p.add_argument("--run", metavar="RUN_DIR", help="a run's output folder (holds state/)")
    p.add_argument("--artifact", metavar="DIR", help="with --run: write the artifact here; alone: read it")
    p.add_argument("--out", metavar="DIR", help="where the model goes (a new or empty folder)")
    p.add_argument("--round", type=int, metavar="N", help="the model after round N (default: the last)")
    p.add_argument("--config", help="the run's round.yaml, for state written before manifests kept the config")
    p.add_argument("--model", help="where to read the base model (default: the run's model spec)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the server's count, default 1, replays to the same bits)")
    add_log_args(p, "warning")
    args = p.parse_args(argv)
    if args.run and args.artifact and (args.out or args.round is not None):
        p.error("--run with --artifact writes an artifact; --out and --round go with one of them only")
    if args.run and not args.artifact and not args.out:
        p.error("--run needs --out DIR (the model) or --artifact DIR (the artifact)")
    if not args.run and not (args.artifact and args.out):
        p.error("give --run RUN_DIR with --out or --artifact, or --artifact DIR with --out")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(args.log_level, args.log_json)
    require_dir(PROG, args.run or args.artifact, "run folder" if args.run else "artifact")
    import torch

    from ..common.config import ConfigError
    from .artifact import artifact_bytes, rebuild_artifact, write_artifact
    from .export import ExportError, rebuild_run, write_export
    from .state import StateError

    torch.set_num_threads(args.threads)
    try:
        if args.run and args.artifact:
            manifest = write_artifact(args.run, args.artifact, args.config, args.model)
            summary = {"artifact": args.artifact, "run_id": manifest["run_id"], "rounds": len(manifest["rounds"]),
                       "bytes": artifact_bytes(args.artifact)}
        else:
            rebuilt = (rebuild_run(args.run, args.round, args.config, args.model) if args.run
                       else rebuild_artifact(args.artifact, args.round, args.model))
            info = write_export(rebuilt, args.out)
            summary = {"out": args.out, **{k: info[k] for k in ("run_id", "round", "state_fingerprint", "model",
                                                                 "peft", "adapters")}}
    except StateError as err:
        fail(PROG, err, REFUSED)
    except (ExportError, ConfigError, FileNotFoundError) as err:
        fail(PROG, err)
    print(json.dumps(summary), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
