"""Evaluation of a model on a saved split: loss and accuracy, or perplexity for a causal LM.

The loss is recomputed here with ``reduction="sum"`` instead of read from ``model(...).loss``
(a per-batch mean), so the reported mean is exact however the rows fall into batches: per
example for classification and regression, per predicted token for a causal LM.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from .data import encode
from .models import Task
from .precision import placement_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _sums(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> tuple[float, int, int]:
    """(summed loss, loss terms, correct predictions) of one batch."""
    logits = logits.float()
    if task == "causal-lm":
        # Token t predicts token t+1; padding was set to -100 and is ignored.
        target = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                               ignore_index=-100, reduction="sum")
        return loss.item(), int((target != -100).sum()), 0
    if labels.is_floating_point():
        loss = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        return loss.item(), len(labels), 0
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return loss.item(), len(labels), int((logits.argmax(-1) == labels).sum())


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    max_length: int,
    batch_size: int,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on the first ``max_examples`` rows of ``dataset``, in order.

    Returns ``eval_loss`` (mean per example, or per token for a causal LM), ``eval_examples``,
    and ``eval_accuracy`` for classification or ``eval_perplexity`` (exp of the token loss)
    plus ``eval_tokens`` for a causal LM. Regression reports the mean squared error as loss.
    The model's train/eval mode is restored afterwards."""
    n = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    placement = placement_of(model)
    device = placement.device
    was_training = model.training
    model.eval()
    total, terms, correct, regression = 0.0, 0, 0, False
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                batch = encode(dataset[start : min(start + batch_size, n)], tokenizer, task,
                               max_length)
                labels = batch.pop("labels").to(device)
                regression = labels.is_floating_point()
                with placement.autocast():
                    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                loss, count, right = _sums(logits, labels, task)
                total, terms, correct = total + loss, terms + count, correct + right
    finally:
        model.train(was_training)
    mean = total / max(terms, 1)
    metrics: dict[str, float] = {"eval_loss": mean, "eval_examples": n}
    if task == "causal-lm":
        metrics["eval_perplexity"] = math.exp(mean) if mean < 709 else math.inf  # exp overflows
        metrics["eval_tokens"] = terms
    elif not regression:
        metrics["eval_accuracy"] = correct / n
    return metrics
