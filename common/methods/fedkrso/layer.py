"""The layer math of FedKRSO: the fused autograd function ``_SubspaceLinear`` (``y = x W^T +
bias + (x P^T) B^T`` with no full-size gradient), the per-example gradient of B it records under
DP-SGD, and ``SubspaceAdapter``, which draws P, holds B and routes each target module's forward
through the function while B is active. Nothing here knows a round (``method`` does)."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ...subspace import subspace
from ..base import is_conv1d, out_in


class _SubspaceLinear(torch.autograd.Function):
    """``y = x W^T + bias + (x P^T) B^T`` on 2-D ``x`` (N x d_n), W frozen.

    Saves W, P, B (references, no copies) and ``xp = x P^T`` (N x r), never ``x``: backward
    needs x only through xp, since ``grad_B = g^T xp`` and ``grad_x = g W + (g B) P``.
    ``w_in_out`` marks GPT-2's Conv1D, whose weight is stored transposed (d_n x d_m). x, W,
    bias and P share one dtype, the compute dtype (the caller casts x); B is the float32 master:
    it is cast to that dtype for the products and its gradient comes back in float32.
    Autocast is off inside: the dtypes are this function's own. W and P receive no gradient
    (the adapter falls back to the unfused path when W requires one)."""

    @staticmethod
    def forward(ctx, x, weight, bias, p, b, w_in_out: bool, examples: int = 0):
        with torch.autocast(x.device.type, enabled=False):
            bc = b.to(x.dtype)
            xp = torch.mm(x, p.T)  # (N, r): all that grad_B needs
            wt = weight if w_in_out else weight.T  # (d_n, d_m) view
            y = torch.mm(x, wt) if bias is None else torch.addmm(bias, x, wt)
            y.addmm_(xp, bc.T)
        ctx.w_in_out = w_in_out
        ctx.examples = examples
        ctx.b_param = b if examples else None
        ctx.save_for_backward(weight, p, b, xp)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, p, b, xp = ctx.saved_tensors
        need_x, _, need_bias, _, need_b, _, _ = ctx.needs_input_grad
        g = g.contiguous()
        gx = gbias = gb = None
        if need_x:
            bc = b.to(g.dtype)
            gx = torch.mm(g, weight.T if ctx.w_in_out else weight)  # (N, d_n)
            gx.addmm_(torch.mm(g, bc), p)
        if need_bias:
            gbias = g.sum(0)
        if need_b:
            gb = torch.mm(g.T, xp).to(b.dtype)  # (d_m, r)
            if ctx.examples:
                _per_example_grad_b(ctx.b_param, g, xp, ctx.examples)
        return gx, None, gbias, None, gb, None, None


def _per_example_grad_b(b: torch.Tensor, g: torch.Tensor, xp: torch.Tensor, examples: int) -> None:
    """DP-SGD (``privacy.dpsgd``): example i's grad_B, ``g_i^T xp_i`` summed over its positions,
    times ``examples`` (the loss is the batch mean, Opacus's ``loss_reduction="mean"``
    convention), stored as ``b.grad_sample`` (examples x d_m x r, float32), added to what an
    earlier use of B in the same step left there."""
    d_m, r = g.shape[-1], xp.shape[-1]
    sample = torch.einsum("bsm,bsr->bmr", g.float().view(examples, -1, d_m), xp.float().view(examples, -1, r))
    sample.mul_(examples)
    prior = getattr(b, "grad_sample", None)
    b.grad_sample = sample if prior is None else prior + sample


class SubspaceAdapter:
    """Trainable B (d_m x r) in a fixed subspace P for each target module.

    While the adapter is open, each target's ``forward`` is an instance attribute that runs
    ``_SubspaceLinear`` when that target has an active B and the module's own forward
    otherwise; no parameter or buffer is added, so ``state_dict`` keys do not change.
    ``start(seed)`` draws P for every target and zeroes B; ``merge()`` folds ``B P`` into the
    frozen weight in place and returns the B's; ``close()`` restores the original forwards."""

    def __init__(self, targets: dict[str, nn.Module], rank: int, per_example: bool = False):
        self.targets = targets
        self.rank = rank
        self.per_example = per_example  # DP-SGD: each B gets a grad_sample (batch-first inputs)
        self.p: dict[str, torch.Tensor] = {}
        self.b: dict[str, nn.Parameter] = {}
        # name -> (module, its own instance-level forward if it had one, our bound wrapper)
        self._installed: dict[str, tuple[nn.Module, object, object]] = {}
        for name, module in targets.items():
            own = module.__dict__.get("forward")
            wrapper = types.MethodType(self._forward(name, own), module)
            module.forward = wrapper
            self._installed[name] = (module, own, wrapper)

    def _forward(self, name: str, own):
        def forward(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            b = self.b.get(name)
            if b is None:  # no active B: the module's own forward, unchanged
                return own(x, *args, **kwargs) if own is not None else (
                    type(module).forward(module, x, *args, **kwargs))
            w = module.weight
            if w.requires_grad or args or kwargs:
                # (under DP-SGD also Opacus's functorch re-run of a Conv1D for its bias's
                # per-example gradient; B's come from the fused call of the real forward)
                # grad_W would need the full x (or an unexpected call): stay unfused.
                out = own(x, *args, **kwargs) if own is not None else (
                    type(module).forward(module, x, *args, **kwargs))
                return out + F.linear(F.linear(x, self.p[name].to(x.dtype)), b.to(x.dtype))
            # compute in the weight's dtype: under autocast x may arrive in float32 (after a
            # float32 norm); the cast is an autograd op, so grad_x returns in x's dtype
            y = _SubspaceLinear.apply(x.reshape(-1, x.shape[-1]).to(w.dtype), w, module.bias,
                                      self.p[name], b, is_conv1d(module), x.shape[0] if self.per_example else 0)
            return y.view(*x.shape[:-1], y.shape[-1])

        return forward

    def start(self, seed: int) -> list[nn.Parameter]:
        """Begin an interval on subspace ``seed``: every target gets its P drawn from the seed and a
        fresh zero B; returns the Bs to optimize."""
        for name, module in self.targets.items():
            d_m, d_n = out_in(module)
            w = module.weight
            self.p[name] = subspace(seed, name, self.rank, d_n, device=w.device, dtype=w.dtype)
            self.b[name] = nn.Parameter(torch.zeros(d_m, self.rank, device=w.device))
        return list(self.b.values())

    @torch.no_grad()
    def merge(self) -> dict[str, torch.Tensor]:
        """W += B P for every target; returns the B's (float32) and deactivates them."""
        out = {}
        for name, module in self.targets.items():
            b = self.b.pop(name).detach()
            delta = b.to(self.p[name].dtype) @ self.p.pop(name)
            module.weight.add_(delta.T if is_conv1d(module) else delta)
            out[name] = b.float()
        return out

    def close(self) -> None:
        """Give every target its own forward back."""
        for module, own, wrapper in self._installed.values():
            if module.__dict__.get("forward") is wrapper:
                if own is None:
                    del module.forward
                else:
                    module.forward = own
        self._installed.clear()
