"""Evaluation of a model on a tokenised split: loss plus the task's metrics
(``common/metrics.py``: accuracy, F1, Matthews correlation for classification; Pearson and
Spearman for regression), or perplexity for a causal LM.

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import classification_metrics, regression_metrics
from .models import Task
from .precision import placement_of

if TYPE_CHECKING:
    from .data import Tokens


def _loss(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> tuple[float, int]:
    """(summed loss, loss terms) of one batch."""
    logits = logits.float()
    if task == "causal-lm":
        # Token t predicts token t+1; padding (and any prompt) was set to -100 and is ignored.
        target = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                               ignore_index=-100, reduction="sum")
        return loss.item(), int((target != -100).sum())
    if labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum").item(), len(labels)
    return F.cross_entropy(logits, labels, reduction="sum").item(), len(labels)


def evaluate(
    model: nn.Module,
    tokens: Tokens,
    batch_size: int,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on the first ``max_examples`` rows of ``tokens``, in order.

    Returns ``eval_loss`` (mean per example, or per token for a causal LM) and
    ``eval_examples``; for classification ``eval_accuracy``, ``eval_mcc`` and, with two
    classes, ``eval_f1``; for regression (loss: mean squared error) ``eval_pearson`` and
    ``eval_spearman``; for a causal LM ``eval_perplexity`` (exp of the token loss) and
    ``eval_tokens``. The model's train/eval mode is restored afterwards."""
    task = tokens.task
    n = len(tokens) if max_examples is None else min(max_examples, len(tokens))
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    placement = placement_of(model)
    device = placement.device
    was_training = model.training
    model.eval()
    total, terms = 0.0, 0
    predictions: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                batch = tokens.batch(list(range(start, min(start + batch_size, n))))
                labels = batch.pop("labels").to(device)
                with placement.autocast():
                    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                loss, count = _loss(logits, labels, task)
                total, terms = total + loss, terms + count
                if task != "causal-lm":
                    regression = labels.is_floating_point()
                    pred = logits.float().squeeze(-1) if regression else logits.argmax(-1)
                    predictions.append(pred.cpu().numpy())
                    targets.append(labels.cpu().numpy())
    finally:
        model.train(was_training)
    mean = total / max(terms, 1)
    metrics: dict[str, float] = {"eval_loss": mean, "eval_examples": n}
    if task == "causal-lm":
        metrics["eval_perplexity"] = math.exp(mean) if mean < 709 else math.inf  # exp overflows
        metrics["eval_tokens"] = terms
        return metrics
    pred, gold = np.concatenate(predictions), np.concatenate(targets)
    if np.issubdtype(gold.dtype, np.floating):
        scores = regression_metrics(pred, gold)
    else:
        scores = classification_metrics(pred, gold, num_labels=logits.shape[-1])
    metrics.update({f"eval_{k}": v for k, v in scores.items()})
    return metrics


# -- what a client reports -------------------------------------------------------------------
# A client sends ``evaluate``'s figures under their names without ``eval_``, those of
# ``client_metric_names`` only: the example count travels as its own field and perplexity is
# left to the server, which derives it from the combined loss (a mean of perplexities is not
# the perplexity of the mean loss). F1, MCC and the correlations are not reported: unlike loss
# and accuracy, their example-weighted mean over clients is not the metric of the union.


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
