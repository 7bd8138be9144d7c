"""The MACE pipeline on any host: refine (CFR) -> training data -> LoRAs -> fusion -> Erasure.

Stages (DESIGN 2.2-2.4); each is usable alone (the ComfyUI nodes call them one by one)::

    stats   = preservation_statistics(host, prompts, retained_prompts)       # cached Gram means
    W1      = refine_weights(host, concepts, stats.groups(w_p, w_r), ridge)  # CFR: W1 = W0 · M
    data    = generate_training_data(host, concepts, ...)                    # mace_ops.data
    bank, L = train_concept_loras(host.with_weights(W1), data, config)       # mace_ops.train
    W*      = fuse_weights(host, W1, bank, concepts, stats.groups(...), ridge)
    erasure = run_erasure(host, concepts, ...)                               # all of it

The statistics are streamed one concept at a time (never all token vectors at once), so memory does
not grow with the number of concepts. The host is never mutated: new weights travel as tensors and
``host.with_weights`` gives a patched view.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .closed_form import FusionProblem, Preservation, refine_cross_attention
from .concepts import Concept, Preset, concept_prompt_pairs, concept_prompts
from .erasure import Erasure
from .errors import MaceError
from .harden import HardenConfig, harden_refinement
from .hosts.base import Host
from .lora import LoRABank
from .preservation import cached_preservation_moments, default_corpus, preservation_moments
from .progress import ProgressCallback
from .statistics import SecondMoment
from .tokens import aligned_rows, ids_fit, phrase_positions
from .train import TrainConfig

Interrupt = Callable[[], None]


def _no_progress(stage: str, done: int, total: int, info: Mapping[str, Any]) -> None:
    return None


def _no_interrupt() -> None:
    return None


@dataclass
class ErasureSettings:
    """Every knob of a run. Preservation weights are scale-free: ``w`` multiplies the MEAN squared
    error over a group's tokens (``w = λ_ref · N_ref`` reproduces the reference; see
    ``mace_ops.concepts``). ``ridge`` is the absolute ``λ ||W - W_prev||²_F``; ``relative_ridge`` ε adds
    ``ε · tr(K)/d`` to it (``closed_form.effective_ridge``: the least-change solution where the tokens
    leave directions undetermined). ``fusion_relative_ridge`` (None: ``relative_ridge``) is the fusion's
    own ε; ``fusion_tokens`` picks the fusion's ``E_i`` (``concept_moments``). Defaults: 100 celebrities."""

    cfr_preserve: float = 0.4749
    cfr_retained: float = 0.0
    fusion_preserve: float = 4749.0
    fusion_retained: float = 0.0
    ridge: float = 0.0
    relative_ridge: float = 1e-6
    fusion_relative_ridge: float | None = None
    fusion_tokens: str = "all"
    n_images: int = 8
    sample_steps: int = 30
    cfg: float = 7.5
    image_size: int = 512
    seed: int = 0
    #: the ``fast`` mode: CFR's closed form only (seconds), no training data, LoRAs or fusion
    closed_form_only: bool = False
    #: hardening against concept inversion after CFR (``mace_ops.harden``): rounds (0: off), original-model
    #: images per concept, inversion steps / lr, weight of the recovered token's pairs
    harden_rounds: int = 0
    harden_images: int = 8
    harden_steps: int = 200
    harden_lr: float = 5e-3
    harden_weight: float = 1.0
    #: SDXL: also edit label_emb's pooled-text columns in closed form (``mace_ops.pooled``); off by
    #: default (held-out drift measured in benchmarks/README.md); ``pooled_preserve``: its preservation weight
    pooled_channel: bool = False
    pooled_preserve: float = 1.0
    # 8 concepts share a forward: bounds memory on full-size models, and an interrupt loses at most 8.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(concepts_per_batch=8))

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> ErasureSettings:
        """The preset's weights and training schedule; ``overrides`` replace any field."""
        w, base = preset.weights, cls().train
        train = dataclasses.replace(
            base,
            steps=int(preset.train.get("steps", base.steps)),
            lr=float(preset.train.get("lr", base.lr)),
            timesteps=str(preset.train.get("timesteps", base.timesteps)),
        )
        settings = cls(
            cfr_preserve=float(w.get("cfr_preserve", 0.0)),
            cfr_retained=float(w.get("cfr_retained", 0.0)),
            fusion_preserve=float(w.get("fusion_preserve", 0.0)),
            fusion_retained=float(w.get("fusion_retained", 0.0)),
            ridge=float(w.get("ridge", 0.0)),
            train=train,
        )
        return dataclasses.replace(settings, **overrides)

    def fusion_ridge_epsilon(self) -> float:
        """The fusion's relative ridge ε: ``fusion_relative_ridge``, or ``relative_ridge`` when unset."""
        return self.relative_ridge if self.fusion_relative_ridge is None else self.fusion_relative_ridge

    def harden(self) -> HardenConfig:
        """The hardening fields as a checked ``HardenConfig``."""
        return HardenConfig(self.harden_rounds, self.harden_images, self.harden_steps, self.harden_lr,
                            self.harden_weight).check()

    def as_metadata(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"] = self.train.result_dict()
        return d


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class PreservationStatistics:
    """Second moments of the general preservation prompts and of the optional retained group."""

    general: SecondMoment | None
    retained: SecondMoment | None = None

    def groups(self, general_weight: float, retained_weight: float = 0.0) -> list[Preservation]:
        """The weighted groups for one stage (groups with weight 0 or no prompts are left out)."""
        out = []
        for moments, w in ((self.general, general_weight), (self.retained, retained_weight)):
            if moments is not None and moments.count > 0 and w > 0:
                out.append(Preservation(moments, float(w)))
        return out


def preservation_statistics(
    host: Host,
    prompts: Sequence[str] | None = None,
    retained: Sequence[str] = (),
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    check_interrupt: Interrupt | None = None,
) -> PreservationStatistics:
    """``Σ e eᵀ`` over all 77 positions of every preservation prompt (default: our corpus) and of the
    retained group's prompts; cached on disk by text-encoder fingerprint when ``cache_dir`` is set."""
    emit = progress or _no_progress
    prompts = list(default_corpus() if prompts is None else prompts)

    def moments(group: Sequence[str], label: str) -> SecondMoment | None:
        if not group:
            return None

        def step(done: int, total: int) -> None:
            emit("preservation", done, total, {"group": label})

        kwargs = dict(progress=step, check_interrupt=check_interrupt)
        if cache_dir is None:
            return preservation_moments(host.encode, group, **kwargs)
        return cached_preservation_moments(
            host.encode, group, fingerprint=host.text_encoder_fingerprint(), cache_dir=cache_dir, **kwargs
        )

    return PreservationStatistics(moments(prompts, "general"), moments(list(retained), "retained"))


def _check_prompt_lengths(
    concept: Concept, role: str, prompts: Sequence[str], ids: Sequence[Sequence[int]], limit: int
) -> None:
    """Refuse a concept whose phrase or anchor prompt would be truncated (``tokens.ids_fit``)."""
    for prompt, row in zip(prompts, ids, strict=True):
        if not ids_fit(row, limit):
            raise MaceError(
                f"concept {concept.phrase!r} -> {concept.anchor!r}: the prompt {prompt!r} exceeds {limit} tokens; "
                f"shorten the {role}"
            )


def concept_pair_moments(
    host: Host,
    concepts: Sequence[Concept],
    *,
    progress: ProgressCallback | None = None,
    check_interrupt: Interrupt | None = None,
) -> tuple[SecondMoment, SecondMoment]:
    """CFR statistics over the aligned token pairs of every concept prompt and its anchor twin:
    ``C = Σ e_g e_fᵀ`` (cross) and ``G = Σ e_f e_fᵀ`` (gram), streamed one concept at a time."""
    emit, check = progress or _no_progress, check_interrupt or _no_interrupt
    cross = gram = None
    anchors: dict[tuple[str, ...], tuple[Tensor, list[list[int]]]] = {}  # anchor prompts -> (E_g, ids)
    for i, concept in enumerate(concepts):
        check()
        pairs = concept_prompt_pairs(concept)
        f_prompts, g_prompts = [p for p, _ in pairs], tuple(a for _, a in pairs)
        ids_f = host.token_ids(f_prompts)
        _check_prompt_lengths(concept, "phrase", f_prompts, ids_f, host.max_length)
        if g_prompts not in anchors:  # many concepts share an anchor ("a person"): encode its prompts once
            ids_g = host.token_ids(g_prompts)
            _check_prompt_lengths(concept, "anchor", g_prompts, ids_g, host.max_length)
            anchors[g_prompts] = (host.encode(g_prompts), ids_g)
        e_f, (e_g, ids_g) = host.encode(f_prompts), anchors[g_prompts]  # (n, 77, d) each
        x_f, x_g = aligned_rows(e_f, e_g, ids_f, ids_g)  # (m, d) each
        if cross is None:
            cross, gram = SecondMoment(x_f.shape[-1]), SecondMoment(x_f.shape[-1])
        cross.add(x_g, x_f)
        gram.add(x_f)
        emit("refine", i + 1, len(concepts), {"concept": concept.phrase})
    if cross is None:
        raise MaceError("the concept list is empty: give at least one concept to erase")
    return cross, gram


FUSION_TOKENS = ("all", "phrase")


def concept_moments(host: Host, concept: Concept, tokens: str = "all") -> SecondMoment:
    """``G_i = Σ_{e∈E_i} e eᵀ`` over the concept's prompts (the fusion's ``E_i``): every position
    (``tokens="all"``, the reference) or only the positions of the phrase's own tokens (``"phrase"``:
    the template words, the end token and the padding, which every prompt shares, are then held by the
    preservation term and the ridge instead of being asked to carry the concept's LoRA)."""
    if tokens not in FUSION_TOKENS:
        raise MaceError(f"fusion_tokens {tokens!r}: use one of {', '.join(FUSION_TOKENS)}")
    prompts = concept_prompts(concept)
    emb = host.encode(prompts)  # (n, L, d)
    if tokens == "all":
        return SecondMoment(emb.shape[-1]).add(emb)
    phrase_ids = host.token_ids([concept.phrase])[0]
    rows = []
    for e, ids in zip(emb, host.token_ids(prompts), strict=True):
        where = phrase_positions(ids, phrase_ids)
        if not where:
            raise MaceError(f"concept {concept.phrase!r}: its tokens are not found in the prompt "
                            f"{prompts[len(rows)]!r}; use fusion_tokens='all'")
        rows.append(e[where])  # (k, d)
    return SecondMoment(emb.shape[-1]).add(torch.cat(rows))


# --------------------------------------------------------------------------------------------------
# Stages


def float32_weights(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The weights as float32 (an exact widening of fp16/bf16): the stages' results stay float32 and
    are rounded to the model's dtype once, when written into it (``Host.with_weights``, the
    checkpoint writer). Rounding an intermediate ``W1`` to bf16 would move it by up to 2⁻⁹ of each
    entry, more than the whole CFR edit of a weakly-weighted concept."""
    return {k: v if v.dtype == torch.float32 else v.float() for k, v in weights.items()}


def refine_weights(
    host: Host,
    concepts: Sequence[Concept],
    preserve: Sequence[Preservation] = (),
    ridge: float = 0.0,
    *,
    relative_ridge: float = 1e-6,
    original: Mapping[str, Tensor] | None = None,
    progress: ProgressCallback | None = None,
    check_interrupt: Interrupt | None = None,
) -> dict[str, Tensor]:
    """Stage 1, CFR: ``{name: W0 · M}`` for every to_k/to_v of ``host`` (DESIGN 2.2); ``W0`` is the host's
    unless ``original`` gives it. Solved in float64; the results are float32 whatever the model's dtype."""
    cross, gram = concept_pair_moments(host, concepts, progress=progress, check_interrupt=check_interrupt)
    w0 = float32_weights(original if original is not None else host.cross_attention_weights())
    return refine_cross_attention(w0, cross, gram, preserve, ridge, relative_ridge)


def harden_weights(
    host: Host,
    concepts: Sequence[Concept],
    settings: ErasureSettings,
    preserve: Sequence[Preservation] = (),
    *,
    original: Mapping[str, Tensor] | None = None,
    progress: ProgressCallback | None = None,
    check_interrupt: Interrupt | None = None,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Stage 1 hardened against concept inversion (``mace_ops.harden``): CFR, then
    ``settings.harden_rounds`` rounds of inverting each concept on the erased model and re-solving CFR
    with the recovered token's pairs added. ``host`` is the ORIGINAL model. Returns (weights, record)."""
    cross, gram = concept_pair_moments(host, concepts, check_interrupt=check_interrupt)
    w0 = float32_weights(original if original is not None else host.cross_attention_weights())
    sampler = dict(steps=settings.sample_steps, cfg=settings.cfg, height=settings.image_size,
                   width=settings.image_size)
    return harden_refinement(host, concepts, w0, cross, gram, settings.harden(), preserve=preserve,
                             ridge=settings.ridge, relative_ridge=settings.relative_ridge, sampler=sampler,
                             seed=settings.seed, progress=progress, check_interrupt=check_interrupt)


def fuse_weights(
    host: Host,
    refined: Mapping[str, Tensor],
    bank: LoRABank,
    concepts: Sequence[Concept],
    preserve: Sequence[Preservation] = (),
    ridge: float = 0.0,
    *,
    relative_ridge: float = 1e-6,
    original: Mapping[str, Tensor] | None = None,
    progress: ProgressCallback | None = None,
    check_interrupt: Interrupt | None = None,
    tokens: str = "all",
) -> dict[str, Tensor]:
    """Stage 3: closed-form fusion of every concept's LoRA into the refined weights (DESIGN 2.4).

    ``host`` is the ORIGINAL model (its to_k/to_v are ``W0`` unless ``original`` is given); ``refined``
    is ``W1``; each concept's LoRA is looked up in ``bank`` by phrase; ``tokens``: which positions form
    ``E_i`` (``concept_moments``). Solved in float64; the results are
    float32 whatever the model's dtype."""
    emit, check = progress or _no_progress, check_interrupt or _no_interrupt
    missing = [c.phrase for c in concepts if c.phrase not in bank.concepts]
    if missing:
        raise MaceError(f"the LoRA bank has no LoRA for {missing[:5]}: train these concepts first")
    W0 = float32_weights(original if original is not None else host.cross_attention_weights())
    problem = FusionProblem(float32_weights(refined), W0, preserve, ridge, relative_ridge=relative_ridge)
    for i, concept in enumerate(concepts):
        check()
        problem.add_concept(concept_moments(host, concept, tokens), bank.factors(bank.index(concept.phrase)))
        emit("fuse", i + 1, len(concepts), {"concept": concept.phrase})
    return problem.solve()


def run_erasure(
    host: Host,
    concepts: Sequence[Concept],
    *,
    preservation_prompts: Sequence[str] | None = None,
    retained_prompts: Sequence[str] = (),
    settings: ErasureSettings | None = None,
    user_images: Mapping[str, Tensor] | None = None,
    user_masks: Mapping[str, Tensor] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    check_interrupt: Interrupt | None = None,
    engine: Any = None,
) -> Erasure:
    """Run the whole MACE pipeline on ``host`` (never mutated) and return the Erasure.

    With ``cache_dir`` the preservation statistics, training images/masks and each finished concept's
    LoRA are kept there, so an interrupted run resumes where it stopped. ``engine``
    (``mace_ops.engines.Engine``: ``LocalPool``, ``RayEngine``) makes the training data and the LoRAs
    per concept on its workers (their host must be ``host``'s model); fusion stays here."""

    settings = settings or ErasureSettings()
    settings.harden()  # refuse bad hardening settings before any work
    concepts = list(concepts)
    if not concepts:
        raise MaceError("the concept list is empty: give at least one concept to erase")
    emit = progress or _no_progress
    cache = Path(cache_dir) if cache_dir is not None else None

    if settings.pooled_channel and getattr(host, "label_emb_weight", lambda: None)() is None:
        raise MaceError("the pooled-channel option needs an SDXL base model (only SDXL feeds a pooled text "
                        "embedding to label_emb); turn it off for SD1.x / SD2.x")
    stats = preservation_statistics(
        host, preservation_prompts, retained_prompts, cache_dir=cache, progress=emit,
        check_interrupt=check_interrupt,
    )
    original = host.cross_attention_weights()
    refined = refine_weights(
        host, concepts, stats.groups(settings.cfr_preserve, settings.cfr_retained), settings.ridge,
        relative_ridge=settings.relative_ridge, original=original, progress=emit, check_interrupt=check_interrupt,
    )
    hardening: list[dict[str, Any]] = []
    if settings.harden_rounds > 0:
        refined, hardening = harden_weights(
            host, concepts, settings, stats.groups(settings.cfr_preserve, settings.cfr_retained), original=original,
            progress=emit, check_interrupt=check_interrupt,
        )
    if settings.closed_form_only:
        return _with_pooled(_erasure(host, refined, concepts, settings, losses={}, hardening=hardening), host,
                            concepts, preservation_prompts, retained_prompts, settings)
    if engine is None:
        bank, losses = _train_here(host, concepts, refined, settings, user_images, user_masks, cache, emit,
                                   check_interrupt)
    else:
        bank, losses = _train_on(engine, host, concepts, refined, settings, user_images, user_masks, cache, emit,
                                 check_interrupt)
    fused = fuse_weights(
        host, refined, bank, concepts, stats.groups(settings.fusion_preserve, settings.fusion_retained),
        settings.ridge, relative_ridge=settings.fusion_ridge_epsilon(), original=original, progress=emit,
        check_interrupt=check_interrupt, tokens=settings.fusion_tokens,
    )
    return _with_pooled(_erasure(host, fused, concepts, settings, losses, hardening=hardening), host, concepts,
                        preservation_prompts, retained_prompts, settings)


def _with_pooled(erasure: Erasure, host: Host, concepts: list[Concept], preservation_prompts: Sequence[str] | None,
                 retained_prompts: Sequence[str], settings: ErasureSettings) -> Erasure:
    """``erasure`` with SDXL's pooled-channel edit (``settings.pooled_channel``): concepts' pooled
    embeddings mapped to their anchors', the preservation and retained prompts' kept."""
    if not settings.pooled_channel:
        return erasure
    from .pooled import pooled_channel_edit

    keep = list(default_corpus() if preservation_prompts is None else preservation_prompts) + list(retained_prompts)
    new = pooled_channel_edit(host, concepts, keep, preserve_weight=settings.pooled_preserve, ridge=settings.ridge,
                              relative_ridge=settings.relative_ridge)
    erasure.label_emb_diff = (new.float() - host.label_emb_weight().float()).cpu()
    return erasure


def _erasure(host: Host, weights: Mapping[str, Tensor], concepts: list[Concept], settings: ErasureSettings,
             losses: Mapping[str, Any], hardening: Sequence[Mapping[str, Any]] = ()) -> Erasure:
    rounds = [{k: v for k, v in h.items() if k != "vector"} for h in hardening]  # the record, not the vectors
    return Erasure.build(weights, base_fingerprint=host.model_fingerprint(), concepts=concepts, source="run_erasure",
                         settings=settings.as_metadata(), losses=losses, hardening=rounds)


def _train_here(
    host: Host, concepts: list[Concept], refined: Mapping[str, Tensor], settings: ErasureSettings,
    user_images: Mapping[str, Tensor] | None, user_masks: Mapping[str, Tensor] | None, cache: Path | None,
    emit: ProgressCallback, check_interrupt: Interrupt | None,
) -> tuple[LoRABank, dict[str, list[float]]]:
    """Training data and LoRAs in this process (batched: ``settings.train.concepts_per_batch``)."""
    from .data import generate_training_data
    from .train import train_concept_loras

    data = generate_training_data(
        host, concepts, token_ids=host.token_ids, n_images=settings.n_images, seed=settings.seed,
        steps=settings.sample_steps, cfg=settings.cfg, size=settings.image_size,
        user_images=user_images, user_masks=user_masks,
        cache_dir=None if cache is None else cache / "data",
        progress=lambda done, total, phrase: emit("data", done, total, {"concept": phrase}),
        check_interrupt=check_interrupt,
    )
    return train_concept_loras(
        host.with_weights(refined), data, settings.train, token_ids=host.token_ids, base_weights=refined,
        progress=lambda step, total, phrase, loss: emit("train", step, total, {"concept": phrase, "loss": loss}),
        check_interrupt=check_interrupt, cache_dir=None if cache is None else cache / "loras",
    )


def _train_on(
    engine: Any, host: Host, concepts: list[Concept], refined: Mapping[str, Tensor], settings: ErasureSettings,
    user_images: Mapping[str, Tensor] | None, user_masks: Mapping[str, Tensor] | None, cache: Path | None,
    emit: ProgressCallback, check_interrupt: Interrupt | None,
) -> tuple[LoRABank, dict[str, list[float]]]:
    """Training data and LoRAs per concept on the engine's workers (``mace_ops.engines``)."""
    from .concept_task import DataSettings
    from .engines import make_job, train_on_engine

    data = DataSettings(settings.n_images, settings.seed, settings.sample_steps, settings.cfg, settings.image_size)
    worker_cache = cache if cache is not None and engine.shares_files else None
    job = make_job(refined, host.model_fingerprint(), data, settings.train, worker_cache)
    return train_on_engine(
        engine, job, concepts, user_images=user_images, user_masks=user_masks,
        cache_dir=None if cache is None else cache / "tasks", progress=emit, check_interrupt=check_interrupt,
    )
