"""GLUE's metrics (common/metrics.py) against values worked out by hand, and through evaluate()."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkrso.common.metrics import classification_metrics, primary_metric, regression_metrics


def test_binary_metrics_match_hand_counts():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
    preds = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    tp, tn, fp, fn = 3, 4, 1, 2
    m = classification_metrics(preds, labels, num_labels=2)
    assert m["accuracy"] == pytest.approx((tp + tn) / 10)
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)


def test_multiclass_has_no_f1_and_majority_class_has_zero_mcc():
    labels = np.array([0, 1, 2, 2, 1, 0])
    m = classification_metrics(labels.copy(), labels, num_labels=3)
    assert m == {"accuracy": 1.0, "mcc": pytest.approx(1.0)}
    always = classification_metrics(np.zeros(6, dtype=int), labels, num_labels=3)
    assert always["mcc"] == 0.0 and always["accuracy"] == pytest.approx(2 / 6)


def test_regression_correlations():
    x = np.arange(10, dtype=float)
    assert regression_metrics(2 * x + 1, x) == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    m = regression_metrics(np.exp(x), x)  # monotone, not linear
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 0.9
    assert regression_metrics(np.full(10, 3.0), x) == {"pearson": 0.0, "spearman": 0.0}  # undefined -> 0


@pytest.mark.parametrize("source, regression, metric", [
    ("glue:CoLA", False, "mcc"), ("glue:SST-2", False, "accuracy"), ("glue:MRPC", False, "f1"),
    ("glue:STS-B", True, "pearson"), ("glue:qqp", False, "f1"), ("glue:RTE", False, "accuracy"),
    ("bbc", False, "accuracy"), ("csv:x.csv", True, "pearson"), (None, False, "accuracy"),
])
def test_primary_metric_is_what_glue_reports(source, regression, metric):
    assert primary_metric(source, regression) == metric


def test_evaluate_reports_task_metrics(tiny_models):
    """A classifier's eval row has accuracy, MCC and F1; a regressor's Pearson and Spearman."""
    from datasets import Dataset

    from fedkrso.common.data.tokens import TokenFormat, tokenize
    from fedkrso.common.evaluate import evaluate
    from fedkrso.common.models import load_model, load_tokenizer

    texts = [f"word{i} other{i % 3}" for i in range(12)]
    for labels, num_labels, keys in (([i % 2 for i in range(12)], 2, {"eval_accuracy", "eval_mcc", "eval_f1"}),
                                     ([float(i) / 3 for i in range(12)], 1, {"eval_pearson", "eval_spearman"})):
        path = tiny_models("bert", num_labels=num_labels)
        model = load_model(str(path), "sequence-classification", num_labels)
        tokens = tokenize(Dataset.from_dict({"text": texts, "label": labels}), load_tokenizer(str(path)),
                          TokenFormat("sequence-classification", 16))
        out = evaluate(model, tokens, 5)
        assert keys <= set(out) and out["eval_examples"] == 12
        assert all(math.isfinite(out[k]) for k in keys)
