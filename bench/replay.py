"""A reported run that was already trained: the sweep's run of the same method, lr, seed and
rounds, scored again on the reported split.

A sweep cell and a reported cell of the same (method, lr, seed, rounds) train the very same
rounds (the evaluation split is the only difference, and the server's evaluation never feeds
back into training: their state fingerprints are equal round for round). When a protocol
sweeps at its full budget (``sweep_rounds == rounds``) and sets ``reuse_sweep_runs``, the
sweep cells of the reported seeds keep their run state (every round's aggregated delta), and
the reported cell at the chosen lr is made from it here: the base model is brought forward
one saved delta at a time (``server.state.rebuild``, every state checked against the run's
fingerprints), and after each round the server's own evaluator (``ServerEvaluator``) scores
it on the reported split. The rows are the sweep cell's, with the evaluation replaced (so
its timings, and its message bytes: an upload names its run, and a sweep run's name is a byte
shorter per message; payload bytes are the same to the byte); the result names the cell it
came from (``replayed_from``). It costs one evaluation per round
instead of a whole run (tests/test_cells.py checks it against a run on the reported split).
"""

from __future__ import annotations

import json
from pathlib import Path

EVAL_PREFIX = "eval_"


def replay_rows(sweep_dir: Path, sweep_rows: list[dict], config: Path) -> list[dict]:
    """The sweep run in ``sweep_dir`` (its ``state/`` kept) scored after each round with the
    evaluation of the run config at ``config`` (the reported cell's round.yaml)."""
    from ..common.config import load_config
    from ..server.export import config_of, load_base
    from ..server.results import ServerEvaluator
    from ..server.state import History, RunStore, rebuild

    root = sweep_dir / "state"
    manifest = json.loads((root / "manifest.json").read_text())
    saved_cfg, _ = config_of(manifest.get("config"), manifest["run_id"], None, str(root))
    store = RunStore(root, manifest["run_id"])
    saved = store.load()
    if saved is None or saved.completed != len(sweep_rows):
        raise RuntimeError(f"{sweep_dir}: its state holds {0 if saved is None else saved.completed} rounds, "
                           f"its result {len(sweep_rows)}")
    evaluator = ServerEvaluator(load_config(config))
    method, model, _ = load_base(saved_cfg)
    scored: dict[int, dict] = {}

    def score(r: int, _delta) -> None:
        scored[r] = evaluator(model)

    # from the base, not a checkpoint: every round's model is scored
    history = History(saved.seeds, saved.state_fingerprints, store.delta, 0, None)
    rebuild(method, model, history, saved.completed, "the sweep run cannot be replayed", visit=score)
    rows = []
    for r, row in enumerate(sweep_rows):
        kept = {k: v for k, v in row.items() if not k.startswith(EVAL_PREFIX)}
        rows.append({**kept, **scored[r]})
    return rows
