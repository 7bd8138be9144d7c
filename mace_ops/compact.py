"""Compact erasure files: each difference ``ΔW = W_new − W0`` as a truncated SVD.

SDXL's 140 dense differences are Σ d_out × 2048 = 166,400 × 2048 numbers: 0.68 GB in float16, 1.36 GB
in float32. ΔW's rank is not bounded usefully (CFR: ``ΔW = W0 (C − G)(G + P + λI)⁻¹`` with
``rank(C − G)`` up to the number of aligned concept tokens, ~2,250 per concept), but its spectrum
decays, so it is stored as the shortest truncated SVD within a relative Frobenius error ``tol``::

    ΔW = U S Vᵀ,   r = min { r : sqrt(Σ_{i>r} s_i²) ≤ tol · ||ΔW||_F }
    up = U_r S_r  (d_out, r),   down = V_rᵀ  (r, d_ctx),   ΔW ≈ up · down

under the keys ``diffusion_model.<block>.to_k.lora_up.weight`` / ``.lora_down.weight``: the plain LoRA
form, so ComfyUI's stock LoRA loader applies a compact file as well (no alpha: scale 1).
Factors are stored in ``dtype`` (default float16, which adds ~1e-3 relative error on top of ``tol``).
Size per matrix: r (d_out + d_ctx) numbers instead of d_out · d_ctx; a matrix whose r makes the
factors no smaller (r ≥ d_out d_ctx / (d_out + d_ctx)) is stored dense in ``dtype`` as ``<key>.diff``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .errors import MaceError

UP_SUFFIX = ".lora_up.weight"
DOWN_SUFFIX = ".lora_down.weight"


def low_rank_factors(diff: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """``(up (d_out, r), down (r, d_ctx))`` float32 with ``||diff − up·down||_F ≤ tol·||diff||_F``, r minimal
    (SVD in float64: the tail sums must be exact to pick r)."""
    if not 0.0 <= tol < 1.0:
        raise MaceError(f"compact erasure tolerance {tol}: give a relative error in [0, 1), e.g. 0.01")
    u, s, vh = torch.linalg.svd(diff.detach().double(), full_matrices=False)
    energy = s.square()
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j≥i} s_j²
    budget = (tol**2) * float(energy.sum())
    fits = (tail <= budget).nonzero()
    r = int(fits[0]) if len(fits) else len(s)  # first i whose tail (dropping i..end) fits
    r = max(r, 1)
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def compact_tensors(diffs: Mapping[str, Tensor], tol: float, prefix: str,
                    dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], dict[str, int]]:
    """``({prefix<name>.lora_up.weight: up, ...down...}, {name: rank})`` for every non-zero diff
    (``{prefix<name>.diff: diff}`` in ``dtype`` where the factors would not be smaller; its rank: 0)."""
    tensors, ranks = {}, {}
    for name, d in sorted(diffs.items()):
        if not bool(torch.any(d != 0)):
            continue
        up, down = low_rank_factors(d, tol)
        if up.shape[1] * (d.shape[0] + d.shape[1]) >= d.numel():
            tensors[f"{prefix}{name}.diff"] = d.detach().to(dtype).contiguous()
            ranks[name] = 0
            continue
        tensors[f"{prefix}{name}{UP_SUFFIX}"] = up.to(dtype).contiguous()
        tensors[f"{prefix}{name}{DOWN_SUFFIX}"] = down.to(dtype).contiguous()
        ranks[name] = int(up.shape[1])
    return tensors, ranks


def expand_low_rank(tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Pop every ``<key>.lora_up.weight`` / ``.lora_down.weight`` pair from ``tensors`` and return
    ``{<key>.diff: up·down}`` (float32); a lone or ill-shaped factor is a corrupt file."""
    out = {}
    for up_key in [k for k in tensors if k.endswith(UP_SUFFIX)]:
        base = up_key[: -len(UP_SUFFIX)]
        up, down = tensors.pop(up_key), tensors.pop(base + DOWN_SUFFIX, None)
        if down is None or up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise MaceError(f"{where}: low-rank factors of {base!r} are missing or do not fit; the file is corrupt")
        out[base + ".diff"] = up.float() @ down.float()
    lone = [k for k in tensors if k.endswith(DOWN_SUFFIX)]
    if lone:
        raise MaceError(f"{where}: {lone[0]!r} has no lora_up partner; the file is corrupt")
    return out


__all__ = ["compact_tensors", "expand_low_rank", "low_rank_factors"]
