"""``fedkrso-export``: the model after any saved round, PEFT and FedTT adapters, and the
seed-replay artifact, from runs of the real simulator (``fedkrso-sim``, one process) on a tiny
BERT. Every export is checked against what the run itself recorded or wrote: the per-round
state fingerprints of metrics.jsonl and the tensors of ``<run>/final``."""

from __future__ import annotations

import importlib
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import metric_rows, round_config
from fedkrso.bench import launch
from method_cases import small

pytestmark = pytest.mark.slow

PROBE = {"input_ids": torch.tensor([[101, 2204, 3185, 2466, 102, 0], [101, 2919, 2143, 2466, 3185, 102]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])}
def sim_run(tmp: Path, model: Path, data: Path, method: str, **sections) -> Path:
    """A finished 3-round run of ``method`` by the simulator (checkpoint after round 1, so
    rebuilding round 2 starts from it and rounds 0 and 1 from the base); its output folder."""
    out = tmp / f"run-{method}"
    cfg = round_config(model, out, method=small(method), server={"checkpoint_every": 2}, **sections)
    config = tmp / f"{method}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = launch.run("fedkrso.sim.main", ["--config", str(config), "--data-root", str(data)], tmp, f"sim-{method}", 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def export(*args: str) -> subprocess.CompletedProcess:
    """``fedkrso-export args`` (as ``python -m``, started warm: ``bench/launch.py``)."""
    return launch.run("fedkrso.server.export_main", list(args), Path(tempfile.mkdtemp(prefix="export-")), "export", 600)


def export_here(run: Path, out: Path, round_: int | None = None) -> dict:
    """The same export in this process (no interpreter start); what export.json says."""
    from fedkrso.server.export import rebuild_run, write_export

    return write_export(rebuild_run(run, round_), out)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**PROBE).logits


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def krso_run(tmp_path_factory, tiny_bert, shards) -> Path:
    return sim_run(tmp_path_factory.mktemp("krso"), tiny_bert, shards, "fedkrso")


