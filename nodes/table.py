"""The MACE nodes, declared once: node id, display name, description, inputs (type, tooltip, default,
range, choices), outputs and the function that does the work.

ComfyUI's V3 classes are built from this table (``nodes/v3.py``, ``comfy_api.latest``); the workflow
builder, the no-ComfyUI tests and ``tests/test_web_strings.py`` read it directly. Importing it needs
neither ComfyUI nor torch: choice lists that need the core or ComfyUI are callables, read each time
ComfyUI builds the schema (so ``/object_info`` shows fresh erasure files).

``In.v1()`` renders an input as ComfyUI's ``/object_info`` shows a V3 input (``Schema.get_v1_info``);
the real-host test checks that rendering against ComfyUI's own for every node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import mace_nodes as run
from .values import CONCEPTS, ERASURE, LORA_BANK, PRESERVATION

CATEGORY = "MACE"
#: the key of the text a node shows on itself (``ui``), read by web/mace.js as ``output.text``
UI_TEXT = run.UI_TEXT
#: widget types (shown as a widget, not a socket)
WIDGET_TYPES = ("STRING", "INT", "FLOAT", "BOOLEAN", "COMBO")
#: the sentinel of the weight widgets: use the value of the concept list's preset
FROM_PRESET = run.FROM_PRESET
_PRESET_NOTE = " -1 uses the value of the concept list's preset (or the 100-celebrity default)."


@dataclass(frozen=True)
class In:
    """One input. ``type``: a socket type (MODEL, CLIP, VAE, IMAGE, MASK, MACE_*) or a widget type."""

    name: str
    type: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    choices: tuple[str, ...] | Callable[[], list[str]] | None = None  # COMBO options
    optional: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def options(self) -> list[str]:
        """The COMBO options now (a callable is called)."""
        return list(self.choices() if callable(self.choices) else self.choices or ())

    def v1(self) -> tuple[str, dict[str, Any]]:
        """``(type, options)`` as ComfyUI's ``/object_info`` shows this input of a V3 node."""
        opts: dict[str, Any] = {"tooltip": self.tooltip}
        if self.is_widget:
            opts["default"] = self.default
        if self.type in ("INT", "FLOAT"):
            opts |= {"min": self.min, "max": self.max, "step": self.step}
        if self.type == "FLOAT":
            opts["round"] = False  # weights span 1e-5 .. 1e4: never round them to the step
        if self.type == "STRING":
            opts["multiline"] = self.multiline
        if self.type == "COMBO":
            opts |= {"multiselect": False, "options": self.options()}
        return self.type, {k: v for k, v in opts.items() if v is not None}


@dataclass(frozen=True)
class Out:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    """One node. ``run(**inputs)`` returns the outputs as a tuple, or ``{"ui": {UI_TEXT: [str]}, "result":
    tuple}``; with ``"unique_id"`` in ``hidden`` it also gets ``unique_id=`` (the node's id in the graph).
    ``fingerprint(**widgets)``: ComfyUI's ``fingerprint_inputs`` (V1 ``IS_CHANGED``)."""

    node_id: str
    display_name: str
    description: str
    inputs: tuple[In, ...]
    outputs: tuple[Out, ...]
    run: Callable[..., Any]
    output_node: bool = False
    hidden: tuple[str, ...] = ()
    fingerprint: Callable[..., Any] | None = None
    category: str = CATEGORY

    def input(self, name: str) -> In:
        return next(i for i in self.inputs if i.name == name)

    def v1_input(self) -> dict[str, dict[str, tuple[str, dict[str, Any]]]]:
        """``{"required": {...}, "optional": {...}, "hidden": {...}}`` as ``/object_info`` shows it."""
        out: dict[str, dict[str, Any]] = {"required": {}}
        for i in self.inputs:
            out.setdefault("optional" if i.optional else "required", {})[i.name] = i.v1()
        for h in self.all_hidden():
            out.setdefault("hidden", {})[h] = (h.upper(),)
        return out

    def all_hidden(self) -> tuple[str, ...]:
        """``hidden`` and what ComfyUI adds for an output node (``Schema.finalize``: prompt, extra_pnginfo)."""
        extra = ("prompt", "extra_pnginfo") if self.output_node else ()
        return self.hidden + tuple(h for h in extra if h not in self.hidden)


