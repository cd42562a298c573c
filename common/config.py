"""round.yaml: the one configuration file of a run, validated by pydantic.

Errors name the bad field with its dotted path (``method.rank: Input should be ...``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .methods import METHODS, Method, OptimizerConfig, build_method
from .models import Task
from .cli import DEVICE_PATTERN
from .privacy.config import PrivacySection
from .protocol import CLIENT_ID_PATTERN

MethodSection = Annotated[
    Union[tuple(cls.Config for cls in METHODS.values())],  # noqa: UP007 - built from the registry
    Field(discriminator="name"),
]


Tracker = Literal["tensorboard", "csv", "wandb", "mlflow", "plot"]


class Section(BaseModel):
    """A round.yaml section: an unknown key is an error, not ignored."""
    model_config = ConfigDict(extra="forbid")


class RunSection(Section):
    """Which run this is, and where what it produces goes."""
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="run name (in paths)")
    seed: int = Field(0, ge=0, description="run seed: round seeds, client RNGs, head init")
    output_dir: Path = Field(Path("runs/run"), description="metrics, checkpoints, final model")
    report_to: list[Tracker] = Field(
        default_factory=list, description="where each metrics row goes besides metrics.jsonl: "
        "tensorboard, csv, wandb (offline), mlflow (file store), plot (metrics.png); server/trackers.py")

    @model_validator(mode="after")
    def _trackers_once(self) -> RunSection:
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"report_to names a tracker twice: {self.report_to}")
        return self


class ModelSection(Section):
    """The base model every party loads itself, and the defaults of where and in which
    precision each party computes (docs/concepts/precision.md)."""
    name: str = Field(..., description="alias (minilm, smollm2), local folder or hub id")
    task: Task = Field("sequence-classification", description="sequence-classification (a classifier or, "
                       "with num_labels 1, a regressor on top) or causal-lm (next-token loss, perplexity)")
    num_labels: int = Field(2, ge=1, le=100_000, description="classes of a sequence classifier; 1 = regression")
    labels: list[str] | None = Field(None, description="label names, index = class id")
    max_length: int = Field(128, ge=8, le=8192, description="most tokens per row; longer rows are truncated "
                            "(instruction rows lose prompt text, never the response)")
    revision: str | None = Field(
        None, description="hub revision (branch, tag or commit) of a hub id; None = the default branch")
    device: str = Field(
        "cpu", pattern=DEVICE_PATTERN, description="where each party computes: auto (cuda, else mps, "
        "else cpu), cpu, cuda, cuda:N or mps; each process may override it (--device, FEDKRSO_DEVICE)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype and dtype of never-changing frozen weights; the state "
        "a round changes stays float32 (common/precision.py); per process: --dtype, FEDKRSO_DTYPE")

    @model_validator(mode="after")
    def _labels_match(self) -> ModelSection:
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ValueError(f"labels has {len(self.labels)} names but num_labels={self.num_labels}")
        return self


class RoundsSection(Section):
    """How many rounds, how many clients each, and how long the server waits for them
    (docs/concepts/round.md)."""
    total: int = Field(5, ge=1, description="rounds in the run")
    clients_per_round: int = Field(2, ge=1, description="clients sampled each round")
    min_clients: int = Field(1, ge=1, description="quorum: fewest updates that close a round")
    deadline_s: float = Field(600.0, gt=0, description="seconds a round waits for updates")
    start_timeout_s: float = Field(600.0, gt=0, description="seconds to wait for enough clients")
    resume_grace_s: float = Field(
        60.0, ge=0, description="after a server restart, the open round waits at least this long "
        "for its selected clients (they reconnect with backoff of up to 30 s)")

    @model_validator(mode="after")
    def _quorum(self) -> RoundsSection:
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min_clients={self.min_clients} exceeds clients_per_round={self.clients_per_round}"
            )
        return self


ClientId = Annotated[str, Field(pattern=f"^{CLIENT_ID_PATTERN}$")]


class TrainingSection(Section):
    """What every client's local training shares, and how much each client weighs in the
    round's mean (docs/algorithm.md section 5)."""
    batch_size: int = Field(16, ge=1, le=65536, description="rows per local training step")
    weighting: Literal["samples", "uniform"] = Field("samples", description="w_n in aggregation")
    max_samples_per_client: int | None = Field(
        None, ge=1, description="weighting by samples: a client counts at most this many samples, "
        "whatever it declares (default: no cap)")
    max_weight_share: float | None = Field(
        0.5, gt=0, le=1, description="no client's weight exceeds this share of the total weight of "
        "the clients selected for a round (water-filling cap; at 0.5 a round of two clients "
        "weighs them equally); null or 1 = no cap")
    client_weights: dict[ClientId, float] = Field(
        default_factory=dict, description="client id -> pinned weight (> 0), used instead of its "
        "declared samples; an operator's choice a client cannot change")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="AdamW weight decay, lr warmup and schedule, gradient clipping: one setting for every method")

    @model_validator(mode="after")
    def _positive_weights(self) -> TrainingSection:
        bad = sorted(c for c, w in self.client_weights.items() if not (w > 0 and w < float("inf")))
        if bad:
            raise ValueError(f"client_weights must be positive and finite: {bad[:5]}")
        return self


