"""The bench YAML (``bench/sst2.yaml``): what to partition, which model, which methods and
learning rates, how many seeds, and the ``--quick`` preset; and the protocol YAML
(``bench/quality.yaml``): a base bench config and the blocks (tasks, partitions, methods)
that vary it. Validated by pydantic, so a typo in a long benchmark's config fails at load
time, not hours in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..common.cli import DEVICE_PATTERN

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CONFIG = HERE / "sst2.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    source: str = Field("glue:SST-2", description="bbc, bbc-headlines, glue:<TASK>, csv:<path>, json:<path>, "
                        "jsonl:<path>, parquet:<path>, hub:<name>")
    glue_dir: Path | None = Field(Path("../shared/data/glue"),
                                  description="local GLUE folder (relative paths: to the repo); "
                                              "the hub is used when it is absent")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    prompt_column: str | None = Field(None, description="with response_column: instruction rows")
    response_column: str | None = None
    client_eval_fraction: float = Field(0.0, ge=0, lt=1, description="held out of each shard for its "
                                        "client's own evaluation (client_eval_every)")
    max_examples: int | None = Field(4000, ge=1, description="cap on training rows (all clients)")
    max_eval: int | None = Field(500, ge=1, description="cap on eval rows")
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    min_size: int = Field(10, ge=1, description="fewest training rows per shard")

    def glue_path(self) -> Path | None:
        """``glue_dir`` made absolute: a relative one is relative to the repo, not to the
        folder the bench happens to be started from."""
        if self.glue_dir is None:
            return None
        return self.glue_dir if self.glue_dir.is_absolute() else (REPO / self.glue_dir).resolve()


class ModelSpec(Strict):
    name: str = "minilm"
    task: str = "sequence-classification"
    num_labels: int | None = Field(None, ge=1, description="None: from the partition's labels")
    max_length: int = Field(128, ge=8)
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="model.device of every run")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model.dtype of every run")


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
    seeds: list[int] | None = None
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
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="repetitions: each seed is the run seed and the partition seed")
    sweep_seeds: int = Field(1, ge=1, description="the lr sweep runs on the first N seeds")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="training rows held out as the validation "
                                "split the lr sweep is scored on (never the reported eval split); 0 "
                                "scores the sweep on the eval split, which reports a biased number")
    select_by: Literal["final", "last3"] = Field("last3", description="sweep score: the final round's "
                                                 "metric or the mean of the last three rounds'")
    metric: str | None = Field(None, description="the metric to report and select by; None: the task's "
                               "own (GLUE's for GLUE tasks, else accuracy / Pearson), loss for a causal LM")
    runner: Literal["sim", "processes"] = Field("sim", description="sim: fedkrso-sim, every client in one "
                                                "process; processes: a server and a client process per shard")
    threads: int = Field(1, ge=1, description="torch threads of a simulated run")
    optimizer: dict[str, Any] = Field(default_factory=dict,
                                      description="training.optimizer of every run (one setting for all methods)")
    weighting: Literal["samples", "uniform"] = Field("samples", description="training.weighting of every run "
                                                     "(uniform: what privacy.dp and secure aggregation need)")
    privacy: dict[str, Any] = Field(default_factory=dict, description="round.yaml privacy section of every run")
    output_dir: Path | None = Field(None, description="default results/<name>")
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    clients: int = Field(10, ge=1)
    alpha: float | None = Field(0.5, gt=0, description="Dirichlet alpha; None = IID")
    clients_per_round: int = Field(3, ge=1)
    rounds: int = Field(10, ge=1)
    sweep_rounds: int = Field(3, ge=1)
    extend_edges: int = Field(0, ge=0, description="where a method's sweep chooses the lowest or highest lr "
                              "of its grid, sweep up to N more lrs beyond that edge, one at a time, each the "
                              "grid's step (the ratio of its two outermost lrs) past the last, until the "
                              "choice sits inside the lrs swept; 0: the grid as given")
    reuse_sweep_runs: bool = Field(False, description="with sweep_rounds equal to rounds: a sweep run of a "
                                   "reported seed keeps its run state, and the reported run at the chosen lr "
                                   "is that run scored again on the reported split (bench/replay.py), not "
                                   "trained a second time")
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    deadline_s: float = Field(900.0, gt=0)
    run_timeout_s: float = Field(7200.0, gt=0, description="give up on one run after this")
    poll_seconds: float = Field(20.0, gt=0, description="client long-poll length")
    target_accuracy: float | None = Field(None, gt=0, le=1,
                                          description="accuracy for the bytes-to-target column")
    instruction: dict[str, Any] | None = Field(None, description="round.yaml's instruction section "
                                               "(template, prompt_format) for prompt/response data")
    client_eval_every: int = Field(0, ge=0, description="round.yaml's eval.client_every (0: server eval only)")
    methods: list[MethodSpec] = Field(min_length=1)
    quick: QuickSpec = QuickSpec()

    @model_validator(mode="after")
    def _reuse_needs_full_sweeps(self) -> BenchConfig:
        if self.reuse_sweep_runs and self.sweep_rounds != self.rounds:
            raise ValueError(f"reuse_sweep_runs needs sweep_rounds equal to rounds (a sweep run is reused as a "
                             f"reported run), not {self.sweep_rounds} and {self.rounds}")
        return self

    def planned_runs(self) -> int:
        """How many result cells this bench needs: each swept lr (a method with more than one) on
        the first ``sweep_seeds`` seeds there are, and every method on every seed."""
        sweep_seeds = len(self.seeds[: self.sweep_seeds])
        sweeps = sum(len(m.lrs) * sweep_seeds for m in self.methods if m.lrs and len(m.lrs) > 1)
        return sweeps + len(self.methods) * len(self.seeds)

    def apply_quick(self) -> BenchConfig:
        q = self.quick
        cfg = self.model_copy(deep=True, update=q.model_dump(
            include={"seeds", "clients", "clients_per_round", "rounds", "sweep_rounds"}, exclude_none=True))
        cfg.data = cfg.data.model_copy(update=q.model_dump(include={"max_examples", "max_eval"},
                                                           exclude_none=True))
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
        cfg.reuse_sweep_runs = cfg.reuse_sweep_runs and cfg.sweep_rounds == cfg.rounds
        return cfg


class BenchConfigError(ValueError):
    """A bench YAML that is missing or does not validate; the message names every bad field."""


def load_bench_config(path: str | Path) -> BenchConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BenchConfigError(f"{path}: {err}") from None
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"{path}: {err.error_count()} invalid field(s)"]
        lines += [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise BenchConfigError("\n".join(lines)) from None


class PoolSpec(Strict):
    """Another bench of the same settings whose seeds or methods a block extends (``report.pool``):
    a block of this protocol or of a committed ``quality.json`` (e.g. the grid's), and the methods
    to bring."""

    report: str | None = Field(None, description="a protocol's combined report (quality.json), read from the "
                                                 "working directory (default: this protocol's own results)")
    block: str = Field(description="the block of that report")
    methods: list[str] | None = Field(None, min_length=1, description="its methods to bring (default: all)")


class ProtocolBlock(BaseModel):
    """One bench of a protocol: a name, what it is for, and the base config's fields it changes."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    purpose: str = ""
    lrs_from: str | None = Field(None, description="take each method's lr from this block's selection")
    pool_with: PoolSpec | None = Field(None, description="also report this block with another bench's seeds pooled in")

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ProtocolConfig(Strict):
    """A protocol (``bench/quality.yaml``): benches sharing one base config."""

    name: str = Field("quality", pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: dict[str, Any]
    blocks: list[ProtocolBlock] = Field(min_length=1)

    def bench(self, block: ProtocolBlock) -> BenchConfig:
        """The block's bench config: the base with the block's fields over it (sections such as
        ``data`` and ``model`` merged key by key, ``methods`` replaced whole)."""
        merged = dict(self.base)
        for key, value in block.overrides().items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        merged["name"] = block.name
        return BenchConfig.model_validate(merged)


def load_protocol(path: str | Path) -> ProtocolConfig:
    data = yaml.safe_load(Path(path).read_text())
    try:
        protocol = ProtocolConfig.model_validate(data)
        for block in protocol.blocks:
            protocol.bench(block)
    except ValidationError as err:
        lines = [f"{path}: {err.error_count()} invalid field(s)"]
        lines += [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise BenchConfigError("\n".join(lines)) from None
    return protocol
