"""What every federated method provides, and the machinery they share.

A method is one module under ``fedkrso.common.methods`` (a package ``config``, ``layer``,
``method`` when it has a layer of its own, as ``fedtt``) with the same shape:

* ``Config``: a pydantic model of its knobs (``name`` is the discriminator in round.yaml);
* ``prepare(model)``: freeze, inject adapters, mark dense-trainables (identical on every party);
* ``place(model, placement)``: the precision rule of ``common.precision`` (state and trainables
  float32, frozen weights in the party's dtype), then onto the party's device;
* ``round_seeds(round)``: the seeds the server hands out for a round (may be empty);
* ``train_round(...)``: a client's local training, returning named upload tensors;
* ``update_spec(model, seeds)``: the names and shapes an upload may carry (validation, bytes);
* ``apply(model, seeds, delta)``: fold the aggregated round delta into a model. Server and
  clients call the same function on the same bytes, so they reach the same weights;
* ``upload_bytes_formula(model, n_seeds_used)``: the closed-form payload of one upload, which
  tests compare with the bytes actually encoded;
* ``allowed_update_names`` / ``keyed_update_problem``: what one client's upload may carry once
  the method's keyed choices (FedKRSO's seed draws, FedKSeed's candidates) are recomputed by
  the server from (run seed, round, client key), so an upload outside them is refused;
* ``update_norm(model, seeds, tensors)``: the L2 norm of the change of the model's weights an
  upload implies, the one space in which ``server.max_update_norm`` and ``clip_norm`` mean
  the same for every method;
* ``export(model)`` / ``export_extra(model)``: a plain transformers model for
  ``save_pretrained`` plus any tensors it cannot hold (FedTT's adapters), which
  ``save_extras`` writes beside it as ``adapters.safetensors`` (the method's config in the
  file's metadata, so a loader such as ``fedtt.load_adapters`` needs nothing else);
* ``export_artifacts(model, folder, model_dir)``: what ``fedkrso-export`` adds for the method
  beside the plain model (FedIT's PEFT adapter folder) and the ``export.json`` entries naming
  it (FedTT's adapters file and its loader), so the export knows no method by name.

Uploads are *changes* (accumulators, weight deltas, per-seed scalars), so the server's job is
the same for every method: a weighted mean of named tensors (``StreamingAggregator``), where a
tensor a client did not send counts as zero (a FedKRSO seed it never drew).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..precision import Placement, place, placement_of
from ..privacy.dpsgd import per_example_inputs, per_example_loss
from ..privacy.geometry import UpdateGeometry
from ..subspace import fingerprint
from ..tensors import element_size, l2_norm
from .modules import _matches, is_conv1d, is_linear, is_norm, out_in, target_linears  # noqa: F401 (re-exported)
from .optim import OptimizerConfig, Optimization

WireDtype = Literal["float32", "bfloat16", "float16"]
EXTRAS_FILE = "adapters.safetensors"
EXTRAS_FORMAT = "fedkrso-adapters/1"

# Linear-like modules inside the repeated transformer blocks (BERT `layer.N`, LLaMA `layers.N`,
# GPT-2 `h.N`, T5/others `block.N`).
DEFAULT_TARGETS = [r"(^|\.)(layer|layers|h|block|blocks)\.\d+\."]
# Task heads of AutoModelForSequenceClassification families (BERT/RoBERTa `classifier` and the
# `pooler` that feeds it, GPT-2/LLaMA `score`). The pooler is part of the head: checkpoints
# such as sentence-transformers' MiniLM ship it untrained, and training it only inside a
# random subspace cost 40 points of round-0 accuracy on BBC News (measured).
DEFAULT_DENSE = [r"(^|\.)classifier(\.|$)", r"(^|\.)pooler(\.|$)", r"(^|\.)score(\.|$)"]


class MethodConfig(BaseModel):
    """Knobs common to every method. Each method's ``Config`` subclasses this."""

    model_config = ConfigDict(extra="forbid")

    name: str
    lr: float = Field(3e-4, gt=0, description="learning rate of the method's trainable part")
    dense_lr: float | None = Field(None, gt=0, description="lr of dense-trainables; None = lr")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="regexes over module names selecting the Linear layers the method adapts",
    )
    dense_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DENSE),
        description="regexes over module names whose parameters are trained densely and sent whole",
    )
    train_norms: bool = Field(True, description="LayerNorm/RMSNorm weights and biases are dense")
    train_biases: bool = Field(True, description="the target Linears' biases are trained too (dense, "
                               "sent whole), as full fine-tuning trains them")
    wire_dtype: WireDtype = Field("float32", description="dtype of tensors on the wire")

    def local_steps(self) -> int:
        """Optimizer steps a client takes per round (each method's ``Config`` says how many)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how many local steps it takes")


@dataclass
class LocalUpdate:
    """A client's upload for one round, before encoding."""

    tensors: dict[str, torch.Tensor]
    loss: float
    steps: int
    num_samples: int = 0
    seeds_used: list[int] = field(default_factory=list)
    train_state_bytes: int = 0  # peak gradient + optimizer-state bytes while training (measured)