class EvalSection(Section):
    """Evaluation by the server on its own split, and by clients on their held-out rows
    (docs/guides/evaluation.md)."""
    data: Path | None = Field(None, description="the server's evaluation split (saved by fedkrso-partition); "
                              "None: the server does not evaluate")
    batch_size: int = Field(64, ge=1, description="rows per evaluation batch")
    max_examples: int | None = Field(None, ge=1, description="cap on evaluated examples (server and clients)")
    client_every: int = Field(
        0, ge=0, description="clients selected for a round t with t % client_every == 0 evaluate the model "
        "they caught up to (W^t) on their own held-out rows (<shard>/eval) and report it; 0 = never")

    def client_due(self, round_id: int) -> bool:
        """Whether the clients of round ``round_id`` evaluate (``client_every``)."""
        return self.client_every > 0 and round_id % self.client_every == 0


class InstructionSection(Section):
    """How prompt/response rows (a causal LM's instruction data) become tokens; the loss and
    the evaluation cover the response tokens only (docs/guides/instruction-tuning.md)."""

    template: Literal["plain", "chat"] = Field(
        "plain", description="plain: prompt_format, then the response and end-of-sequence; chat: the "
        "tokenizer's chat template, a user turn holding prompt_format and the assistant's response")
    prompt_format: str = Field(
        "{prompt}\n", description="text of the prompt, with the row's prompt in place of {prompt}")

    @model_validator(mode="after")
    def _one_prompt(self) -> InstructionSection:
        if self.prompt_format.count("{prompt}") != 1:
            raise ValueError("prompt_format must contain {prompt} exactly once")
        return self


MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1024, 3 << 20  # messages stay far below gRPC's 4 MB limit
MAX_UPDATE_NORM = 1000.0
TRANSPORT_FIELDS = {"listen", "upload_idle_s", "upload_total_s", "max_connections", "max_connections_per_peer",
                    "max_pending_connections", "handshake_timeout_s", "connection_idle_s",
                    "max_streams_per_connection", "max_clients", "join_burst", "join_rate_per_s",
                    "finish_wait_s"}


