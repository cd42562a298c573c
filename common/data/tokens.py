"""Token rows: a split tokenised once, with ``Dataset.map``, then padded batch by batch.

Tokenising is the same for every round, so a client tokenises its shard once (and the server
its eval split) instead of in every batch of every round. ``tokenize`` stores each row's token
ids unpadded, with its labels (a class id, a score, or per-token labels for a causal LM), and
``Tokens.batch`` pads the rows of one batch to the longest of them, exactly as
``tokenizer(..., padding="longest")`` does: same ids, attention mask, token types and labels,
so training and evaluation see the very tensors they saw when every batch was tokenised anew.

A split saved on disk (a shard, an eval split) keeps its token rows beside it, in
``<split>/tokenized/<key>.arrow``, keyed by everything that shapes them: the tokenizer's
content (its vocabulary, normaliser, special tokens, chat template), the task, ``max_length``,
the instruction template and this module's ``FORMAT``. A later run with the same key reads
the file instead of tokenising; a folder that cannot be written to tokenises in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch
from datasets import Dataset, Features, Sequence, Value

from ..models import Task
from .instruct import IGNORE, Pieces, Template, check_prompt_format, encode_instructions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = structlog.get_logger(__name__)
FORMAT = 1  # of the stored token rows: bump when what tokenize stores changes meaning
CACHE_DIR = "tokenized"


@dataclass(frozen=True)
class TokenFormat:
    """How rows become token sequences; the same on every client and on the server."""

    task: Task
    max_length: int
    template: Template = "plain"
    prompt_format: str = "{prompt}\n"

    def __post_init__(self) -> None:
        check_prompt_format(self.prompt_format)


def is_instruction(dataset: Dataset) -> bool:
    """Whether ``dataset`` holds instruction rows (``prompt`` and ``response`` columns)."""
    return {"prompt", "response"} <= set(dataset.column_names)


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what makes this tokenizer map text to ids: its backend's whole definition
    (vocabulary, merges, normaliser, added tokens) without the truncation and padding state
    that every call changes, plus its class, special tokens, padding side and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    extra = [type(tokenizer).__name__, tokenizer.all_special_tokens, tokenizer.padding_side,
             getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256(json.dumps([spec, extra], sort_keys=True, default=str).encode()).hexdigest()


def _features(dataset: Dataset, fmt: TokenFormat, with_types: bool) -> Features:
    cols = {"input_ids": Sequence(Value("int32"))}
    if with_types:
        cols["token_type_ids"] = Sequence(Value("int8"))
    if fmt.task == "causal-lm":
        cols["labels"] = Sequence(Value("int32"))
    else:
        cols["labels"] = dataset.features["label"]
    return Features(cols)


def _row_encoder(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, fmt: TokenFormat):
    """The batched ``map`` function of ``dataset``'s rows, and whether it emits token types."""
    causal = fmt.task == "causal-lm"
    if is_instruction(dataset):
        if not causal:
            raise ValueError("prompt/response rows train a causal LM: set model.task: causal-lm")
        pieces = Pieces.build(tokenizer, fmt.template, fmt.prompt_format)
        return (lambda rows: encode_instructions(tokenizer, pieces, rows["prompt"], rows["response"],
                                                 fmt.max_length)), False
    if "text" not in dataset.column_names:
        raise ValueError(f"rows need a 'text' column (or 'prompt' and 'response'); columns are "
                         f"{dataset.column_names}")
    if not causal and "label" not in dataset.column_names:
        raise ValueError("sequence-classification needs a 'label' column; this split has none")
    probe = tokenizer("a", "b" if "text_pair" in dataset.column_names else None)
    with_types = not causal and "token_type_ids" in probe

    def encode(rows: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(rows["text"], rows.get("text_pair"), truncation=True, max_length=fmt.max_length)
        out = {"input_ids": enc["input_ids"]}
        if with_types:
            out["token_type_ids"] = enc["token_type_ids"]
        # a causal LM predicts its own text: every real token is a label (padding never is)
        out["labels"] = [list(ids) for ids in enc["input_ids"]] if causal else rows["label"]
        return out

    return encode, with_types


def _cache_file(dataset: Dataset, key: str) -> Path | None:
    """``<split>/tokenized/<key>.arrow`` beside a split read from disk; None for a split in
    memory or a folder this process cannot write to."""
    if not dataset.cache_files:
        return None
    folder = Path(dataset.cache_files[0]["filename"]).parent / CACHE_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    return folder / f"{key}.arrow" if os.access(folder, os.W_OK) else None


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, fmt: TokenFormat) -> Tokens:
    """Token rows of ``dataset`` (tokenised once, or read back from its cache file)."""
    encode, with_types = _row_encoder(dataset, tokenizer, fmt)
    parts = [FORMAT, asdict(fmt), tokenizer_identity(tokenizer), dataset._fingerprint, with_types]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    path = _cache_file(dataset, key)
    cached = path is not None and path.is_file()
    started = time.perf_counter()
    rows = dataset.map(encode, batched=True, remove_columns=dataset.column_names,
                       features=_features(dataset, fmt, with_types), new_fingerprint=key,
                       cache_file_name=None if path is None else str(path), load_from_cache_file=True,
                       keep_in_memory=path is None, desc="tokenising")
    log.info("split_tokenized", rows=len(rows), cached=cached, seconds=round(time.perf_counter() - started, 3),
             path=None if path is None else str(path))
    pad_type = getattr(tokenizer, "pad_token_type_id", 0)
    return Tokens(rows, fmt.task, tokenizer.pad_token_id, pad_type, tokenizer.padding_side)


class Tokens:
    """A tokenised split: rows of unpadded token ids and labels; ``batch`` pads some of them."""

    def __init__(self, rows: Dataset, task: Task, pad_id: int, pad_type_id: int, padding_side: str):
        self.rows = rows
        self.task = task
        self.pad_id = pad_id
        self.pad_type_id = pad_type_id
        self.left = padding_side == "left"

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The rows at ``indices`` padded to the longest: ``input_ids``, ``attention_mask``,
        ``token_type_ids`` (encoders with segments) and ``labels``: int64 class ids, float32
        scores, or for a causal LM per-token labels with -100 on padding (and on the prompt
        of an instruction row) so neither counts in the loss."""
        rows = self.rows[indices]
        seqs = rows["input_ids"]
        width = max(len(s) for s in seqs)
        shape = (len(seqs), width)
        out = {"input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros(shape, dtype=torch.long)}
        if "token_type_ids" in rows:
            out["token_type_ids"] = torch.full(shape, self.pad_type_id, dtype=torch.long)
        causal = self.task == "causal-lm"
        if causal:
            out["labels"] = torch.full(shape, IGNORE, dtype=torch.long)
        for i, seq in enumerate(seqs):
            at = slice(width - len(seq), width) if self.left else slice(0, len(seq))
            out["input_ids"][i, at] = torch.tensor(seq)
            out["attention_mask"][i, at] = 1
            if "token_type_ids" in rows:
                out["token_type_ids"][i, at] = torch.tensor(rows["token_type_ids"][i])
            if causal:
                out["labels"][i, at] = torch.tensor(rows["labels"][i])
        if not causal:
            out["labels"] = torch.tensor(rows["labels"])
        return out

