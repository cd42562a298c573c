"""FedTT: tensor-train adapters, and FedTT+ (docs/algorithm.md section 7; Ghiasvand et al.,
arXiv 2410.13097).

After the attention output and the feed-forward output of every block (``adapter_modules``:
BERT/RoBERTa ``attention.output.dense`` and ``layer.N.output.dense``, GPT-2 ``attn.c_proj``
and ``mlp.c_proj``, LLaMA-style ``self_attn.o_proj`` and ``mlp.down_proj``) a forward hook
applies a bottleneck adapter ``y + U act(D y)`` with D (m x h) and U (h x m), m = 64. Each of
D and U is a tensor-train matrix: ``cores`` cores G_k of shape (r_{k-1}, o_k, i_k, r_k), with
h and m split into that many balanced factors (``tt_factors``: 384 -> 6*8*8, 64 -> 4*4*4) and
TT rank r (5); the full matrix is contracted from the cores at each forward (it is small).

Initialisation, from CPU generators seeded by (run seed, module, matrix, core): Gaussian cores
scaled so that D has variance 1/h per entry; U the same at 1/m except one core, which is zero,
so every adapter starts as the identity. Clients train the cores (plus the dense-trainables)
with Adam and upload core deltas; the server averages them (FedAvg on cores).

FedTT+ (``FedTTPlus``) freezes part of the cores; its docstring gives the rule.

The adapters do not merge into the base weights (the activation is in between), so ``export``
returns a copy without them and ``export_extra`` returns their cores, which the server saves
beside the model as ``adapters.safetensors`` (with the adapter config in its metadata). To use
an exported FedTT model (``<run>/final`` or a ``fedkrso-export`` folder)::

    from transformers import AutoModelForSequenceClassification
    from fedkrso.common.methods.fedtt import load_adapters

    model = load_adapters(AutoModelForSequenceClassification.from_pretrained(folder), folder)
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Literal

import structlog
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..subspace import cpu_generator
from ..tensors import l2_norm
from .base import EXTRAS_FILE, EXTRAS_FORMAT, MethodConfig, out_in
from .delta import DeltaMethod

ATTR = "tt_adapter"
DEFAULT_ADAPTER_MODULES = [
    r"\.attention\.output\.dense$",  # BERT/RoBERTa attention output
    r"\.(layer|layers)\.\d+\.output\.dense$",  # BERT/RoBERTa feed-forward output
    r"\.attn\.c_proj$",  # GPT-2 attention output
    r"\.mlp\.c_proj$",  # GPT-2 feed-forward output
    r"\.self_attn\.o_proj$",  # LLaMA/Mistral/Qwen attention output
    r"\.mlp\.down_proj$",  # LLaMA/Mistral/Qwen feed-forward output
]
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

log = structlog.get_logger("fedkrso.methods")


class Config(MethodConfig):
    name: Literal["fedtt"] = "fedtt"
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the TT cores")
    steps: int = Field(16, ge=1, le=100_000, description="local Adam steps per round")
    adapter_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ADAPTER_MODULES),
        description="regexes over module names: adapters go after these modules' outputs",
    )
    bottleneck: int = Field(64, ge=1, le=65536, description="m: adapter width (h -> m -> h)")
    tt_rank: int = Field(5, ge=1, le=1024, description="TT rank between consecutive cores")
    cores: int = Field(3, ge=2, le=16, description="cores per TT matrix (factors of h and of m)")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="act in y + U act(D y)")

    def local_steps(self) -> int:
        return self.steps


class PlusConfig(Config):
    name: Literal["fedtt+"] = "fedtt+"
    freeze_rule: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive: freeze slow-moving core indices round by round; fixed: `freeze`")
    freeze: list[int] = Field(
        default_factory=lambda: [0, -1],
        description="fixed rule: core indices frozen in both TT matrices of each adapter (negative: from end)",
    )
    freeze_ratio: float = Field(0.25, gt=0, lt=1, description="adaptive: freeze the slowest core index when "
                                "its relative change is below this share of the fastest one's")
    max_frozen: int | None = Field(None, ge=0, description="adaptive: at most this many frozen core "
                                   "indices (default: all but one)")

    @model_validator(mode="after")
    def _some_core_trains(self) -> PlusConfig:
        if any(not -self.cores <= i < self.cores for i in self.freeze):
            raise ValueError(f"freeze indices must lie in [-{self.cores}, {self.cores})")
        if len({i % self.cores for i in self.freeze}) == self.cores:
            raise ValueError("freeze leaves no core trainable")
        if self.max_frozen is not None and self.max_frozen >= self.cores:
            raise ValueError(f"max_frozen must leave a core trainable (< {self.cores})")
        return self


def tt_factors(n: int, d: int) -> list[int]:
    """``n`` as ``d`` balanced factors (ascending): primes, largest first, each into the bucket
    with the smallest product. Pads with 1 where n has fewer than d prime factors."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    buckets = [1] * d
    for q in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= q
    return sorted(buckets)


