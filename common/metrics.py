"""Task metrics as GLUE reports them, from predictions and labels (scikit-learn and SciPy).

* classification: accuracy always; Matthews correlation (CoLA's metric; defined for any
  number of classes); F1 of the positive class for two-class tasks (MRPC's and QQP's metric);
* regression: Pearson and Spearman correlation (STS-B's metrics).

``primary_metric`` names the one a task is selected and reported by: GLUE's own for GLUE tasks
(``common.data.sources.GLUE_TASKS``), otherwise accuracy for classification and Pearson for
regression. Perplexity and loss belong to the evaluation itself (``common/evaluate.py``).
"""

from __future__ import annotations

import math

import numpy as np

CLASSIFICATION = ("accuracy", "f1", "mcc")
REGRESSION = ("pearson", "spearman")


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and MCC, plus F1 of class 1 when there are two classes."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    out = {"accuracy": float((predictions == labels).mean()) if len(labels) else 0.0,
           "mcc": float(matthews_corrcoef(labels, predictions)) if len(labels) else 0.0}
    if num_labels == 2:
        out["f1"] = float(f1_score(labels, predictions, pos_label=1, zero_division=0.0))
    return out


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation; 0 where undefined (a constant prediction)."""
    from scipy.stats import pearsonr, spearmanr

    def safe(value: float) -> float:
        return 0.0 if value is None or not math.isfinite(value) else float(value)

    if len(labels) < 2 or np.all(predictions == predictions[0]) or np.all(labels == labels[0]):
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": safe(pearsonr(predictions, labels).statistic),
            "spearman": safe(spearmanr(predictions, labels).statistic)}


def primary_metric(source: str | None, regression: bool) -> str:
    """The metric a task is reported and selected by (module docstring)."""
    if source and source.lower().startswith("glue:"):
        from .data.sources import glue_task

        return glue_task(source.split(":", 1)[1])[1].metric
    return "pearson" if regression else "accuracy"