class ServerSection(Section):
    """The coordinator: its address, streams, catch-up, update checks, aggregation and
    checkpoints; then its limits against hostile clients and networks (docs/HOSTILE.md),
    which shape no result and may change across a restart."""
    listen: str = Field("127.0.0.1:50051", description="host:port to bind")
    max_chunk_bytes: int = Field(1 << 20, ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES, description="stream chunk size")
    snapshot_after_rounds: int = Field(
        8, ge=1, description="round deltas kept in memory for catch-up: a client further behind "
        "gets a snapshot; within them it gets the deltas or a snapshot, whichever is smaller"
    )
    max_update_norm: float | None = Field(
        MAX_UPDATE_NORM, gt=0, description="refuse an update whose size exceeds this: the L2 norm of "
        "the change of the model's weights it implies (method.update_norm, the same space for every "
        "method). The default is far above every honest update measured (docs/HOSTILE.md: largest "
        "17, FedKRSO on MiniLM) and far below what wrecks a model (1e38-valued updates); null = off")
    clip_norm: float | None = Field(
        None, gt=0, description="scale an update whose size (as for max_update_norm) exceeds this "
        "down to it before weighting (robust aggregation); default off")
    aggregation: Literal["mean", "trimmed-mean"] = Field(
        "mean", description="weighted streaming mean, or coordinate-wise trimmed mean (unweighted)"
    )
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="trimmed-mean: fraction of values dropped at each end"
    )
    max_concurrent_downloads: int = Field(
        32, ge=1, description="round deltas and snapshots streamed at once; the rest wait their "
        "turn, so server memory for the downlink fan-out stays flat in the number of clients")
    max_concurrent_uploads: int = Field(
        32, ge=1, description="updates received and assembled at once; other streams wait, held "
        "back by flow control, so server memory stays flat in the number of clients sending")
    checkpoint_every: int = Field(
        5, ge=1, description="rounds between full state checkpoints under <output_dir>/state"
    )
    # -- hostile clients and networks (docs/HOSTILE.md); none of these shapes a run's results
    upload_idle_s: float = Field(
        30.0, gt=0, description="longest wait for the next message of an update stream, the first "
        "included; a stream silent longer is refused (DEADLINE_EXCEEDED) and its slot freed")
    upload_total_s: float = Field(
        600.0, gt=0, description="longest an update stream may take from its first byte to its last, "
        "waiting for its turn included; keep rounds.deadline_s above it")
    max_connections: int = Field(
        1024, ge=1, description="TCP connections held at once (each costs file descriptors); more are "
        "closed at accept. Lowered at start to what the process's file-descriptor limit allows")
    max_connections_per_peer: int = Field(
        64, ge=1, description="TCP connections held at once from one IP address (clients behind one "
        "NAT share it); more are closed at accept")
    max_pending_connections: int = Field(
        128, ge=1, description="connections not yet through their handshake; beyond it the oldest "
        "pending one is closed to make room (a flood of stalled handshakes cannot lock clients out)")
    handshake_timeout_s: float = Field(
        10.0, gt=0, description="a connection must complete its TLS/HTTP2 handshake within this")
    connection_idle_s: float = Field(
        300.0, gt=0, description="a connection carrying no byte for this long is closed (clients "
        "ping every 30 s)")
    max_streams_per_connection: int = Field(
        16, ge=4, description="concurrent RPCs on one connection (a client uses at most 4)")
    max_clients: int = Field(
        4096, ge=1, description="entries of the client table; when full, clients that left or went "
        "silent are forgotten first, then a Join of a new id is refused (RESOURCE_EXHAUSTED)")
    join_burst: int = Field(
        32, ge=1, description="Joins one IP address may make at once before join_rate_per_s applies")
    join_rate_per_s: float = Field(
        2.0, gt=0, description="sustained Joins per second from one IP address; more are refused "
        "(RESOURCE_EXHAUSTED) and the client retries")
    finish_wait_s: float = Field(
        30.0, ge=0, description="after the last round, the longest the server waits for the clients "
        "it last heard from within 60 s to fetch the final state and leave before it stops (a "
        "client that joined and went silent, or whose Leave is lost, holds it this long at most)")


