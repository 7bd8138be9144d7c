"""LoRAs trained elsewhere (kohya, diffusers, peft files), read onto the cross-attention to_k / to_v and
fused with MACE's closed form (DESIGN 2.4), one LoRA per concept.

A LoRA file stores, per adapted module, ``down`` (r, d_in) and ``up`` (d_out, r), and sometimes an
``alpha``: the edit is ``ΔW = (alpha / r) · up @ down`` (scale 1 when there is no alpha). We fold the
scale into ``up`` so that ``ΔW = up @ down`` exactly, as ``closed_form.FusionProblem`` expects.

Key styles read (``<m>`` names one module; the part after it names the factor)::

    kohya      lora_unet_<m with '_' for '.'>.lora_down.weight / .lora_up.weight / .alpha
    diffusers  unet.<m>.lora_A.weight / .lora_B.weight     (and the older
               unet.<attn>.processor.to_k_lora.down.weight / .up.weight)
    peft       base_model.model.<m>.lora_A[.<adapter>].weight / .lora_B[...].weight  (+ adapter_config.json
               beside the file: scale lora_alpha / r)

``<m>`` may be a diffusers module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``)
or an LDM one (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``, kohya's SDXL files). Only the
host's cross-attention ``to_k`` / ``to_v`` can be fused: a key on any other module (self-attention,
to_q, to_out, feed-forward, the text encoder ...) is listed, and the file is refused unless the caller
allows it, never dropped silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import MaceError
from .io import read_safetensors

#: ``(pattern of the key's tail, factor)``; the module is what comes before the tail.
_TAILS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
)
_PROCESSOR = re.compile(r"\.processor\.(to_[a-z]+)_lora\.(down|up)\.weight$")  # diffusers' attention processors
_PREFIXES = {"lora_unet_": "kohya", "base_model.model.": "peft", "unet.": "diffusers",
             "model.diffusion_model.": "ldm", "diffusion_model.": "ldm"}


@dataclass
class ExternalLoRA:
    """One concept's LoRA read from a file: ``factors`` ``{matrix: (up · scale (d_out, r), down (r, d))}``
    for every host matrix (zeros, rank 1, where the file has none), and what was not used."""

    path: str
    style: str  # "kohya" | "diffusers" | "peft" | "ldm" | "plain" (the prefix its keys use)
    factors: dict[str, tuple[Tensor, Tensor]]
    used: list[str]  # host matrices the file adapts
    ignored: list[str] = field(default_factory=list)  # file modules that are not a cross-attention to_k/to_v
    scales: dict[str, float] = field(default_factory=dict)  # matrix -> alpha / r applied to its up

    def summary(self) -> dict[str, Any]:
        """What the erasure's metadata records about this file."""
        ranks = sorted({int(self.factors[m][1].shape[0]) for m in self.used})
        return {"file": os.path.basename(self.path), "style": self.style, "matrices": len(self.used),
                "ranks": ranks, "scales": sorted(set(self.scales.values())), "ignored": self.ignored}


# ---------------------------------------------------------------- module names


def layers_per_block(blocks: Sequence[str]) -> int:
    """LDM ``input_blocks.<n>.1`` attention indices run ``1 + level·(L+1) + j`` (j < L): L is the length
    of the first run of consecutive indices (SD1.x/SD2/SDXL: 2). 2 when the names say nothing."""
    idx = sorted({int(m.group(1)) for b in blocks if (m := re.match(r"input_blocks\.(\d+)\.1\.", b))})
    if not idx:
        return 2
    run = 1
    while run < len(idx) and idx[run] == idx[0] + run:
        run += 1
    return run


def diffusers_block_name(block: str, layers_per_block: int) -> str | None:
    """The diffusers module path of an LDM block name (``input_blocks.1.1.transformer_blocks.0.attn2`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``); None when it has no such form."""
    per = layers_per_block + 1  # resnets (+ a down/upsampler) per level
    if m := re.fullmatch(r"input_blocks\.(\d+)\.1\.(.+)", block):
        level, j = divmod(int(m.group(1)) - 1, per)
        return f"down_blocks.{level}.attentions.{j}.{m.group(2)}" if j < layers_per_block else None
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", block):
        k = int(m.group(1))
        return f"mid_block.attentions.{(k - 1) // 2}.{m.group(2)}" if k % 2 == 1 else None
    if m := re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", block):
        level, j = divmod(int(m.group(1)), per)
        return f"up_blocks.{level}.attentions.{j}.{m.group(2)}"
    return None