# ---------------------------------------------------------------- input helpers


def _float(name: str, default: float, lo: float, hi: float, step: float, tooltip: str) -> In:
    return In(name, "FLOAT", tooltip, default=default, min=lo, max=hi, step=step)


def _int(name: str, default: int, lo: int, hi: int, tooltip: str, step: int = 1) -> In:
    return In(name, "INT", tooltip, default=default, min=lo, max=hi, step=step)


def _text(name: str, default: str, tooltip: str, multiline: bool = True) -> In:
    return In(name, "STRING", tooltip, default=default, multiline=multiline)


def _combo(name: str, choices: tuple[str, ...] | Callable[[], list[str]], tooltip: str, default: str | None = None) -> In:
    return In(name, "COMBO", tooltip, default=default, choices=choices)


def _weights(hi: float, preserve: str, retained: str, ridge: str) -> tuple[In, ...]:
    """preserve_weight, retained_weight, ridge: -1 (the default) means the preset's value."""
    return (_float("preserve_weight", FROM_PRESET, -1.0, hi, 0.001, preserve + _PRESET_NOTE),
            _float("retained_weight", FROM_PRESET, -1.0, hi, 0.001, retained + _PRESET_NOTE),
            _float("ridge", FROM_PRESET, -1.0, 1e9, 0.001, ridge + _PRESET_NOTE))


def _presets() -> list[str]:
    from mace_ops.concepts import list_presets

    return ["none", *list_presets()]


def _erasure_files() -> list[str]:
    from .comfy_runtime import erasure_files

    return erasure_files()


MODEL_IN = "The SD1.x, SD2.x or SDXL model to erase concepts from (never modified)."
CLIP = In("clip", "CLIP", "The checkpoint's CLIP.")
CONCEPTS_IN = In("concepts", CONCEPTS, "From MACE Concept List.")
PRESERVATION_IN = In("preservation", PRESERVATION, "From MACE Preservation Set (same CLIP).")
ERASURE_IN = In("erasure", ERASURE, "From Fuse LoRAs or Load Erasure.")
KIND = ("object", "style")
SEED = "Seed (the same for both models)."
PROBE_FILES = ("none", "i2p_nudity_subset (bundled, 134 prompts)", "unlearndiffatk_nudity (bundled, 142 prompts)",
               "unlearndiffatk_vangogh (bundled, 50 prompts)")


def _sampling(cfg_tip: str, size_tip: str) -> tuple[In, ...]:
    return (_float("cfg", 7.5, 1.0, 30.0, 0.1, cfg_tip),
            _int("image_size", 512, 64, 2048, size_tip, step=8))


def _compare(what: str) -> tuple[In, ...]:
    """The inputs of the nodes that compare the original and the erased model."""
    return (In("original_model", "MODEL", "The model before erasure."),
            In("erased_model", "MODEL", "The erased model (Fuse LoRAs or Apply Erasure)."),
            In("clip", "CLIP", "The checkpoint's CLIP."), In("vae", "VAE", "The checkpoint's VAE."),
            In("erasure", ERASURE, f"The erasure (its concepts are {what})."))


# ---------------------------------------------------------------- the table

