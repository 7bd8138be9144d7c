"""What each MACE node does: one function per node, named in the node table (``nodes/table.py``), which
declares its inputs (the function's keyword parameters) and outputs.

A function returns its outputs as a tuple, or ``{"ui": {UI_TEXT: [text]}, "result": outputs}`` when the
node also shows text. Functions only translate sockets and widgets into calls of ``mace_ops`` (the
pipeline stages) and back; ``mace_ops`` and ComfyUI are imported inside them, so importing this module
does no work and needs neither. Bad input raises ``MaceError`` naming the input and the fix.
"""

from __future__ import annotations

from typing import Any

from .values import (
    BankValue,
    ConceptsValue,
    ErasureValue,
    PreservationValue,
)

#: the sentinel of the weight widgets: use the value of the concept list's preset
FROM_PRESET = -1.0
#: the key of the text a node shows on itself (``{"ui": {UI_TEXT: [...]}}``), read by web/mace.js
UI_TEXT = "text"


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


def concept_list(concepts: str, kind: str, default_anchor: str, preset: str):
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


def preservation_set(clip: Any, corpus: str, prompts: str, retained: str, retained_kind: str):
    from mace_ops.errors import MaceError
    from mace_ops.pipeline import preservation_statistics
    from mace_ops.preservation import default_corpus, retained_prompts

    from .comfy_runtime import RunProgressBar, cache_dir, check_interrupt

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
    return (PreservationValue(stats, host.text_encoder_fingerprint(), general + kept),)


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


def refine_cross_attention(model, clip, concepts, preservation, preserve_weight, retained_weight, ridge):
    from mace_ops.hosts.comfy import ComfyHost
    from mace_ops.pipeline import refine_weights

    from .comfy_runtime import RunProgressBar, check_interrupt

    cv = _need(concepts, ConceptsValue, "concepts", "MACE Concept List")
    host = ComfyHost(model, clip)
    pv = _preserve(preservation, host)
    s = cv.settings
    groups = pv.statistics.groups(_weight(preserve_weight, s.cfr_preserve), _weight(retained_weight, s.cfr_retained))
    progress = RunProgressBar({"refine": len(cv.concepts)})
    w1 = refine_weights(host, cv.concepts, groups, _weight(ridge, s.ridge), progress=progress.pipeline,
                        check_interrupt=check_interrupt)
    return (host.with_weights(w1).model,)


def _same_base(derived, original, what: str, fix: str) -> None:
    """Refuse a MODEL input whose base checkpoint (``model_fingerprint``) is not ``original``'s, naming both."""
    from mace_ops.errors import MaceError

    if derived.model_fingerprint() != original.model_fingerprint():
        raise MaceError(f"{what} base model {derived.model_fingerprint()[:12]}, but original_model is "
                        f"{original.model_fingerprint()[:12]}; {fix}")


def train_concept_lora(original_model, refined_model, clip, vae, concepts, steps, learning_rate, rank, seed,
                       batch_size, images_per_concept, sample_steps, cfg, image_size, images=None, masks=None,
                       images_for="", unique_id=None):
    """``unique_id``: the node's id in the graph (ComfyUI's hidden input), named in the web panel's events."""
    import dataclasses

    from mace_ops.data import generate_training_data
    from mace_ops.hosts.comfy import ComfyHost
    from mace_ops.train import train_concept_loras

    from .comfy_runtime import RunProgressBar, cache_dir, check_interrupt
    from .web_api import TrainProgressEvents, tee

    cv = _need(concepts, ConceptsValue, "concepts", "MACE Concept List")
    original = ComfyHost(original_model, clip, vae)
    refined = ComfyHost(refined_model, clip, vae)
    _same_base(refined, original, "refined_model input: refined from",
               "connect the MODEL that went into Refine Cross-Attention")
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
    events = TrainProgressEvents([c.phrase for c in cv.concepts], train_cfg.steps,  # for the web panel
                                 node_id=None if unique_id is None else str(unique_id))
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


