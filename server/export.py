"""A run's global model after any saved round, rebuilt from ``<run>/state`` and written where
other tools take it (``fedkrso-export``, ``export_main.py``).

The model is rebuilt exactly as a restarted server rebuilds it (``state.rebuild``): the base
model from the run's config, the latest checkpoint at or before the round, then the round
deltas, every state checked against the fingerprint the run recorded. ``write_export`` then
lays out::

    DIR/export.json   what this is: run, round, state fingerprint, base model, method, folders
    DIR/model/        save_pretrained + tokenizer: AutoModelFor<task>.from_pretrained(DIR/model)
                      (FedTT: + adapters.safetensors, fedtt.load_adapters(model, DIR/model))
    DIR/peft/         FedIT / FFA-LoRA: a PEFT LoRA adapter, PeftModel.from_pretrained(base, DIR/peft)

``DIR/model`` of the last round is written by the same code as ``<run>/final``
(``results.write_model``) from the same state, so the two hold the same tensors. What a method
adds beside it, and the ``export.json`` entries naming that, is the method's own
(``Method.export_artifacts``): this module knows no method by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import structlog
from torch import nn

from ..common.config import ConfigError, RunConfig, load_config, parse_config
from ..common.methods import Method
from ..common.models import base_identity, load_model, model_fingerprint
from ..common.precision import resolve_placement
from .results import write_model
from .state import RunStore, StateError, rebuild, run_identity, shaping_config

log = structlog.get_logger("fedkrso.export")
EXPORT_FORMAT = "fedkrso-export/1"
MODEL_DIR = "model"  # DIR/model: the plain model, as <run>/final holds it


class ExportError(ValueError):
    """Input that cannot be exported: no run there, a round not saved, a folder in the way."""


@dataclass
class Rebuilt:
    """A run's model rebuilt after ``round`` (the metrics.jsonl row of that number)."""

    cfg: RunConfig
    run_id: str
    method: Method
    model: nn.Module
    round: int
    state_fingerprint: str
    base: dict


def load_base(cfg: RunConfig, model: str | None = None) -> tuple[Method, nn.Module, dict]:
    """The run's method and its base model as every party loads it (``model`` overrides where
    the base model is read from, as ``fedkrso-client --model`` does), with its identity."""
    method = cfg.build_method()
    base = load_model(model or cfg.model.name, cfg.model.task, cfg.model.num_labels, cfg.run.seed,
                      revision=cfg.model.revision)
    identity = model_fingerprint(base)  # as loaded, before the method prepares it (as every party)
    method.prepare(base)
    method.place(base, resolve_placement("cpu", "float32"))  # the float32 state every party agrees on
    base.eval()
    return method, base, base_identity(cfg.model.name, base, identity)


def check_base(recorded: dict | None, loaded: dict, refusal: str) -> None:
    """The loaded base model must be the one the run started from (when the run recorded it)."""
    if recorded and recorded.get("model_fingerprint") != loaded["model_fingerprint"]:
        raise StateError(f"the base model {loaded['name']!r} loaded here has fingerprint "
                         f"{loaded['model_fingerprint'][:12]}, the run started from {recorded['model_fingerprint'][:12]} "
                         f"({recorded.get('revision') or recorded.get('source')}); {refusal}")


def config_of(shaping: dict | None, run_id: str, config: str | Path | None, where: str) -> tuple[RunConfig, dict]:
    """The run's config: the one its manifest keeps, else ``config`` (a round.yaml, for state
    written before manifests kept it), which must be the same run (same run_id)."""
    if config is not None:
        cfg = load_config(config)
        shaping = shaping_config(cfg)
    elif shaping is None:
        raise ExportError(f"{where} does not hold the run's config (state written by an older fedkrso); "
                          "pass the run's round.yaml with --config")
    else:
        cfg = parse_config(shaping, f"{where} config")
    if run_identity(shaping) != run_id:
        raise ConfigError(f"{where} is run {run_id!r}, but that config is run {run_identity(shaping)!r}")
    return cfg, shaping


def pick_round(round_: int | None, completed: int, where: str) -> int:
    """The row number asked for (default: the last completed round), checked against the run."""
    if completed == 0:
        raise ExportError(f"{where}: no round has completed yet")
    if round_ is None:
        return completed - 1
    if not 0 <= round_ < completed:
        raise ExportError(f"{where}: round {round_} is not saved; rounds 0..{completed - 1} are")
    return round_


def rebuild_run(run_dir: str | Path, round_: int | None = None, config: str | Path | None = None,
                model: str | None = None) -> Rebuilt:
    """The global model of the run in ``run_dir`` after round ``round_`` (default: the last)."""
    root = Path(run_dir) / "state"
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise ExportError(f"no run state at {root} (a run folder is a server's run.output_dir)")
    m = json.loads(manifest.read_text())
    cfg, _ = config_of(m.get("config"), m["run_id"], config, str(manifest))
    store = RunStore(root, m["run_id"])
    saved = store.load()
    r = pick_round(round_, saved.completed, str(run_dir))
    method, net, base = load_base(cfg, model)
    refusal = "refusing to export"
    check_base(m.get("base_model"), base, refusal)
    rebuild(method, net, store.history(saved), r + 1, refusal)
    log.info("model_rebuilt", run_id=m["run_id"], round=r, state_fingerprint=saved.state_fingerprints[r + 1][:12])
    return Rebuilt(cfg, m["run_id"], method, net, r, saved.state_fingerprints[r + 1], base)


def write_export(rebuilt: Rebuilt, out: str | Path) -> dict:
    """Lay out ``out`` (see the module docstring); returns what ``export.json`` says."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    method, model = rebuilt.method, rebuilt.model
    write_model(rebuilt.cfg, method, model, out / MODEL_DIR)
    info = {
        "format": EXPORT_FORMAT,
        "run_id": rebuilt.run_id,
        "round": rebuilt.round,
        "state_fingerprint": rebuilt.state_fingerprint,
        "method": method.name,
        "task": rebuilt.cfg.model.task,
        "num_labels": rebuilt.cfg.model.num_labels,
        "base_model": rebuilt.base,
        "model": MODEL_DIR,
        "adapters": None,  # every export says whether it has these; the method fills them in
        "peft": None,
        **method.export_artifacts(model, out, MODEL_DIR),
    }
    (out / "export.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("model_exported", out=str(out), round=rebuilt.round, method=method.name)
    return info
