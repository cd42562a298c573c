"""``fedkrso-bench --config bench/sst2.yaml [--quick]``: compare federated methods end to end.

For every method of the config (and every learning rate of its sweep) the bench writes a
round.yaml and runs a *real* federated job: one ``fedkrso-server`` process and one
``fedkrso-client`` process per shard, talking gRPC on loopback (``bench.launch.Cluster``).
All runs share one Dirichlet partition of the data (written once). Unselected clients just
long-poll the server, so many clients fit on a small host.

Learning-rate sweep: when a method lists several ``lrs``, each is run for ``sweep_rounds``
rounds and the best one (highest final eval accuracy; lowest eval loss for a causal LM) is
then run for the full ``rounds`` (the sweep run is reused when ``sweep_rounds == rounds``).

Output under ``<output_dir>`` (default ``results/<name>``): ``results.md`` (the table, the
sweep table and the three targets with pass/fail), ``results.json``, ``accuracy_vs_bytes.png``
and one folder per run (round.yaml, metrics.jsonl, server and client logs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..common.config import parse_config
from .launch import Cluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    source: str = Field("glue:SST-2", description="bbc, glue:<TASK>, csv:<path>, jsonl:<path>, hub:<name>")
    glue_dir: Path | None = Field(Path("../shared/data/glue"),
                                  description="local GLUE folder (relative paths: to the repo); "
                                              "the hub is used when it is absent")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_examples: int | None = Field(4000, ge=1, description="cap on training rows (all clients)")
    max_eval: int | None = Field(500, ge=1, description="cap on eval rows")
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    min_size: int = Field(10, ge=1, description="fewest training rows per shard")


class ModelSpec(Strict):
    name: str = "minilm"
    task: str = "sequence-classification"
    num_labels: int | None = Field(None, ge=1, description="None: from the partition's labels")
    max_length: int = Field(128, ge=8)


class MethodSpec(BaseModel):
    """``name`` plus any knob of that method's round.yaml section; ``lrs`` is the sweep."""

    model_config = ConfigDict(extra="allow")
    name: str
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$",
                              description="row name in the results (default: name); lets one method "
                                          "run twice with different knobs")
    lrs: list[float] | None = Field(None, min_length=1, description="lr sweep (None: the method default)")

    @property
    def tag(self) -> str:
        return self.label or self.name

    def knobs(self) -> dict[str, Any]:
        return {k: v for k, v in (self.model_extra or {}).items()}


class QuickSpec(Strict):
    """Overrides applied by ``--quick`` (None keeps the main value)."""

    methods: list[str] | None = None
    clients: int | None = None
    clients_per_round: int | None = None
    rounds: int | None = None
    sweep_rounds: int | None = None
    max_lrs: int | None = Field(1, ge=1, description="keep only the first N lrs of every sweep")
    max_examples: int | None = None
    max_eval: int | None = None
    max_length: int | None = None
    method_knobs: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                    description="per-method knob overrides")


