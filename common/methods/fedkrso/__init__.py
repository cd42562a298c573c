"""FedKRSO: federated K-seed random subspace optimization (docs/algorithm.md sections 2 to 5).

Each projected matrix W (d_m x d_n, nn.Linear convention) is trained as W + B P, where P
(r x d_n) is rebuilt from a seed and B (d_m x r) is the only trainable part. The layer never
forms W + B P nor a full-size gradient: while B is active the layer's forward is one fused
autograd Function, ``y = x W^T + bias + (x P^T) B^T``, that keeps only the r-column ``x P^T``
(plus references to W, P, B) for backward; ``grad_B = g^T (x P^T) = grad_W P^T`` without
grad_W ever existing, and ``grad_x = g W + (g B) P``.

Choices the paper leaves open (docs/algorithm.md section 8 names the field or code of each):
K fresh seeds per round; a seed drawn uniformly per interval from a client RNG keyed by (run
seed, round, client); B and its AdamW state reset every interval; the dense-trainables (head,
norms and, with ``train_biases`` as in full fine-tuning, the projected layers' biases) keep
one AdamW state for the whole round. Both follow the run's one optimizer setting
(``training.optimizer``: decay, schedule, clipping).

Precision (common/precision.py): the layer computes in its weight's dtype; B is a float32
master. Under a low-precision placement each projected weight is a copy in that dtype on the
party's device and its float32 master lives in host memory (``precision.master``): the
state, fingerprints and ``apply`` use the masters, training merges ``B P`` into the copies
only, and ``restore`` rebuilds the copies from the masters.

The package has the shape of a PEFT tuner: ``config`` (the knobs), ``layer`` (the fused
autograd function ``_SubspaceLinear``, DP-SGD's per-example gradient of B, and
``SubspaceAdapter``, which routes each target's forward through them; no model, no round) and
``method`` (``FedKRSO``: seeds, intervals, uploads, the server's checks and ``apply``).
"""

from .config import Config
from .layer import SubspaceAdapter
from .method import FedKRSO

__all__ = ["Config", "FedKRSO", "SubspaceAdapter"]
