"""SDXL's pooled text channel: a closed-form edit of ``label_emb``'s pooled columns.

SDXL reads a prompt twice: its token states through every cross-attention block, and bigG's pooled
embedding ``y`` (1280) through ``label_emb``, whose first linear layer ``W = label_emb.0.0.weight``
(d_t, 2816) takes ``[y; s]`` (``s``: the 6 × 256 size embeddings) and feeds every ResBlock. An edit of
the cross-attention alone leaves ``y`` untouched: the concept still reaches the UNet through it.

Only the pooled columns ``P = W[:, :1280]`` see the text. Their edit is CFR's objective on this one
matrix, with one pooled vector per prompt instead of one state per token::

    min_P Σ_pairs ||P y_f − P0 y_g||² + Σ_k w_k mean_{y∈k} ||P y − P0 y||² + λ ||P − P0||²_F
    P = P0 · M_p,   M_p = cfr_right_factor(C_p, G_p, preservation, λ)   (1280 × 1280, float64)

``y_f`` / ``y_g``: pooled embeddings of each concept prompt and its anchor twin (the concept's ~30
templates); preservation: pooled embeddings of the preservation prompts. The size columns and the
bias are unchanged. Host name of the matrix: LDM ``label_emb.0.0`` (diffusers ``add_embedding.linear_1``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from .closed_form import Preservation, cfr_right_factor
from .concepts import Concept, concept_prompt_pairs
from .errors import MaceError
from .statistics import SecondMoment

#: LDM name of the edited matrix (state-dict key without ``model.diffusion_model.``)
LABEL_EMB_WEIGHT = "label_emb.0.0.weight"

EncodePooled = Callable[[Sequence[str]], Tensor]  # prompts -> (B, d_pooled)


def pooled_pair_moments(encode_pooled: EncodePooled, concepts: Sequence[Concept]) -> tuple[SecondMoment, SecondMoment]:
    """``C_p = Σ y_g y_fᵀ`` and ``G_p = Σ y_f y_fᵀ`` over every concept prompt and its anchor twin."""
    cross = gram = None
    for concept in concepts:
        pairs = concept_prompt_pairs(concept)
        y_f = encode_pooled([f for f, _ in pairs]).double()  # (n, d_pooled)
        y_g = encode_pooled([g for _, g in pairs]).double()
        if cross is None:
            cross, gram = SecondMoment(y_f.shape[-1]), SecondMoment(y_f.shape[-1])
        cross.add(y_g, y_f)
        gram.add(y_f)
    if cross is None:
        raise MaceError("the concept list is empty: give at least one concept to erase")
    return cross, gram


def pooled_moments(encode_pooled: EncodePooled, prompts: Sequence[str], batch: int = 32) -> SecondMoment:
    """``Σ y yᵀ`` (float64) over the pooled embeddings of ``prompts``, streamed in batches."""
    if not prompts:
        raise MaceError("pooled channel: give at least one preservation prompt")
    moments = None
    for k in range(0, len(prompts), batch):
        y = encode_pooled(list(prompts[k : k + batch])).double()  # (b, d_pooled)
        moments = moments or SecondMoment(y.shape[-1])
        moments.add(y)
    return moments


def edit_pooled_columns(
    weight: Tensor,
    cross: SecondMoment,
    gram: SecondMoment,
    preserve: Sequence[Preservation] = (),
    ridge: float = 0.0,
    relative_ridge: float = 1e-6,
) -> Tensor:
    """``W`` (d_t, d_pooled + d_size) with its first ``d_pooled = gram.dim`` columns replaced by
    ``P0 · M_p``; a new tensor of ``weight``'s dtype and device, the input untouched."""
    d = gram.dim
    if weight.ndim != 2 or weight.shape[1] <= d:
        raise MaceError(f"label_emb weight of shape {tuple(weight.shape)}: needs more than {d} columns "
                        f"(pooled {d} + size embeddings); is it an SDXL base model?")
    factor = cfr_right_factor(cross, gram, preserve, ridge, relative_ridge)  # (d, d) float64
    out = weight.detach().clone()
    out[:, :d] = (weight[:, :d].detach().to(factor) @ factor).to(weight.dtype)
    return out


def pooled_channel_edit(
    host: object,
    concepts: Sequence[Concept],
    preservation_prompts: Sequence[str],
    *,
    preserve_weight: float = 1.0,
    ridge: float = 0.0,
    relative_ridge: float = 1e-6,
) -> Tensor:
    """The edited ``label_emb.0.0.weight`` of an SDXL host (``host.encode_pooled``,
    ``host.label_emb_weight()``): concepts' pooled embeddings mapped to their anchors', the
    preservation prompts' kept with weight ``preserve_weight`` (scale-free: mean over prompts)."""
    encode_pooled = getattr(host, "encode_pooled", None)
    weight = host.label_emb_weight() if hasattr(host, "label_emb_weight") else None
    if encode_pooled is None or weight is None or encode_pooled([""]) is None:
        raise MaceError("pooled channel: the model has no pooled text channel (only SDXL base has one); "
                        "turn the pooled-channel option off")
    cross, gram = pooled_pair_moments(encode_pooled, concepts)
    preserve = [Preservation(pooled_moments(encode_pooled, preservation_prompts), preserve_weight)]
    return edit_pooled_columns(weight, cross, gram, preserve, ridge, relative_ridge)


__all__ = [
    "LABEL_EMB_WEIGHT",
    "edit_pooled_columns",
    "pooled_channel_edit",
    "pooled_moments",
    "pooled_pair_moments",
]
