"""Evaluation of a model on a tokenised split: loss and accuracy, or perplexity for a causal LM.

The loss is recomputed here with ``reduction="sum"`` instead of read from ``model(...).loss``
(a per-batch mean), so the reported mean is exact however the rows fall into batches: per
example for classification and regression, per predicted token for a causal LM (the response
tokens alone for instruction rows, whose prompt labels are -100).

The server evaluates its eval split with it; a client evaluates its held-out rows with it and
reports ``client_metrics`` (the same figures under their wire names) in its update.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .models import Task

if TYPE_CHECKING:
    from .data import Tokens


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
    tokens: Tokens,
    batch_size: int,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on the first ``max_examples`` rows of ``tokens``, in order.

    Returns ``eval_loss`` (mean per example, or per token for a causal LM), ``eval_examples``,
    and ``eval_accuracy`` for classification or ``eval_perplexity`` (exp of the token loss)
    plus ``eval_tokens`` for a causal LM. Regression reports the mean squared error as loss.
    The model's train/eval mode is restored afterwards."""
    task = tokens.task
    n = len(tokens) if max_examples is None else min(max_examples, len(tokens))
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, terms, correct, regression = 0.0, 0, 0, False
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                batch = tokens.batch(list(range(start, min(start + batch_size, n))))
                labels = batch.pop("labels").to(device)
                regression = labels.is_floating_point()
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


# -- what a client reports -------------------------------------------------------------------
# A client sends ``evaluate``'s figures under their names without ``eval_``, those of
# ``client_metric_names`` only: the example count travels as its own field and perplexity is
# left to the server, which derives it from the combined loss (a mean of perplexities is not
# the perplexity of the mean loss).


def client_metric_names(task: Task, num_labels: int) -> frozenset[str]:
    """What a client reports for a task, and all a server accepts from one: ``loss`` and
    ``tokens`` for a causal LM, ``loss`` for regression (one label), ``loss`` and ``accuracy``
    for classification."""
    if task == "causal-lm":
        return frozenset({"loss", "tokens"})
    return frozenset({"loss"}) if num_labels == 1 else frozenset({"loss", "accuracy"})


def client_metrics(metrics: dict[str, float], task: Task, num_labels: int) -> dict[str, float]:
    """``evaluate``'s figures as a client reports them (see above)."""
    names = client_metric_names(task, num_labels)
    return {k.removeprefix("eval_"): float(v) for k, v in metrics.items() if k.removeprefix("eval_") in names}
