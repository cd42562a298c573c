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
    """Evaluates the global model on ``eval.data`` (loaded once, on first use); no
    evaluation split configured means no evaluation."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._data = None
        self._tokenizer = None

    def __call__(self, model: nn.Module) -> dict:
        if self.cfg.eval.data is None:
            return {}
        from ..common.data import load_split
        from ..common.evaluate import evaluate

        if self._data is None:
            self._data = load_split(self.cfg.eval.data)
            self._tokenizer = load_tokenizer(self.cfg.model.name, self.cfg.model.revision)
        m = self.cfg.model
        return evaluate(model, self._data, self._tokenizer, m.task, m.max_length,
                        self.cfg.eval.batch_size, self.cfg.eval.max_examples)


def save_final(cfg: RunConfig, method: Method, model: nn.Module, out: Path, state_fingerprint: str) -> Path:
    """save_pretrained into ``<out>/final`` (plus adapters.safetensors if any) and the final
    state fingerprint beside it."""
    from safetensors.torch import save_file

    path = out / "final"
    method.export(model).save_pretrained(path)
    try:
        load_tokenizer(cfg.model.name, cfg.model.revision).save_pretrained(path)
    except (OSError, ValueError) as err:  # tokenizer is a convenience, not the result
        log.warning("tokenizer_not_saved", error=str(err))
    extra = method.export_extra(model)
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, str(path / "adapters.safetensors"))
    (out / "final_state_fingerprint.txt").write_text(state_fingerprint + "\n")
    return path