def test_every_round_rebuilds_to_its_recorded_fingerprint(krso_run):
    from fedkrso.server.export import rebuild_run

    rows = metric_rows(krso_run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    fingerprints = set()
    for row in rows:
        rebuilt = rebuild_run(krso_run, row["round"])
        assert rebuilt.state_fingerprint == row["state_fingerprint"]
        assert rebuilt.method.state_fingerprint(rebuilt.model) == row["state_fingerprint"]
        fingerprints.add(row["state_fingerprint"])
    assert len(fingerprints) == 3  # every round moved the model


def test_export_of_the_last_round_is_final_bit_for_bit(krso_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fedkrso.server.export import rebuild_run

    proc = export("--run", str(krso_run), "--out", str(tmp_path / "last"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["round"] == 2 and summary["peft"] is None and summary["adapters"] is None
    info = json.loads((tmp_path / "last" / "export.json").read_text())
    assert set(info) == {"format", "run_id", "round", "state_fingerprint", "method", "task", "num_labels",
                         "base_model", "model", "adapters", "peft"}
    assert info["model"] == "model" and info["method"] == "fedkrso" and info["format"] == "fedkrso-export/1"
    assert info["state_fingerprint"] == metric_rows(krso_run)[-1]["state_fingerprint"]
    assert info["state_fingerprint"] == (krso_run / "final_state_fingerprint.txt").read_text().strip()
    assert_same_tensors(tmp_path / "last" / "model" / "model.safetensors", krso_run / "final" / "model.safetensors")
    # plain transformers loads it, and it computes what the rebuilt model computes
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "last" / "model")
    assert torch.equal(logits(plain), logits(rebuild_run(krso_run).model))
    # an earlier round is another model
    export_here(krso_run, tmp_path / "r0", 0)
    first = load_file(str(tmp_path / "r0" / "model" / "model.safetensors"))
    last = load_file(str(tmp_path / "last" / "model" / "model.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_export_refuses_what_it_cannot_rebuild(krso_run, tmp_path):
    from fedkrso.server.export import ExportError, rebuild_run

    proc = export("--run", str(krso_run), "--round", "3", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "round 3 is not saved; rounds 0..2 are" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_here(krso_run, tmp_path / "full")
    with pytest.raises(ExportError, match="no run state"):
        rebuild_run(tmp_path)
    # a round delta changed on disk: the replay no longer reaches the recorded fingerprint
    # (round 2 replays from the checkpoint after round 1, so its delta is read)
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(krso_run), str(run)], check=True)
    delta = run / "state" / "round-000002.safetensors"
    tensors = load_file(str(delta))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(delta))
    proc = export("--run", str(run), "--out", str(tmp_path / "y"))
    assert proc.returncode == 3 and "state rebuilt at round 3 has fingerprint" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert export_here(run, tmp_path / "z", 1)["round"] == 1  # before it


def test_artifact_is_small_and_rebuilds_the_model_bit_for_bit(krso_run, tmp_path):
    art = tmp_path / "art"
    proc = export("--run", str(krso_run), "--artifact", str(art))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["format"] == "fedkrso-seed-replay" and manifest["version"] == 1
    assert {p.name for p in art.iterdir()} == {"manifest.json", *manifest["files"]}
    assert all(p.suffix in (".json", ".safetensors") for p in art.iterdir())  # no pickle
    rows = metric_rows(krso_run)
    assert [r["state_fingerprint"] for r in manifest["rounds"]] == [r["state_fingerprint"] for r in rows]
    assert all(r["seeds"] for r in manifest["rounds"]) and manifest["base_model"]["model_fingerprint"]
    size = sum(p.stat().st_size for p in art.iterdir())
    assert json.loads(proc.stdout.strip().splitlines()[-1])["bytes"] == size
    assert size < (krso_run / "final" / "model.safetensors").stat().st_size / 10

    proc = export("--artifact", str(art), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(tmp_path / "m" / "model" / "model.safetensors", krso_run / "final" / "model.safetensors")
    from fedkrso.server.artifact import rebuild_artifact
    from fedkrso.server.export import write_export

    write_export(rebuild_artifact(art, 0), tmp_path / "m0")
    export_here(krso_run, tmp_path / "r0", 0)
    assert_same_tensors(tmp_path / "m0" / "model" / "model.safetensors", tmp_path / "r0" / "model" / "model.safetensors")


def test_a_damaged_or_foreign_artifact_is_refused(krso_run, tmp_path, tiny_models):
    from fedkrso.server.artifact import rebuild_artifact, write_artifact
    from fedkrso.server.state import StateError

    art = tmp_path / "art"
    write_artifact(krso_run, art)
    # another base model: refused before any replay
    with pytest.raises(StateError, match="the run started from"):
        rebuild_artifact(art, model=str(tiny_models("bert", 2, hidden=48)))
    # an edited config no longer hashes to the run id
    manifest = json.loads((art / "manifest.json").read_text())
    lr = manifest["config"]["method"]["lr"]
    manifest["config"]["method"]["lr"] = 0.5
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StateError, match="manifest was edited"):
        rebuild_artifact(art)
    # a flipped byte in a round file
    manifest["config"]["method"]["lr"] = lr
    (art / "manifest.json").write_text(json.dumps(manifest))
    f = art / manifest["rounds"][1]["file"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    proc = export("--artifact", str(art), "--out", str(tmp_path / "d"))
    assert proc.returncode == 3 and "does not match the manifest's size and SHA-256" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["fedit", "ffa-lora"])
def test_peft_adapter_gives_the_merged_logits(tmp_path, tiny_bert, shards, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification as Auto

    run = sim_run(tmp_path, tiny_bert, shards, method)
    info = export_here(run, tmp_path / "x")
    assert info["peft"] == "peft" and info["adapters"] is None and "adapters_loader" not in info
    assert_same_tensors(tmp_path / "x" / "model" / "model.safetensors", run / "final" / "model.safetensors")
    merged = logits(Auto.from_pretrained(tmp_path / "x" / "model"))
    adapted = logits(PeftModel.from_pretrained(Auto.from_pretrained(tiny_bert), tmp_path / "x" / "peft"))
    torch.testing.assert_close(adapted, merged, rtol=0, atol=1e-6)
    assert not torch.allclose(logits(Auto.from_pretrained(tiny_bert)), merged, atol=1e-4)  # it was trained


def test_fedtt_adapters_load_with_their_loader(tmp_path, tiny_bert, shards):
    from transformers import AutoModelForSequenceClassification as Auto

    from fedkrso.common.methods.fedtt import load_adapters
    from fedkrso.server.export import rebuild_run

    run = sim_run(tmp_path, tiny_bert, shards, "fedtt")
    info = export_here(run, tmp_path / "x")
    assert info["adapters"] == "model/adapters.safetensors" and info["peft"] is None
    assert info["adapters_loader"] == "fedkrso.common.methods.fedtt.load_adapters(model, DIR/model)"
    module, _, function = info["adapters_loader"].partition("(")[0].rpartition(".")
    assert getattr(importlib.import_module(module), function) is load_adapters  # the call it names works
    folder = tmp_path / "x" / "model"
    for name in ("model.safetensors", "adapters.safetensors"):
        assert_same_tensors(folder / name, run / "final" / name)
    expected = logits(rebuild_run(run).model)
    model = load_adapters(Auto.from_pretrained(folder), folder)
    assert torch.equal(logits(model), expected)
    assert not torch.equal(logits(Auto.from_pretrained(folder)), expected)  # the adapters matter
    with pytest.raises(ValueError, match="already has TT adapters"):
        load_adapters(model, folder)
    with pytest.raises(FileNotFoundError):
        load_adapters(Auto.from_pretrained(folder), tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapters(one_layer_fewer(folder), folder)


def one_layer_fewer(folder: Path):
    """The exported architecture with one transformer layer less: the adapters do not fit it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers -= 1
    return AutoModelForSequenceClassification.from_config(config)


def test_state_without_a_kept_config_exports_with_the_runs_round_yaml(krso_run, tmp_path):
    """State written before manifests kept the config: --config names the run's round.yaml,
    which must be that run (same run_id)."""
    from fedkrso.common.config import ConfigError
    from fedkrso.server.export import ExportError, rebuild_run

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(krso_run), str(run)], check=True)
    manifest = json.loads((run / "state" / "manifest.json").read_text())
    del manifest["config"]
    (run / "state" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="pass the run's round.yaml with --config"):
        rebuild_run(run)
    config = krso_run.parent / "fedkrso.yaml"
    assert rebuild_run(run, config=config).state_fingerprint == metric_rows(krso_run)[-1]["state_fingerprint"]
    other = yaml.safe_load(config.read_text())
    other["method"]["lr"] = 0.5
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="but that config is run"):
        rebuild_run(run, config=tmp_path / "other.yaml")
