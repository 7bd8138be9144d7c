"""The MACE nodes (classic ComfyUI node classes, category "MACE").

Nodes only translate sockets and widgets into calls of ``mace_ops`` (the pipeline stages) and back;
``mace_ops`` and ComfyUI are imported inside the methods, so importing this module does no work and
needs neither. Bad input raises ``MaceError`` naming the input and the fix.
"""

from __future__ import annotations

from typing import Any

from .values import (
    CONCEPTS,
    ERASURE,
    LORA_BANK,
    PRESERVATION,
    BankValue,
    ConceptsValue,
    ErasureValue,
    PreservationValue,
)

CATEGORY = "MACE"
#: the sentinel of the weight widgets: use the value of the concept list's preset
FROM_PRESET = -1.0
_PRESET_NOTE = " -1 uses the value of the concept list's preset (or the 100-celebrity default)."


def _float(default: float, lo: float, hi: float, step: float, tooltip: str) -> tuple[str, dict[str, Any]]:
    # round=False: weights span 1e-5 .. 1e4 (e.g. explicit content's 2.3e-5), never round them to the step.
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tooltip})


def _int(default: int, lo: int, hi: int, tooltip: str, step: int = 1) -> tuple[str, dict[str, Any]]:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def _weight(value: float, preset_value: float) -> float:
    return float(preset_value) if value == FROM_PRESET else float(value)


def _need(value: Any, cls: type, name: str, producer: str) -> Any:
    from mace_ops.errors import MaceError

    if not isinstance(value, cls):
        raise MaceError(f"{name} input: expected the output of '{producer}', got {type(value).__name__}")
    return value


def _lines(text: str) -> list[str]:
    from mace_ops.preservation import prompt_lines

    return prompt_lines(text or "")


# ------------------------------------------------------------------------------------------------


class MaceConceptList:
    DESCRIPTION = "The concepts to erase, one 'phrase -> anchor' per line, or a bundled preset."
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (CONCEPTS,)
    RETURN_NAMES = ("concepts",)
    OUTPUT_TOOLTIPS = ("The concept list with the preset's weights and training schedule.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from mace_ops.concepts import list_presets

        return {
            "required": {
                "concepts": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "One concept per line: 'Taylor Swift -> a woman'. A line without '->' uses the "
                               "default anchor; ':: style' or ':: object' at the end gives that line its own "
                               "kind ('Van Gogh -> art :: style'); '#' starts a comment. Leave empty to use "
                               "the preset's list.",
                }),
                "kind": (["object", "style"], {
                    "default": "object",
                    "tooltip": "object: people, things, explicit content (trained with masks); style: artists' "
                               "styles (no masks). The kind of lines without ':: kind'; a preset sets its own.",
                }),
                "default_anchor": ("STRING", {
                    "default": "a person",
                    "tooltip": "The anchor of lines written without '->' (e.g. 'a person', 'art', 'sky').",
                }),
                "preset": (["none", *list_presets()], {
                    "default": "none",
                    "tooltip": "A bundled task: its weights and training schedule; its concept list when the "
                               "text above is empty.",
                }),
            }
        }

    def build(self, concepts: str, kind: str, default_anchor: str, preset: str):
        from mace_ops.concepts import load_preset, parse_concept_list
        from mace_ops.errors import MaceError
        from mace_ops.pipeline import ErasureSettings

        p = None if preset == "none" else load_preset(preset)
        settings = ErasureSettings.from_preset(p) if p is not None else ErasureSettings()
        if _lines(concepts):
            parsed = parse_concept_list(concepts, default_anchor=default_anchor, kind=p.kind if p else kind)
        elif p is not None:
            parsed = list(p.concepts)
        else:
            raise MaceError("concepts input: empty; write one 'phrase -> anchor' per line or choose a preset")
        return (ConceptsValue(parsed, settings, preset=None if p is None else p.name),)