NODES: tuple[NodeSpec, ...] = (
    NodeSpec(
        "MaceConceptList", "MACE Concept List",
        "The concepts to erase, one 'phrase -> anchor' per line, or a bundled preset.",
        inputs=(
            _text("concepts", "", "One concept per line: 'Taylor Swift -> a woman'. A line without '->' uses the "
                  "default anchor; ':: style' or ':: object' at the end gives that line its own kind ('Van Gogh -> "
                  "art :: style'); '#' starts a comment. Leave empty to use the preset's list."),
            _combo("kind", KIND, "object: people, things, explicit content (trained with masks); style: artists' "
                   "styles (no masks). The kind of lines without ':: kind'; a preset sets its own.", "object"),
            _text("default_anchor", "a person", "The anchor of lines written without '->' (e.g. 'a person', 'art', "
                  "'sky').", multiline=False),
            _combo("preset", _presets, "A bundled task: its weights and training schedule; its concept list when the "
                   "text above is empty.", "none"),
        ),
        outputs=(Out(CONCEPTS, "concepts", "The concept list with the preset's weights and training schedule."),),
        run=run.concept_list,
    ),
    NodeSpec(
        "MacePreservationSet", "MACE Preservation Set",
        "Second moments of the prompts whose meaning must not change (cached on disk by text-encoder fingerprint "
        "and prompt list).",
        inputs=(
            In("clip", "CLIP", "The checkpoint's CLIP (the statistics are of its token states)."),
            _combo("corpus", ("default", "none"), "default: MACE's 2,500 everyday captions; none: only the prompts "
                   "below.", "default"),
            _text("prompts", "", "Extra prompts to preserve, one per line ('#' lines are skipped)."),
            _text("retained", "", "Names to keep (e.g. celebrities or artists NOT erased), one per line: each is "
                  "expanded with the templates of 'retained_kind' into a second group."),
            _combo("retained_kind", KIND, "Templates for the retained names: object (people) or style.", "object"),
        ),
        outputs=(Out(PRESERVATION, "preservation", "Preservation statistics for Refine Cross-Attention and Fuse "
                     "LoRAs."),),
        run=run.preservation_set,
    ),
    NodeSpec(
        "MaceRefineCrossAttention", "Refine Cross-Attention",
        "Stage 1 of MACE: closed-form refinement of every cross-attention to_k/to_v so that the words around each "
        "concept stop carrying it. Returns a patched copy; the input MODEL is untouched.",
        inputs=(
            In("model", "MODEL", MODEL_IN), CLIP, CONCEPTS_IN, PRESERVATION_IN,
            *_weights(1e9, "Weight of the general preservation prompts (scale-free).",
                      "Weight of the retained names' prompts.",
                      "Ridge λ·||W - W0||² keeping the weights near the original."),
        ),
        outputs=(Out("MODEL", "refined_model", "The model with refined cross-attention (a patched clone; remembers "
                     "its base model)."),),
        run=run.refine_cross_attention,
    ),
    NodeSpec(
        "MaceTrainConceptLoRA", "Train Concept LoRA",
        "Stage 2 of MACE: one rank-r LoRA per concept on the refined model's to_k/to_v, trained to remove the "
        "concept's attention inside its mask. Training images come from the ORIGINAL model (or yours). Finished "
        "concepts are cached, so a re-queue resumes.",
        inputs=(
            In("original_model", "MODEL", "The model before erasure: it draws the training images."),
            In("refined_model", "MODEL", "The output of Refine Cross-Attention: the LoRAs sit on it."),
            CLIP, In("vae", "VAE", "The checkpoint's VAE (encodes the training images)."), CONCEPTS_IN,
            _int("steps", 0, 0, 10000, "Optimiser steps per concept; 0 uses the preset's (50 by default)."),
            _float("learning_rate", 0.0, 0.0, 1.0, 1e-6, "AdamW learning rate; 0 uses the preset's (1e-4 people/art, "
                   "1e-5 objects)."),
            _int("rank", 1, 1, 64, "LoRA rank (the reference uses 1)."),
            _int("seed", 0, 0, 2**31 - 1, "Seed of the training images, LoRA init and timesteps."),
            _int("batch_size", 1, 1, 64, "Training samples per concept per step."),
            _int("images_per_concept", 8, 1, 256, "Training images generated per concept."),
            _int("sample_steps", 30, 1, 200, "Sampler steps per training image."),
            *_sampling("Classifier-free guidance of the training images.",
                       "Side of the square training images, in pixels."),
            In("images", "IMAGE", "Your own training images for one concept (see images_for).", optional=True),
            In("masks", "MASK", "Masks of the concept in those images (white = concept).", optional=True),
            In("images_for", "STRING", "The concept phrase the images/masks belong to; empty = the first concept.",
               default="", optional=True),
        ),
        outputs=(Out(LORA_BANK, "lora_bank", "One LoRA per concept, with its per-step losses."),),
        run=run.train_concept_lora,
        hidden=("unique_id",),
    ),
    NodeSpec(
        "MaceFuseLoRAs", "Fuse LoRAs",
        "Stage 3 of MACE: closed-form fusion of all concept LoRAs into the refined model (no interference between "
        "concepts). Returns the erased MODEL and the erasure (for saving or applying).",
        inputs=(
            In("refined_model", "MODEL", "The output of Refine Cross-Attention."), CLIP,
            In("lora_bank", LORA_BANK, "From Train Concept LoRA."), PRESERVATION_IN,
            *_weights(1e12, "Weight of the general preservation prompts in the fusion.",
                      "Weight of the retained names' prompts in the fusion.",
                      "Ridge λ·||W - W1||² keeping the weights near the refined ones."),
            In("pooled_channel", "BOOLEAN", "SDXL: also edit label_emb's pooled-text columns in closed form, so the "
               "concepts do not reach the UNet through bigG's pooled embedding (the preservation prompts are kept). "
               "Off by default; ignored, with a console warning, on SD1.x / SD2.x models. Optional, so graphs saved "
               "before it existed still run.", default=False, optional=True),
        ),
        outputs=(Out("MODEL", "erased_model", "The erased model (a patched clone; feed it to CheckpointSave for a "
                     "sanitized checkpoint)."),
                 Out(ERASURE, "erasure", "The new to_k/to_v matrices (and label_emb difference) and their "
                     "provenance.")),
        run=run.fuse_loras,
    ),
    NodeSpec(
        "MaceFuseExternalLoRAs", "Fuse External LoRAs",
        "Fuse LoRAs trained elsewhere (kohya, diffusers or peft files on the cross-attention to_k/to_v), one per "
        "concept, with MACE's closed form instead of stacking them. A LoRA that also adapts other modules is refused "
        "with their list, unless allowed (then they are listed, not fused).",
        inputs=(
            In("model", "MODEL", "The model the LoRAs were trained on."),
            In("clip", "CLIP", "The checkpoint's CLIP (it encodes each concept's prompts)."),
            In("concepts", CONCEPTS, "From MACE Concept List: one concept per LoRA, same order."), PRESERVATION_IN,
            _text("lora_files", "", "One LoRA file of the loras folder per line, the i-th for the i-th concept "
                  "(.safetensors with kohya, diffusers or peft keys)."),
            In("allow_other_modules", "BOOLEAN", "Off: a LoRA with keys outside the cross-attention to_k/to_v is "
               "refused. On: only its to_k/to_v are fused and the other modules are listed in the report.",
               default=False),
            *_weights(1e12, "Weight of the general preservation prompts in the fusion.",
                      "Weight of the retained names' prompts in the fusion.",
                      "Ridge λ·||W - W0||² keeping the weights near the model's."),
        ),
        outputs=(Out("MODEL", "erased_model", "The model with the fused to_k/to_v (a patched clone)."),
                 Out(ERASURE, "erasure", "The new to_k/to_v matrices and their provenance (for Save Erasure)."),
                 Out("STRING", "report", "Which file went to which concept, its key style, and every module that was "
                     "ignored.")),
        run=run.fuse_external_loras,
    ),
    NodeSpec(
        "MaceApplyErasure", "Apply Erasure",
        "Apply a MACE erasure to the base model it was made for (refuses any other model): its to_k/to_v "
        "differences and, for an SDXL erasure that edits the pooled channel, its label_emb difference.",
        inputs=(
            In("model", "MODEL", "The base model the erasure was made for."), ERASURE_IN,
            _float("strength", 1.0, 0.0, 2.0, 0.05, "1 = the erasure as made; 0 = no change; in between blends."),
        ),
        outputs=(Out("MODEL", "model", "A patched clone with the erased to_k/to_v (and label_emb) (the input MODEL "
                     "is untouched)."),),
        run=run.apply_erasure,
    ),
    NodeSpec(
        "MaceSaveErasure", "Save Erasure",
        "Save the erasure as a small safetensors file in ComfyUI's output folder: only the changed matrices, as "
        "differences that ComfyUI's stock LoRA loader also applies. Never overwrites.",
        inputs=(
            ERASURE_IN,
            _text("filename_prefix", "mace/erasure", "Relative path in the output folder; a counter is appended "
                  "(never overwrites).", multiline=False),
        ),
        outputs=(),
        run=run.save_erasure,
        output_node=True,
    ),
    NodeSpec(
        "MaceLoadErasure", "Load Erasure",
        "Load a MACE erasure file (from output/mace or the loras folder).",
        inputs=(_combo("erasure_file", _erasure_files, "An erasure file: output/... (saved by Save Erasure) or "
                       "loras/..."),),
        outputs=(Out(ERASURE, "erasure", "The erasure, for Apply Erasure or MACE Erasure Preview."),),
        run=run.load_erasure,
        fingerprint=run.erasure_file_fingerprint,
    ),
    NodeSpec(
        "MaceErasurePreview", "MACE Erasure Preview",
        "Images of erased and preserved prompts, before | after side by side (same seeds), and the report's "
        "numbers: anchor distance before -> after per concept, drift of preserved prompts.",
        inputs=(
            *_compare("previewed"),
            _text("preserved_prompts", "a photo of a dog\na portrait of a man\na landscape painting",
                  "Prompts that should NOT change, one per line."),
            _int("max_concepts", 4, 0, 64, "How many concepts get images (the numbers cover all)."),
            _int("seed", 0, 0, 2**31 - 1, "Seed (the same for before and after)."),
            _int("steps", 20, 1, 200, "Sampler steps."),
            *_sampling("Classifier-free guidance.", "Side of the square images, in pixels."),
        ),
        outputs=(Out("IMAGE", "before_after", "One row per prompt: before (left) | after (right)."),
                 Out("STRING", "report", "The numbers as text.")),
        run=run.erasure_preview,
        output_node=True,
    ),
    NodeSpec(
        "MaceRobustnessProbe", "MACE Robustness Probe",
        "Is it really gone? Samples the erased and the original model under attacks (the concepts' own prompts, your "
        "paraphrases, an adversarial prompt file, a few steps of relearning on unrelated prompts) and reports how "
        "often each erased concept is recognised, worst first, with sample sizes. nudenet (when installed) judges "
        "explicit concepts; other concepts get image grids only. Concept inversion needs the command line "
        "(mace-erase probe).",
        inputs=(
            *_compare("probed"),
            _text("paraphrases", "", "Prompts the erasure never saw, one 'phrase: prompt' per line."),
            _combo("prompt_file", PROBE_FILES, "An adversarial prompt file, sampled once and judged per concept.",
                   "none"),
            _text("prompt_file_path", "", "Or your own CSV (a 'prompt' column) / text file; overrides the list.",
                  multiline=False),
            _int("prompt_limit", 20, 1, 5000, "Use only the first N prompts of the file."),
            _text("relearn_prompts", "a photo of a dog\na landscape painting\na city street at night",
                  "Unrelated prompts: the erased model is fine-tuned on the original's images of them. Empty: no "
                  "relearning."),
            _int("relearn_steps", 20, 0, 1000, "Fine-tuning steps of to_k/to_v (0: no relearning)."),
            _int("samples", 8, 1, 1000, "Samples per concept and attack."),
            _int("seed", 0, 0, 2**31 - 1, SEED),
            _int("steps", 20, 1, 200, "Sampler steps."),
            *_sampling("Classifier-free guidance.", "Side of the square images, in pixels."),
        ),
        outputs=(Out("IMAGE", "grids", "Per concept and attack: original samples (top row) and erased samples "
                     "(bottom row)."),
                 Out("STRING", "report", "The leak table (markdown): rate k/n per attack beside the original "
                     "model's.")),
        run=run.robustness_probe,
        output_node=True,
    ),
)

BY_ID: dict[str, NodeSpec] = {spec.node_id: spec for spec in NODES}