def fuse_loras(refined_model, clip, lora_bank, preservation, preserve_weight, retained_weight, ridge,
               pooled_channel=False):
    """Stage 3, and with ``pooled_channel`` SDXL's pooled-channel edit (``_pooled_label_emb``)."""
    from mace_ops.erasure import Erasure
    from mace_ops.errors import MaceError
    from mace_ops.hosts.comfy import ComfyHost
    from mace_ops.pipeline import ErasureSettings, fuse_weights

    from .comfy_runtime import RunProgressBar, check_interrupt

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
    label = _pooled_label_emb(host, bv.concepts, pv, settings) if pooled_channel else None
    made_with = {"preserve_weight": wp, "retained_weight": wr, "ridge": lam}
    if pooled_channel:  # False when the model has no pooled channel (the edit was skipped with a warning)
        made_with["pooled_channel"] = label is not None
    erasure = Erasure.build(fused, base_fingerprint=host.model_fingerprint(), concepts=bv.concepts,
                            source="fuse_weights", settings=made_with, losses=bv.losses)
    if label is not None:
        erasure.label_emb_diff = (label.float() - host.original_label_emb_weight()).cpu()
    erased = host.with_weights(erasure.weights, label_emb=label)
    return (erased.model, ErasureValue(erasure, erasure.diffs(original)))


def _pooled_label_emb(host: Any, concepts: list, pv: PreservationValue, settings: Any) -> Any:
    """The new ``label_emb.0.0.weight`` of Fuse LoRAs' ``pooled_channel`` option, as ``mace-erase run
    --pooled-channel`` makes it (``mace_ops.pooled.pooled_channel_edit``: the preservation prompts kept with the
    concept list's ``pooled_preserve``); None, with a logged warning, for a model without SDXL's pooled channel."""
    import logging

    from mace_ops.errors import MaceError
    from mace_ops.pooled import pooled_channel_edit

    if not host.family.pooled_dim or host.label_emb_weight() is None:
        logging.getLogger(__name__).warning(
            "MACE Fuse LoRAs: pooled_channel ignored: this %s model has no pooled text channel (only SDXL base "
            "feeds a pooled embedding to label_emb); only the cross-attention was erased", host.family.name)
        return None
    if not pv.prompts:
        raise MaceError("preservation input: it carries no prompts (made before the pooled channel); run MACE "
                        "Preservation Set again, or turn pooled_channel off")
    return pooled_channel_edit(host, concepts, pv.prompts, preserve_weight=settings.pooled_preserve,
                               ridge=settings.ridge, relative_ridge=settings.relative_ridge)


def fuse_external_loras(model, clip, concepts, preservation, lora_files, allow_other_modules, preserve_weight,
                        retained_weight, ridge):
    from mace_ops.erasure import Erasure
    from mace_ops.external_lora import external_fusion_metadata, fuse_external_loras, read_external_lora
    from mace_ops.hosts.comfy import ComfyHost

    from .comfy_runtime import RunProgressBar, resolve_lora_file

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


def apply_erasure(model, erasure, strength):
    """The erasure's to_k/to_v differences and, when it carries one, its SDXL ``label_emb`` difference,
    times ``strength``, on the weights of the base model before any MACE edit (a patched clone)."""
    from mace_ops.erasure import apply_erasure_weights, apply_label_emb_diff
    from mace_ops.errors import MaceError
    from mace_ops.hosts.comfy import ComfyHost

    ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
    host = ComfyHost(model)
    label = ev.erasure.label_emb_diff
    if label is not None:  # refused first: an SD1.x / SD2.x model has no pooled channel at all
        label = apply_label_emb_diff(host.original_label_emb_weight(), label, float(strength),
                                     model=f"this {host.family.name} model")
    mine, theirs = host.model_fingerprint(), ev.erasure.base_fingerprint
    if mine != theirs:
        raise MaceError(f"model input: this erasure was made for base model {theirs}, but this model is {mine}; "
                        "connect the checkpoint the erasure was made from")
    base = host.original_weights()  # a MACE-edited MODEL: the weights before the edit (no double erasure)
    weights = apply_erasure_weights(base, ev.diffs, float(strength))
    return (host.with_weights({n: weights[n] for n in ev.diffs}, label_emb=label).model,)


