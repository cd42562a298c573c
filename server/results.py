"""What a run produces besides its metrics rows: the server's evaluation of the global model
after each round, and the final model in ``<output_dir>/final``."""

from __future__ import annotations

from pathlib import Path

import structlog
from torch import nn

from ..common.config import RunConfig
from ..common.methods import Method
from ..common.models import load_tokenizer

log = structlog.get_logger("fedkrso.server")


class ServerEvaluator:
    """Evaluates the global model on ``eval.data`` (loaded and tokenised once, on first
    use); no evaluation split configured means no server evaluation (clients may still
    evaluate on their own rows: ``client_eval.py``)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._tokens = None

    def __call__(self, model: nn.Module) -> dict:
        if self.cfg.eval.data is None:
            return {}
        from ..common.data import load_split, tokenize
        from ..common.evaluate import evaluate

        if self._tokens is None:
            tokenizer = load_tokenizer(self.cfg.model.name, self.cfg.model.revision)
            self._tokens = tokenize(load_split(self.cfg.eval.data), tokenizer, self.cfg.token_format())
        return evaluate(model, self._tokens, self.cfg.eval.batch_size, self.cfg.eval.max_examples)


def write_model(cfg: RunConfig, method: Method, model: nn.Module, path: Path) -> Path:
    """A folder plain transformers loads: ``save_pretrained`` of ``method.export(model)``, the
    tokenizer, and ``adapters.safetensors`` for what the plain model cannot hold (FedTT; its
    loader is ``fedkrso.common.methods.fedtt.load_adapters``). ``<run>/final`` and
    ``fedkrso-export`` both write with this."""
    method.export(model).save_pretrained(path)
    try:
        load_tokenizer(cfg.model.name, cfg.model.revision).save_pretrained(path)
    except (OSError, ValueError) as err:  # tokenizer is a convenience, not the result
        log.warning("tokenizer_not_saved", error=str(err))
    method.save_extras(model, path)
    return path


def save_final(cfg: RunConfig, method: Method, model: nn.Module, out: Path, state_fingerprint: str) -> Path:
    """``write_model`` into ``<out>/final`` and the final state fingerprint beside it."""
    path = write_model(cfg, method, model, out / "final")
    (out / "final_state_fingerprint.txt").write_text(state_fingerprint + "\n")
    return path
