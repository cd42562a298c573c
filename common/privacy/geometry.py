"""The map from a method's upload to the model update it makes, for clipping and noise.

Differential privacy bounds one client's influence and calibrates noise to that bound. For
the bound C and an epsilon to mean the same for every method, both are set on the *model
update* an upload makes, not on the upload's own coordinates: a FedKRSO accumulator A of a
matrix changes the weights by A P (P = the round's random subspaces stacked, known to every
party), and ||A P||_F is not ||A||_F because P has orthogonal-in-expectation, not orthonormal,
rows. ``UpdateGeometry`` handles that map *exactly* for uploads whose model update is linear in
them:

* identity tensors (FedAvg's weight deltas, every method's dense deltas, FedIT's LoRA factor
  deltas, FedTT's core deltas): the upload is the change of the parameters themselves;
* right factors (FedKRSO's accumulators, FFA-LoRA's B): a group of tensors X_1..X_k
  (d_m x r_i each), side by side X (d_m x R), changes a weight matrix by X M with M (R x d_n)
  known from the round's seeds. With M M^T = U diag(lambda) U^T (eigendecomposition),
  S = diag(sqrt(lambda)) and V = M^T U S^-1 (orthonormal columns), X M = (X U S) V^T, so the
  coordinates Y = X U S of the update in the orthonormal basis V have ||Y||_F = ||X M||_F.

Then

* ``norm`` is the exact L2 norm of the model update (all tensors together);
* ``clip`` scales the upload by min(1, C / norm): the map is linear, so the model update scales
  by the same factor and its norm is at most C, exactly (tests check it on sampled updates);
* ``noise`` draws X_noise = Y_noise S^-1 U^T with Y_noise ~ N(0, std^2) i.i.d.: its model
  update X_noise M = Y_noise V^T is isotropic Gaussian of that std on the subspace every client
  update lies in. Releasing (sum of clipped X) + X_noise is therefore, up to the bijection
  X -> Y, the Gaussian mechanism with L2 sensitivity C (2C under replacement) and noise std
  ``std``: the epsilon of the accountant holds for the released accumulators and for every
  weight computed from them (post-processing).

Directions of X that M maps to zero (possible only when R > d_n) change no weight but would
still be released, unbounded by the clip: ``project`` removes them first (X <- X U U^T over
the kept eigenvectors), which leaves the model update unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]
RANK_TOL = 1e-10  # eigenvalues below this share of the largest count as zero


@dataclass
class RightFactor:
    """Upload tensors ``names`` (each d_m x width), side by side X, change a weight by X M."""

    names: list[str]
    widths: list[int]
    matrix: torch.Tensor  # M: (sum(widths) x d_n)
    basis: torch.Tensor = field(init=False)  # U over the kept eigenvalues (R x rank), float64
    scale: torch.Tensor = field(init=False)  # sqrt(lambda) (rank,), float64

    def __post_init__(self) -> None:
        m = self.matrix.double()
        if m.shape[0] != sum(self.widths):
            raise ValueError(f"factor of {self.names[:1]}: {m.shape[0]} rows for widths {self.widths}")
        lam, u = torch.linalg.eigh(m @ m.T)
        keep = lam > RANK_TOL * float(lam.max().clamp_min(1e-300))
        self.basis, self.scale = u[:, keep], lam[keep].sqrt()
        self.matrix = m

    def stack(self, tensors: Tensors, rows: int) -> torch.Tensor:
        """The factor's upload tensors side by side as one (rows x sum of widths) float64 matrix, zeros
        for a name not in ``tensors``."""
        parts = [tensors[n].double() if n in tensors else torch.zeros(rows, w, dtype=torch.float64)
                 for n, w in zip(self.names, self.widths)]
        return torch.cat(parts, dim=1)

    def split(self, x: torch.Tensor) -> Tensors:
        """The inverse of ``stack``: the matrix cut back into one tensor per name."""
        return dict(zip(self.names, torch.split(x, self.widths, dim=1)))

    def coords(self, x: torch.Tensor) -> torch.Tensor:
        """Y = X U S: the update's coordinates in an orthonormal basis of the weight subspace."""
        return (x @ self.basis) * self.scale

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the directions that change no weight removed (projected on the factor's row space)."""
        return (x @ self.basis) @ self.basis.T

    def noise(self, rows: int, std: float, rng: np.random.Generator) -> torch.Tensor:
        """Upload-space noise of ``rows`` rows whose weight change is N(0, std^2) on every coordinate
        of the factor's subspace."""
        y = torch.from_numpy(rng.standard_normal((rows, self.basis.shape[1]))) * std
        return (y / self.scale) @ self.basis.T


class UpdateGeometry:
    """The model update of every upload of a round with a given spec (module docstring)."""

    def __init__(self, spec: dict[str, tuple[int, ...]], factors: list[RightFactor] | None = None):
        self.spec = dict(spec)
        self.factors = list(factors or [])
        grouped = {n for f in self.factors for n in f.names}
        missing = grouped - set(self.spec)
        if missing:
            raise ValueError(f"factor names outside the update spec: {sorted(missing)[:3]}")
        self.identity = [n for n in self.spec if n not in grouped]

    def _rows(self, f: RightFactor) -> int:
        return self.spec[f.names[0]][0]

    @property
    def dimension(self) -> int:
        """D: the dimensions of the subspace the round's model updates reach, which ``noise``
        fills (every element of an identity tensor; rows x rank of each right factor)."""
        return (sum(math.prod(self.spec[n]) for n in self.identity)
                + sum(self._rows(f) * f.basis.shape[1] for f in self.factors))

    def norm(self, tensors: Tensors) -> float:
        """L2 norm of the model update ``tensors`` make (absent tensors count as zero)."""
        total = sum(float(tensors[n].double().square().sum()) for n in self.identity if n in tensors)
        for f in self.factors:
            if any(n in tensors for n in f.names):
                total += float(f.coords(f.stack(tensors, self._rows(f))).square().sum())
        return math.sqrt(total)

    def project(self, tensors: Tensors) -> Tensors:
        """The same model update without upload directions that change no weight."""
        out = dict(tensors)
        for f in self.factors:  # full row rank (R <= d_n, the usual case): nothing to remove
            if f.basis.shape[1] < f.matrix.shape[0] and any(n in tensors for n in f.names):
                out.update(f.split(f.project(f.stack(tensors, self._rows(f)))))
        return out

    def clip(self, tensors: Tensors, bound: float) -> tuple[Tensors, float]:
        """(the upload scaled so its model update's norm is at most ``bound``, the norm before)."""
        tensors = self.project(tensors)
        norm = self.norm(tensors)
        scale = min(1.0, bound / norm) if norm > 0 else 1.0
        return {n: t.double() * scale for n, t in tensors.items()}, norm

    def noise(self, std: float, rng: np.random.Generator) -> Tensors:
        """Upload-space noise whose model update is N(0, std^2) on every coordinate of the
        subspace the round's updates reach; one tensor for every name of the spec."""
        out: Tensors = {}
        for n in self.identity:
            out[n] = torch.from_numpy(np.asarray(rng.standard_normal(self.spec[n]))) * std
        for f in self.factors:
            out.update(f.split(f.noise(self._rows(f), std, rng)))
        return out