def save_erasure(erasure, filename_prefix):
    import os

    from mace_ops.erasure import save_erasure_diffs

    from .comfy_runtime import new_output_path, output_dir

    ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
    path = new_output_path(filename_prefix, "safetensors")
    written = save_erasure_diffs(ev.diffs, ev.erasure, path, overwrite=False)
    rel = os.path.relpath(str(written), output_dir())
    return {"ui": {UI_TEXT: [rel]}, "result": ()}


def erasure_file_fingerprint(erasure_file):
    import os

    from .comfy_runtime import resolve_erasure_file

    try:
        path = resolve_erasure_file(erasure_file)
    except Exception:  # noqa: BLE001 - reported by load()
        return erasure_file
    st = os.stat(path)
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"


def load_erasure(erasure_file):
    from mace_ops.erasure import load_erasure

    from .comfy_runtime import resolve_erasure_file

    erasure, diffs = load_erasure(resolve_erasure_file(erasure_file))
    return (ErasureValue(erasure, diffs),)


def erasure_preview(original_model, erased_model, clip, vae, erasure, preserved_prompts, max_concepts, seed,
                    steps, cfg, image_size):
    import torch

    from mace_ops.concepts import concept_prompt_pairs
    from mace_ops.hosts.comfy import ComfyHost
    from mace_ops.report import kv_metrics

    from .comfy_runtime import RunProgressBar

    ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
    before = ComfyHost(original_model, clip, vae)
    after = ComfyHost(erased_model, clip, vae)
    _same_base(after, before, "erased_model input: derived from", "connect the model the erasure was made from")
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
    text = _report_text(numbers, prompts) + _pooled_channel_text(ev, before, after)
    return {"ui": {UI_TEXT: [text]}, "result": (rows, text)}


def _pooled_channel_text(ev: Any, before: Any, after: Any) -> str:
    """The preview's paragraph on SDXL's pooled channel when the erasure edits it: the share of the erasure's
    ``label_emb`` difference D that erased_model carries, ``<L1 - L0, D> / <D, D>`` (1: all of it, 0: none)."""
    label = ev.erasure.label_emb_diff
    if label is None:
        return ""
    w0, w1 = before.label_emb_weight(), after.label_emb_weight()
    head = "\n\nPooled channel (SDXL label_emb): the erasure edits it"
    if w0 is None or w1 is None or tuple(w0.shape) != tuple(label.shape):
        return f"{head}, but these models have no label_emb of its shape {tuple(label.shape)}"
    share = float(((w1 - w0).double() * label.double()).sum() / (label.double().square().sum() + 1e-300))
    hint = "" if share > 0.5 else " (connect the MODEL of Apply Erasure as erased_model to see the whole erasure)"
    return f"{head}; erased_model carries {share:.3f} of that edit (1 = all){hint}"


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


def robustness_probe(original_model, erased_model, clip, vae, erasure, paraphrases, prompt_file, prompt_file_path,
                     prompt_limit, relearn_prompts, relearn_steps, samples, seed, steps, cfg, image_size):
    import tempfile
    from pathlib import Path

    from mace_ops.hosts.comfy import ComfyHost
    from mace_ops.probe import ProbeSettings, run_probe
    from mace_ops.probe_cli import nudenet_judge, parse_paraphrases

    ev = _need(erasure, ErasureValue, "erasure", "Fuse LoRAs or Load Erasure")
    before, after = ComfyHost(original_model, clip, vae), ComfyHost(erased_model, clip, vae)
    _same_base(after, before, "erased_model input: derived from", "connect the model the erasure was made from")
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
    return {"ui": {UI_TEXT: [text]}, "result": (grids, text)}


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
    from .comfy_runtime import check_interrupt

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
