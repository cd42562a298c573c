"""Federated evaluation: what a client may report of its own evaluation, and a round's
combined figures.

Data owners rarely give the server an evaluation split, so clients evaluate too: a client
selected for round t that holds held-out rows (``<shard>/eval``) evaluates W^t, the state it
caught up to, before training, when ``eval.client_every`` makes the round due, and sends the
figures in its update's header. The row of round t then carries them as ``client_eval_*``,
with ``client_eval_state: t`` naming the evaluated state. The server's own ``eval_*`` in the
same row are of W^{t+1}, the state the round produced, so the server's figures of row t-1 and
the clients' of row t measure the same model: a client sees W^{t+1} only once it is selected
again, and the final model is measured by the server alone.

What a client sends is checked before its tensors are read (``check``): only the run task's
metric names (``evaluate.client_metric_names``: a hostile client cannot add keys to the
metrics row), each once, finite and in range, and an example count no larger than the
held-out split it declared at join (capped by ``eval.max_examples``). ``combine`` weights each
client's figures by its example count; a causal LM's loss, a mean per token, by its token
count, and its perplexity is the exponential of the combined loss.
"""

from __future__ import annotations

import math

from ..common.config import RunConfig
from ..common.evaluate import client_metric_names
from ..common.update import UpdateRecord
from .rounds import RoundError, Submission

PREFIX = "client_eval_"


def _refuse(message: str) -> RoundError:
    return RoundError("INVALID_ARGUMENT", message)


def check(cfg: RunConfig, round_id: int, report: UpdateRecord, declared_eval: int) -> None:
    """Refuse (INVALID_ARGUMENT) a report whose evaluation part is not what this run's
    clients send (module docstring); a report without one passes."""
    metrics, examples = report.eval_metrics, report.eval_examples
    if not metrics and not examples:
        return
    allowed = client_metric_names(cfg.model.task, cfg.model.num_labels)
    if len(metrics) > len(allowed):
        raise _refuse(f"{len(metrics)} eval metrics; this run's clients report {len(allowed)}")
    if not cfg.eval.client_due(round_id):
        raise _refuse(f"client evaluation is not due in round {round_id} "
                      f"(eval.client_every={cfg.eval.client_every})")
    if not metrics or examples < 1:
        raise _refuse("eval_metrics and a positive eval_examples go together")
    bound = declared_eval if cfg.eval.max_examples is None else min(declared_eval, cfg.eval.max_examples)
    if examples > bound:
        raise _refuse(f"eval_examples={examples} exceeds {bound}: the held-out rows declared at join"
                      + ("" if cfg.eval.max_examples is None else ", capped by eval.max_examples"))
    names = [name for name, _ in metrics]
    if len(set(names)) != len(names) or set(names) != allowed:
        shown = [name[:40] for name in names]
        raise _refuse(f"eval metrics must be exactly {sorted(allowed)} (each once), got {shown}")
    for name, value in metrics:
        if not math.isfinite(value) or value < 0:
            raise _refuse(f"eval metric {name}={value!r} is not a finite, non-negative number")
    values = dict(metrics)
    if values.get("accuracy", 0.0) > 1.0:
        raise _refuse(f"eval accuracy {values['accuracy']!r} exceeds 1")
    if "tokens" in values:
        tokens = values["tokens"]
        if tokens != int(tokens) or tokens > examples * cfg.model.max_length:
            raise _refuse(f"eval tokens={tokens!r} is not a count of at most "
                          f"eval_examples * model.max_length = {examples * cfg.model.max_length}")


def _mean(rows: list[Submission], name: str, weight) -> float:
    total = sum(weight(s) for s in rows)
    return sum(s.eval[name] * weight(s) for s in rows) / total


def combine(round_id: int, subs: list[Submission]) -> dict:
    """The ``client_eval_*`` fields of a round's row from its aggregated submissions (none
    when no client evaluated): ``state`` (the evaluated W^t), ``clients``, ``examples`` and
    each metric's weighted mean (module docstring); for a causal LM also ``tokens`` and
    ``perplexity``."""
    rows = [s for s in subs if s.eval_examples]
    if not rows:
        return {}
    out = {"state": round_id, "clients": len(rows), "examples": sum(s.eval_examples for s in rows)}
    by_tokens = all("tokens" in s.eval for s in rows) and sum(s.eval["tokens"] for s in rows) > 0
    for name in sorted(set.intersection(*(set(s.eval) for s in rows))):
        if name == "tokens":
            out[name] = int(sum(s.eval[name] for s in rows))
        elif name == "loss" and by_tokens:
            out[name] = _mean(rows, name, lambda s: s.eval["tokens"])
        else:
            out[name] = _mean(rows, name, lambda s: s.eval_examples)
    if "tokens" in out and "loss" in out:
        out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 709 else math.inf  # exp overflows
    return {PREFIX + k: v for k, v in out.items()}