def module_aliases(matrices: Sequence[str]) -> dict[str, str]:
    """``{alias: matrix}``: each host matrix (``<LDM block>.to_k``) under its LDM and diffusers paths,
    each also with '_' for '.' (kohya), so a file's module is found by lookup, never by guessing."""
    blocks = [m.rsplit(".", 1)[0] for m in matrices]
    per = layers_per_block(blocks)
    out: dict[str, str] = {}
    for m in matrices:
        block, proj = m.rsplit(".", 1)
        names = [m]
        if (d := diffusers_block_name(block, per)) is not None:
            names.append(f"{d}.{proj}")
        for n in names:
            out[n] = out[n.replace(".", "_")] = m
    return out


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(prefix style, module, factor)`` of one tensor key; None when it is no LoRA factor."""
    key = _PROCESSOR.sub(r".\1.lora_\2.weight", key)
    for pattern, part in _TAILS:
        if m := pattern.search(key):
            module = key[: m.start()]
            for prefix, style in _PREFIXES.items():
                if module.startswith(prefix):
                    return style, module[len(prefix):], part
            return "plain", module, part
    return None


# ---------------------------------------------------------------- reading


def _peft_scale(path: Path) -> float | None:
    """``lora_alpha / r`` of an ``adapter_config.json`` beside ``path`` (peft's own files); None if absent."""
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        d = json.loads(config.read_text(encoding="utf-8"))
        return float(d["lora_alpha"]) / float(d["r"])
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise MaceError(f"{str(config)!r}: cannot read lora_alpha / r ({e}); fix or remove that file") from e


def _group_factors(tensors: Mapping[str, Tensor], what: str) -> tuple[dict[str, dict[str, Tensor]], set[str], list[str]]:
    """``({module: {factor: tensor}}, prefix styles, keys that are no LoRA factor)``."""
    modules: dict[str, dict[str, Tensor]] = {}
    styles: set[str] = set()
    strange = []
    for key, t in tensors.items():
        split = _split_key(key)
        if split is None:
            strange.append(key)
            continue
        style, module, part = split
        styles.add(style)
        if part in modules.setdefault(module, {}):
            raise MaceError(f"{what}: module {module!r} has two {part} tensors (keys of two styles?); "
                            "keep one key style per file")
        modules[module][part] = t
    return modules, styles, strange


def _factor_pair(module: str, parts: Mapping[str, Tensor], shape: tuple[int, int], what: str,
                 default_scale: float) -> tuple[Tensor, Tensor, float]:
    """``(up · scale, down, scale)`` of one module, shapes checked against the host's ``(d_out, d)``."""
    if "up" not in parts or "down" not in parts:
        raise MaceError(f"{what}: module {module!r} has no {'up' if 'up' not in parts else 'down'} factor; "
                        "is the file complete?")
    up, down = (parts[p].float().squeeze(-1).squeeze(-1) if parts[p].ndim == 4 else parts[p].float()
                for p in ("up", "down"))
    d_out, d = shape
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] or up.shape[0] != d_out or down.shape[1] != d:
        raise MaceError(f"{what}: module {module!r} has up {tuple(up.shape)} and down {tuple(down.shape)}, but "
                        f"the model's matrix is {shape}: was the LoRA trained for this model family?")
    rank = down.shape[0]
    scale = float(parts["alpha"]) / rank if "alpha" in parts else default_scale
    return up * scale, down, scale


