"""``run.report_to``: every metrics row through each tracker library's own writer, read back
with that library's own reader and compared with metrics.jsonl. The runs are real simulator
runs (``fedkrso-sim``), which write through the coordinator as the server does."""

from __future__ import annotations

import csv
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import metric_rows, round_config
from fedkrso.bench.launch import child_env
from fedkrso.common.config import ConfigError
from fedkrso.server.trackers import Trackers, Wandb, scalars

BIN = Path(sys.executable).parent


def sim(tmp: Path, model: Path, data: Path, report_to: list[str]) -> Path:
    out = tmp / "out"
    cfg = round_config(model, out, run={"name": "trk", "seed": 1, "report_to": report_to})
    (tmp / "round.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([str(BIN / "fedkrso-sim"), "--config", str(tmp / "round.yaml"), "--data-root", str(data)],
                          capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracker_failed" not in proc.stderr + proc.stdout
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_bert, shards) -> Path:
    return sim(tmp_path_factory.mktemp("trk"), tiny_bert, shards, ["tensorboard", "csv", "plot"])


def test_tensorboard_holds_every_number_of_every_row(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = metric_rows(tracked)
    assert len(rows) == 3
    acc = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    expected = {key for row in rows for key in scalars(row)}
    assert set(acc.Tags()["scalars"]) == expected
    assert {"uplink_payload_bytes", "downlink_message_bytes", "train_loss", "clients"} <= expected
    for key in expected:
        events = {e.step: e.value for e in acc.Scalars(key)}
        want = {r["round"]: np.float32(scalars(r)[key]) for r in rows if key in scalars(r)}
        assert events == want, key  # TensorBoard keeps float32


def test_csv_and_plot(tracked):
    rows = metric_rows(tracked)
    with (tracked / "metrics.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        assert int(line["round"]) == row["round"] and line["state_fingerprint"] == row["state_fingerprint"]
        for key, value in scalars(row).items():
            assert type(value)(line[key]) == value, key
    png = (tracked / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(tracked / "metrics.png")).shape[:2] == (715, 770)


def test_a_missing_tracker_library_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(Wandb, "needs", ("fedkrso_no_such_module", "wandb"))
    with pytest.raises(ConfigError, match=r"run.report_to: wandb needs the wandb package.*pip install"):
        Trackers(["csv", "wandb"], tmp_path, "r-1", {"run": {"name": "r"}})


def wandb_history(run_file: Path) -> list[dict]:
    """The history records of an offline W&B run file, decoded with wandb's own protobuf.

    The file is a LevelDB-style log (wandb's transaction log): a 7-byte header, then 32 KiB
    blocks of records, each with a 7-byte header (CRC-32, length, type: 1 full, 2 first,
    3 middle, 4 last)."""
    import json

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            records.append(pending)
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("mlflow") is None,
                    reason="optional trackers not installed: pip install 'fedkrso[trackers]'")
def test_wandb_offline_and_mlflow_file_store(tmp_path, tiny_bert, shards):
    out = sim(tmp_path, tiny_bert, shards, ["wandb", "mlflow"])
    rows = metric_rows(out)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = sorted(wandb_history(run_file), key=lambda h: h["round"])
    assert [h["_step"] for h in history] == [r["round"] for r in rows]
    for h, row in zip(history, rows):
        for key, value in scalars(row).items():
            assert h[key] == value, key

    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("trk").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fedkrso.run_id"].startswith("trk-")
    assert run.data.params["method.name"] == "fedkrso"
    for key in scalars(rows[0]):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {r["round"]: float(scalars(r)[key]) for r in rows if key in scalars(r)}, key