class MacePreservationSet:
    DESCRIPTION = ("Second moments of the prompts whose meaning must not change (cached on disk by text-encoder "
                   "fingerprint and prompt list).")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (PRESERVATION,)
    RETURN_NAMES = ("preservation",)
    OUTPUT_TOOLTIPS = ("Preservation statistics for Refine Cross-Attention and Fuse LoRAs.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (the statistics are of its token states)."}),
                "corpus": (["default", "none"], {
                    "default": "default",
                    "tooltip": "default: MACE's 2,500 everyday captions; none: only the prompts below.",
                }),
                "prompts": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Extra prompts to preserve, one per line ('#' lines are skipped).",
                }),
                "retained": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Names to keep (e.g. celebrities or artists NOT erased), one per line: each is "
                               "expanded with the templates of 'retained_kind' into a second group.",
                }),
                "retained_kind": (["object", "style"], {
                    "default": "object", "tooltip": "Templates for the retained names: object (people) or style.",
                }),
            }
        }

    def build(self, clip: Any, corpus: str, prompts: str, retained: str, retained_kind: str):
        from mace_ops.errors import MaceError
        from mace_ops.pipeline import preservation_statistics
        from mace_ops.preservation import default_corpus, retained_prompts

        from .host import RunProgressBar, cache_dir, check_interrupt

        general = (default_corpus() if corpus == "default" else []) + _lines(prompts)
        names = _lines(retained)
        kept = retained_prompts(names, retained_kind) if names else []
        if not general and not kept:
            raise MaceError("prompts input: no preservation prompts; choose the default corpus or write prompts")
        host = _text_host(clip)
        progress = RunProgressBar({"preservation:general": len(general), "preservation:retained": len(kept)})
        stats = preservation_statistics(
            host, general, kept, cache_dir=cache_dir("preservation"), progress=progress.pipeline,
            check_interrupt=check_interrupt,
        )
        return (PreservationValue(stats, host.text_encoder_fingerprint()),)


def _text_host(clip: Any):
    """A text-only ComfyHost (encode, token ids, text-encoder fingerprint) for CLIP-only nodes."""
    from mace_ops.errors import MaceError
    from mace_ops.hosts.comfy import ComfyHost

    if clip is None or not hasattr(clip, "tokenize"):
        raise MaceError("clip input: expected a CLIP; connect the checkpoint's CLIP output")
    return ComfyHost(None, clip)


def _preserve(value: Any, host: Any) -> PreservationValue:
    from mace_ops.errors import MaceError

    value = _need(value, PreservationValue, "preservation", "MACE Preservation Set")
    if value.text_encoder_fingerprint != host.text_encoder_fingerprint():
        raise MaceError(
            "preservation input: computed with another CLIP (text encoder "
            f"{value.text_encoder_fingerprint[:12]}, this one {host.text_encoder_fingerprint()[:12]}); "
            "feed MACE Preservation Set the same CLIP"
        )
    return value


class MaceRefineCrossAttention:
    DESCRIPTION = ("Stage 1 of MACE: closed-form refinement of every cross-attention to_k/to_v so that the words "
                   "around each concept stop carrying it. Returns a patched copy; the input MODEL is untouched.")
    CATEGORY = CATEGORY
    FUNCTION = "refine"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("refined_model",)
    OUTPUT_TOOLTIPS = ("The model with refined cross-attention (a patched clone; remembers its base model).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x, SD2.x or SDXL model to erase concepts from (never modified)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "concepts": (CONCEPTS, {"tooltip": "From MACE Concept List."}),
                "preservation": (PRESERVATION, {"tooltip": "From MACE Preservation Set (same CLIP)."}),
                "preserve_weight": _float(FROM_PRESET, -1.0, 1e9, 0.001,
                                          "Weight of the general preservation prompts (scale-free)." + _PRESET_NOTE),
                "retained_weight": _float(FROM_PRESET, -1.0, 1e9, 0.001,
                                          "Weight of the retained names' prompts." + _PRESET_NOTE),
                "ridge": _float(FROM_PRESET, -1.0, 1e9, 0.001,
                                "Ridge λ·||W - W0||² keeping the weights near the original." + _PRESET_NOTE),
            }
        }

    def refine(self, model, clip, concepts, preservation, preserve_weight, retained_weight, ridge):
        from mace_ops.hosts.comfy import ComfyHost
        from mace_ops.pipeline import refine_weights

        from .host import RunProgressBar, check_interrupt

        cv = _need(concepts, ConceptsValue, "concepts", "MACE Concept List")
        host = ComfyHost(model, clip)
        pv = _preserve(preservation, host)
        s = cv.settings
        groups = pv.statistics.groups(_weight(preserve_weight, s.cfr_preserve), _weight(retained_weight, s.cfr_retained))
        progress = RunProgressBar({"refine": len(cv.concepts)})
        w1 = refine_weights(host, cv.concepts, groups, _weight(ridge, s.ridge), progress=progress.pipeline,
                            check_interrupt=check_interrupt)
        return (host.with_weights(w1).model,)