def read_external_lora(path: str | os.PathLike[str], shapes: Mapping[str, tuple[int, int]], *,
                       allow_other_modules: bool = False) -> ExternalLoRA:
    """Read a LoRA file onto the host matrices ``shapes`` (``{"<block>.to_k": (d_out, d)}``).

    Raises ``MaceError`` naming the file when: it is not a safetensors LoRA, it adapts no cross-attention
    to_k/to_v, or (unless ``allow_other_modules``) it has keys on other modules: all of them are listed."""
    p = Path(path)
    what = f"LoRA file {str(p)!r}"
    tensors, _ = read_safetensors(p, "LoRA file")
    modules, styles, strange = _group_factors(tensors, what)
    if strange:
        raise MaceError(f"{what}: {len(strange)} key(s) are no LoRA factor of a known style (kohya lora_down/"
                        f"lora_up/alpha, diffusers or peft lora_A/lora_B): {strange[:8]}")
    aliases = module_aliases(list(shapes))
    default_scale = _peft_scale(p) if "peft" in styles else None
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    scales: dict[str, float] = {}
    ignored = []
    for module, parts in modules.items():
        matrix = aliases.get(module)
        if matrix is None:
            ignored.append(module)
            continue
        if matrix in factors:
            raise MaceError(f"{what}: matrix {matrix!r} is adapted twice (module {module!r}); keep one")
        up, down, scales[matrix] = _factor_pair(module, parts, shapes[matrix], what, default_scale or 1.0)
        factors[matrix] = (up, down)
    if not factors:
        raise MaceError(f"{what}: none of its {len(modules)} module(s) is a cross-attention to_k/to_v of this "
                        f"model (e.g. {sorted(modules)[:3]}); MACE fuses LoRAs on attn2.to_k / attn2.to_v only")
    if ignored and not allow_other_modules:
        raise MaceError(
            f"{what}: {len(ignored)} module(s) are not a cross-attention to_k/to_v and cannot be fused: "
            f"{sorted(ignored)}. Retrain the LoRA on attn2.to_k/to_v only, or allow other modules to fuse "
            f"its {len(factors)} to_k/to_v matrices and ignore these"
        )
    used = [m for m in shapes if m in factors]
    for m, (d_out, d) in shapes.items():
        factors.setdefault(m, (torch.zeros(d_out, 1), torch.zeros(1, d)))  # untouched: ΔW = 0
    style = "/".join(sorted(styles))
    return ExternalLoRA(str(p), style, factors, used, sorted(ignored), scales)


# ---------------------------------------------------------------- fusion


def fuse_external_loras(
    host: Any,
    concepts: Sequence[Any],
    loras: Sequence[ExternalLoRA],
    preserve: Sequence[Any] = (),
    ridge: float = 0.0,
    *,
    relative_ridge: float = 1e-6,
    base: Mapping[str, Tensor] | None = None,
    original: Mapping[str, Tensor] | None = None,
    progress: Callable[[str, int, int, Mapping[str, Any]], None] | None = None,
) -> dict[str, Tensor]:
    """Closed-form fusion (DESIGN 2.4) of ``loras[i]`` for ``concepts[i]``: ``W1`` = ``base`` (default the
    host's current to_k/to_v), ``W0`` = ``original`` (default ``W1``); ``G_i`` from concept i's prompts
    through the host's text encoder. float64 solve, float32 results."""
    from .closed_form import FusionProblem
    from .pipeline import concept_moments, float32_weights

    if len(concepts) != len(loras):
        raise MaceError(f"{len(concepts)} concept(s) but {len(loras)} LoRA file(s): give one LoRA per concept, "
                        "in the order of the concept list")
    if not concepts:
        raise MaceError("no concepts: give at least one concept and its LoRA file")
    W1 = float32_weights(base if base is not None else host.cross_attention_weights())
    W0 = float32_weights(original) if original is not None else W1
    problem = FusionProblem(W1, W0, preserve, ridge, relative_ridge=relative_ridge)
    for i, (concept, lora) in enumerate(zip(concepts, loras, strict=True)):
        problem.add_concept(concept_moments(host, concept), lora.factors)
        if progress is not None:
            progress("fuse", i + 1, len(concepts), {"concept": concept.phrase})
    return problem.solve()


def external_fusion_metadata(loras: Sequence[ExternalLoRA], concepts: Sequence[Any], **fusion: float) -> dict:
    """``Erasure.build``'s ``settings`` (the fusion weights) and ``external_loras`` (each file's summary)
    of a fusion of external LoRAs."""
    return {"settings": dict(fusion), "external_loras": [
        {"concept": c.phrase, **lora.summary()} for c, lora in zip(concepts, loras, strict=True)]}


__all__ = ["ExternalLoRA", "diffusers_block_name", "external_fusion_metadata", "fuse_external_loras", "layers_per_block",
           "module_aliases", "read_external_lora"]
