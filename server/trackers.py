"""Where each metrics row goes besides ``metrics.jsonl``: ``run.report_to`` in round.yaml.

One small class per destination, all with the same two calls, ``log(row, rows)`` after a
round's row was written to metrics.jsonl and ``close()`` at the end of the run (each class
says how to ``open``, ``write`` and ``release`` its library's own writer):

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``<out>/tensorboard``
  (``tensorboard --logdir <out>/tensorboard``); needs the ``tensorboard`` package;
- ``csv``: ``csv.DictWriter`` into ``<out>/metrics.csv``, one line per round (rewritten whole
  each round, so a column that appears later, or a restart, never leaves it ragged);
- ``wandb``: a Weights & Biases run in offline mode under ``<out>/wandb`` (nothing leaves the
  machine; ``wandb sync <out>/wandb/offline-run-*`` uploads it later); optional dependency;
- ``mlflow``: an MLflow run in a file store at ``<out>/mlruns`` (``mlflow ui --backend-store-uri
  <out>/mlruns``), the experiment named after the run, the run after its run_id, the config
  as params; optional dependency (``mlflow-skinny`` is enough);
- ``plot``: ``<out>/metrics.png`` (matplotlib), the metrics and the bytes per client by round,
  redrawn after every round.

What is logged: every top-level number of the row at step = round (bytes, losses,
accuracy, seconds, client figures), ``clients`` and ``dropped`` as counts; the per-client
breakdown stays in metrics.jsonl. The simulator writes through the same code: it runs the
``Coordinator``. A tracker that fails at run time is logged (``tracker_failed``) and the run
goes on: metrics.jsonl is the record. A row is handed to the trackers once, right after it
is written to metrics.jsonl; a crash between the two can leave a tracker without that round.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import io
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import structlog

from ..common.config import ConfigError
from .state import atomic_write

log = structlog.get_logger("fedkrso.server")
INSTALL = "pip install 'fedkrso[trackers]'"


def scalars(row: dict) -> dict[str, int | float]:
    """The numbers of a metrics row: top-level ints and floats (None and text left out), lists
    (``clients``, ``dropped``) as their length; ``round`` is the step, not a value."""
    out: dict[str, int | float] = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool):
            continue
        if isinstance(value, list):
            out[key] = len(value)
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


class Tracker:
    """One destination of metrics rows. The library's writer (``handle``) is opened on the
    first row, so a run that never closes a round opens nothing."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, str] | None] = None  # (module to import, pip package)
    history: ClassVar[bool] = False  # write() wants every row so far, not only the new one

    def __init__(self, out: Path, run_id: str, config: dict):
        self.out, self.run_id, self.config = out, run_id, config
        self.handle = None

    def log(self, row: dict, rows: list[dict]) -> None:
        """Write one round's ``row`` (``rows``: every row so far, for trackers that redraw),
        opening the writer on first use."""
        if self.handle is None:
            self.handle = self.open()
        self.write(row, rows)

    def close(self) -> None:
        """Release the writer at the end of the run, if it was opened."""
        if self.handle is not None:
            self.release()

    def open(self):
        """The library's writer (anything not None when there is none to open)."""
        return True

    def write(self, row: dict, rows: list[dict]) -> None:
        """Hand ``row`` to the library's writer (each tracker's own)."""
        raise NotImplementedError

    def release(self) -> None:
        """Flush and close the writer; the default has nothing to close."""


class TensorBoard(Tracker):
    """Rows as TensorBoard scalars under ``<output_dir>/tensorboard``, one step per round."""

    name = "tensorboard"
    needs = ("tensorboard", "tensorboard")

    def open(self):
        """A ``SummaryWriter`` on ``<output_dir>/tensorboard``."""
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.out / "tensorboard"))

    def write(self, row: dict, rows: list[dict]) -> None:
        """Every numeric field of ``row`` as a scalar at the round's step."""
        for key, value in scalars(row).items():
            self.handle.add_scalar(key, value, global_step=row["round"])
        self.handle.flush()

    def release(self) -> None:
        """Close the writer."""
        self.handle.close()


class Csv(Tracker):
    """Rows as ``<output_dir>/metrics.csv``: the numeric fields and state fingerprint of every round,
    rewritten whole (atomically) each round, so the columns can grow."""

    name = "csv"
    history = True

    def write(self, row: dict, rows: list[dict]) -> None:
        """Write every row so far, with the union of their fields as columns."""
        fields: dict[str, None] = {"round": None}
        lines = []
        for r in rows:
            line = {"round": r["round"], **scalars(r), "state_fingerprint": r.get("state_fingerprint")}
            fields.update(dict.fromkeys(line))
            lines.append(line)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
        atomic_write(self.out / "metrics.csv", buf.getvalue().encode())


