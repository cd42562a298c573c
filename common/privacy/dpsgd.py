"""Sample-level DP inside a client: DP-SGD (Abadi et al. 2016) on every local step
(``privacy.dp_sgd``, docs/PRIVACY.md section 1b).

One step, for a client with n rows, expected batch b = min(training.batch_size, n):

1. the batch is a Poisson sample: each row joins independently with probability q = b / n
   (``poisson_batches``; an empty draw is a step of noise alone);
2. every example's gradient of everything the step trains (the method's own parameters and
   the dense-trainables, jointly) is clipped to L2 norm C; Opacus's grad samplers give the
   per-example gradients of module parameters (``GradSampleModule`` hooks, attached for the
   round), FedKRSO's fused layer gives its B's (``fedkrso.layer._SubspaceLinear``);
3. the sum gets Gaussian noise of std sigma * C on every coordinate, from a generator keyed
   by the client's secret, and is divided by b; the optimizer steps on that.

The model's loss must be a mean of per-example losses, so that example i's gradient is b
times its share (Opacus's ``loss_reduction="mean"``): true of classification and regression.
For a causal LM the model's loss averages tokens over the whole batch, which would make one
example's gradient depend on the others' lengths; ``forward_loss`` computes the per-example
mean instead while DP-SGD is on (``per_example_loss``).

Accounting (``accountant.sample_epsilon``): each step is ``PoissonSampledDpEvent(q,
Gaussian(sigma))`` under add-or-remove-one-example adjacency, composed over every step the
client ran; the server reports the largest over its clients (``server/privacy.py``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .config import DPSGDSection


def poisson_batches(tokens, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless Poisson-sampled batches of ``tokens``: each row joins each batch independently
    with q = min(batch_size, n) / n. An empty draw yields one row marked ``dp_empty`` (its
    gradient is multiplied by 0: the step releases noise alone, as an empty batch would)."""
    n = len(tokens)
    if n == 0:
        raise ValueError("cannot draw batches from an empty dataset")
    q = min(batch_size, n) / n
    while True:
        picked = np.flatnonzero(rng.random(n) < q)
        if len(picked):
            yield tokens.batch(picked.tolist())
        else:
            batch = tokens.batch([0])
            batch["dp_empty"] = torch.ones(1)
            yield batch


class SampleDP:
    """DP-SGD for one client round: Opacus hooks on ``model`` while open, and ``privatize``,
    which ``Optimization.step`` calls on the parameters of every optimizer it steps."""

    def __init__(self, cfg: DPSGDSection, model: nn.Module, expected_batch: int, rng: np.random.Generator):
        self.cfg = cfg
        self.model = model
        self.expected_batch = expected_batch
        self.rng = rng
        self.empty = False  # the current step's batch was an empty draw
        self._hooks = None
        self._quiet = None
        self.steps = 0

    def __enter__(self) -> SampleDP:
        from opacus import GradSampleModule  # ~1 s to import: only where DP-SGD is on

        # hooks on every module holding a trainable parameter; FedKRSO's B lives outside any
        # module and gets its per-example gradients from its own layer
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        # the first hooked module's input is token ids, which need no gradient: expected, not news
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self._hooks = GradSampleModule(self.model, batch_first=True, loss_reduction="mean", strict=True)
        self.model.fedkrso_per_example_loss = True  # forward_loss: a causal LM's loss per example
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks._close()  # removes the hooks and every grad_sample
            self._hooks = None
        self.model.__dict__.pop("fedkrso_per_example_loss", None)
        if self._quiet is not None:
            self._quiet.__exit__(*exc)
            self._quiet = None

    def batches(self, stream: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """``stream`` (from ``poisson_batches``) as a method draws it, one batch per step,
        noting whether the step's batch stands for an empty draw."""
        for batch in stream:
            self.empty = batch.pop("dp_empty", None) is not None
            yield batch

    @torch.no_grad()
    def privatize(self, params: list[nn.Parameter]) -> None:
        """Replace each parameter's ``grad`` by the DP-SGD gradient from its ``grad_sample``."""
        params = [p for p in params if p.requires_grad]
        missing = [tuple(p.shape) for p in params if getattr(p, "grad_sample", None) is None and p.grad is not None]
        if missing:
            raise RuntimeError(f"DP-SGD: no per-example gradient for trainable parameters of shapes {missing[:3]}; "
                               "their module has no Opacus grad sampler")
        if any(isinstance(getattr(p, "grad_sample", None), list) for p in params):
            raise RuntimeError("DP-SGD: more than one backward pass before a step (one batch, one backward)")
        samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
        if samples:
            norms_sq = torch.zeros(samples[0].shape[0], dtype=torch.float32, device=samples[0].device)
            for g in samples:
                norms_sq += g.reshape(g.shape[0], -1).float().pow(2).sum(1)
            factor = (self.cfg.clip / (norms_sq.sqrt() + 1e-6)).clamp(max=1.0)
            if self.empty:
                factor.zero_()
        std = self.cfg.noise_multiplier * self.cfg.clip
        for p in params:
            gs = getattr(p, "grad_sample", None)
            total = (torch.einsum("i,i...->...", factor.to(gs.device), gs.float()) if gs is not None
                     else torch.zeros(p.shape, dtype=torch.float32, device=p.device))
            noise = torch.from_numpy(self.rng.standard_normal(p.numel(), dtype=np.float32)).view(p.shape)
            total = (total + std * noise.to(total.device)) / self.expected_batch
            p.grad = total.to(p.dtype)
            p.grad_sample = None
        self.steps += 1


def expected_batch(batch_size: int, rows: int) -> int:
    """The expected Poisson batch of a shard of ``rows``: ``batch_size``, at most the shard, at least 1."""
    return max(1, min(batch_size, rows))


def sampling_rate(batch_size: int, rows: int) -> float:
    """Poisson sampling rate q of one DP-SGD step: the expected batch over the shard's rows."""
    return expected_batch(batch_size, rows) / max(rows, 1)


def per_example_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with ``position_ids`` given per example (B x L) where the model takes them:
    left to itself a model looks positions up with a batch dimension of 1, which Opacus's
    embedding grad sampler would read as one example (learned position embeddings, trained
    by full fine-tuning). The values are the model's own default, 0..L-1."""
    if "position_ids" in batch or "position_ids" not in inspect.signature(model.forward).parameters:
        return batch
    b, length = batch["input_ids"].shape
    pos = torch.arange(length, device=batch["input_ids"].device).expand(b, length)
    return {**batch, "position_ids": pos}


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> torch.Tensor:
    """A causal LM's loss as the batch mean of each example's own token mean (next-token,
    positions labelled ``ignore`` left out); an example with no labelled token adds 0."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=ignore, reduction="none").view(labels.shape)
    counts = (labels != ignore).sum(1).clamp(min=1)
    return (tok.sum(1) / counts).mean()

