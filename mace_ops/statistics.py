"""Streaming second moments of token embeddings, in float64.

A ``SecondMoment`` holds ``S = Σ_i x_i y_iᵀ`` (d×d) and the sample count ``n``; it never keeps the
samples. ``G = Σ e eᵀ`` is ``add(e)``; the CFR cross term ``C = Σ e_g e_fᵀ`` is ``add(e_g, e_f)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# A symmetric Gram ``xᵀx`` of at least this many dimensions is formed from its upper block triangle
# (``_SYM_BLOCKS`` column blocks: 10 of the 16 block products, 62.5 % of the multiply-adds).
_SYM_MIN_DIM = 512
_SYM_BLOCKS = 4


def _add_gram(out: Tensor, x: Tensor) -> None:
    """``out += xᵀ x`` for ``x`` (n, d), ``out`` (d, d): block row ``a`` is ``x_aᵀ x[:, e_a:]`` (its
    diagonal block and everything right of it); the blocks left of the diagonal are the mirror."""
    d = x.shape[1]
    if d < _SYM_MIN_DIM:
        out.addmm_(x.T, x)
        return
    edges = [round(k * d / _SYM_BLOCKS) for k in range(_SYM_BLOCKS + 1)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        block = x[:, lo:hi].T @ x[:, lo:]  # (hi − lo, d − lo)
        out[lo:hi, lo:] += block
        out[hi:, lo:hi] += block[:, hi - lo :].T  # (d − hi, hi − lo): the mirrored off-diagonal part


@dataclass
class SecondMoment:
    """``sum = Σ x yᵀ`` over ``count`` samples; ``mean = sum / count``. float64, on CPU by default."""

    dim: int
    sum: Tensor = field(default=None)  # (dim, dim) float64
    count: int = 0

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if self.sum.shape != (self.dim, self.dim):
            raise ValueError(f"SecondMoment sum has shape {tuple(self.sum.shape)}, expected {(self.dim, self.dim)}")

    def add(self, x: Tensor, y: Tensor | None = None) -> SecondMoment:
        """Accumulate ``Σ x_i y_iᵀ`` over the rows of ``x``/``y`` (..., dim); ``y`` defaults to ``x``."""
        x = x.reshape(-1, self.dim).to(device=self.sum.device, dtype=torch.float64)
        y = x if y is None else y.reshape(-1, self.dim).to(device=self.sum.device, dtype=torch.float64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"SecondMoment.add: {x.shape[0]} rows in x but {y.shape[0]} in y")
        if y is x:
            _add_gram(self.sum, x)  # symmetric: the upper block triangle only
        else:
            self.sum.addmm_(x.T, y)
        self.count += x.shape[0]
        return self

    def mean(self) -> Tensor:
        """``sum / count`` (zeros when empty)."""
        return self.sum / max(self.count, 1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"sum": self.sum, "count": torch.tensor(self.count, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> SecondMoment:
        s = state["sum"].to(torch.float64)
        return cls(dim=s.shape[0], sum=s.clone(), count=int(state["count"]))