class Wandb(Tracker):
    """Rows logged to an offline Weights & Biases run under ``<output_dir>/wandb`` (id = the run id,
    resumed with it; project = ``run.name``), with round.yaml's shaping settings as its config."""

    name = "wandb"
    needs = ("wandb", "wandb")

    def open(self):
        """The offline W&B run of this run id (a resumed run goes on in it)."""
        import wandb

        (self.out / "wandb").mkdir(parents=True, exist_ok=True)
        return wandb.init(mode="offline", dir=str(self.out), project=self.config["run"]["name"], name=self.run_id,
                          id=self.run_id, resume="allow", config=self.config,
                          settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def write(self, row: dict, rows: list[dict]) -> None:
        """Every numeric field of ``row`` at the round's step."""
        self.handle.log({**scalars(row), "round": row["round"]}, step=row["round"])

    def release(self) -> None:
        """Finish the W&B run."""
        self.handle.finish()


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


class Mlflow(Tracker):
    """Rows logged to an MLflow run in the file store ``<output_dir>/mlruns`` (experiment =
    ``run.name``, tagged with the run id), with round.yaml's shaping settings as params."""

    name = "mlflow"
    needs = ("mlflow", "mlflow-skinny")

    def open(self):
        """(client, MLflow run id): the run tagged with this run_id (a resumed run goes on in
        it), else a new one with the config as params."""
        # MLflow 3 keeps the file store (no database, no server) behind this switch.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(self.out / "mlruns").resolve().as_uri())
        name = self.config["run"]["name"]
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
        found = client.search_runs([exp_id], filter_string=f"tags.`fedkrso.run_id` = '{self.run_id}'")
        if found:
            return client, found[0].info.run_id
        run = client.create_run(exp_id, run_name=self.run_id, tags={"fedkrso.run_id": self.run_id}).info.run_id
        params = [Param(k, v) for k, v in sorted(_flat(self.config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run, params=params[i:i + 100])
        return client, run

    def write(self, row: dict, rows: list[dict]) -> None:
        """Every numeric field of ``row`` as a metric at the round's step."""
        from mlflow.entities import Metric

        client, run = self.handle
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, row["round"]) for k, v in scalars(row).items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run, metrics=metrics[i:i + 1000])

    def release(self) -> None:
        """End the MLflow run."""
        client, run = self.handle
        client.set_terminated(run)


QUALITY = ("eval_accuracy", "eval_loss", "train_loss")
BYTES = (("uplink_payload_bytes_per_client", "uplink payload"), ("uplink_wire_bytes_per_client", "uplink wire"),
         ("downlink_payload_bytes_per_client", "downlink payload"),
         ("downlink_wire_bytes_per_client", "downlink wire"))


class Plot(Tracker):
    """Rows drawn as ``<output_dir>/metrics.png``: quality and bytes per round."""

    name = "plot"
    needs = ("matplotlib", "matplotlib")
    history = True

    def write(self, row: dict, rows: list[dict]) -> None:
        """Redraw the plots from every row so far."""
        from matplotlib.figure import Figure  # no pyplot: safe off the main thread

        fig = Figure(figsize=(7, 6.5))
        top, bottom = fig.subplots(2, 1, sharex=True)
        rounds = [r["round"] for r in rows]
        keys = [k for k in QUALITY if any(r.get(k) is not None for r in rows)]
        keys += sorted({k for r in rows for k in r if k not in QUALITY and k.endswith(("_accuracy", "_loss"))})
        for key in keys:
            pts = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            top.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        top.set_ylabel("metric")
        top.set_title(self.run_id)
        for key, label in BYTES:
            pts = [(r["round"], r[key]) for r in rows if r.get(key)]
            if pts:
                bottom.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        fedavg = [(r["round"], r["fedavg_equivalent_bytes"] / (2 * len(r["clients"])))
                  for r in rows if r.get("fedavg_equivalent_bytes") and r.get("clients")]
        if fedavg:
            bottom.plot([p[0] for p in fedavg], [p[1] for p in fedavg], linestyle="--", color="grey",
                        label="FedAvg, one direction")
        bottom.set_yscale("log")
        bottom.set_ylabel("bytes per client")
        bottom.set_xlabel("round")
        bottom.set_xticks(rounds if len(rounds) <= 20 else rounds[:: math.ceil(len(rounds) / 20)])
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write(self.out / "metrics.png", buf.getvalue())


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, Csv, Wandb, Mlflow, Plot)}


class Trackers:
    """Every tracker of ``run.report_to``, fed from one worker thread (libraries such as wandb
    want one thread; the event loop must not wait on them). Building it checks that each
    selected tracker's library is installed (``ConfigError`` naming the pip command)."""

    def __init__(self, names: list[str], out: Path, run_id: str, config: dict):
        for name in names:
            needs = TRACKERS[name].needs
            if needs and importlib.util.find_spec(needs[0]) is None:
                raise ConfigError(f"run.report_to: {name} needs the {needs[1]} package, which is not installed: "
                                  f"{INSTALL} (or pip install {needs[1]})")
        self.trackers = [TRACKERS[name](out, run_id, config) for name in names]
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="trackers") if self.trackers else None

    def _each(self, call: str, *args) -> None:
        for t in self.trackers:
            try:
                getattr(t, call)(*args)
            except Exception as err:  # noqa: BLE001 - a tracker must not stop the run
                log.warning("tracker_failed", tracker=t.name, call=call, error=f"{type(err).__name__}: {err}")

    def _log(self, row: dict, read_rows) -> None:
        rows = read_rows() if any(t.history for t in self.trackers) else []
        self._each("log", row, rows)

    async def log(self, row: dict, read_rows) -> None:
        """Hand ``row`` to every tracker; ``read_rows()`` gives every row so far (called in the
        worker thread, only when a tracker wants the history)."""
        if self.trackers:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._log, row, read_rows)

    async def close(self) -> None:
        """Release every tracker's writer at the end of the run."""
        if self.trackers:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._each, "close")
            self._thread.shutdown(wait=True)