class SecuritySection(Section):
    """Transport security and client credentials (docs/guides/security.md).

    TLS is required for a non-loopback ``server.listen`` unless ``insecure`` is set; on
    loopback the channel may stay plaintext (tests, the demo). Without ``tokens_file`` and
    ``client_id_from_cert`` enrolment is open: Join issues a per-session bearer token."""

    tls_cert: Path | None = Field(None, description="server certificate chain (PEM); enables TLS")
    tls_key: Path | None = Field(None, description="private key of tls_cert (PEM)")
    client_ca: Path | None = Field(
        None, description="CA bundle for client certificates (PEM); set => mutual TLS required"
    )
    tokens_file: Path | None = Field(
        None, description="per-client bearer tokens, one `client_id token` per line, # comments; "
        "re-read when it changes, so removing a line revokes that client"
    )
    client_id_from_cert: bool = Field(
        False, description="with mutual TLS: the client id is the certificate's subject CN"
    )
    insecure: bool = Field(
        False, description="serve plaintext gRPC even on a non-loopback address (trusted networks only)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SecuritySection:
        if self.tls_cert is not None and self.tls_key is None:
            raise ValueError("tls_key is required with tls_cert")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_cert is required with tls_key")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.client_id_from_cert and self.client_ca is None:
            raise ValueError("client_id_from_cert needs client_ca (mutual TLS)")
        if self.client_id_from_cert and self.tokens_file is not None:
            raise ValueError("choose one client identity: tokens_file or client_id_from_cert")
        return self


class RunConfig(Section):
    """A whole round.yaml; ``method`` is the ``Config`` of one registered method, chosen by
    its ``name``."""
    run: RunSection = RunSection()
    model: ModelSection
    method: MethodSection
    rounds: RoundsSection = RoundsSection()
    training: TrainingSection = TrainingSection()
    instruction: InstructionSection = InstructionSection()
    eval: EvalSection = EvalSection()
    server: ServerSection = ServerSection()
    security: SecuritySection = SecuritySection()
    privacy: PrivacySection = PrivacySection()

    @model_validator(mode="after")
    def _privacy_fits(self) -> RunConfig:
        """DP and secure aggregation sum plain, unweighted updates (docs/PRIVACY.md)."""
        p, s = self.privacy, self.server
        if p.dp.enabled and (reason := METHODS[self.method.name].dp_unsupported):
            raise ValueError(f"privacy.dp does not apply to {self.method.name}: {reason}")
        if p.dp_sgd.enabled:
            if reason := METHODS[self.method.name].dp_sgd_unsupported:
                raise ValueError(f"privacy.dp_sgd does not apply to {self.method.name}: {reason}")
            if self.training.optimizer.max_grad_norm is not None:
                raise ValueError("privacy.dp_sgd clips every example's gradient (privacy.dp_sgd.clip): "
                                 "training.optimizer.max_grad_norm cannot apply on top; leave it unset")
        if p.dp.enabled or p.secure_aggregation.enabled:
            what = "privacy.dp" if p.dp.enabled else "privacy.secure_aggregation"
            if self.training.weighting != "uniform":
                raise ValueError(f"{what} needs training.weighting: uniform (sample-count weights reveal each "
                                 "client's count and break the sum's sensitivity bound)")
            if s.aggregation != "mean":
                raise ValueError(f"{what} needs server.aggregation: mean (a trimmed mean is no sum)")
            if self.training.client_weights:
                raise ValueError(f"{what} sums unweighted updates: training.client_weights cannot apply")
        if p.dp.enabled and p.dp.mode == "local" and "max_update_norm" in s.model_fields_set:
            raise ValueError("privacy.dp local mode: every update carries its own noise, so the server bounds its "
                             "size by what the clip and the noise allow (C + z C (sqrt(D) + 8)); "
                             "server.max_update_norm cannot apply")
        if p.any and self.eval.client_every:
            raise ValueError("eval.client_every: each client's evaluation would reach the server in the clear, one "
                             "client at a time, which privacy.* rules out; evaluate on the server (eval data)")
        if p.secure_aggregation.enabled:
            if s.clip_norm is not None or (s.max_update_norm is not None and "max_update_norm" in s.model_fields_set):
                raise ValueError("privacy.secure_aggregation: the server never sees an update, so server.clip_norm "
                                 "and server.max_update_norm cannot apply (clients clip with privacy.dp)")
            object.__setattr__(s, "max_update_norm", None)  # the default bound too: nothing it could apply to
            if self.rounds.min_clients < 2:
                raise ValueError("privacy.secure_aggregation needs rounds.min_clients >= 2 (a sum of one update is it)")
            sa = p.secure_aggregation
            if self.rounds.clients_per_round * sa.value_bound * 2 > 2 ** (sa.ring_bits - 1):
                raise ValueError(f"privacy.secure_aggregation: a {sa.ring_bits}-bit ring has no fixed-point room for "
                                 f"{self.rounds.clients_per_round} values bounded by {sa.value_bound}")
            if p.dp.amplification:
                raise ValueError("privacy.dp.amplification needs a secret selection, but secure aggregation shows "
                                 "each round's clients to one another")
        return self

    def build_method(self) -> Method:
        """The run's method, with its optimizer setting and schedule length."""
        return build_method(self.method, self.run.seed, self.training.optimizer, self.rounds.total)

    def token_format(self):
        """How this run's rows become tokens (``common.data.TokenFormat``): the same on the
        server and every client."""
        from .data import TokenFormat

        return TokenFormat(self.model.task, self.model.max_length, self.instruction.template,
                           self.instruction.prompt_format)


def address_host(address: str) -> str:
    """The host of ``host:port`` (brackets of an IPv6 literal removed; empty = all interfaces)."""
    return address.rpartition(":")[0].strip("[]")


def is_loopback(host: str) -> bool:
    """Loopback hosts may stay plaintext: nothing off this machine can reach them."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConfigError(ValueError):
    """A round.yaml that does not validate; the message names every bad field."""


def format_errors(source: str, err: ValidationError) -> str:
    """One line per bad field, named by its dotted path."""
    lines = [f"{source}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "config") -> RunConfig:
    """A validated ``RunConfig`` from a round.yaml already read, or ``ConfigError``."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(source, err)) from None


def check_inputs(cfg: RunConfig) -> None:
    """``ConfigError`` now, before a model loads, for an input folder the run would miss later
    (``eval.data``, read after the first round)."""
    if cfg.eval.data is not None and not Path(cfg.eval.data).is_dir():
        raise ConfigError(f"eval.data: no evaluation split at {cfg.eval.data} (write it with fedkrso-partition)")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a round.yaml; ``ConfigError`` names what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(data, str(path))
