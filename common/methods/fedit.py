"""FedIT: LoRA plus FedAvg (docs/algorithm.md section 7).

Every target matrix W (the Linears FedKRSO projects) gets a PEFT LoRA adapter
``W x + (alpha / r) B A x`` of rank ``r`` with dropout 0. Clients train A, B and the
dense-trainables with Adam and upload their changes; the server averages A and B *separately*
(the known aggregation discordance: mean(B) mean(A) != mean(B A)).

Determinism: PEFT draws A from the global RNG, so injection runs inside ``fork_rng`` and A is
then redrawn, per module, from a CPU generator seeded by (run seed, module name), with PEFT's
own distribution (kaiming-uniform, a=sqrt(5): U(-1/sqrt(d_n), 1/sqrt(d_n))); B starts at zero.
GPT-2's Conv1D (weight stored in x out) is handled by PEFT with ``fan_in_fan_out``.

``export`` merges W += (alpha / r) B A into a copy and swaps each LoRA layer back for its
base layer, so ``save_pretrained`` writes the base model's own keys. ``save_peft_adapter``
writes the same result as a PEFT adapter folder instead (``export_artifacts`` puts it in a
``fedkrso-export`` folder as ``peft/``): the LoRA factors, plus every module holding
dense-trainables (heads, norms) as PEFT ``modules_to_save``, so
``PeftModel.from_pretrained(base, folder)`` on the base checkpoint computes what the merged
export computes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..subspace import cpu_generator
from ..tensors import l2_norm, product_norm_sq
from .base import MethodConfig, is_conv1d, out_in, target_linears
from .delta import DeltaMethod

ADAPTER = "default"


class Config(MethodConfig):
    """FedIT's knobs: PEFT LoRA of rank ``rank`` on the targeted linears, trained with Adam."""

    name: Literal["fedit"] = "fedit"
    lr: float = Field(3e-4, gt=0, description="Adam learning rate of the LoRA factors")
    steps: int = Field(16, ge=1, le=100_000, description="local Adam steps per round")
    rank: int = Field(8, ge=1, le=4096, description="r_L: LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")

    def local_steps(self) -> int:
        """Adam steps per client round."""
        return self.steps


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s PEFT LoRA layers by module name (none before ``FedIT.inject``)."""
    from peft.tuners.lora import LoraLayer  # peft costs ~2 s to import: only when used

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class FedIT(DeltaMethod):
    name = "fedit"
    Config = Config
    cfg: Config
    train_a = True  # FFA-LoRA freezes A

    def prepare(self, model: nn.Module) -> None:
        """Inject the LoRA layers (once; a model that has them keeps them), then mark what trains."""
        if not lora_layers(model):
            self.inject(model)
        super().prepare(model)

    @torch.no_grad()
    def inject(self, model: nn.Module) -> None:
        """Put PEFT LoRA layers on every targeted linear, A drawn from the run seed so every party
        draws it alike, B zero."""
        from peft import LoraConfig, inject_adapter_in_model

        targets = target_linears(model, self.cfg.target_modules)
        if not targets:
            raise ValueError(f"no Linear module matches target_modules={self.cfg.target_modules}")
        conv1d = {is_conv1d(m) for m in targets.values()}
        if len(conv1d) > 1:
            raise ValueError("target_modules mixes nn.Linear and Conv1D; select one kind")
        config = LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=0.0,
            target_modules=list(targets),
            fan_in_fan_out=conv1d == {True},
        )
        with torch.random.fork_rng(devices=[]):
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        for name, layer in lora_layers(model).items():
            a = layer.lora_A[ADAPTER].weight  # (r, d_n)
            bound = 1.0 / math.sqrt(a.shape[1])
            init = torch.rand(a.shape, generator=cpu_generator("lora-a", self.run_seed, name))
            a.copy_((init * 2 - 1) * bound)
            layer.lora_B[ADAPTER].weight.zero_()

    def trainable(self, model: nn.Module, seeds: list[int] | None = None) -> dict[str, nn.Parameter]:
        """Every LoRA layer's B, and its A unless the method freezes A (FFA-LoRA)."""
        kinds = ("lora_A", "lora_B") if self.train_a else ("lora_B",)
        out: dict[str, nn.Parameter] = {}
        for name, layer in lora_layers(model).items():
            for kind in kinds:
                out[f"{name}.{kind}.{ADAPTER}.weight"] = getattr(layer, kind)[ADAPTER].weight
        return out

    def state_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trained tensors plus, for FFA-LoRA, the frozen A (proves every party drew it alike)."""
        state = super().state_parameters(model)
        for name, layer in lora_layers(model).items():
            state[f"{name}.lora_A.{ADAPTER}.weight"] = layer.lora_A[ADAPTER].weight
        return state

    def update_norm(self, model: nn.Module, seeds: list[int], tensors: dict[str, torch.Tensor]) -> float:
        """The change of each adapted weight, ``(alpha / r) (B' A' - B A)`` with B' = B + dB and
        A' = A + dA (A' = A for FFA-LoRA), as ``[B', -B] [A'; A]``: its norm from the 2r x 2r Gram
        matrices; plus the dense deltas."""
        total, scale = 0.0, self.cfg.alpha / self.cfg.rank
        for name, layer in lora_layers(model).items():
            a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
            da = tensors.get(f"delta.{name}.lora_A.{ADAPTER}.weight")
            db = tensors.get(f"delta.{name}.lora_B.{ADAPTER}.weight")
            if da is None and db is None:
                continue
            a2 = a.double() + (0 if da is None else da.double())
            b2 = b.double() + (0 if db is None else db.double())
            total += scale * scale * product_norm_sq(torch.cat([b2, -b.double()], dim=1), torch.cat([a2, a.double()]))
        dense = l2_norm(t for n, t in tensors.items() if n.startswith("dense."))
        return math.sqrt(max(total, 0.0) + dense * dense)

    def upload_bytes_formula(self, model: nn.Module, n_seeds_used: int = 0) -> int:
        """FedIT: (sum_m r (d_m + d_n) + dense) * b. FFA-LoRA: (sum_m r d_m + dense) * b."""
        numel = 0
        for layer in lora_layers(model).values():
            d_m, d_n = out_in(layer.get_base_layer())
            numel += self.cfg.rank * (d_m + d_n if self.train_a else d_m)
        numel += sum(p.numel() for p in self.dense(model).values())
        return self.wire_bytes(numel)

    def export(self, model: nn.Module) -> nn.Module:
        """A copy with every LoRA layer merged into its base weight and swapped back for it."""
        return self._without_lora(model, merge=True)

    @torch.no_grad()
    def _without_lora(self, model: nn.Module, merge: bool) -> nn.Module:
        """A copy whose LoRA layers are swapped back for their base layers, merged into them
        first when ``merge``; the dense-trainables keep their trained values either way."""
        plain = copy.deepcopy(model)
        for name, layer in lora_layers(plain).items():
            if merge:
                layer.merge(adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, layer.get_base_layer())
        if "peft_config" in vars(plain):
            del plain.peft_config
        return plain

    def export_artifacts(self, model: nn.Module, folder: Path, model_dir: str) -> dict[str, str]:
        """The PEFT adapter folder ``peft`` beside the merged model (``save_peft_adapter``)."""
        self.save_peft_adapter(model, folder / "peft")
        return {"peft": "peft"}

    @torch.no_grad()
    def save_peft_adapter(self, model: nn.Module, folder: Path) -> Path:
        """Write ``model``'s adapter as a PEFT LoRA adapter folder (PEFT's own
        ``save_pretrained``): the trained A and B of every target, the targets' trained biases
        as PEFT's ``lora_only`` biases, and the other modules holding dense-trainables as
        ``modules_to_save``, so the base checkpoint plus this folder
        (``PeftModel.from_pretrained(base, folder)``) is the fine-tuned model."""
        from peft import LoraConfig, get_peft_model

        layers = lora_layers(model)

        def in_target(name: str) -> bool:
            return any(name == t or name.startswith(t + ".") for t in layers)

        dense = self.dense(model)
        inside = [n for n in dense if in_target(n.rpartition(".")[0])]
        if any(not n.endswith(".bias") for n in inside):
            raise ValueError(f"LoRA targets' weights cannot also be dense-trainables in a PEFT adapter: {inside[:3]}")
        config = LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=0.0,
            target_modules=list(layers),
            fan_in_fan_out=any(is_conv1d(layer.get_base_layer()) for layer in layers.values()),
            # the targets' trained biases (train_biases) travel as PEFT's own "lora_only" biases
            bias="lora_only" if inside else "none",
            modules_to_save=sorted({n.rpartition(".")[0] for n in dense if n not in inside}) or None,
        )
        with torch.random.fork_rng(devices=[]):  # PEFT draws A from the global RNG; overwritten below
            peft_model = get_peft_model(self._without_lora(model, merge=False), config)
        inner = peft_model.base_model.model
        for name, layer in layers.items():
            target = inner.get_submodule(name)
            for kind in ("lora_A", "lora_B"):
                getattr(target, kind)[ADAPTER].weight.copy_(getattr(layer, kind)[ADAPTER].weight)
        peft_model.save_pretrained(str(folder))
        return Path(folder)