class MaceTrainConceptLoRA:
    DESCRIPTION = ("Stage 2 of MACE: one rank-r LoRA per concept on the refined model's to_k/to_v, trained to remove "
                   "the concept's attention inside its mask. Training images come from the ORIGINAL model (or "
                   "yours). Finished concepts are cached, so a re-queue resumes.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (LORA_BANK,)
    RETURN_NAMES = ("lora_bank",)
    OUTPUT_TOOLTIPS = ("One LoRA per concept, with its per-step losses.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "original_model": ("MODEL", {"tooltip": "The model before erasure: it draws the training images."}),
                "refined_model": ("MODEL", {"tooltip": "The output of Refine Cross-Attention: the LoRAs sit on it."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE (encodes the training images)."}),
                "concepts": (CONCEPTS, {"tooltip": "From MACE Concept List."}),
                "steps": _int(0, 0, 10000, "Optimiser steps per concept; 0 uses the preset's (50 by default)."),
                "learning_rate": _float(0.0, 0.0, 1.0, 1e-6,
                                        "AdamW learning rate; 0 uses the preset's (1e-4 people/art, 1e-5 objects)."),
                "rank": _int(1, 1, 64, "LoRA rank (the reference uses 1)."),
                "seed": _int(0, 0, 2**31 - 1, "Seed of the training images, LoRA init and timesteps."),
                "batch_size": _int(1, 1, 64, "Training samples per concept per step."),
                "images_per_concept": _int(8, 1, 256, "Training images generated per concept."),
                "sample_steps": _int(30, 1, 200, "Sampler steps per training image."),
                "cfg": _float(7.5, 1.0, 30.0, 0.1, "Classifier-free guidance of the training images."),
                "image_size": _int(512, 64, 2048, "Side of the square training images, in pixels.", step=8),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Your own training images for one concept (see images_for)."}),
                "masks": ("MASK", {"tooltip": "Masks of the concept in those images (white = concept)."}),
                "images_for": ("STRING", {
                    "default": "",
                    "tooltip": "The concept phrase the images/masks belong to; empty = the first concept.",
                }),
            },
        }

    def train(self, original_model, refined_model, clip, vae, concepts, steps, learning_rate, rank, seed,
              batch_size, images_per_concept, sample_steps, cfg, image_size, images=None, masks=None,
              images_for=""):
        import dataclasses

        from mace_ops.data import generate_training_data
        from mace_ops.errors import MaceError
        from mace_ops.hosts.comfy import ComfyHost
        from mace_ops.train import train_concept_loras

        from .host import RunProgressBar, cache_dir, check_interrupt
        from .web_api import TrainProgressEvents, tee

        cv = _need(concepts, ConceptsValue, "concepts", "MACE Concept List")
        original = ComfyHost(original_model, clip, vae)
        refined = ComfyHost(refined_model, clip, vae)
        if refined.model_fingerprint() != original.model_fingerprint():
            raise MaceError(
                f"refined_model input: refined from base model {refined.model_fingerprint()[:12]}, but original_model "
                f"is {original.model_fingerprint()[:12]}; connect the MODEL that went into Refine Cross-Attention"
            )
        train_cfg = cv.settings.train
        train_cfg = dataclasses.replace(
            train_cfg,
            steps=int(steps) if steps > 0 else train_cfg.steps,
            lr=float(learning_rate) if learning_rate > 0 else train_cfg.lr,
            rank=int(rank), seed=int(seed), batch_size=int(batch_size),
        )
        user_images, user_masks = _user_data(cv, images, masks, images_for)
        n_generated = sum(1 for c in cv.concepts if c.phrase not in user_images)
        progress = RunProgressBar({
            "data": n_generated * images_per_concept * sample_steps,
            "train": train_cfg.steps * len(cv.concepts),
        })
        events = TrainProgressEvents([c.phrase for c in cv.concepts], train_cfg.steps)  # for the web panel
        data = generate_training_data(
            original, cv.concepts, n_images=int(images_per_concept), seed=int(seed), steps=int(sample_steps),
            cfg=float(cfg), size=int(image_size), user_images=user_images, user_masks=user_masks,
            cache_dir=cache_dir("data"), progress=tee(progress.stage("data"), events.data),
            check_interrupt=check_interrupt,
        )
        bank, losses = train_concept_loras(
            refined, data, train_cfg, base_weights=refined.cross_attention_weights(),
            progress=tee(progress.stage("train"), events.train), check_interrupt=check_interrupt,
            cache_dir=cache_dir("loras"),
        )
        return (BankValue(bank, list(cv.concepts), losses, original.model_fingerprint(), cv.settings),)


def _user_data(cv: ConceptsValue, images: Any, masks: Any, images_for: str):
    """ComfyUI IMAGE (B,H,W,3) in [0,1] / MASK (B,H,W) -> the pipeline's {phrase: (B,3,H,W) in [-1,1]} and
    {phrase: masks}; images (and masks at image size) are cropped to multiples of 8. Masks alone apply to
    the generated images of that concept."""
    from mace_ops.errors import MaceError

    if images is None and masks is None:
        return {}, {}
    phrases = [c.phrase for c in cv.concepts]
    target = " ".join((images_for or "").split()) or phrases[0]
    if target not in phrases:
        raise MaceError(f"images_for input: {target!r} is not in the concept list ({phrases[:5]}); give a phrase from it")
    user_images, user_masks = {}, {}
    if images is not None:
        if images.ndim != 4 or images.shape[-1] < 3 or images.shape[1] < 8 or images.shape[2] < 8:
            raise MaceError(f"images input: shape {tuple(images.shape)}; expected a ComfyUI IMAGE batch (B, H, W, 3), "
                            "at least 8x8 pixels")
        h, w = images.shape[1] // 8 * 8, images.shape[2] // 8 * 8
        user_images[target] = images[:, :h, :w, :3].float().permute(0, 3, 1, 2).clone() * 2.0 - 1.0
    if masks is not None:
        m = masks.float()
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise MaceError(f"masks input: shape {tuple(masks.shape)}; expected a ComfyUI MASK (B, H, W)")
        if images is not None and tuple(m.shape[1:]) == tuple(images.shape[1:3]):
            m = m[:, : images.shape[1] // 8 * 8, : images.shape[2] // 8 * 8]
        user_masks[target] = m.clone()
    return user_images, user_masks


class MaceFuseLoRAs:
    DESCRIPTION = ("Stage 3 of MACE: closed-form fusion of all concept LoRAs into the refined model (no interference "
                   "between concepts). Returns the erased MODEL and the erasure (for saving or applying).")
    CATEGORY = CATEGORY
    FUNCTION = "fuse"
    RETURN_TYPES = ("MODEL", ERASURE)
    RETURN_NAMES = ("erased_model", "erasure")
    OUTPUT_TOOLTIPS = ("The erased model (a patched clone; feed it to CheckpointSave for a sanitized checkpoint).",
                       "The new to_k/to_v matrices and their provenance.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "refined_model": ("MODEL", {"tooltip": "The output of Refine Cross-Attention."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "lora_bank": (LORA_BANK, {"tooltip": "From Train Concept LoRA."}),
                "preservation": (PRESERVATION, {"tooltip": "From MACE Preservation Set (same CLIP)."}),
                "preserve_weight": _float(FROM_PRESET, -1.0, 1e12, 0.001,
                                          "Weight of the general preservation prompts in the fusion." + _PRESET_NOTE),
                "retained_weight": _float(FROM_PRESET, -1.0, 1e12, 0.001,
                                          "Weight of the retained names' prompts in the fusion." + _PRESET_NOTE),
                "ridge": _float(FROM_PRESET, -1.0, 1e9, 0.001,
                                "Ridge λ·||W - W1||² keeping the weights near the refined ones." + _PRESET_NOTE),
            }
        }

    def fuse(self, refined_model, clip, lora_bank, preservation, preserve_weight, retained_weight, ridge):
        from mace_ops.erasure import Erasure
        from mace_ops.errors import MaceError
        from mace_ops.hosts.comfy import ComfyHost
        from mace_ops.pipeline import ErasureSettings, fuse_weights

        from .host import RunProgressBar, check_interrupt

        bv = _need(lora_bank, BankValue, "lora_bank", "Train Concept LoRA")
        host = ComfyHost(refined_model, clip)
        if host.model_fingerprint() != bv.base_fingerprint:
            raise MaceError(
                f"refined_model input: its base model is {host.model_fingerprint()[:12]}, but the LoRA bank was "
                f"trained for {bv.base_fingerprint[:12]}; connect the refined model the bank was trained on"
            )
        pv = _preserve(preservation, host)
        settings = bv.erasure_settings or ErasureSettings()
        wp = _weight(preserve_weight, settings.fusion_preserve)
        wr = _weight(retained_weight, settings.fusion_retained)
        lam = _weight(ridge, settings.ridge)
        original = host.original_weights()
        refined = host.cross_attention_weights()
        progress = RunProgressBar({"fuse": len(bv.concepts)})
        fused = fuse_weights(host, refined, bv.bank, bv.concepts, pv.statistics.groups(wp, wr), lam,
                             original=original, progress=progress.pipeline, check_interrupt=check_interrupt)
        erasure = Erasure.build(fused, base_fingerprint=host.model_fingerprint(), concepts=bv.concepts,
                                source="fuse_weights", settings={"preserve_weight": wp, "retained_weight": wr,
                                                                 "ridge": lam}, losses=bv.losses)
        erased = host.with_weights(erasure.weights)
        return (erased.model, ErasureValue(erasure, erasure.diffs(original)))


class MaceFuseExternalLoRAs:
    DESCRIPTION = ("Fuse LoRAs trained elsewhere (kohya, diffusers or peft files on the cross-attention to_k/to_v), "
                   "one per concept, with MACE's closed form instead of stacking them. A LoRA that also adapts "
                   "other modules is refused with their list, unless allowed (then they are listed, not fused).")
    CATEGORY = CATEGORY
    FUNCTION = "fuse"
    RETURN_TYPES = ("MODEL", ERASURE, "STRING")
    RETURN_NAMES = ("erased_model", "erasure", "report")
    OUTPUT_TOOLTIPS = ("The model with the fused to_k/to_v (a patched clone).",
                       "The new to_k/to_v matrices and their provenance (for Save Erasure).",
                       "Which file went to which concept, its key style, and every module that was ignored.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the LoRAs were trained on."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (it encodes each concept's prompts)."}),
                "concepts": (CONCEPTS, {"tooltip": "From MACE Concept List: one concept per LoRA, same order."}),
                "preservation": (PRESERVATION, {"tooltip": "From MACE Preservation Set (same CLIP)."}),
                "lora_files": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "One LoRA file of the loras folder per line, the i-th for the i-th concept "
                               "(.safetensors with kohya, diffusers or peft keys).",
                }),
                "allow_other_modules": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: a LoRA with keys outside the cross-attention to_k/to_v is refused. On: only "
                               "its to_k/to_v are fused and the other modules are listed in the report.",
                }),
                "preserve_weight": _float(FROM_PRESET, -1.0, 1e12, 0.001,
                                          "Weight of the general preservation prompts in the fusion." + _PRESET_NOTE),
                "retained_weight": _float(FROM_PRESET, -1.0, 1e12, 0.001,
                                          "Weight of the retained names' prompts in the fusion." + _PRESET_NOTE),
                "ridge": _float(FROM_PRESET, -1.0, 1e9, 0.001,
                                "Ridge λ·||W - W0||² keeping the weights near the model's." + _PRESET_NOTE),
            }
        }

    def fuse(self, model, clip, concepts, preservation, lora_files, allow_other_modules, preserve_weight,
             retained_weight, ridge):
        from mace_ops.erasure import Erasure
        from mace_ops.external_lora import external_fusion_metadata, fuse_external_loras, read_external_lora
        from mace_ops.hosts.comfy import ComfyHost

        from .host import RunProgressBar, resolve_lora_file

        cv = _need(concepts, ConceptsValue, "concepts", "MACE Concept List")
        host = ComfyHost(model, clip)
        pv = _preserve(preservation, host)
        paths = [resolve_lora_file(name) for name in _lines(lora_files)]
        original, current = host.original_weights(), host.cross_attention_weights()
        shapes = {k: tuple(w.shape) for k, w in current.items()}
        loras = [read_external_lora(p, shapes, allow_other_modules=bool(allow_other_modules)) for p in paths]
        s = cv.settings
        wp, wr, lam = (_weight(preserve_weight, s.fusion_preserve), _weight(retained_weight, s.fusion_retained),
                       _weight(ridge, s.ridge))
        progress = RunProgressBar({"fuse": len(cv.concepts)})
        fused = fuse_external_loras(host, cv.concepts, loras, pv.statistics.groups(wp, wr), lam, base=current,
                                    original=original, relative_ridge=s.relative_ridge, progress=progress.pipeline)
        erasure = Erasure.build(fused, base_fingerprint=host.model_fingerprint(), concepts=cv.concepts,
                                source="fuse_external_loras",
                                **external_fusion_metadata(loras, cv.concepts, preserve_weight=wp,
                                                           retained_weight=wr, ridge=lam))
        report = "\n".join(
            f"{c.phrase} ({c.kind}): {lora.summary()['file']}, {lora.style} keys, {len(lora.used)} to_k/to_v"
            + (f"; ignored {len(lora.ignored)}: {', '.join(lora.ignored)}" if lora.ignored else "")
            for c, lora in zip(cv.concepts, loras, strict=True))
        erased = host.with_weights(erasure.weights)
        return (erased.model, ErasureValue(erasure, erasure.diffs(original)), report)


