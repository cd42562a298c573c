"""The seed-replay artifact: a whole federated fine-tune as the base model's identity, every
round's seeds and every round's aggregated delta (for FedKRSO: the per-seed accumulators and
the dense-trainables' deltas), which replay onto the base model into the fine-tuned model.

One folder, safetensors and JSON only (no pickle)::

    manifest.json              format + version, fedkrso version, run_id, the run's config,
                               the base model (spec, source, revision, model fingerprint),
                               each round's seeds, delta file and state fingerprint, and the
                               size and SHA-256 of every other file
    round-RRRRRR.safetensors   round R's aggregated delta, byte for byte the server's

``write_artifact`` makes it from a run's ``state/``; ``rebuild_artifact`` checks every file
against its hash, the config against the run_id, the base model against its fingerprint, then
replays the rounds (``state.rebuild``) checking each state fingerprint, so what comes out is
the run's model bit for bit or nothing. The seeds regenerate the subspaces, so FedKRSO's
artifact holds r x d_m per seed and layer instead of d_m x d_n.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import structlog

from ..common.cli import version
from ..common.config import ConfigError, parse_config
from .export import ExportError, Rebuilt, check_base, config_of, load_base, pick_round
from .state import History, RunStore, StateError, read_tensors, rebuild, run_identity

log = structlog.get_logger("fedkrso.export")
ARTIFACT_FORMAT = "fedkrso-seed-replay"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_artifact(run_dir: str | Path, out: str | Path, config: str | Path | None = None,
                   model: str | None = None) -> dict:
    """The artifact of every completed round of the run in ``run_dir``, in ``out`` (a new or
    empty folder); returns its manifest. The base model is loaded once to record its identity
    (and refused when it is not the one the run started from)."""
    root = Path(run_dir) / "state"
    if not (root / MANIFEST).is_file():
        raise ExportError(f"no run state at {root} (a run folder is a server's run.output_dir)")
    m = json.loads((root / MANIFEST).read_text())
    cfg, shaping = config_of(m.get("config"), m["run_id"], config, str(root / MANIFEST))
    saved = RunStore(root, m["run_id"]).load()
    pick_round(None, saved.completed, str(run_dir))  # at least one round
    _, _, base = load_base(cfg, model)
    check_base(m.get("base_model"), base, "refusing to write an artifact of it")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    rounds, files = [], {}
    for r in range(saved.completed):
        name = f"round-{r:06d}.safetensors"
        shutil.copyfile(root / name, out / name)
        files[name] = {"bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
        rounds.append({"round": r, "seeds": saved.seeds[r], "file": name,
                       "state_fingerprint": saved.state_fingerprints[r + 1]})
    manifest = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "fedkrso_version": version(),
        "run_id": m["run_id"],
        "config": shaping,
        "method": cfg.method.name,
        "base_model": m.get("base_model") or base,
        "base_state_fingerprint": saved.state_fingerprints[0],
        "rounds": rounds,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("artifact_written", out=str(out), rounds=len(rounds), bytes=artifact_bytes(out))
    return manifest


def artifact_bytes(folder: str | Path) -> int:
    """Bytes of every file of an artifact, its manifest included."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def read_manifest(folder: str | Path) -> dict:
    """The manifest of the artifact in ``folder``, after checking its format and version, the
    size and hash of every file it lists, and that its config is its run (``StateError`` for
    an artifact that does not hold together, ``ExportError`` for one that is not there)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"no artifact at {folder} (no {MANIFEST})")
    try:
        m = json.loads(path.read_text())
    except ValueError as err:
        raise StateError(f"{path}: not JSON: {err}") from None
    if m.get("format") != ARTIFACT_FORMAT:
        raise ExportError(f"{path}: format {m.get('format')!r}, not a {ARTIFACT_FORMAT} artifact")
    if m.get("version") != ARTIFACT_VERSION:
        raise ExportError(f"{path}: artifact version {m.get('version')!r}; this fedkrso reads version "
                          f"{ARTIFACT_VERSION}")
    for name, meta in m["files"].items():
        f = folder / name
        if Path(name).name != name or not f.is_file():
            raise StateError(f"{folder}: file {name!r} listed in the manifest is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise StateError(f"{f} does not match the manifest's size and SHA-256: the artifact is damaged")
    if run_identity(m["config"]) != m["run_id"]:
        raise StateError(f"{path}: its config is not run {m['run_id']!r}: the manifest was edited")
    listed = {r["file"] for r in m["rounds"]}
    if not listed <= set(m["files"]) or [r["round"] for r in m["rounds"]] != list(range(len(m["rounds"]))):
        raise StateError(f"{path}: rounds and files do not agree")
    return m


def rebuild_artifact(folder: str | Path, round_: int | None = None, model: str | None = None) -> Rebuilt:
    """The run's model after round ``round_`` (default: the last) from the artifact in
    ``folder``; ``model`` is where to read the base model from (default: the config's spec)."""
    folder = Path(folder)
    m = read_manifest(folder)
    try:
        cfg = parse_config(m["config"], f"{folder / MANIFEST} config")
    except ConfigError as err:
        raise StateError(str(err)) from None
    r = pick_round(round_, len(m["rounds"]), str(folder))
    method, net, base = load_base(cfg, model)
    refusal = "refusing to rebuild from this artifact"
    check_base(m["base_model"], base, refusal)
    fingerprints = {0: m["base_state_fingerprint"]}
    fingerprints.update({x["round"] + 1: x["state_fingerprint"] for x in m["rounds"]})
    files = {x["round"]: folder / x["file"] for x in m["rounds"]}
    history = History({x["round"]: x["seeds"] for x in m["rounds"]}, fingerprints, lambda i: read_tensors(files[i]))
    rebuild(method, net, history, r + 1, refusal)
    log.info("model_rebuilt", artifact=str(folder), round=r, state_fingerprint=fingerprints[r + 1][:12])
    return Rebuilt(cfg, m["run_id"], method, net, r, fingerprints[r + 1], base)