class TTMatrix(nn.Module):
    """An (out x in) matrix stored as TT cores G_k (r_{k-1}, o_k, i_k, r_k), r_0 = r_d = 1."""

    def __init__(self, out_factors: list[int], in_factors: list[int], rank: int):
        super().__init__()
        d = len(out_factors)
        ranks = [1] + [rank] * (d - 1) + [1]
        self.shape = (math.prod(out_factors), math.prod(in_factors))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(ranks[k], out_factors[k], in_factors[k], ranks[k + 1]))
            for k in range(d)
        )

    @torch.no_grad()
    def init(self, variance: float, zero: int | None, seed_parts: tuple) -> None:
        """Gaussian cores whose product has ``variance`` per entry; core ``zero`` set to 0."""
        inner = math.prod(c.shape[-1] for c in list(self.cores)[:-1])
        std = (variance / inner) ** (1 / (2 * len(self.cores)))
        for k, core in enumerate(self.cores):
            g = torch.randn(core.shape, generator=cpu_generator(*seed_parts, k)) * std
            core.copy_(torch.zeros_like(g) if k == zero else g)

    def full(self) -> torch.Tensor:
        return contract(list(self.cores), self.shape)


def contract(cores: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The (out x in) matrix of TT ``cores``."""
    t = cores[0]
    for core in cores[1:]:
        a, o, i, _ = t.shape
        _, p, j, _ = core.shape
        t = torch.einsum("aoir,rpjs->aopijs", t, core).reshape(a, o * p, i * j, -1)
    return t.reshape(shape)


class TTAdapter(nn.Module):
    """``y + U act(D y)`` with D (m x h) and U (h x m) as TT matrices."""

    def __init__(self, hidden: int, cfg: Config):
        super().__init__()
        h, m = tt_factors(hidden, cfg.cores), tt_factors(cfg.bottleneck, cfg.cores)
        self.down = TTMatrix(m, h, cfg.tt_rank)
        self.up = TTMatrix(h, m, cfg.tt_rank)
        self.activation = cfg.activation

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        z = ACTIVATIONS[self.activation](F.linear(y, self.down.full().to(y.dtype)))
        return y + F.linear(z, self.up.full().to(y.dtype))


def _adapter_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # Looks the adapter up at call time, so a deepcopy of the model uses its own copy.
    return getattr(module, ATTR)(output)


def adapters(model: nn.Module) -> dict[str, TTAdapter]:
    """Host module name -> its adapter, in model order."""
    found = ((n, getattr(m, ATTR, None)) for n, m in model.named_modules())
    return {n: a for n, a in found if isinstance(a, TTAdapter)}


def _out_features(module: nn.Module) -> int:
    return out_in(module)[0]


class FedTT(DeltaMethod):
    name = "fedtt"
    Config = Config
    cfg: Config
    dp_sgd_unsupported = (
        "the TT cores are contracted inside TTAdapter.forward (TTMatrix.full), so the modules that hold them never "
        "run and no Opacus hook sees a per-example gradient; it would need the contraction's vector-Jacobian "
        "product vmapped over examples (not built)")

    def frozen_cores(self) -> set[int]:
        """Core indices frozen from the start (never trained, never sent)."""
        return set()

    def round_seeds(self, round_id: int) -> list[int]:
        """The round's plan: the core indices it trains."""
        return sorted(set(range(self.cfg.cores)) - self.frozen_cores())

    def zero_core(self) -> int:
        """U's zero-initialised core: the middle one, else the first trainable one."""
        frozen, middle = self.frozen_cores(), self.cfg.cores // 2
        return middle if middle not in frozen else min(set(range(self.cfg.cores)) - frozen)

    def hosts(self, model: nn.Module) -> dict[str, nn.Module]:
        found = {
            n: m for n, m in model.named_modules()
            if hasattr(m, "weight") and any(re.search(p, n) for p in self.cfg.adapter_modules)
        }
        if not found:
            raise ValueError(f"no module matches adapter_modules={self.cfg.adapter_modules}")
        return found

    def prepare(self, model: nn.Module) -> None:
        if not adapters(model):
            self.inject(model)
        super().prepare(model)

    def inject(self, model: nn.Module) -> None:
        for name, host in self.hosts(model).items():
            hidden = _out_features(host)
            adapter = TTAdapter(hidden, self.cfg)
            seed = ("tt", self.run_seed, name)
            adapter.down.init(1 / hidden, None, (*seed, "down"))
            adapter.up.init(1 / self.cfg.bottleneck, self.zero_core(), (*seed, "up"))
            host.add_module(ATTR, adapter.to(host.weight.device))
            host.register_forward_hook(_adapter_hook)

    def all_cores(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {
            f"{host}.{ATTR}.{n}": p
            for host, adapter in adapters(model).items()
            for n, p in adapter.named_parameters()
        }

    def trainable(self, model: nn.Module, seeds: list[int] | None = None) -> dict[str, nn.Parameter]:
        """The cores of the round's indices (``seeds``), or of every index not frozen from the start."""
        keep = set(range(self.cfg.cores)) - self.frozen_cores() if seeds is None else set(seeds)
        return {n: p for n, p in self.all_cores(model).items() if core_index(n) in keep}

    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trained tensors plus the frozen cores (proves every party drew them alike)."""
        state = super().state_parameters(model)
        state.update(self.all_cores(model))
        return state

    def update_norm(self, model: nn.Module, seeds: list[int], tensors: dict[str, torch.Tensor]) -> float:
        """The change of each adapter's matrices D and U (contracted from the cores with and
        without the core deltas), plus the dense deltas: the weights the adapters compute with."""
        total = 0.0
        for host, adapter in adapters(model).items():
            for part, matrix in (("down", adapter.down), ("up", adapter.up)):
                cores = [c.detach().double() for c in matrix.cores]
                moved = [c + tensors[key].double() if (key := f"delta.{host}.{ATTR}.{part}.cores.{k}") in tensors
                         else c for k, c in enumerate(cores)]
                if any(m is not c for m, c in zip(moved, cores)):
                    total += float((contract(moved, matrix.shape) - contract(cores, matrix.shape)).square().sum())
        dense = l2_norm(t for n, t in tensors.items() if n.startswith("dense."))
        return math.sqrt(total + dense * dense)

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0,
                             seeds: list[int] | None = None) -> int:
        """uplink = (sum over adapters, over D and U, over the round's trained core indices k
        (``seeds``; default round 0's) of r_{k-1} o_k i_k r_k  +  dense) * b."""
        d, r = self.cfg.cores, self.cfg.tt_rank
        trained = self.round_seeds(0) if seeds is None else seeds
        ranks = [1] + [r] * (d - 1) + [1]
        m = tt_factors(self.cfg.bottleneck, d)
        numel = 0
        for host in self.hosts(model).values():
            h = tt_factors(_out_features(host), d)
            for k in trained:
                numel += 2 * ranks[k] * h[k] * m[k] * ranks[k + 1]  # D and U: same core sizes
        numel += sum(p.numel() for p in self.dense(model).values())
        return self.wire_bytes(numel)

    def export(self, model: nn.Module) -> nn.Module:
        """A copy without adapters or their hooks: the base architecture, base keys only."""
        plain = copy.deepcopy(model)
        for host in self.hosts(plain).values():
            delattr(host, ATTR)
            for key, hook in list(host._forward_hooks.items()):
                if hook is _adapter_hook:
                    del host._forward_hooks[key]
        return plain

    def export_extra(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.all_cores(model).items()}


def core_index(name: str) -> int:
    """k of a core parameter named ``...cores.<k>``."""
    return int(name.rsplit(".", 1)[1])


class FedTTPlus(FedTT):
    """FedTT with part of the tensor factors frozen, to cut what trains and travels and to resist
    client heterogeneity. The paper says it does so *adaptively* (cross-silo, all clients every
    round); its abstract is all of it we could read here, so the rule below is ours, adaptive in its
    spirit and documented as a choice (``freeze_rule``):

    * ``adaptive`` (default): every core index starts trainable. After each round every party
      measures, per core index k still trained, the relative change the aggregated round made to the
      cores of index k over every adapter and both matrices, ||mean delta G_k|| / ||G_k||. The index
      with the smallest relative change is frozen from the next round on when that change is below
      ``freeze_ratio`` times the largest one, one index per round, until ``max_frozen`` indices are
      frozen (default: all but one). Slow-moving factors stop being trained and sent; the fast ones
      keep adapting. The decision is the server's (it applies the same bytes as every client),
      travels as the round's seeds (the trainable core indices), and is saved with each round
      (``plan_state``) so a restart keeps it.
    * ``fixed``: ``freeze`` lists core indices (negative counts from the end) frozen from the start
      in *both* matrices of every adapter; [0, -1] trains only the middle core of each matrix.

    Measured upload on MiniLM-L6 (SST-2 bench, fp32; the dense head and pooler, 148,997 values,
    travel with every method): FedTT 721 KiB per client per round, FedTT+ fixed [0, -1] 695 KiB
    (0.96x; its cores alone are about 70% of FedTT's by parameter count). U's zero-initialised core
    is the middle one, or the first trainable one if the middle is frozen from the start, so a core
    frozen at its init is never the zero one."""

    name = "fedtt+"
    Config = PlusConfig
    cfg: PlusConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained = super().round_seeds(0)  # adaptive: the indices the next round trains

    def frozen_cores(self) -> set[int]:
        if self.cfg.freeze_rule == "fixed":
            return {i % self.cfg.cores for i in self.cfg.freeze}
        return set()

    def round_seeds(self, round_id: int) -> list[int]:
        return list(self.trained) if self.cfg.freeze_rule == "adaptive" else super().round_seeds(round_id)

    def plan_state(self) -> dict:
        return {"trained": list(self.trained)}

    def load_plan_state(self, state: dict) -> None:
        if "trained" in state:
            self.trained = sorted(int(k) for k in state["trained"])

    @torch.no_grad()
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        super().apply(model, seeds, delta)
        if self.cfg.freeze_rule == "adaptive":
            self.trained = self.next_trained(model, seeds, delta)

    def next_trained(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> list[int]:
        """The adaptive rule (module docstring): maybe freeze the slowest of ``seeds``."""
        limit = self.cfg.cores - 1 if self.cfg.max_frozen is None else self.cfg.max_frozen
        if len(seeds) <= self.cfg.cores - limit or len(seeds) < 2:
            return sorted(seeds)
        moved = dict.fromkeys(seeds, 0.0)
        size = dict.fromkeys(seeds, 0.0)
        for name, p in self.all_cores(model).items():
            k = core_index(name)
            if k in moved and f"delta.{name}" in delta:
                moved[k] += float(delta[f"delta.{name}"].double().square().sum())
                size[k] += float(p.double().square().sum())
        relative = {k: math.sqrt(moved[k] / size[k]) if size[k] > 0 else math.inf for k in seeds}
        slowest = min(seeds, key=lambda k: (relative[k], k))
        freeze = relative[slowest] < self.cfg.freeze_ratio * max(relative.values())
        log.info("fedtt_plus_core_change", relative={k: round(v, 6) for k, v in relative.items()},
                 slowest=slowest, share_of_fastest=round(relative[slowest] / max(max(relative.values()), 1e-30), 6),
                 freeze_ratio=self.cfg.freeze_ratio, frozen=slowest if freeze else None)
        if freeze:
            return sorted(set(seeds) - {slowest})
        return sorted(seeds)


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Put the FedTT / FedTT+ adapters saved in ``folder/adapters.safetensors`` (by the server
    in ``<run>/final``, or by ``fedkrso-export``) on ``model``, the plain transformers model
    loaded from the same folder, and return it: the adapters are injected where the run had
    them (their config is in the file's metadata) and every core is loaded; a file that does
    not match the model's modules exactly raises ``ValueError``. Call it once per model."""
    from safetensors import safe_open

    path = Path(folder) / EXTRAS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {EXTRAS_FILE} in {folder}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != EXTRAS_FORMAT or meta.get("method") not in (FedTT.name, FedTTPlus.name):
        raise ValueError(f"{path} holds no FedTT adapters (format {meta.get('format')!r}, "
                         f"method {meta.get('method')!r})")
    if adapters(model):
        raise ValueError("the model already has TT adapters")
    method_cls = FedTTPlus if meta["method"] == FedTTPlus.name else FedTT
    method = method_cls(method_cls.Config.model_validate(json.loads(meta["config"])), run_seed=0)
    method.inject(model)  # seeded init, overwritten below
    cores = method.all_cores(model)
    if set(cores) != set(tensors):
        missing, unexpected = sorted(set(cores) - set(tensors)), sorted(set(tensors) - set(cores))
        raise ValueError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, core in cores.items():
            if core.shape != tensors[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(core.shape)}")
            core.copy_(tensors[name])
    return model