class MaceApplyErasure:
    DESCRIPTION = "Apply a MACE erasure to the base model it was made for (refuses any other model)."
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched clone with the erased to_k/to_v (the input MODEL is untouched).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model the erasure was made for."}),
                "erasure": (ERASURE, {"tooltip": "From Fuse LoRAs or Load Erasure."}),
                "strength": _float(1.0, 0.0, 2.0, 0.05, "1 = the erasure as made; 0 = no change; in between blends."),
            }
        }

    def apply(self, model, erasure, strength):
        from mace_ops.erasure import apply_erasure_weights
        from mace_ops.errors import MaceError
        from mace_ops.hosts.comfy import ComfyHost

        ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
        host = ComfyHost(model)
        mine, theirs = host.model_fingerprint(), ev.erasure.base_fingerprint
        if mine != theirs:
            raise MaceError(f"model input: this erasure was made for base model {theirs}, but this model is {mine}; "
                            "connect the checkpoint the erasure was made from")
        base = host.original_weights()  # a MACE-edited MODEL: the weights before the edit (no double erasure)
        weights = apply_erasure_weights(base, ev.diffs, float(strength))
        return (host.with_weights({n: weights[n] for n in ev.diffs}).model,)


class MaceSaveErasure:
    DESCRIPTION = ("Save the erasure as a small safetensors file in ComfyUI's output folder: only the changed "
                   "matrices, as differences that ComfyUI's stock LoRA loader also applies. Never overwrites.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "erasure": (ERASURE, {"tooltip": "From Fuse LoRAs or Load Erasure."}),
                "filename_prefix": ("STRING", {
                    "default": "mace/erasure",
                    "tooltip": "Relative path in the output folder; a counter is appended (never overwrites).",
                }),
            }
        }

    def save(self, erasure, filename_prefix):
        import os

        from mace_ops.erasure import save_erasure_diffs

        from .host import new_output_path, output_dir

        ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
        path = new_output_path(filename_prefix, "safetensors")
        written = save_erasure_diffs(ev.diffs, ev.erasure, path, overwrite=False)
        rel = os.path.relpath(str(written), output_dir())
        return {"ui": {"text": [rel]}, "result": ()}


