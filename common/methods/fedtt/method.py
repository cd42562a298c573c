"""The federated side of FedTT: ``FedTT`` and ``FedTTPlus`` inject the adapters of ``layer``
after their host modules, say which cores a round trains and sends, measure and apply uploads,
and export the plain model plus the cores; ``load_adapters`` puts exported cores back on a
plain model. The method itself is described in the package's docstring."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import structlog
import torch
from torch import nn

from ...tensors import l2_norm
from ..base import EXTRAS_FILE, EXTRAS_FORMAT, out_in
from ..delta import DeltaMethod
from .config import Config, PlusConfig
from .layer import ATTR, TTAdapter, adapter_hook, contract, tt_factors

log = structlog.get_logger("fedkrso.methods")


def adapters(model: nn.Module) -> dict[str, TTAdapter]:
    """Host module name -> its adapter, in model order."""
    found = ((n, getattr(m, ATTR, None)) for n, m in model.named_modules())
    return {n: a for n, a in found if isinstance(a, TTAdapter)}


def core_index(name: str) -> int:
    """k of a core parameter named ``...cores.<k>``."""
    return int(name.rsplit(".", 1)[1])


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
        """The modules an adapter follows (``adapter_modules``); ``ValueError`` when none matches."""
        found = {
            n: m for n, m in model.named_modules()
            if hasattr(m, "weight") and any(re.search(p, n) for p in self.cfg.adapter_modules)
        }
        if not found:
            raise ValueError(f"no module matches adapter_modules={self.cfg.adapter_modules}")
        return found

    def prepare(self, model: nn.Module) -> None:
        """Inject the adapters (once; a model that has them keeps them), then mark what trains."""
        if not adapters(model):
            self.inject(model)
        super().prepare(model)

    def inject(self, model: nn.Module) -> None:
        """Put a ``TTAdapter`` after every host module, its cores drawn from the run seed and U's zero
        core zero (the adapter starts as the identity)."""
        for name, host in self.hosts(model).items():
            hidden = _out_features(host)
            adapter = TTAdapter(hidden, self.cfg)
            seed = ("tt", self.run_seed, name)
            adapter.down.init(1 / hidden, None, (*seed, "down"))
            adapter.up.init(1 / self.cfg.bottleneck, self.zero_core(), (*seed, "up"))
            host.add_module(ATTR, adapter.to(host.weight.device))
            host.register_forward_hook(adapter_hook)

    def all_cores(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Every core of every adapter, trained this round or not, by parameter name."""
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
                if hook is adapter_hook:
                    del host._forward_hooks[key]
        return plain

    def export_extra(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The cores, saved beside the exported plain model (``export_artifacts``)."""
        return {n: p.detach().cpu().contiguous() for n, p in self.all_cores(model).items()}

    def export_artifacts(self, model: nn.Module, folder: Path, model_dir: str) -> dict[str, str]:
        """The cores ``save_extras`` wrote beside the plain model, and the call that puts them
        on it (``load_adapters`` under the package's public name)."""
        return {"adapters": f"{model_dir}/{EXTRAS_FILE}",
                "adapters_loader": f"{__package__}.{load_adapters.__name__}(model, DIR/{model_dir})"}


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
        """Under ``fixed``, the configured ``freeze`` indices; under ``adaptive`` none from the start."""
        if self.cfg.freeze_rule == "fixed":
            return {i % self.cfg.cores for i in self.cfg.freeze}
        return set()

    def round_seeds(self, round_id: int) -> list[int]:
        """The core indices the round trains: those still trained (adaptive), or all but the frozen
        ones (fixed)."""
        return list(self.trained) if self.cfg.freeze_rule == "adaptive" else super().round_seeds(round_id)

    def plan_state(self) -> dict:
        """The adaptive rule's state, saved with the run (the indices still trained)."""
        return {"trained": list(self.trained)}

    def load_plan_state(self, state: dict) -> None:
        """Restore what ``plan_state`` saved."""
        if "trained" in state:
            self.trained = sorted(int(k) for k in state["trained"])

    @torch.no_grad()
    def apply(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> None:
        """Apply the round's mean, then (adaptive) decide which core indices the next round trains."""
        super().apply(model, seeds, delta)
        if self.cfg.freeze_rule == "adaptive":
            self.trained = self.next_trained(model, seeds, delta)

    def next_trained(self, model: nn.Module, seeds: list[int], delta: dict[str, torch.Tensor]) -> list[int]:
        """The adaptive rule (the class docstring): maybe freeze the slowest of ``seeds``."""
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