class BenchConfig(Strict):
    name: str = Field("bench", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    output_dir: Path | None = Field(None, description="default results/<name>")
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    clients: int = Field(10, ge=1)
    alpha: float | None = Field(0.5, gt=0, description="Dirichlet alpha; None = IID")
    clients_per_round: int = Field(3, ge=1)
    rounds: int = Field(10, ge=1)
    sweep_rounds: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    deadline_s: float = Field(900.0, gt=0)
    run_timeout_s: float = Field(7200.0, gt=0, description="give up on one run after this")
    poll_seconds: float = Field(20.0, gt=0, description="client long-poll length")
    target_accuracy: float | None = Field(None, gt=0, le=1,
                                          description="accuracy for the bytes-to-target column")
    methods: list[MethodSpec] = Field(min_length=1)
    quick: QuickSpec = QuickSpec()

    def apply_quick(self) -> BenchConfig:
        q = self.quick
        cfg = self.model_copy(deep=True)
        for key in ("clients", "clients_per_round", "rounds", "sweep_rounds"):
            if getattr(q, key) is not None:
                setattr(cfg, key, getattr(q, key))
        for key in ("max_examples", "max_eval"):
            if getattr(q, key) is not None:
                setattr(cfg.data, key, getattr(q, key))
        if q.max_length is not None:
            cfg.model.max_length = q.max_length
        if q.methods is not None:
            cfg.methods = [m for m in cfg.methods if m.tag in q.methods]
        methods = []
        for m in cfg.methods:
            d = m.model_dump()
            d.update(q.method_knobs.get(m.name, {}))
            if q.max_lrs and d.get("lrs"):
                d["lrs"] = d["lrs"][: q.max_lrs]
            methods.append(MethodSpec.model_validate(d))
        cfg.methods = methods
        cfg.clients_per_round = min(cfg.clients_per_round, cfg.clients)
        return cfg


def load_bench_config(path: str | Path) -> BenchConfig:
    data = yaml.safe_load(Path(path).read_text())
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"{path}: {err.error_count()} invalid field(s)"]
        lines += [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise SystemExit("\n".join(lines)) from None


# -- data -------------------------------------------------------------------------------------

def resolve(path: Path | None) -> Path | None:
    if path is None:
        return None
    return path if path.is_absolute() else (REPO / path).resolve()


def partition(cfg: BenchConfig, out: Path) -> dict:
    from ..common.data import load_source, make_partition, read_partition_info, save_partition

    d = cfg.data
    glue_dir = resolve(d.glue_dir)
    if glue_dir is not None and not glue_dir.is_dir():
        print(f"glue_dir {glue_dir} not found: GLUE comes from the hub", flush=True)
        glue_dir = None
    src = load_source(d.source, glue_dir=glue_dir, text_column=d.text_column,
                      text_pair_column=d.text_pair_column, label_column=d.label_column)
    part = make_partition(src, cfg.clients, source=d.source, alpha=cfg.alpha, seed=cfg.seed,
                          eval_fraction=d.eval_fraction, min_size=d.min_size,
                          max_examples=d.max_examples, max_eval=d.max_eval)
    save_partition(part, out)
    return read_partition_info(out)


# -- one run ----------------------------------------------------------------------------------

def round_yaml(cfg: BenchConfig, method: dict, rounds: int, data: Path, out: Path, run_name: str,
               num_labels: int) -> dict:
    return {
        "run": {"name": run_name, "seed": cfg.seed, "output_dir": str(out)},
        "model": {"name": cfg.model.name, "task": cfg.model.task, "num_labels": num_labels,
                  "max_length": cfg.model.max_length},
        "method": method,
        "rounds": {"total": rounds, "clients_per_round": cfg.clients_per_round,
                   "min_clients": cfg.clients_per_round, "deadline_s": cfg.deadline_s,
                   "start_timeout_s": 900.0},
        "training": {"batch_size": cfg.batch_size},
        "eval": {"data": str(data / "eval"), "batch_size": cfg.eval_batch_size},
        "server": {"listen": "127.0.0.1:0"},
    }


def run_one(cfg: BenchConfig, method: dict, rounds: int, data: Path, workdir: Path,
            num_labels: int) -> list[dict]:
    """One real federated job (server + ``cfg.clients`` client processes); its metrics rows."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    run_name = workdir.name.replace("+", "plus")
    rc = round_yaml(cfg, method, rounds, data, workdir, run_name, num_labels)
    parse_config(rc, "generated round.yaml")  # fail here, not in a child process
    config = workdir / "round.yaml"
    config.write_text(yaml.safe_dump(rc, sort_keys=False))
    cluster = Cluster(workdir)
    try:
        cluster.start_server(config)
        for i in range(cfg.clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}",
                                 args=["--poll-seconds", str(cfg.poll_seconds)])
        code = cluster.wait(cfg.run_timeout_s)
        if code != 0:
            raise RuntimeError(f"server exited {code}:\n{cluster.server.text()[-3000:]}")
        # Clients that sat out the last round may still be in a long-poll or retrying a
        # server that is gone; the metrics are complete, so give them a moment, then stop.
        give_up = time.monotonic() + 10.0
        for c in cluster.clients:
            try:
                c.wait(max(0.1, give_up - time.monotonic()))
            except Exception:  # noqa: BLE001 - a lingering client does not void the metrics
                pass
    finally:
        cluster.stop()
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- analysis ---------------------------------------------------------------------------------

def analytic_state(cfg: BenchConfig, methods: list[dict], num_labels: int) -> dict[str, dict]:
    """Per method: trainable parameters of one local optimisation and their gradient + Adam
    state bytes (grad + exp_avg + exp_avg_sq = 3 x params x 4 bytes; FedKSeed: 0, it is
    zeroth order). FedKRSO trains one subspace at a time: B (d_m x r per target Linear) plus
    the dense-trainables."""
    from ..common.methods import build_method
    from ..common.models import load_model

    out: dict[str, dict] = {}
    for m in methods:
        section = {k: v for k, v in m.items() if k != "label"}
        mc = parse_config({"model": {"name": cfg.model.name, "task": cfg.model.task,
                                     "num_labels": num_labels}, "method": section}).method
        model = load_model(cfg.model.name, cfg.model.task, num_labels, cfg.seed)
        meth = build_method(mc, cfg.seed)
        meth.prepare(model)
        total = sum(p.numel() for p in model.parameters())
        if mc.name == "fedkseed":
            trainable, factor = 0, 0
        elif mc.name == "fedkrso":
            from ..common.methods.base import out_in

            sum_dm = sum(out_in(mod)[0] for mod in meth.targets(model).values())
            trainable = mc.rank * sum_dm + sum(p.numel() for p in meth.dense(model).values())
            factor = 3
        else:
            own = meth.own(model) if hasattr(meth, "own") else {}
            trainable = sum(p.numel() for p in own.values()) + sum(p.numel() for p in meth.dense(model).values())
            factor = 3
        out[m.get("label") or mc.name] = {"model_parameters": total, "trainable_parameters": trainable,
                        "state_bytes": factor * trainable * 4, "local_steps": mc.local_steps()}
        del model
    return out


def cumulative_wire(rows: list[dict]) -> list[int]:
    acc, out = 0, []
    for r in rows:
        acc += (r.get("uplink_wire_bytes") or 0) + (r.get("downlink_wire_bytes") or 0)
        out.append(acc)
    return out


def score(rows: list[dict], causal: bool) -> float:
    if not rows:
        return -math.inf
    last = rows[-1]
    if causal:
        loss = last.get("eval_loss")
        return -loss if loss is not None and math.isfinite(loss) else -math.inf
    acc = last.get("eval_accuracy")
    return acc if acc is not None else -math.inf


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(name: str, lr: float | None, rows: list[dict], state: dict, target: float | None) -> dict:
    accs = [r.get("eval_accuracy") for r in rows]
    cum = cumulative_wire(rows)
    to_target = None
    if target is not None:
        for a, c in zip(accs, cum):
            if a is not None and a >= target:
                to_target = c
                break
    measured_state = max((r.get("client_train_state_bytes") or 0 for r in rows), default=0)
    steps = state.get("local_steps") or 1
    step_s = mean([r.get("client_train_seconds") for r in rows])
    last = rows[-1] if rows else {}
    return {
        "method": name, "lr": lr, "rounds": len(rows),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max((a for a in accs if a is not None), default=None),
        "final_eval_loss": last.get("eval_loss"),
        "final_perplexity": math.exp(last["eval_loss"]) if last.get("eval_loss") is not None
        and last["eval_loss"] < 50 else None,
        "uplink_payload_per_client_round": mean([r.get("uplink_payload_bytes_per_client") for r in rows]),
        "uplink_wire_per_client_round": mean([r.get("uplink_wire_bytes_per_client") for r in rows]),
        "downlink_payload_per_client_round": mean([r.get("downlink_payload_bytes_per_client") for r in rows]),
        "downlink_wire_per_client_round": mean([r.get("downlink_wire_bytes_per_client") for r in rows]),
        "total_wire_bytes": cum[-1] if cum else 0,
        "wire_bytes_to_target": to_target,
        "client_peak_rss_bytes": max((r.get("client_peak_rss_bytes") or 0 for r in rows), default=0),
        "train_state_bytes": measured_state or state.get("state_bytes"),
        "train_state_source": "measured" if measured_state else "analytic",
        "trainable_parameters": state.get("trainable_parameters"),
        "local_steps": steps,
        "mean_step_seconds": step_s / steps if step_s is not None else None,
        "mean_round_seconds": mean([r.get("round_seconds") for r in rows]),
        "curve": [{"round": r["round"], "eval_accuracy": r.get("eval_accuracy"),
                   "eval_loss": r.get("eval_loss"), "cumulative_wire_bytes": c}
                  for r, c in zip(rows, cum)],
    }


def targets(summaries: dict[str, dict]) -> list[dict]:
    """The three targets for every FedKRSO row (default and labelled variants), computed from
    the measured summaries (pass None: a method is missing)."""
    a, f = summaries.get("fedavg"), summaries.get("fedit")
    rows = [dict(s, method=key) for key, s in summaries.items()
            if s.get("base_method", key) == "fedkrso"] or [None]
    out = []

    def acc_pt(s):
        return None if s is None or s.get("final_accuracy") is None else 100 * s["final_accuracy"]

    for k in rows:
        who = "FedKRSO" if k is None or k["method"] == "fedkrso" else f"FedKRSO ({k['method']})"
        ka, aa, fa = acc_pt(k), acc_pt(a), acc_pt(f)
        if ka is not None and aa is not None and fa is not None:
            ok = ka >= aa - 1.0 and ka >= fa
            detail = (f"{who} {ka:.2f} vs FedAvg {aa:.2f} (diff {ka - aa:+.2f} pt) and FedIT {fa:.2f} "
                      f"after {k['rounds']}/{a['rounds']}/{f['rounds']} rounds")
        else:
            ok, detail = None, "needs fedkrso, fedavg and fedit results"
        out.append({"target": f"{who} final accuracy within 1.0 pt of FedAvg and not below FedIT",
                    "pass": ok, "detail": detail})
        name = f"{who} uplink >= 30x smaller than FedAvg (float32)"
        if k and a and k.get("uplink_payload_per_client_round") and a.get("uplink_payload_per_client_round"):
            ratio = a["uplink_payload_per_client_round"] / k["uplink_payload_per_client_round"]
            wratio = (a["uplink_wire_per_client_round"] or 0) / (k["uplink_wire_per_client_round"] or 1)
            out.append({"target": name, "pass": ratio >= 30,
                        "detail": f"payload ratio {ratio:.1f}x (wire {wratio:.1f}x)"})
        else:
            out.append({"target": name, "pass": None, "detail": "needs fedkrso and fedavg results"})
        name = f"{who} gradient+optimizer state <= 5% of FedAvg"
        if k and a and k.get("train_state_bytes") and a.get("train_state_bytes"):
            share = k["train_state_bytes"] / a["train_state_bytes"]
            out.append({"target": name, "pass": share <= 0.05,
                        "detail": f"{share * 100:.2f}% ({k['train_state_source']} {fmt_bytes(k['train_state_bytes'])}"
                                  f" vs {a['train_state_source']} {fmt_bytes(a['train_state_bytes'])})"})
        else:
            out.append({"target": name, "pass": None, "detail": "needs fedkrso and fedavg results"})
    return out


# -- report -----------------------------------------------------------------------------------

def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_acc(a: float | None) -> str:
    return "n/a" if a is None else f"{100 * a:.2f}"


def last_mean_accuracy(summary: dict, n: int = 3) -> float | None:
    """Mean eval accuracy of the last ``n`` rounds: under strong label skew the global model
    swings from round to round, and one final value says less than this."""
    return mean([c["eval_accuracy"] for c in summary["curve"][-n:]])


def render(report: dict) -> str:
    causal = report["causal"]
    target = report.get("target_accuracy")
    lines = [f"# Benchmark `{report['name']}`", "",
             f"Command: `{report['command']}`  ", f"Runtime: {report['runtime_s']:.0f} s  ",
             f"Data: {report['data_source']}, {report['clients']} clients (Dirichlet alpha "
             f"{report['alpha']}), {report['clients_per_round']} per round, "
             f"{report['train_rows']} training rows, {report['eval_rows']} eval rows  ",
             f"Model: {report['model']} ({report['task']}, max_length {report['max_length']}), "
             f"batch {report['batch_size']}, {report['rounds']} rounds (sweep: {report['sweep_rounds']})",
             ""]
    lines.append("| method | lr | rounds | " + ("final eval loss | final ppl" if causal else
                 "final acc | best acc | last-3 mean acc") + " | up payload/client/round | up wire | down payload/client/round"
                 " | down wire | wire bytes to " + (f"acc {fmt_acc(target)}" if target else "target")
                 + " | client peak RSS | grad+opt state | mean local step |")
    lines.append("|" + "---|" * (13 if causal else 14))
    for s in report["results"]:
        quality = ((f"{s['final_eval_loss']:.4f} | {s['final_perplexity']:.2f}" if s["final_perplexity"]
                    else "n/a | n/a") if causal else f"{fmt_acc(s['final_accuracy'])} | {fmt_acc(s['best_accuracy'])} | "
                   f"{fmt_acc(last_mean_accuracy(s))}")
        reach = ("n/a" if target is None else
                 fmt_bytes(s["wire_bytes_to_target"]) if s["wire_bytes_to_target"] is not None else "not reached")
        step = "n/a" if s["mean_step_seconds"] is None else f"{1000 * s['mean_step_seconds']:.0f} ms"
        lines.append(
            f"| {s['method']} | {s['lr']:g} | {s['rounds']} | {quality} | "
            f"{fmt_bytes(s['uplink_payload_per_client_round'])} | {fmt_bytes(s['uplink_wire_per_client_round'])} | "
            f"{fmt_bytes(s['downlink_payload_per_client_round'])} | {fmt_bytes(s['downlink_wire_per_client_round'])} | "
            f"{reach} | {fmt_bytes(s['client_peak_rss_bytes'])} | "
            f"{fmt_bytes(s['train_state_bytes'])} ({s['train_state_source']}) | {step} |")
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"- **{mark}** {t['target']}: {t['detail']}")
    lines += ["", "## Learning-rate sweep", "",
              "| method | lr | rounds | final " + ("eval loss" if causal else "acc") + " | chosen |",
              "|---|---|---|---|---|"]
    for s in report["sweep"]:
        val = (f"{s['final_eval_loss']:.4f}" if s["final_eval_loss"] is not None else "n/a") if causal \
            else fmt_acc(s["final_accuracy"])
        lines.append(f"| {s['method']} | {s['lr']:g} | {s['rounds']} | {val} | {'yes' if s['chosen'] else ''} |")
    lines += ["", "## Notes", "",
              "- Bytes per client per round are means over rounds of the server's per-round means over the "
              "clients it aggregated; *payload* is the tensor bytes, *wire* the TCP bytes counted on the "
              "loopback connection (gRPC framing, headers, control messages included).",
              "- *Wire bytes to target*: cumulative uplink + downlink wire bytes of all selected clients "
              "until the first round whose eval accuracy reaches the target.",
              "- *grad+opt state*: the client's own count when it reports one (measured); otherwise analytic: "
              "gradient + Adam exp_avg + exp_avg_sq = 3 x trainable parameters x 4 bytes, where FedKRSO's "
              "trainables are one subspace's B (r x sum d_m over target Linears) plus the dense-trainables, "
              "the LoRA/TT methods' their adapters plus dense-trainables, FedAvg every trained weight, and "
              "FedKSeed 0 (zeroth order: no gradient, no optimizer state).",
              "- *Mean local step*: mean over rounds of the slowest selected client's training seconds "
              "divided by the method's local steps per round (includes data loading, interval ends).",
              "- *Client peak RSS*: the largest peak RSS any client reported (whole process: Python, torch, "
              "model, data).", f"- Plot: `{report['plot']}` (eval accuracy vs cumulative wire bytes, log x).",
              ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causal = report["causal"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in report["results"]:
        pts = [(c["cumulative_wire_bytes"], c["eval_loss"] if causal else c["eval_accuracy"])
               for c in s["curve"]]
        pts = [(x, y) for x, y in pts if x and y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] * (1 if causal else 100) for p in pts], marker="o",
                    label=f"{s['method']} (lr {s['lr']:g})")
    if report.get("target_accuracy") and not causal:
        ax.axhline(100 * report["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the wire (uplink + downlink, all clients)")
    ax.set_ylabel("eval loss" if causal else "eval accuracy (%)")
    ax.set_title(f"{report['name']}: {report['data_source']}, {report['model']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the bench --------------------------------------------------------------------------------

def method_section(spec: MethodSpec, lr: float | None) -> dict:
    section = {"name": spec.name, **spec.knobs()}
    if lr is not None:
        section["lr"] = lr
    return section


def default_lr(cfg: BenchConfig, spec: MethodSpec) -> float:
    section = method_section(spec, None)
    return parse_config({"model": {"name": cfg.model.name}, "method": section}).method.lr


def run_bench(cfg: BenchConfig, out: Path, command: str = "fedkrso-bench", log=print) -> dict:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    log(f"partitioning {cfg.data.source} into {cfg.clients} shards (alpha={cfg.alpha}) ...")
    info = partition(cfg, data)
    causal = cfg.model.task == "causal-lm"
    num_labels = cfg.model.num_labels or info.get("num_labels") or 2
    sections = [method_section(m, (m.lrs or [None])[0]) | {"label": m.tag} for m in cfg.methods]
    state = analytic_state(cfg, sections, num_labels)
    report: dict[str, Any] = {
        "name": cfg.name, "command": command, "causal": causal, "data_source": cfg.data.source,
        "clients": cfg.clients, "alpha": cfg.alpha, "clients_per_round": cfg.clients_per_round,
        "train_rows": sum(s["size"] for s in info["shards"]), "eval_rows": info["eval"]["size"],
        "model": cfg.model.name, "task": cfg.model.task, "max_length": cfg.model.max_length,
        "batch_size": cfg.batch_size, "rounds": cfg.rounds, "sweep_rounds": cfg.sweep_rounds,
        "target_accuracy": None if causal else cfg.target_accuracy, "analytic_state": state,
        "plot": "accuracy_vs_bytes.png", "results": [], "sweep": [], "targets": [], "runtime_s": 0.0,
    }

    def save() -> None:
        report["runtime_s"] = time.monotonic() - started
        report["targets"] = targets({s["method"]: s for s in report["results"]})
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, out / report["plot"])
        (out / "results.md").write_text(render(report))

    for spec in cfg.methods:
        lrs = spec.lrs or [default_lr(cfg, spec)]
        st = state[spec.tag]
        chosen_lr, chosen_rows = lrs[0], None
        if len(lrs) > 1:
            sweep = []
            for lr in lrs:
                tag = f"{spec.tag}-lr{lr:g}-sweep"
                t0 = time.monotonic()
                rows = run_one(cfg, method_section(spec, lr), cfg.sweep_rounds, data, out / "runs" / tag, num_labels)
                s = summarise(spec.tag, lr, rows, st, None)
                log(f"  sweep {spec.tag} lr={lr:g}: acc {fmt_acc(s['final_accuracy'])} loss "
                    f"{s['final_eval_loss']} ({time.monotonic() - t0:.0f} s)")
                sweep.append((score(rows, causal), lr, rows, s))
            best = max(sweep, key=lambda x: x[0])
            chosen_lr = best[1]
            if cfg.sweep_rounds == cfg.rounds:
                chosen_rows = best[2]
            for _, lr, _, s in sweep:
                report["sweep"].append({k: s[k] for k in ("method", "lr", "rounds", "final_accuracy",
                                                          "final_eval_loss")} | {"chosen": lr == chosen_lr})
        if chosen_rows is None:
            tag = f"{spec.tag}-lr{chosen_lr:g}" if chosen_lr is not None else spec.tag
            t0 = time.monotonic()
            chosen_rows = run_one(cfg, method_section(spec, chosen_lr), cfg.rounds, data,
                                  out / "runs" / tag, num_labels)
            log(f"  run {spec.tag} lr={chosen_lr}: {time.monotonic() - t0:.0f} s")
        if len(lrs) == 1:
            s1 = summarise(spec.tag, chosen_lr, chosen_rows, st, None)
            report["sweep"].append({k: s1[k] for k in ("method", "lr", "rounds", "final_accuracy",
                                                       "final_eval_loss")} | {"chosen": True})
        s = summarise(spec.tag, chosen_lr, chosen_rows, st, report["target_accuracy"])
        s["base_method"] = spec.name
        report["results"].append(s)
        log(f"{spec.tag} lr={chosen_lr:g}: final acc {fmt_acc(s['final_accuracy'])}, uplink "
            f"{fmt_bytes(s['uplink_payload_per_client_round'])}/client/round")
        save()
    save()
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fedkrso-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "sst2.yaml"), help="bench YAML")
    p.add_argument("--quick", action="store_true", help="apply the config's quick preset")
    p.add_argument("--out", help="results folder (default: output_dir or results/<name>[-quick])")
    p.add_argument("--methods", help="comma-separated subset of the config's methods")
    p.add_argument("--rounds", type=int, help="override rounds")
    p.add_argument("--report-only", metavar="DIR",
                   help="rewrite DIR/results.md and the plot from DIR/results.json, running nothing")
    args = p.parse_args(argv)
    if args.report_only:
        out = Path(args.report_only)
        report = json.loads((out / "results.json").read_text())
        (out / "results.md").write_text(render(report))
        plot(report, out / report["plot"])
        print((out / "results.md").read_text())
        return

    cfg = load_bench_config(args.config)
    if args.quick:
        cfg = cfg.apply_quick()
    if args.methods:
        keep = args.methods.split(",")
        unknown = set(keep) - {m.tag for m in cfg.methods}
        if unknown:
            raise SystemExit(f"fedkrso-bench: methods not in the config: {sorted(unknown)}")
        cfg.methods = [m for m in cfg.methods if m.tag in keep]
    if args.rounds:
        cfg.rounds = args.rounds
        cfg.sweep_rounds = min(cfg.sweep_rounds, args.rounds)
    out = Path(args.out) if args.out else (cfg.output_dir or Path("results") / (cfg.name + ("-quick" if args.quick else "")))
    command = "fedkrso-bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run_bench(cfg, out.resolve(), command, log=lambda s: print(s, flush=True))
    print((out / "results.md").read_text())
    print(f"fedkrso-bench: {len(report['results'])} method(s) in {report['runtime_s']:.0f} s; "
          f"results in {out}")


if __name__ == "__main__":
    main()