class MaceLoadErasure:
    DESCRIPTION = "Load a MACE erasure file (from output/mace or the loras folder)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (ERASURE,)
    RETURN_NAMES = ("erasure",)
    OUTPUT_TOOLTIPS = ("The erasure, for Apply Erasure or MACE Erasure Preview.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        from .host import erasure_files

        return {
            "required": {
                "erasure_file": (erasure_files(), {
                    "tooltip": "An erasure file: output/... (saved by Save Erasure) or loras/...",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, erasure_file):
        import os

        from .host import resolve_erasure_file

        try:
            path = resolve_erasure_file(erasure_file)
        except Exception:  # noqa: BLE001 - reported by load()
            return erasure_file
        st = os.stat(path)
        return f"{path}:{st.st_mtime_ns}:{st.st_size}"

    def load(self, erasure_file):
        from mace_ops.erasure import load_erasure

        from .host import resolve_erasure_file

        erasure, diffs = load_erasure(resolve_erasure_file(erasure_file))
        return (ErasureValue(erasure, diffs),)


class MaceErasurePreview:
    DESCRIPTION = ("Images of erased and preserved prompts, before | after side by side (same seeds), and the "
                   "report's numbers: anchor distance before -> after per concept, drift of preserved prompts.")
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("before_after", "report")
    OUTPUT_TOOLTIPS = ("One row per prompt: before (left) | after (right).", "The numbers as text.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "original_model": ("MODEL", {"tooltip": "The model before erasure."}),
                "erased_model": ("MODEL", {"tooltip": "The erased model (Fuse LoRAs or Apply Erasure)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
                "erasure": (ERASURE, {"tooltip": "The erasure (its concepts are previewed)."}),
                "preserved_prompts": ("STRING", {
                    "multiline": True, "default": "a photo of a dog\na portrait of a man\na landscape painting",
                    "tooltip": "Prompts that should NOT change, one per line.",
                }),
                "max_concepts": _int(4, 0, 64, "How many concepts get images (the numbers cover all)."),
                "seed": _int(0, 0, 2**31 - 1, "Seed (the same for before and after)."),
                "steps": _int(20, 1, 200, "Sampler steps."),
                "cfg": _float(7.5, 1.0, 30.0, 0.1, "Classifier-free guidance."),
                "image_size": _int(512, 64, 2048, "Side of the square images, in pixels.", step=8),
            }
        }

    def preview(self, original_model, erased_model, clip, vae, erasure, preserved_prompts, max_concepts, seed,
                steps, cfg, image_size):
        import torch

        from mace_ops.concepts import concept_prompt_pairs
        from mace_ops.errors import MaceError
        from mace_ops.hosts.comfy import ComfyHost
        from mace_ops.report import kv_metrics

        from .host import RunProgressBar

        ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
        before = ComfyHost(original_model, clip, vae)
        after = ComfyHost(erased_model, clip, vae)
        if after.model_fingerprint() != before.model_fingerprint():
            raise MaceError(
                f"erased_model input: derived from base model {after.model_fingerprint()[:12]}, but original_model "
                f"is {before.model_fingerprint()[:12]}; connect the model the erasure was made from"
            )
        concepts = list(ev.erasure.concepts)
        kept = _lines(preserved_prompts)
        numbers = kv_metrics(before.cross_attention_weights(), after.cross_attention_weights(), before.encode,
                             before.token_ids, concepts, kept)
        prompts = [concept_prompt_pairs(c)[0][0] for c in concepts[: int(max_concepts)]] + kept
        if prompts:
            progress = RunProgressBar({"before": steps, "after": steps})
            imgs_b = before.generate(prompts, seed=int(seed), steps=int(steps), cfg=float(cfg), height=int(image_size),
                                     width=int(image_size), progress=progress.stage("before"))
            imgs_a = after.generate(prompts, seed=int(seed), steps=int(steps), cfg=float(cfg), height=int(image_size),
                                    width=int(image_size), progress=progress.stage("after"))
            rows = torch.cat([before.to_comfy_image(imgs_b), before.to_comfy_image(imgs_a)], dim=2)  # (B, H, 2W, 3)
        else:
            rows = torch.zeros(1, 64, 128, 3)
        text = _report_text(numbers, prompts)
        return {"ui": {"text": [text]}, "result": (rows, text)}


def _report_text(numbers: dict[str, Any], prompts: list[str]) -> str:
    lines = ["MACE erasure preview (rows: before | after)", "", "Erased concepts (anchor distance before -> after, "
             "remaining: 0 = keys/values equal the anchor's, 1 = unchanged):"]
    for c in numbers["concepts"]:
        lines.append(f"  {c['phrase']} -> {c['anchor']}: {c['anchor_distance_before']:.3f} -> "
                     f"{c['anchor_distance_after']:.3f} (remaining {c['remaining']:.3f})")
    kept = numbers["retained"]
    if kept["prompts"]:
        lines += ["", f"Preserved prompts: mean K/V drift {kept['drift']:.4f}"]
        for p, d in zip(kept["prompts"], kept["drift_per_prompt"], strict=True):
            lines.append(f"  {p}: {d:.4f}")
    lines += ["", "Image rows: " + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))]
    return "\n".join(lines)


class MaceRobustnessProbe:
    DESCRIPTION = ("Is it really gone? Samples the erased and the original model under attacks (the concepts' own "
                   "prompts, your paraphrases, an adversarial prompt file, a few steps of relearning on unrelated "
                   "prompts) and reports how often each erased concept is recognised, worst first, with sample sizes. "
                   "nudenet (when installed) judges explicit concepts; other concepts get image grids only. Concept "
                   "inversion needs the command line (mace-erase probe).")
    CATEGORY = CATEGORY
    FUNCTION = "probe"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grids", "report")
    OUTPUT_TOOLTIPS = ("Per concept and attack: original samples (top row) and erased samples (bottom row).",
                       "The leak table (markdown): rate k/n per attack beside the original model's.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "original_model": ("MODEL", {"tooltip": "The model before erasure."}),
                "erased_model": ("MODEL", {"tooltip": "The erased model (Fuse LoRAs or Apply Erasure)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
                "erasure": (ERASURE, {"tooltip": "The erasure (its concepts are probed)."}),
                "paraphrases": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Prompts the erasure never saw, one 'phrase: prompt' per line.",
                }),
                "prompt_file": (["none", "i2p_nudity_subset (bundled, 134 prompts)",
                                 "unlearndiffatk_nudity (bundled, 142 prompts)",
                                 "unlearndiffatk_vangogh (bundled, 50 prompts)"], {
                    "default": "none", "tooltip": "An adversarial prompt file, sampled once and judged per concept.",
                }),
                "prompt_file_path": ("STRING", {
                    "default": "", "tooltip": "Or your own CSV (a 'prompt' column) / text file; overrides the list.",
                }),
                "prompt_limit": _int(20, 1, 5000, "Use only the first N prompts of the file."),
                "relearn_prompts": ("STRING", {
                    "multiline": True, "default": "a photo of a dog\na landscape painting\na city street at night",
                    "tooltip": "Unrelated prompts: the erased model is fine-tuned on the original's images of them. "
                               "Empty: no relearning.",
                }),
                "relearn_steps": _int(20, 0, 1000, "Fine-tuning steps of to_k/to_v (0: no relearning)."),
                "samples": _int(8, 1, 1000, "Samples per concept and attack."),
                "seed": _int(0, 0, 2**31 - 1, "Seed (the same for both models)."),
                "steps": _int(20, 1, 200, "Sampler steps."),
                "cfg": _float(7.5, 1.0, 30.0, 0.1, "Classifier-free guidance."),
                "image_size": _int(512, 64, 2048, "Side of the square images, in pixels.", step=8),
            }
        }

    def probe(self, original_model, erased_model, clip, vae, erasure, paraphrases, prompt_file, prompt_file_path,
              prompt_limit, relearn_prompts, relearn_steps, samples, seed, steps, cfg, image_size):
        import tempfile
        from pathlib import Path

        from mace_ops.errors import MaceError
        from mace_ops.hosts.comfy import ComfyHost
        from mace_ops.probe import ProbeSettings, run_probe
        from mace_ops.probe_cli import nudenet_judge, parse_paraphrases

        ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
        before, after = ComfyHost(original_model, clip, vae), ComfyHost(erased_model, clip, vae)
        if after.model_fingerprint() != before.model_fingerprint():
            raise MaceError(f"erased_model input: derived from base model {after.model_fingerprint()[:12]}, but "
                            f"original_model is {before.model_fingerprint()[:12]}; connect the model the erasure "
                            "was made from")
        concepts, files = _probe_inputs(ev, parse_paraphrases(paraphrases, "paraphrases input"),
                                                    prompt_file, prompt_file_path, int(prompt_limit))
        relearn = _lines(relearn_prompts)
        attacks = ("own", "paraphrase", "files") + (("relearning",) if relearn and relearn_steps > 0 else ())
        settings = ProbeSettings(samples=int(samples), seed=int(seed), sample_steps=int(steps), cfg=float(cfg),
                                 size=int(image_size), attacks=attacks, relearn_steps=max(1, int(relearn_steps)),
                                 relearn_images=max(1, min(8, len(relearn))))
        judge, note = nudenet_judge()
        with tempfile.TemporaryDirectory() as tmp:
            report = run_probe(before, after, concepts, judge, settings, prompt_files=files, relearn_prompts=relearn,
                               grid_dir=Path(tmp), progress=_probe_progress())
            grids = _load_grids(Path(tmp))
        report.notes = [note, "concept inversion is not run here: use mace-erase probe"] + report.notes
        text = report.markdown()
        return {"ui": {"text": [text]}, "result": (grids, text)}


def _probe_inputs(ev: Any, paraphrases: dict[str, list[str]], prompt_file: str, path: str,
                  limit: int) -> tuple[list, dict]:
    """(probe concepts of the erasure, {name: attack prompts}) from the node's widgets."""
    from pathlib import Path

    from mace_ops.attacks import read_attack_prompts
    from mace_ops.probe import ProbeConcept
    from mace_ops.probe_cli import BUNDLED_PROMPT_FILES

    concepts = [ProbeConcept(c.phrase, c.kind, c.anchor, paraphrases=tuple(paraphrases.get(c.phrase.lower(), ())))
                for c in ev.erasure.concepts]
    files = {}
    if path.strip():
        files[Path(path.strip()).stem] = read_attack_prompts(path.strip(), limit=limit)
    elif prompt_file != "none":
        name = prompt_file.split(" ")[0]
        files[name] = read_attack_prompts(BUNDLED_PROMPT_FILES[name], limit=limit)
    return concepts, files


def _probe_progress():
    """ComfyUI's progress bar per stage, and its interrupt check."""
    from .host import check_interrupt

    def progress(stage: str, done: int, total: int, info: Any) -> None:
        check_interrupt()

    return progress


def _load_grids(folder: Any):
    """The probe's grid PNGs as one IMAGE batch (B, H, W, 3) in [0, 1], padded white to the largest."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))]
    if not arrays:
        return torch.ones(1, 64, 64, 3)
    h, w = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    padded = [np.pad(a, ((0, h - a.shape[0]), (0, w - a.shape[1]), (0, 0)), constant_values=255) for a in arrays]
    return torch.from_numpy(np.stack(padded)).float() / 255.0


NODE_CLASS_MAPPINGS = {
    "MaceConceptList": MaceConceptList,
    "MacePreservationSet": MacePreservationSet,
    "MaceRefineCrossAttention": MaceRefineCrossAttention,
    "MaceTrainConceptLoRA": MaceTrainConceptLoRA,
    "MaceFuseLoRAs": MaceFuseLoRAs,
    "MaceFuseExternalLoRAs": MaceFuseExternalLoRAs,
    "MaceApplyErasure": MaceApplyErasure,
    "MaceSaveErasure": MaceSaveErasure,
    "MaceLoadErasure": MaceLoadErasure,
    "MaceErasurePreview": MaceErasurePreview,
    "MaceRobustnessProbe": MaceRobustnessProbe,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MaceConceptList": "MACE Concept List",
    "MacePreservationSet": "MACE Preservation Set",
    "MaceRefineCrossAttention": "Refine Cross-Attention",
    "MaceTrainConceptLoRA": "Train Concept LoRA",
    "MaceFuseLoRAs": "Fuse LoRAs",
    "MaceFuseExternalLoRAs": "Fuse External LoRAs",
    "MaceApplyErasure": "Apply Erasure",
    "MaceSaveErasure": "Save Erasure",
    "MaceLoadErasure": "Load Erasure",
    "MaceErasurePreview": "MACE Erasure Preview",
    "MaceRobustnessProbe": "MACE Robustness Probe",
}
