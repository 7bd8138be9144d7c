"""Hardening CFR against concept inversion (RECE-style): invert, add the recovered token, re-solve.

Concept inversion (``mace_ops.inversion``) learns a token embedding ``v_c`` that makes the erased model
draw concept ``c`` again; on CFR-only erasures it is the attack that brings most back (benchmarks/README,
"Robustness"). Hardening turns each recovered token into more CFR pairs, for ``N`` rounds::

    W_0' = CFR(C, G)                                         # the ordinary refinement, W = W0 · M
    round r = 1..N, for every concept c:
        v_c,r  = invert_concept(model with W_{r-1}', x_c)      # x_c: the ORIGINAL model's images of c
        (C_r, G_r) += aligned pairs (template(*; v_c,r) -> template(anchor_c))   # the concept's templates
    W_r' = W0 · M(C + w Σ_{s≤r} C_s,  G + w Σ_{s≤r} G_s)      # closed_form.add_recovered_pairs

so every recovered token's states are mapped onto the anchor's, as the phrase's are. The math is in
``closed_form``; this module only orchestrates. The hardening's own attack is held out from the
probe's: its images come from ``training_prompt(c)`` at seeds ``seed + 50_000 + 1000·i`` (the probe's
from the concept's own prompts at ``probe seed + 10_000``), its inversion uses the kind's templates
after the fifth (the probe's the first five) and seeds ``seed + 50_000 + r``.
It needs a host with a transformers text encoder (the diffusers host; not the ComfyUI host).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .closed_form import Preservation, add_recovered_pairs, refine_cross_attention
from .concepts import Concept, concept_prompt_pairs, templates_for, training_prompt
from .errors import MaceError
from .inversion import PLACEHOLDER, invert_concept, placeholder_embedding, placeholder_id
from .statistics import SecondMoment
from .tokens import aligned_rows

#: the hardening's seeds start here (above the probe's ``seed + 10_000`` / ``+ 20_000``)
SEED_OFFSET = 50_000
#: the probe inverts with the kind's first templates; hardening with the rest (held out)
PROBE_TEMPLATES = 5

Progress = Callable[[str, int, int, Mapping[str, Any]], None]


@dataclass(frozen=True)
class HardenConfig:
    """``rounds`` of invert-and-re-solve; ``images`` original-model images per concept; the inversion's
    ``steps`` and ``lr`` (defaults: the probe's); ``weight`` w of the recovered pairs (1: as the phrase's)."""

    rounds: int = 0
    images: int = 8
    steps: int = 200
    lr: float = 5e-3
    weight: float = 1.0

    def check(self) -> HardenConfig:
        for name, least in (("rounds", 0), ("images", 1), ("steps", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise MaceError(f"harden {name} = {value!r}: give a whole number >= {least}")
        if not (math.isfinite(float(self.lr)) and self.lr > 0):
            raise MaceError(f"harden lr = {self.lr}: give a positive learning rate (e.g. 5e-3)")
        if not (math.isfinite(float(self.weight)) and self.weight >= 0):
            raise MaceError(f"harden weight = {self.weight}: give a finite number >= 0 (1: as the phrase's pairs)")
        return self


def recovered_pair_moments(host: Any, concept: Concept, vector: Tensor, cross: SecondMoment | None = None,
                           gram: SecondMoment | None = None) -> tuple[SecondMoment, SecondMoment]:
    """Add the aligned pairs ``(e_r, e_g)`` of ``template(*)`` (``*`` read as ``vector``) and
    ``template(anchor)`` over the concept's templates to ``cross`` (``Σ e_g e_rᵀ``) and ``gram`` (``Σ e_r e_rᵀ``)."""
    pairs = concept_prompt_pairs(Concept(PLACEHOLDER, concept.anchor, concept.kind))
    f_prompts, g_prompts = [f for f, _ in pairs], [g for _, g in pairs]
    with placeholder_embedding(host, vector):
        e_r = host.encode(f_prompts)  # (P, 77, d)
    e_g = host.encode(g_prompts)  # (P, 77, d)
    x_r, x_g = aligned_rows(e_r, e_g, host.token_ids(f_prompts), host.token_ids(g_prompts))  # (m, d) each
    cross = cross if cross is not None else SecondMoment(x_r.shape[-1])
    gram = gram if gram is not None else SecondMoment(x_r.shape[-1])
    cross.add(x_g, x_r)
    gram.add(x_r)
    return cross, gram


def _init_word(host: Any, anchor: str) -> str:
    """The anchor's last word when it is one token (the probe starts there too), else the placeholder."""
    word = anchor.split()[-1] if anchor.split() else PLACEHOLDER
    try:
        placeholder_id(host, word)
    except MaceError:
        return PLACEHOLDER
    return word


def harden_refinement(
    host: Any,
    concepts: Sequence[Concept],
    original: Mapping[str, Tensor],
    cross: SecondMoment,
    gram: SecondMoment,
    config: HardenConfig,
    *,
    preserve: Sequence[Preservation] = (),
    ridge: float = 0.0,
    relative_ridge: float = 0.0,
    sampler: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """``(W_N', record)``: CFR of ``original`` (W0) on ``cross``/``gram`` hardened for ``config.rounds``
    rounds (see the module docstring). ``host`` is the ORIGINAL model (it draws the images);
    ``sampler``: ``generate`` keywords (steps, cfg, height, width). ``record``: per round and concept
    the inversion's first and last loss and the recovered ``vector`` (d_emb,)."""
    config.check()
    solve = dict(preserve=preserve, ridge=ridge, relative_ridge=relative_ridge)
    weights = refine_cross_attention(original, cross, gram, **solve)
    if config.rounds == 0:
        return weights, []
    images = {c.phrase: host.generate([training_prompt(c)] * config.images, seed=seed + SEED_OFFSET + 1000 * i,
                                      **dict(sampler or {})) for i, c in enumerate(concepts)}
    rec_cross = rec_gram = None
    record: list[dict[str, Any]] = []
    total = config.rounds * len(concepts)
    for r in range(config.rounds):
        erased = host.with_weights(weights)
        for i, c in enumerate(concepts):
            if check_interrupt is not None:
                check_interrupt()
            templates = list(templates_for(c.kind)[PROBE_TEMPLATES:]) or list(templates_for(c.kind))
            vector, losses = invert_concept(erased, images[c.phrase], templates, steps=config.steps, lr=config.lr,
                                            init_word=_init_word(host, c.anchor), seed=seed + SEED_OFFSET + r)
            rec_cross, rec_gram = recovered_pair_moments(host, c, vector, rec_cross, rec_gram)
            record.append({"round": r + 1, "concept": c.phrase, "loss_first": losses[0], "loss_last": losses[-1],
                           "vector": vector})
            if progress is not None:
                progress("harden", r * len(concepts) + i + 1, total, {"concept": c.phrase, "loss": losses[-1]})
        c2, g2 = add_recovered_pairs(cross, gram, [(rec_cross, rec_gram)], config.weight)
        weights = refine_cross_attention(original, c2, g2, **solve)
    return weights, record


__all__ = ["HardenConfig", "SEED_OFFSET", "harden_refinement", "recovered_pair_moments"]