def dense_parameters(model: nn.Module, cfg: MethodConfig, biases: bool | None = None) -> dict[str, nn.Parameter]:
    """Parameters trained densely: the task head(s), every norm (``train_norms``) and the target
    Linears' biases (``biases``, default ``cfg.train_biases``), in model order."""
    biases = cfg.train_biases if biases is None else biases
    out: dict[str, nn.Parameter] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if _matches(mname, cfg.dense_modules) or (cfg.train_norms and is_norm(module)):
            for pname, p in module.named_parameters(recurse=False):
                out[prefix + pname] = p
        elif biases and is_linear(module) and module.bias is not None and _matches(mname, cfg.target_modules):
            out[prefix + "bias"] = module.bias
    return out


def train_state_bytes(*optimizers: torch.optim.Optimizer | None) -> int:
    """Gradient plus optimizer-state bytes held right now by ``optimizers``' parameters,
    counted from the tensors themselves (call it after ``step()``, before ``zero_grad``)."""
    total = 0
    for opt in optimizers:
        if opt is None:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    total += p.grad.numel() * p.grad.element_size()
                for value in opt.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.dim() > 0:
                        total += value.numel() * value.element_size()
    return total


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (float32) on a batch that carries ``labels``, computed on the
    model's device under its placement's autocast (common/precision.py, rule 4)."""
    placement = placement_of(model)
    batch = {k: v.to(placement.device, non_blocking=True) for k, v in batch.items()}
    with placement.autocast():
        if getattr(model, "fedkrso_per_example_loss", False):  # DP-SGD (privacy.dpsgd)
            batch = per_example_inputs(model, batch)
            if batch["labels"].dim() == 2:  # a causal LM: each example's token mean, then the batch mean
                labels = batch.pop("labels")
                return per_example_loss(model(**batch).logits, labels)
        return model(**batch).loss.float()


class Method(ABC):
    """Base of every federated method; see the module docstring for the contract."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]

    # False: the round's seeds are fixed for the whole run (FedKSeed's candidates) and travel
    # once, to a client that has none yet, rather than in every round header and delta
    seeds_per_round: ClassVar[bool] = True
    # why client-level DP cannot bound this method's model update (None: it can)
    dp_unsupported: ClassVar[str | None] = None
    # why sample-level DP-SGD cannot privatize this method's local steps (None: it can)
    dp_sgd_unsupported: ClassVar[str | None] = None

    def __init__(self, cfg: MethodConfig, run_seed: int, optimizer: OptimizerConfig | None = None,
                 total_rounds: int = 1):
        self.cfg = cfg
        self.run_seed = run_seed
        self.optim = Optimization(optimizer or OptimizerConfig(), cfg.local_steps(), total_rounds)

    # -- both sides --------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Freeze everything but the dense-trainables. Subclasses add their own parts."""
        for p in model.parameters():
            p.requires_grad_(False)
        for p in dense_parameters(model, self.cfg).values():
            p.requires_grad_(True)

    def round_seeds(self, round_id: int) -> list[int]:
        """The seeds the server hands out for round ``round_id`` (none by default)."""
        return []

    def plan_state(self) -> dict:
        """What the method decided from earlier rounds and needs for the next ones (JSON): the
        coordinator saves it with each round, so a restart resumes it. Empty for most."""
        return {}

    def load_plan_state(self, state: dict) -> None:
        """Take back a ``plan_state`` saved before a restart."""

    def plan_fingerprint(self, model: nn.Module, seeds: list[int]) -> str:
        """Proof that a party rebuilt the round's random objects (subspaces, directions)."""
        return fingerprint([("seeds", torch.tensor(seeds, dtype=torch.int64))])

    @abstractmethod
    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor a round delta changes: what a client snapshots and fingerprints."""

    def state_fingerprint(self, model: nn.Module) -> str:
        """SHA-256 of the state's tensors: what server and clients compare after every round."""
        return fingerprint(sorted(self.state_parameters(model).items()))

    def mastered(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules whose weight is state but, under a low-precision dtype, is computed with a
        copy in that dtype beside a float32 host master (common/precision.py, rule 5)."""
        return {}

    def place(self, model: nn.Module, placement: Placement) -> nn.Module:
        """The precision rule on a prepared model: the state (and every trainable) float32,
        ``mastered`` weights a float32 host master plus a compute copy, every other weight in
        the placement's dtype; all of it on the placement's device."""
        return place(model, placement, self.state_parameters(model).values(), self.mastered(model).values())

    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A copy of the state a round changes, in host memory (a GPU party does not hold its
        state twice on the device)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.state_parameters(model).items()}

    def training_snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a client must copy to return to W^t after local training: the state training
        can change (all of it, unless a method knows better)."""
        return self.snapshot(model)

    @torch.no_grad()
    def restore(self, model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
        """Put back a ``snapshot`` (or any tensors of the same names and shapes: a checkpoint,
        a downloaded state, a ``training_snapshot``), bit for bit."""
        state = self.state_parameters(model)
        for k, v in snapshot.items():
            state[k].copy_(v)

    def snapshot_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a snapshot download carries to take a client to the current state; by default
        the whole state (a method whose state has a compact form overrides both this and
        ``load_snapshot``)."""
        return self.snapshot(model)

    def load_snapshot(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Take a ``snapshot_tensors`` download as the state."""
        self.restore(model, tensors)

    def snapshot_spec(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Names and shapes of ``snapshot_tensors`` (what a client accepts as a snapshot)."""
        return {k: tuple(v.shape) for k, v in self.state_parameters(model).items()}

    @abstractmethod
    def trainable_count(self, model: nn.Module) -> int:
        """Parameters trained with gradients and an optimizer at any one time during local
        training (FedKRSO: one subspace's B plus the dense-trainables)."""

    def train_state_bytes_formula(self, model: nn.Module) -> int:
        """Gradient + Adam state of ``trainable_count`` float32 parameters, in closed form:
        grad + exp_avg + exp_avg_sq = 3 x 4 bytes each. Clients measure the real figure
        (``LocalUpdate.train_state_bytes``); this is the analytic one."""
        return 3 * 4 * self.trainable_count(model)

    @abstractmethod
    def update_spec(self, model: nn.Module, seeds: list[int]) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor an upload may carry for a round with ``seeds``."""

    def required_names(self, model: nn.Module, seeds: list[int]) -> set[str]:
        """Names an upload must carry (the rest of ``update_spec`` is optional)."""
        return set(self.update_spec(model, seeds))

    def update_geometry(self, model: nn.Module, seeds: list[int]) -> UpdateGeometry:
        """The map from an upload of a round with ``seeds`` to the model update it makes, on
        which DP clips and noises (``privacy.geometry``). By default every uploaded tensor is
        the change of the parameters it names (identity)."""
        return UpdateGeometry(self.update_spec(model, seeds))

    @abstractmethod
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        """Fold the aggregated (weighted-mean) round delta into ``model``."""

    def export(self, model: nn.Module) -> nn.Module:
        """A plain transformers model for ``save_pretrained`` (adapters merged or removed)."""
        return model

    def export_extra(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trained tensors the plain model cannot hold (adapters that do not merge into the
        base weights), saved with safetensors next to ``export(model)``; empty by default."""
        return {}

    def save_extras(self, model: nn.Module, folder: Path) -> Path | None:
        """Write ``export_extra(model)`` to ``folder/adapters.safetensors``, with the format,
        the method's name and its config as JSON in the safetensors metadata; None (and no
        file) when the method has nothing beyond the plain model."""
        from safetensors.torch import save_file

        extra = self.export_extra(model)
        if not extra:
            return None
        path = Path(folder) / EXTRAS_FILE
        meta = {"format": EXTRAS_FORMAT, "method": self.name, "config": json.dumps(self.cfg.model_dump(mode="json"))}
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(path), metadata=meta)
        return path

    def export_artifacts(self, model: nn.Module, folder: Path, model_dir: str) -> dict[str, str]:
        """Write into the export folder ``folder`` what the method adds to the plain model, and
        return the ``export.json`` entries that name it (paths relative to ``folder``).
        ``folder/model_dir`` already holds the plain model and ``save_extras``'s file, written
        as ``<run>/final`` is. Nothing by default: a plain model needs no more."""
        return {}

    # -- server: what one client's upload may be --------------------------------------------
    def allowed_update_names(self, model: nn.Module, seeds: list[int], round_id: int, client_key: str) -> set[str]:
        """Names the upload of ``client_key`` for round ``round_id`` may carry, its keyed
        choices recomputed from (run seed, round, client key); by default all of update_spec."""
        return set(self.update_spec(model, seeds))

    def keyed_update_problem(self, model: nn.Module, seeds: list[int], round_id: int, client_key: str,
                             tensors: dict[str, torch.Tensor], seeds_used: list[int]) -> str | None:
        """Why an upload (already matched to ``update_spec``) does not fit the choices its
        client's key makes, or None when it fits. The base check: no name outside
        ``allowed_update_names``; methods whose choices are keyed check ``seeds_used`` too."""
        allowed = self.allowed_update_names(model, seeds, round_id, client_key)
        extra = sorted(set(tensors) - allowed)
        if extra:
            return f"tensor {extra[0]!r} is not one client {client_key!r} may send in round {round_id}"
        return None

    def update_norm(self, model: nn.Module, seeds: list[int], tensors: dict[str, torch.Tensor]) -> float:
        """L2 norm of the change of the model's weights that ``tensors`` imply when applied
        alone (weight 1) to ``model``: a method-independent size for an upload. The default
        holds for uploads that are themselves weight changes (FedAvg's deltas, dense deltas)."""
        return l2_norm(tensors.values())

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0) -> int:
        """Payload bytes of one client's upload in closed form (tensor data, no framing).

        ``n_seeds_used`` matters only to methods whose upload grows with the seeds a client
        drew (FedKRSO). Each method states its formula in its own docstring."""
        raise NotImplementedError(f"{type(self).__name__} has no upload formula")

    def wire_bytes(self, numel: int) -> int:
        """Bytes of ``numel`` elements in the configured wire dtype."""
        return numel * element_size(self.cfg.wire_dtype)

    # -- client ------------------------------------------------------------------------
    @abstractmethod
    def train_round(
        self,
        model: nn.Module,
        batches: Iterator[dict[str, torch.Tensor]],
        round_id: int,
        seeds: list[int],
        client_key: str,
    ) -> LocalUpdate:
        """Local training for one round; ``model`` is left in its trained state."""

    # -- shared helpers ----------------------------------------------------------------
    def dense(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The dense-trainables: head, norms and the target Linears' biases (``dense_parameters``)."""
        return dense_parameters(model, self.cfg)

    def dense_optimizer(self, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer | None:
        """One AdamW over the dense-trainables at ``dense_lr`` (default: the method's lr)."""
        return self.optim.adamw([(params.values(), self.cfg.dense_lr or self.cfg.lr)])

    @staticmethod
    def dense_spec(dense: dict[str, nn.Parameter]) -> dict[str, tuple[int, ...]]:
        """The upload spec of parameters trained densely (biases, norms, heads), each under
        ``dense.<name>``."""
        return {f"dense.{n}": tuple(p.shape) for n, p in dense.items()}

    @staticmethod
    def start_values(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Copies of ``params`` before training, in host memory (the deltas are taken there)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}

    @staticmethod
    def deltas(params: dict[str, nn.Parameter], start: dict[str, torch.Tensor], prefix: str):
        """``<prefix><name>``: trained - start, float32, in host memory."""
        return {f"{prefix}{n}": (p.detach().cpu() - start[n]).float() for n, p in params.items()}

    @classmethod
    def dense_deltas(cls, dense: dict[str, nn.Parameter], start: dict[str, torch.Tensor]):
        """The change of each dense parameter since ``start``, named ``dense.<name>``."""
        return cls.deltas(dense, start, "dense.")

    @staticmethod
    @torch.no_grad()
    def apply_dense(model: nn.Module, delta: dict[str, torch.Tensor]) -> None:
        """Add the round's mean dense changes (``dense.<name>``) to ``model``'s parameters."""
        params = dict(model.named_parameters())
        for key, d in delta.items():
            if key.startswith("dense."):
                p = params[key[len("dense."):]]
                p.add_(d.to(device=p.device, dtype=p.dtype))
