"""The host protocol: the few things the MACE core needs from a Stable Diffusion host.

Naming. A cross-attention block is named by its LDM state-dict path without the
``diffusion_model.`` prefix, e.g. ``input_blocks.1.1.transformer_blocks.0.attn2``; its two edited
matrices are ``<block>.to_k`` and ``<block>.to_v`` with weights of shape ``(d_out, d_ctx)``
(``d_ctx`` = ``host.family.context_dim``: 768 SD1.x, 1024 SD2.x, 2048 SDXL). Blocks are enumerated
from the model (SD1.x/SD2.x 16, SDXL 70), never from a list. Every host uses these names, whatever its own module paths are, so
erasure files and LoRA banks are portable between hosts.

Instrumented forward. ``Host.instrument(linears=..., attention=...)`` is a context manager that,
while open, routes the cross-attention of the UNet through our code and is fully undone on exit
(also on error or interrupt); the host's model is never mutated:

* ``linears[name](context) -> projected`` replaces ``to_k`` / ``to_v`` of that block
  (``context``: (B, L, d_ctx) -> (B, L, d_out), L = ``host.max_length``); used for LoRA and trial weights.
* the yielded ``unet(x_t, t, context[, pooled])``: families with a pooled text channel (SDXL) need
  ``pooled = host.encode_pooled(prompts)``; hosts without one may omit that argument.
* ``attention(block, q, k, v, heads) -> out`` replaces the scaled-dot-product attention of the
  block: ``q`` (B, N, heads·d), ``k``/``v`` (B, 77, heads·d) already projected; it returns
  (B, N, heads·d) *before* ``to_out``. ``mace_ops.attention`` implements an explicit softmax
  version that hands the probabilities to a sink.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..family import ModelFamily

LinearFn = Callable[[Tensor], Tensor]
AttentionFn = Callable[[str, Tensor, Tensor, Tensor, int], Tensor]
UNetFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CrossAttentionBlock:
    """One cross-attention block of the UNet, by its LDM name."""

    name: str  # "input_blocks.1.1.transformer_blocks.0.attn2"
    heads: int
    dim_head: int
    d_out: int  # heads * dim_head: rows of to_k / to_v
    d_ctx: int  # columns of to_k / to_v (768 for SD1.x)


@runtime_checkable
class Host(Protocol):
    """What the MACE core needs from a host. See the module docstring for names and shapes."""

    #: token positions per prompt (77 for every supported family)
    max_length: int
    #: the model family (``mace_ops.family``): context width, encoders, padding, VAE scale, prediction
    family: ModelFamily

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, padded/truncated exactly as the host feeds its text encoder."""
        ...

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Per-token text-encoder hidden states, (B, max_length, d_ctx), float32, no grad."""
        ...

    def encode_pooled(self, prompts: Sequence[str]) -> Tensor | None:
        """The pooled text embedding the UNet also reads (SDXL: bigG's, (B, 1280)); None when the family has none."""
        ...

    def text_encoder_fingerprint(self) -> str:
        """A stable hash of the text-encoder weights (keys the preservation cache)."""
        ...

    def model_fingerprint(self) -> str:
        """A stable hash of the original to_k/to_v weights (keys banks and erasure files)."""
        ...

    def cross_attention_blocks(self) -> list[CrossAttentionBlock]:
        """The UNet's cross-attention blocks in forward order."""
        ...

    def cross_attention_weights(self) -> dict[str, Tensor]:
        """``{"<block>.to_k": W, "<block>.to_v": W}``: detached copies of the current weights."""
        ...

    def with_weights(self, weights: dict[str, Tensor]) -> Host:
        """A new host whose to_k/to_v are ``weights`` (others unchanged); this host is untouched."""
        ...

    def instrument(
        self,
        *,
        linears: dict[str, LinearFn] | None = None,
        attention: AttentionFn | None = None,
    ) -> AbstractContextManager[UNetFn]:
        """Open an instrumented UNet: yields ``unet(x_t (B,4,h,w), t (B,), context (B,77,d_ctx)) -> eps``.

        Gradients flow when the caller enables them; the host's own parameters stay frozen.
        """
        ...

    def alphas_cumprod(self) -> Tensor:
        """The training noise schedule, (num_train_timesteps,) float64 (1000 for SD1.x)."""
        ...

    def vae_encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8)."""
        ...

    def vae_decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images (B, 3, H, W) in [-1, 1]."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int,
        steps: int = 30,
        cfg: float = 7.5,
        height: int = 512,
        width: int = 512,
        attention_probe: Callable[[str, Tensor], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Sample images (B, 3, H, W) in [-1, 1], seeded (prompt i uses seed ``seed + i``).

        ``attention_probe(block, probs)`` receives, at every sampler step, the softmax attention
        probabilities of the *conditional* branch only, (B, heads, N, 77).
        ``progress(step, total)`` is called after each sampler step.
        """
        ...


