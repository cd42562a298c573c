"""FedTT: tensor-train adapters, and FedTT+ (docs/algorithm.md section 7; Ghiasvand et al.,
arXiv 2410.13097).

After the attention output and the feed-forward output of every block (``adapter_modules``:
BERT/RoBERTa ``attention.output.dense`` and ``layer.N.output.dense``, GPT-2 ``attn.c_proj``
and ``mlp.c_proj``, LLaMA-style ``self_attn.o_proj`` and ``mlp.down_proj``) a forward hook
applies a bottleneck adapter ``y + U act(D y)`` with D (m x h) and U (h x m), m = 64. Each of
D and U is a tensor-train matrix: ``cores`` cores G_k of shape (r_{k-1}, o_k, i_k, r_k), with
h and m split into that many balanced factors (``tt_factors``: 384 -> 6*8*8, 64 -> 4*4*4) and
TT rank r (5); the full matrix is contracted from the cores at each forward (it is small).

Initialisation, from CPU generators seeded by (run seed, module, matrix, core): Gaussian cores
scaled so that D has variance 1/h per entry; U the same at 1/m except one core, which is zero,
so every adapter starts as the identity. Clients train the cores (plus the dense-trainables)
with Adam and upload core deltas; the server averages them (FedAvg on cores).

FedTT+ (``FedTTPlus``) freezes part of the cores; its docstring gives the rule.

The adapters do not merge into the base weights (the activation is in between), so ``export``
returns a copy without them and ``export_extra`` returns their cores, which the server saves
beside the model as ``adapters.safetensors`` (with the adapter config in its metadata). To use
an exported FedTT model (``<run>/final`` or a ``fedkrso-export`` folder)::

    from transformers import AutoModelForSequenceClassification
    from fedkrso.common.methods.fedtt import load_adapters

    model = load_adapters(AutoModelForSequenceClassification.from_pretrained(folder), folder)

The package has the shape of a PEFT tuner: ``config`` (the knobs), ``layer`` (the TT matrix,
its contraction, the adapter and the forward hook that applies it) and ``method`` (``FedTT``
and ``FedTTPlus``, which inject the adapters into a host model and train them federatedly,
and ``load_adapters``).
"""

from .config import Config, PlusConfig
from .layer import TTAdapter, TTMatrix, contract, tt_factors
from .method import FedTT, FedTTPlus, adapters, core_index, load_adapters

__all__ = ["Config", "FedTT", "FedTTPlus", "PlusConfig", "TTAdapter", "TTMatrix", "adapters", "contract",
           "core_index", "load_adapters", "tt_factors"]
