"""Explicit cross-attention with its softmax probabilities handed to a sink, and mask helpers.

For one block with ``heads`` heads of width ``d`` (``q``: (B, N, heads·d), ``k``/``v``: (B, L, heads·d)):

    P = softmax(Q_h K_hᵀ / √d)       (B, heads, N, L)     -- the probabilities a sink receives
    out = concat_h(P_h V_h)          (B, N, heads·d)      -- what scaled-dot-product attention returns

Precision: ``P`` is computed in float32 at least (``probability_dtype``), whatever the host's dtype:
in fp16/bf16 a probability keeps 11/8 significant bits, so the attention-map loss (a sum of squares
of thousands of them) and the masks derived from ``P`` would carry relative errors of 1e-3 to 1e-2.

Use ``explicit_attention`` as the ``attention`` function of ``Host.instrument``; ``AttentionRecorder``
is a sink that stores the probabilities per block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MaceError

#: sink(block, probs) or, when ``explicit_attention`` gets no block name, sink(probs)
Sink = Callable[..., None]


def probability_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the probabilities are computed in: the inputs' common dtype, at least float32."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, sink: Sink | None = None, block: str | None = None
) -> Tensor:
    """Attention with explicit probabilities ``P = softmax(Q Kᵀ/√d)`` (B, heads, N, L); returns (B, N, heads·d).

    ``sink`` is called with ``(block, P)`` when ``block`` is given, else with ``(P)``; ``P`` keeps its
    autograd graph, so a loss on it trains whatever produced ``q``/``k``. ``P`` and the product are
    computed in ``probability_dtype(q, k, v)`` (float32 for fp16/bf16 inputs); the output has ``q``'s dtype.
    """
    out_dtype = q.dtype
    q, k, v = (x.to(probability_dtype(q, k, v)) for x in (q, k, v))
    b, n, inner = q.shape
    if inner % heads:
        raise MaceError(f"attention of width {inner} cannot be split into {heads} heads")
    d = inner // heads
    qh = (q * (1.0 / math.sqrt(d))).view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d), scaled: N·d < N·L
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # (B, heads, L, d)
    vh = v.view(b, v.shape[1], heads, d).transpose(1, 2)  # (B, heads, L, d)
    probs = torch.softmax(qh @ kh.transpose(-1, -2), dim=-1)  # (B, heads, N, L)
    if sink is not None:
        if block is None:
            sink(probs)
        else:
            sink(block, probs)
    out = probs @ vh  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(b, n, inner).to(out_dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Standard attention via ``F.scaled_dot_product_attention``; same shapes as ``explicit_attention``."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(b, n, inner)


class AttentionRecorder:
    """A sink ``(block, probs)`` that keeps each block's probabilities, per call, detached.

    ``tokens``: keep only these token columns (indices into L). ``conditional_half``: keep only the
    second half of the batch (the conditional branch of classifier-free guidance, uncond first).
    ``blocks``: record only these blocks. ``records[block]`` is a list, one entry per call, of
    (B', heads, N, L') tensors on ``device`` (default: where they were computed).
    """

    def __init__(
        self,
        tokens: Sequence[int] | Tensor | None = None,
        *,
        conditional_half: bool = False,
        blocks: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.tokens = None if tokens is None else torch.as_tensor(tokens, dtype=torch.long)
        self.conditional_half = conditional_half
        self.blocks = None if blocks is None else set(blocks)
        self.device = device
        self.records: dict[str, list[Tensor]] = {}

    def __call__(self, block: str, probs: Tensor) -> None:
        if self.blocks is not None and block not in self.blocks:
            return
        p = probs.detach()
        if self.conditional_half:
            if p.shape[0] % 2:
                raise MaceError(f"block {block}: batch of {p.shape[0]} has no conditional half")
            p = p[p.shape[0] // 2 :]
        if self.tokens is not None:
            p = p.index_select(-1, self.tokens.to(p.device))
        if self.device is not None:
            p = p.to(self.device)
        self.records.setdefault(block, []).append(p)

    def attention(self, block: str, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
        """An ``AttentionFn`` for ``Host.instrument`` that records into this recorder."""
        return explicit_attention(q, k, v, heads, sink=self, block=block)

    def clear(self) -> None:
        self.records.clear()


def layer_hw(n_tokens: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """Spatial size ``(h, w)`` of a layer with ``n_tokens = h·w`` pixels in a UNet whose latent is
    ``latent_h × latent_w``: the latent downsampled by the power of two ``f`` with ``h = ⌈H/f⌉``, ``w = ⌈W/f⌉``."""
    f = 1
    while f <= max(latent_h, latent_w) * 2:
        h, w = -(-latent_h // f), -(-latent_w // f)
        if h * w == n_tokens:
            return h, w
        if h * w < n_tokens:
            break
        f *= 2
    raise MaceError(
        f"a layer with {n_tokens} pixels does not match a {latent_h}x{latent_w} latent downsampled by a power of two"
    )


def resize_mask(mask: Tensor, h: int | tuple[int, int], w: int | None = None) -> Tensor:
    """Mask (B, H, W) or (H, W) -> (B, h·w) bool: nearest-neighbour resize to ``h × w``, then ``> 0.5``.

    The size is given as ``h, w`` or as one tuple ``(h, w)``.
    """
    if w is None:
        if not isinstance(h, tuple | list) or len(h) != 2:
            raise MaceError(f"resize_mask size {h!r}: give h, w or a tuple (h, w)")
        h, w = h
    m = mask if mask.ndim == 3 else mask[None]
    if m.ndim != 3:
        raise MaceError(f"mask of shape {tuple(mask.shape)}: give (B, H, W) or (H, W)")
    m = F.interpolate(m[:, None].float(), size=(int(h), int(w)), mode="nearest")[:, 0]  # (B, h, w)
    return (m > 0.5).reshape(m.shape[0], int(h) * int(w))


__all__ = [
    "AttentionRecorder",
    "explicit_attention",
    "layer_hw",
    "probability_dtype",
    "resize_mask",
    "sdpa_attention",
]