def check_generate_args(prompts: Sequence[str], *, steps: int, height: int, width: int) -> list[str]:
    """The checks every host's ``generate`` makes on its arguments; returns the prompts as a list."""
    from ..errors import MaceError

    prompts = list(prompts)
    if not prompts:
        raise MaceError("generate: give at least one prompt")
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise MaceError(f"image size {height}x{width}: height and width must be positive multiples of 8")
    if steps < 1:
        raise MaceError(f"steps={steps}: give at least one sampler step")
    return prompts


def check_matrix_names(what: str, given: Iterable[str], known: Mapping[str, object] | set[str]) -> None:
    """Refuse names in ``given`` that are not in ``known`` (``what``: "weights" or "linears")."""
    from ..errors import MaceError

    unknown = [n for n in given if n not in known]
    if unknown:
        raise MaceError(f"{what} for unknown matrices {unknown[:3]}: names must be '<block>.to_k' / '.to_v'")


def check_weight_shapes(weights: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse a weight whose shape is not ``shapes[name]`` (every name of ``weights`` is in ``shapes``)."""
    from ..errors import MaceError

    for n, w in weights.items():
        if tuple(w.shape) != shapes[n]:
            raise MaceError(f"weights {n} of shape {tuple(w.shape)}; the model needs {shapes[n]}")


#: Hash format: a changed canonical form must never collide with an old fingerprint.
FINGERPRINT_FORMAT = "mace-weights/fp16-canonical/1"


def canonical_weight_bytes(weight: Tensor) -> bytes:
    """The bytes a weight is hashed by: float tensors rounded to IEEE fp16 (nearest-even, on the CPU,
    via the exact widening to float32), little-endian; other tensors as little-endian int64."""
    w = weight.detach().to("cpu")
    if w.is_floating_point():
        return w.to(torch.float32).to(torch.float16).contiguous().numpy().astype("<f2", copy=False).tobytes()
    return w.to(torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes()


def weights_fingerprint(weights: Mapping[str, Tensor], names: Sequence[str]) -> str:
    """sha256 over a format tag, then ``name, shape, canonical_weight_bytes`` of ``weights[name]`` for
    ``names`` in order. It does not depend on the precision the model was loaded in.

    Why fp16 is the canonical form, for a weight file of dtype D loaded in precision L:
    - D = fp16, L = fp32 or fp16: the values are the same (widening is exact), so is their rounding;
    - D = fp32, L = fp32 or fp16: rounding to fp16 is idempotent, ``fp16(fp16(x)) = fp16(x)``;
    - D = bf16, any L: bf16 → fp32 is exact, and bf16 → fp16 is the same rounding of the same value.
    Not covered: a bf16 load of an fp16/fp32 file: it dropped 3+ bits the other copies keep, and no
    rounding can undo that (any grid coarser than both still splits pairs that sit near its
    boundaries, and a model has millions of entries); such a copy has its own fingerprint. The price:
    weights that differ only below fp16's resolution (2⁻¹¹ relative, 2⁻²⁴ absolute under 2⁻¹⁴)
    share a fingerprint, and |w| > 65504 hashes as ±inf.
    """
    h = hashlib.sha256(f"{FINGERPRINT_FORMAT}\n".encode())
    for name in names:
        w = weights[name]
        h.update(f"{name}:{tuple(w.shape)}\n".encode())
        h.update(canonical_weight_bytes(w))
    return h.hexdigest()


def sd1_block_names() -> list[str]:
    """The 16 cross-attention block names of SD1.x in forward order (tests and benchmarks; hosts
    enumerate their blocks from the model)."""
    ins = [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (1, 2, 4, 5, 7, 8)]
    mid = ["middle_block.1.transformer_blocks.0.attn2"]
    outs = [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(3, 12)]
    return ins + mid + outs


def matrix_names(blocks: Sequence[str]) -> list[str]:
    """``[b.to_k, b.to_v for b in blocks]`` in a fixed order."""
    return [f"{b}.{m}" for b in blocks for m in ("to_k", "to_v")]


__all__ = [
    "FINGERPRINT_FORMAT",
    "AttentionFn",
    "CrossAttentionBlock",
    "Host",
    "LinearFn",
    "UNetFn",
    "canonical_weight_bytes",
    "check_generate_args",
    "check_matrix_names",
    "check_weight_shapes",
    "matrix_names",
    "sd1_block_names",
    "weights_fingerprint",
]
