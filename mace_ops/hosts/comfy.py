"""The ComfyUI host: a MODEL (``comfy.model_patcher.ModelPatcher``), its CLIP and optionally its VAE.

Families (``mace_ops.family``): SD1.x, SD2.x and SDXL base, read from the MODEL's UNet (the width of its
cross-attention context and the inputs of its ``label_emb``, never a list of model names); a text-only
host reads it from the CLIP's encoders (tokenizer keys ``l``; ``h``; ``g`` + ``l``). The context is what
ComfyUI's CLIP gives its UNet (SDXL: ``cat(CLIP-L penultimate, bigG penultimate)``, 2048; SD2.x: OpenCLIP-H
penultimate after the final LN, 1024). SDXL's UNet also reads ``y = label_emb input = cat(pooled bigG,
6 × Timestep(256) of (h, w, 0, 0, h, w))``, built by the model's own ``encode_adm`` from
``encode_pooled``; the size ids are those of an uncropped image of the latent's size × 8.

Imported only inside ComfyUI (every ``comfy`` import is lazy, in the functions that need it).

Names. The UNet is ``model.model.diffusion_model`` (LDM layout), so our block names are its own module
paths: ``input_blocks.1.1.transformer_blocks.0.attn2``; a weight's ComfyUI key is
``diffusion_model.<block>.to_k.weight``. ComfyUI's attention patches address the same block as
``("input", 1, 0)`` = (kind, index in input_blocks/output_blocks, transformer index 0–9 inside the block's
transformer); middle is ``("middle", 0, t)``. Blocks are every ``attn2`` of the UNet (SD1.x/SD2.x 16, SDXL 70).

Weights (never written). The weights of a host are the model's own tensors with the ModelPatcher's
patches applied, computed on a float32 CPU copy with ComfyUI's ``comfy.lora.calculate_weight``; the
unpatched tensor comes from the patcher's backup when another clone of the same module is currently
loaded with its patches in place. ``with_weights(W)`` returns a host on ``model.clone()`` with the
patches ``W - W_current`` (ComfyUI's full-difference patch), so every other view of the MODEL is
untouched; ``with_weights(W, label_emb=L)`` (``with_label_emb``) patches SDXL's ``label_emb.0.0.weight``
(the pooled channel) the same way. The clone carries the weights it started from (before any MACE edit) as
a patcher attachment (``"mace_base"``): ``original_weights()`` / ``original_label_emb_weight()`` of hosts
made from it, e.g. in a later node.
``model_fingerprint()`` identifies the checkpoint: the hash of the to_k/to_v as loaded, without any
patch, so a MODEL keeps its fingerprint through MACE edits and LoRAs.

Instrumented UNet (gradients inside a node). ComfyUI runs nodes under ``torch.inference_mode()``: the
loaded weights are inference tensors and cannot be saved for backward. ``instrument`` therefore runs a
PRIVATE copy of the UNet (built once per host and patch state, outside inference mode, from the effective
weights, in the MODEL's compute dtype; its parameters are frozen, ordinary tensors), and calls it directly:
``eps = UNet(x_t, t, context[, y])`` with ComfyUI's own ``attn2`` replace patch for ``attention`` (the block
gets the projected q/k/v) and private ``to_k``/``to_v`` modules for ``linears``. Nothing of the shared
model is touched; the private modules are put back on exit, also on error. Only the MODEL's weight
patches reach this forward (its transformer patches, wrappers and object patches on UNet modules do
not): it is the plain noise predictor the MACE loss is defined on.

Model management. Devices are ComfyUI's: the MODEL's ``load_device`` / ``offload_device`` (``--cpu``: the
CPU), the CLIP's and VAE's own (ComfyUI loads them itself in ``encode_from_tokens`` / ``encode`` /
``decode``; sampling loads the MODEL in ``comfy.sample.sample``). The private copy is a ComfyUI
``ModelPatcher`` built on the offload device; the first forward of a training step loads it whole with
``comfy.model_management.load_models_gpu(memory_required=training_memory(...), force_full_load=True)``, so
ComfyUI frees what it needs and can evict the copy later like any model. On a GPU the MODEL (and its
clones), the CLIP and the VAE are unloaded first (``unload_model_and_clones``): a training step reads
none of them, and no second full UNet stays on the GPU. ``--lowvram`` cannot split a UNet that is
trained through (the backward keeps every layer's weights, as ComfyUI's own trainer loads it whole
unless it offloads with its own checkpointing); an out-of-memory load is a ``MaceError`` that says so.

Sampling (``generate``) is ComfyUI's own KSampler (``comfy.sample.sample``, sampler ``euler``,
scheduler ``normal`` by default) on a clone, classifier-free guidance with the empty prompt (SDXL: each
conditioning carries its ``pooled_output`` and the image size, as ComfyUI's SDXL text encode node does); prompt
``i``'s initial noise is ``comfy.sample.prepare_noise`` of seed ``seed + i``. The attention probe is an
``attn2`` replace patch on that clone computing ``P = softmax(QKᵀ/√d)`` explicitly; of each batch it
forwards the chunks that ``extra_options["cond_or_uncond"]`` marks as conditional (0).

VAE: ComfyUI's IMAGE is (B, H, W, 3) in [0, 1] and its LATENT is the unscaled VAE latent; the host
works in (B, 3, H, W) in [-1, 1] and scaled latents (``latent_format.process_in``: × 0.18215, SDXL × 0.13025).
``alphas_cumprod`` is ``1 / (1 + σ²)`` of ``model.model.model_sampling.sigmas`` (ComfyUI keeps σ, not ᾱ).
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import explicit_attention
from ..errors import MaceError
from ..family import FAMILIES, SD1, ModelFamily, family_from_unet_dims
from ..tokens import MAX_LENGTH
from .base import (
    AttentionFn,
    CrossAttentionBlock,
    LinearFn,
    UNetFn,
    check_generate_args,
    check_matrix_names,
    check_weight_shapes,
    matrix_names,
    weights_fingerprint,
)

#: key prefix of the UNet in a ComfyUI model's state (model.diffusion_model.<path>.weight in a checkpoint file)
COMFY_UNET_PREFIX = "diffusion_model."
#: SDXL's pooled channel, the first linear layer of ``label_emb`` (``mace_ops.pooled``)
LABEL_EMB_KEY = f"{COMFY_UNET_PREFIX}label_emb.0.0.weight"
ATTACHMENT = "mace_base"
#: input_blocks.<i>.<j>.transformer_blocks.<t>.attn2 | middle_block.<j>.transformer_blocks.<t>.attn2 | output_...
_BLOCK_RE = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<number>\d+)\.\d+|middle_block\.\d+)\.transformer_blocks\.(?P<index>\d+)\.attn2$"
)
#: prompts per text-encoder call in ``encode``
ENCODE_BATCH = 64
#: CLIP object -> ((patches_uuid, layer_idx), fingerprint): hashing CLIP-L takes seconds on a CPU
_TEXT_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def normal_tensor(t: Tensor) -> Tensor:
    """A copy of ``t`` that is an ordinary tensor (not an inference tensor), detached."""
    with torch.inference_mode(False):
        return t.detach().clone()


def comfy_block_key(block: str) -> tuple[str, int, int]:
    """LDM block name -> ComfyUI's attention-patch key ``(kind, number, transformer_index)``."""
    m = _BLOCK_RE.match(block)
    if m is None:
        raise MaceError(f"cross-attention block {block!r} is not an LDM UNet block path (input/middle/output_blocks)")
    if m.group("kind") is None:
        return "middle", 0, int(m.group("index"))
    return m.group("kind"), int(m.group("number")), int(m.group("index"))


def _comfy_pixels(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) in [0, 1], float32 CPU, a permuted view (not contiguous)."""
    return ((images.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)


def effective_weight(patcher: Any, key: str, *, patched: bool = True) -> Tensor:
    """The weight ``key`` of the patcher's model with its patches applied (``patched``) or as loaded
    from the checkpoint (not ``patched``), float32 CPU copy.

    The unpatched tensor is the patcher's backup when the shared module is currently loaded with
    patches in place, else the module's own tensor; patches are applied by ComfyUI's
    ``comfy.lora.calculate_weight`` exactly as at load time (float32)."""
    import comfy.lora
    import comfy.utils

    backup = patcher.backup.get(key)
    raw = backup.weight if backup is not None else comfy.utils.get_attr(patcher.model, key)
    with torch.inference_mode(False):
        w = raw.detach().to("cpu", torch.float32, copy=True)
        if patched and key in patcher.patches:
            w = comfy.lora.calculate_weight(patcher.patches[key], w, key, intermediate_dtype=torch.float32)
        return w.float()


class _FnLinear(nn.Module):
    """A module calling ``fn(context)``: stands in for a private copy's to_k / to_v. ``cast``: the result in
    the context's dtype (ComfyUI's own attention needs q, k, v of one dtype; our attention patch does not)."""

    def __init__(self, fn: LinearFn, cast: bool = False) -> None:
        super().__init__()
        self.fn = fn
        self.cast = cast

    def forward(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        return out.to(x.dtype) if self.cast else out


class _PrivateUNet(nn.Module):
    """What ComfyUI's ``ModelPatcher`` manages for the private UNet: ``diffusion_model`` and its dtype."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.dtype = dtype

    def get_dtype(self) -> torch.dtype:
        return self.dtype


#: what a training step keeps for backward per latent pixel of one sample, in units of the compute dtype's
#: size: 2.16 GiB per 512 px sample in fp16, counted for the SD1.5 UNet by ``benchmarks/bench_train_memory.py``
#: (flash attention; SDXL's deeper transformers keep more, so this is a lower bound there)``
ACTIVATION_ELEMENTS_PER_LATENT_PIXEL = 2.84e5


def compute_dtype(patcher: Any) -> torch.dtype:
    """The dtype ComfyUI computes the MODEL's UNet in (its manual-cast dtype, else its weights'); float32
    for anything other than float32/float16/bfloat16 (fp8 weights are computed in their manual-cast dtype)."""
    base = patcher.model
    get = getattr(base, "get_dtype_inference", None) or getattr(base, "get_dtype", None)
    dtype = get() if get is not None else None
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def training_memory(patcher: Any, x_shape: Sequence[int]) -> int:
    """Bytes to ask ComfyUI for, besides the weights, for one training step on latents ``x_shape``
    (B, 4, h, w): the larger of ComfyUI's own inference estimate (``BaseModel.memory_required``) and
    ``ACTIVATION_ELEMENTS_PER_LATENT_PIXEL · B·h·w · dtype size`` (saved activations of the backward)."""
    b, h, w = int(x_shape[0]), int(x_shape[-2]), int(x_shape[-1])
    size = torch.empty((), dtype=compute_dtype(patcher)).element_size()
    saved = ACTIVATION_ELEMENTS_PER_LATENT_PIXEL * b * h * w * size
    estimate = getattr(patcher.model, "memory_required", None)
    inference = float(estimate(list(x_shape))) if estimate is not None else 0.0
    return int(max(saved, inference))


def on_cpu(device: torch.device) -> bool:
    """ComfyUI's ``is_device_cpu`` (``--cpu``: nothing to unload, RAM is the only memory)."""
    import comfy.model_management

    return bool(comfy.model_management.is_device_cpu(device))


def ordinary_tensors(module: nn.Module) -> None:
    """Replace any inference tensor among ``module``'s parameters and buffers by an ordinary copy (a
    model moved by ComfyUI inside a node's ``inference_mode`` gets inference tensors: no backward)."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.detach().clone()


def encoder_key(name: str) -> str:
    """ComfyUI's tokenizer key of a family encoder: "clip_l" -> "l", "clip_g" -> "g", "clip_h" -> "h"."""
    return name.removeprefix("clip_")


def unet_family(diffusion_model: nn.Module, blocks: Mapping[str, nn.Module]) -> ModelFamily:
    """The family of a ComfyUI UNet from its shapes: the context width of its cross-attention (``to_k``
    columns, the same in every block) and the inputs of ``label_emb``'s first linear layer (0: none)."""
    widths = {int(m.to_k.weight.shape[1]) for m in blocks.values()}
    if len(widths) != 1:
        raise MaceError(f"MODEL input: cross-attention blocks read contexts of widths {sorted(widths)}; "
                        "give an SD1.x, SD2.x or SDXL base model")
    label_emb = getattr(diffusion_model, "label_emb", None)
    first = next((m for m in label_emb.modules() if isinstance(m, nn.Linear)), None) if label_emb is not None else None
    adm = int(first.in_features) if first is not None else 0
    return family_from_unet_dims(widths.pop(), adm)


def clip_family(clip: Any) -> ModelFamily:
    """The family whose text encoders are the CLIP's (its tokenizer keys: SD1.x ``l``, SD2.x ``h``, SDXL ``g, l``)."""
    keys = set(clip.tokenize(""))
    for fam in FAMILIES.values():
        if {encoder_key(e.name) for e in fam.encoders} == keys:
            return fam
    raise MaceError(f"CLIP input: text encoders {sorted(keys)} are not SD1.x's (l), SD2.x's (h) or SDXL's (g, l); "
                    "connect the checkpoint's own CLIP")


class ComfyHost:
    """A ``Host`` over ComfyUI's MODEL, CLIP and VAE (none of them is ever mutated)."""

    max_length: int = MAX_LENGTH
    family: ModelFamily = SD1  # replaced in __init__ by the family read from the MODEL (or the CLIP)

    def __init__(
        self,
        model: Any,
        clip: Any = None,
        vae: Any = None,
        *,
        sampler_name: str = "euler",
        scheduler: str = "normal",
    ) -> None:
        """``model``: a ModelPatcher of an SD1.x, SD2.x or SDXL base UNet (None: a text-only host for
        CLIP-only work); ``clip``: its CLIP (text methods need it); ``vae``: its VAE (``vae_*`` and
        ``generate`` need it). The family is read from the UNet's shapes (text-only: from the CLIP)."""
        self.model = model
        self.clip = clip
        self.vae = vae
        self.sampler_name = sampler_name
        self.scheduler = scheduler
        self._modules: dict[str, nn.Module] = {}
        self._cache: dict[str, Any] = {}
        if model is None:
            if clip is not None:
                self.family = clip_family(clip)
            return
        dm = getattr(getattr(model, "model", None), "diffusion_model", None)
        if dm is None:
            raise MaceError("MODEL input: not a ComfyUI diffusion model (no model.diffusion_model); connect a MODEL")
        for name, m in dm.named_modules():
            if name.endswith(".attn2") and _BLOCK_RE.match(name) and hasattr(m, "to_k") and hasattr(m, "to_v"):
                self._modules[name] = m
        if not self._modules:
            raise MaceError("MODEL input: the UNet has no cross-attention blocks (input_blocks.*.attn2); "
                            "connect an SD1.x, SD2.x or SDXL model")
        self.family = unet_family(dm, self._modules)

    def _need_model(self) -> Any:
        if self.model is None:
            raise MaceError("MODEL input: this step needs the diffusion model; connect the checkpoint's MODEL")
        return self.model

    # ------------------------------------------------------------------ provenance
    def _attachment(self) -> dict[str, Any] | None:
        get = getattr(self._need_model(), "get_attachment", None)
        return get(ATTACHMENT) if get is not None else None

    def original_weights(self) -> dict[str, Tensor]:
        """The to_k/to_v of the base model this MODEL was derived from by MACE (its own when none)."""
        return self._original_weights()

    def _original_weights(self, current: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``original_weights``; ``current``: this host's ``cross_attention_weights()`` when already at hand
        (returned as they are when there is no attachment, instead of being computed again)."""
        att = self._attachment()
        if att is not None:
            return {k: v.clone() for k, v in att["weights"].items()}
        return current if current is not None else self.cross_attention_weights()

    def model_fingerprint(self) -> str:
        """``weights_fingerprint`` (as the diffusers host) of the to_k/to_v AS LOADED from the checkpoint
        (the shared module's own tensors, without any patch), in block order: every clone of a loaded
        MODEL, patched by MACE or by LoRAs, has its checkpoint's fingerprint."""
        if "fingerprint" not in self._cache:
            model = self._need_model()
            names = matrix_names(list(self._modules))
            w = {n: effective_weight(model, f"{COMFY_UNET_PREFIX}{n}.weight", patched=False) for n in names}
            self._cache["fingerprint"] = weights_fingerprint(w, names)
        return self._cache["fingerprint"]

    def text_encoder_fingerprint(self) -> str:
        """``weights_fingerprint`` of every text-encoder tensor with the CLIP's patches applied, plus the
        CLIP's output layer (``CLIPSetLastLayer``). Remembered per CLIP object and patch state."""
        clip = self._need_clip()
        patcher = clip.patcher
        state = (getattr(patcher, "patches_uuid", None), clip.layer_idx)
        known = _TEXT_FINGERPRINTS.get(clip)
        if known is not None and known[0] == state:
            return known[1]
        weights = {k: effective_weight(patcher, k) for k in patcher.model.state_dict()}
        weights["layer_idx"] = torch.tensor([-(10**6) if clip.layer_idx is None else int(clip.layer_idx)],
                                            dtype=torch.float32)
        fingerprint = weights_fingerprint(weights, list(weights))
        try:
            _TEXT_FINGERPRINTS[clip] = (state, fingerprint)
        except TypeError:  # not weak-referenceable: just do not remember it
            pass
        return fingerprint

    # ------------------------------------------------------------------ text
    def _need_clip(self) -> Any:
        if self.clip is None:
            raise MaceError("CLIP input: this step needs the model's CLIP; connect the checkpoint's CLIP")
        return self.clip

    def _sections(self, prompts: Sequence[str]) -> dict[str, list[list[tuple[int, float]]]]:
        """Tokenize each prompt with the CLIP's tokenizer; ``{encoder key: [first 77-token section of each
        prompt]}``, the keys of this host's family (SDXL: ``g`` and ``l``)."""
        clip = self._need_clip()
        want = [encoder_key(e.name) for e in self.family.encoders]
        out: dict[str, list[list[tuple[int, float]]]] = {k: [] for k in want}
        for p in prompts:
            tokens = clip.tokenize(p)
            if sorted(tokens) != sorted(want):
                raise MaceError(f"CLIP input: text encoders {sorted(tokens)}, but the MODEL is {self.family.name}, "
                                f"which reads {sorted(want)}; connect the checkpoint's own CLIP")
            for k in want:
                out[k].append([tuple(t[:2]) for t in tokens[k][0]])
        return out

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of the family's first encoder as ComfyUI's tokenizer pads them (start, tokens, end,
        padding), first 77 (SDXL: CLIP-L's; bigG's differ only after the end token)."""
        sections = self._sections(prompts)[encoder_key(self.family.encoders[0].name)]
        out = []
        for sec in sections:
            ids = []
            for tok, _w in sec:
                if not isinstance(tok, int):
                    raise MaceError("prompt uses a textual-inversion embedding; MACE prompts must be plain text")
                ids.append(tok)
            out.append(ids)
        return out

    def encode_pooled(self, prompts: Sequence[str]) -> Tensor | None:
        """The pooled text embedding ComfyUI's CLIP gives the UNet (SDXL: projected bigG, (B, 1280)) float32,
        one ``encode_from_tokens`` call per prompt (ComfyUI returns the first section's pooled output only);
        None when the family has no pooled channel (SD1.x, SD2.x)."""
        if not self.family.pooled_dim:
            return None
        prompts = list(prompts)
        if not prompts:
            raise MaceError("encode_pooled: give at least one prompt")
        clip = self._need_clip()
        sections = self._sections(prompts)
        parts = []
        with torch.no_grad():
            for i in range(len(prompts)):
                _, pooled = clip.encode_from_tokens({k: [v[i]] for k, v in sections.items()}, return_pooled=True)
                parts.append(pooled.reshape(1, -1).float().cpu())
        pooled = normal_tensor(torch.cat(parts))
        if pooled.shape[-1] != self.family.pooled_dim:
            raise MaceError(f"CLIP input: pooled output of width {pooled.shape[-1]}; {self.family.name} needs "
                            f"{self.family.pooled_dim}: connect the checkpoint's own CLIP")
        return pooled

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Per-token states ComfyUI feeds the UNet as context, (B, 77, d_ctx) float32, no grad.

        Prompts are encoded ENCODE_BATCH at a time as sections of one ``encode_from_tokens`` call
        (ComfyUI encodes sections as a batch and concatenates them along the sequence)."""
        prompts = list(prompts)
        if not prompts:
            raise MaceError("encode: give at least one prompt")
        clip = self._need_clip()
        sections = self._sections(prompts)
        d = self.family.context_dim
        parts = []
        with torch.no_grad():
            for i in range(0, len(prompts), ENCODE_BATCH):
                chunk = {k: v[i : i + ENCODE_BATCH] for k, v in sections.items()}
                cond = clip.encode_from_tokens(chunk)  # (1, 77·n, d)
                n = min(ENCODE_BATCH, len(prompts) - i)
                if tuple(cond.shape[1:]) != (n * self.max_length, d):
                    raise MaceError(f"CLIP input: got states {tuple(cond.shape[1:])} for {n} prompts; {self.family.name} "
                                    f"needs {MAX_LENGTH} states of width {d} each: connect the checkpoint's own CLIP")
                parts.append(cond.reshape(n, self.max_length, d).float().cpu())
            return normal_tensor(torch.cat(parts))

    # ------------------------------------------------------------------ weights
    def cross_attention_blocks(self) -> list[CrossAttentionBlock]:
        self._need_model()
        out = []
        for name, m in self._modules.items():
            d_out, d_ctx = m.to_k.weight.shape
            out.append(CrossAttentionBlock(name, int(m.heads), int(m.dim_head), int(d_out), int(d_ctx)))
        return out

    def cross_attention_weights(self) -> dict[str, Tensor]:
        """The effective (patched) to_k/to_v, float32 CPU copies, in block order."""
        model = self._need_model()
        names = matrix_names(list(self._modules))
        return {n: effective_weight(model, f"{COMFY_UNET_PREFIX}{n}.weight") for n in names}

    def label_emb_weight(self) -> Tensor | None:
        """The effective (patched) ``label_emb.0.0.weight`` (SDXL: (d_t, 2816)), float32 CPU copy; None when
        the UNet has no ``label_emb`` linear layer (SD1.x, SD2.x)."""
        model = self._need_model()
        layer = getattr(getattr(model.model.diffusion_model, "label_emb", None), "0", None)
        if not isinstance(getattr(layer, "0", None), nn.Linear):
            return None
        return effective_weight(model, LABEL_EMB_KEY)

    def original_label_emb_weight(self) -> Tensor | None:
        """``label_emb.0.0.weight`` of the base model this MODEL was derived from by MACE (as
        ``original_weights``); None without ``label_emb``."""
        att = self._attachment()
        if att is not None and att.get("label_emb") is not None:
            return att["label_emb"].clone()
        return self.label_emb_weight()

    def with_label_emb(self, weight: Tensor) -> ComfyHost:
        """``with_weights({}, label_emb=weight)``: only SDXL's pooled channel changes."""
        return self.with_weights({}, label_emb=weight)

    def with_weights(self, weights: Mapping[str, Tensor], *, label_emb: Tensor | None = None) -> ComfyHost:
        """A host on ``model.clone()`` whose to_k/to_v are ``weights`` (missing names keep this host's) and,
        with ``label_emb``, whose ``label_emb.0.0.weight`` is that; the patches are the differences to this
        host's weights. This host's MODEL is untouched."""
        current = self.cross_attention_weights()
        check_matrix_names("weights", weights, current)
        check_weight_shapes(weights, {n: tuple(w.shape) for n, w in current.items()})
        base = {"weights": self._original_weights(current), "label_emb": self.original_label_emb_weight()}
        clone = self.model.clone()
        with torch.inference_mode(False):
            diffs = {
                f"{COMFY_UNET_PREFIX}{n}.weight": (w.detach().to("cpu", torch.float32) - current[n],)
                for n, w in weights.items()
            }
            if label_emb is not None:
                now = self.label_emb_weight()
                if now is None or tuple(now.shape) != tuple(label_emb.shape):
                    raise MaceError(f"MODEL input: a label_emb weight of shape {tuple(label_emb.shape)} does not "
                                    f"fit this {self.family.name} model (its label_emb: "
                                    f"{None if now is None else tuple(now.shape)}); use an SDXL base model")
                diffs[LABEL_EMB_KEY] = (label_emb.detach().to("cpu", torch.float32) - now,)
        added = clone.add_patches(diffs, 1.0, 1.0)
        if len(added) != len(diffs):
            raise MaceError("MODEL input: ComfyUI did not accept the weight patches (unexpected key layout)")
        clone.set_attachments(ATTACHMENT, base)
        return ComfyHost(clone, self.clip, self.vae, sampler_name=self.sampler_name, scheduler=self.scheduler)

    # ------------------------------------------------------------------ UNet with gradients
    def _device(self) -> torch.device:
        return torch.device(self.model.load_device)

    def _private_patcher(self) -> Any:
        """The private UNet copy as a ComfyUI ``ModelPatcher`` (built once per patch state, see the module
        docstring): the effective weights as frozen ORDINARY tensors in the MODEL's compute dtype, on its
        offload device; ``_load_private`` puts it on the load device through ComfyUI's model management."""
        uuid = getattr(self.model, "patches_uuid", None)
        cached = self._cache.get("unet")
        if cached is not None and cached[0] == uuid:
            return cached[1]
        import comfy.model_patcher

        self._cache.pop("unet", None)  # the old copy goes before a new one is built
        self._cache.pop("asked", None)
        dm = self.model.model.diffusion_model
        dtype = compute_dtype(self.model)
        offload = torch.device(getattr(self.model, "offload_device", "cpu"))
        memo: dict[int, Any] = {}
        with torch.inference_mode(False):
            for name, p in dm.named_parameters():
                w = effective_weight(self.model, f"{COMFY_UNET_PREFIX}{name}")
                memo[id(p)] = nn.Parameter(w.to(offload, dtype), requires_grad=False)
            for _name, b in dm.named_buffers():
                memo[id(b)] = b.detach().to(offload, copy=True)
            unet = copy.deepcopy(dm, memo)
        for m in unet.modules():  # ComfyUI's cast/low-VRAM hooks would re-apply patches: plain torch ops
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = False
            if hasattr(m, "weight_function"):
                m.weight_function = []
            if hasattr(m, "bias_function"):
                m.bias_function = []
        unet.eval()
        patcher = comfy.model_patcher.ModelPatcher(_PrivateUNet(unet, dtype), load_device=self._device(),
                                                   offload_device=offload)
        self._cache["unet"] = (uuid, patcher)
        return patcher

    def _private_unet(self) -> nn.Module:
        """The private UNet module (``_private_patcher``'s), wherever it is now."""
        return self._private_patcher().model.diffusion_model

    def _load_private(self, x_shape: Sequence[int]) -> nn.Module:
        """The private UNet, loaded whole on the load device by ``comfy.model_management.load_models_gpu``
        with the memory one training step on latents ``x_shape`` needs (``training_memory``); on a GPU the
        MODEL, CLIP and VAE (not used by a training step) are unloaded first. Nothing is done while it is
        loaded and the last request covered ``x_shape``. Returns the module."""
        import comfy.model_management as mm

        patcher = self._private_patcher()
        need = training_memory(self.model, x_shape)
        loaded = any(lm.model is patcher for lm in mm.current_loaded_models)
        if loaded and patcher.loaded_size() >= patcher.model_size() and need <= self._cache.get("asked", 0):
            return patcher.model.diffusion_model
        if not on_cpu(self._device()):
            self._unload_unused()
        try:
            with torch.inference_mode(False):  # weights moved here are ordinary tensors
                mm.load_models_gpu([patcher], memory_required=need, force_full_load=True)
        except Exception as e:
            is_oom = getattr(mm, "is_oom", lambda err: isinstance(err, torch.OutOfMemoryError))
            if not is_oom(e):
                raise
            raise MaceError(f"not enough memory on {self._device()} to train on the whole UNet (about "
                            f"{(patcher.model_size() + need) / 2**30:.1f} GiB with this batch); train fewer "
                            "concepts at once or at a smaller image size, close other work on the GPU, or run "
                            "ComfyUI with --cpu") from e
        self._cache["asked"] = need
        unet = patcher.model.diffusion_model
        ordinary_tensors(unet)
        return unet

    def _unload_unused(self) -> None:
        """Unload the MODEL (and its clones), the CLIP and the VAE from the GPU through ComfyUI
        (``unload_model_and_clones``): a training step reads only the private UNet."""
        import comfy.model_management as mm

        unload = getattr(mm, "unload_model_and_clones", None)
        if unload is None:  # an older ComfyUI: load_models_gpu's free_memory still makes the room it needs
            return
        for part in (self.model, getattr(self.clip, "patcher", None), getattr(self.vae, "patcher", None)):
            if part is not None:
                unload(part, unload_additional_models=False)

    @contextmanager
    def instrument(
        self,
        *,
        linears: Mapping[str, LinearFn] | None = None,
        attention: AttentionFn | None = None,
    ) -> Iterator[UNetFn]:
        """Yield ``unet(x_t, t, context[, pooled]) -> eps`` on the private UNet copy (see the module docstring);
        SDXL needs ``pooled = encode_pooled(prompts)``."""
        self._need_model()
        linears = dict(linears or {})
        check_matrix_names("linears", linears, set(matrix_names(list(self._modules))))
        unet = self._private_unet()  # loaded on the device by the first call (which knows the batch shape)
        dtype = compute_dtype(self.model)
        attn2 = {b: unet.get_submodule(b) for b in self._modules}
        saved: list[tuple[nn.Module, str, nn.Module]] = []
        replace: dict[tuple[str, int, int], Callable[..., Tensor]] = {}
        if attention is not None:
            for block in self._modules:
                replace[comfy_block_key(block)] = self._attention_patch(block, attention)
        device = self._device()

        def unet_fn(x_t: Tensor, t: Tensor, context: Tensor, pooled: Tensor | None = None) -> Tensor:
            self._load_private(x_t.shape)
            with torch.inference_mode(False):
                x = x_t.to(device, dtype)
                c = context.to(device, dtype)
                ts = torch.as_tensor(t, device=device).float()
                if ts.ndim == 0:
                    ts = ts.expand(x.shape[0])
                options: dict[str, Any] = {"patches_replace": {"attn2": replace}} if replace else {}
                y = self._adm(pooled, x.shape[-2] * 8, x.shape[-1] * 8)
                y = None if y is None else y.to(device, dtype).expand(x.shape[0], -1)
                return unet(x, timesteps=ts, context=c, y=y, transformer_options=options)

        try:
            for name, fn in linears.items():
                block, which = name.rsplit(".", 1)
                module = attn2[block]
                saved.append((module, which, getattr(module, which)))
                setattr(module, which, _FnLinear(fn, cast=attention is None))
            yield unet_fn
        finally:
            for module, which, original in reversed(saved):
                setattr(module, which, original)

    def _adm(self, pooled: Tensor | None, height: int, width: int) -> Tensor | None:
        """SDXL's ``label_emb`` input (B, 2816) from the model's own ``encode_adm``: pooled bigG and the
        size ids (h, w, 0, 0, h, w) of an uncropped ``height × width`` image; None for families without."""
        if not self.family.adm_dim:
            return None
        if pooled is None:
            raise MaceError(f"a {self.family.name} UNet needs the pooled text embedding (host.encode_pooled)")
        h, w, crop_h, crop_w, target_h, target_w = self.family.size_ids(height, width)
        with torch.inference_mode(False):
            y = self.model.model.encode_adm(
                pooled_output=pooled.detach().float().cpu(), height=h, width=w, crop_h=crop_h, crop_w=crop_w,
                target_height=target_h, target_width=target_w,
            )
        if y is None or y.shape[-1] != self.family.adm_dim:
            raise MaceError(f"MODEL input: its label_emb input is {None if y is None else y.shape[-1]}-d, "
                            f"{self.family.name} needs {self.family.adm_dim}")
        return y.float()

    def _conditioning(self, states: Tensor, pooled: Tensor | None, height: int, width: int) -> list[list[Any]]:
        """ComfyUI CONDITIONING ``[[states, {...}]]``; SDXL's carries ``pooled_output`` and the image size."""
        if pooled is None:
            return [[states, {}]]
        h, w, crop_h, crop_w, target_h, target_w = self.family.size_ids(height, width)
        return [[states, {"pooled_output": pooled, "height": h, "width": w, "crop_h": crop_h, "crop_w": crop_w,
                          "target_height": target_h, "target_width": target_w}]]

    @staticmethod
    def _attention_patch(block: str, attention: AttentionFn) -> Callable[..., Tensor]:
        def patch(q: Tensor, k: Tensor, v: Tensor, extra_options: Mapping[str, Any]) -> Tensor:
            return attention(block, q, k, v, int(extra_options["n_heads"])).to(q.dtype)

        return patch

    # ------------------------------------------------------------------ schedule and VAE
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t = 1 / (1 + σ_t²) from ComfyUI's discrete schedule, (1000,) float64."""
        sigmas = getattr(self._need_model().get_model_object("model_sampling"), "sigmas", None)
        if sigmas is None:
            raise MaceError("MODEL input: the model has no discrete noise schedule; MACE needs an SD1.x, SD2.x or "
                            "SDXL model with the usual 1000-step schedule")
        s = sigmas.detach().to("cpu", torch.float64)
        return normal_tensor(1.0 / (1.0 + s * s))

    def _need_vae(self) -> Any:
        if self.vae is None:
            raise MaceError("VAE input: this step needs the model's VAE; connect the checkpoint's VAE")
        return self.vae

    def _latent_format(self) -> Any:
        return self._need_model().get_model_object("latent_format")

    def vae_encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8) via ComfyUI's VAE."""
        vae = self._need_vae()
        if images.ndim != 4 or images.shape[1] != 3:
            raise MaceError(f"images of shape {tuple(images.shape)}: expected (B, 3, H, W) in [-1, 1]")
        pixels = _comfy_pixels(images.detach())  # (B,H,W,3), not made contiguous
        with torch.no_grad():
            raw = vae.encode(pixels)
            return normal_tensor(self._latent_format().process_in(raw.float().cpu()))

    def vae_decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> (B, 3, H, W) in [-1, 1] via ComfyUI's VAE."""
        vae = self._need_vae()
        with torch.no_grad():
            raw = self._latent_format().process_out(latents.detach().float().cpu())
            images = vae.decode(raw)  # (B, H, W, 3) in [0, 1]
            if images.ndim == 5:  # some VAEs return (B, T, H, W, 3)
                images = images.reshape(-1, *images.shape[-3:])
            return normal_tensor(images.float().cpu().permute(0, 3, 1, 2) * 2.0 - 1.0)

    @staticmethod
    def to_comfy_image(images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) in [0, 1], contiguous."""
        return _comfy_pixels(images).contiguous()

    # ------------------------------------------------------------------ sampling
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
        """ComfyUI's KSampler on a clone (see the module docstring); images (B, 3, H, W) in [-1, 1]."""
        import comfy.sample

        prompts = check_generate_args(prompts, steps=steps, height=height, width=width)
        self._need_vae()
        self._need_model()
        b = len(prompts)
        cond = self._conditioning(self.encode(prompts), self.encode_pooled(prompts), height, width)  # (B, 77, d)
        uncond = self._conditioning(self.encode([""]), self.encode_pooled([""]), height, width)  # (1, 77, d)
        model = self.model.clone()
        if attention_probe is not None:
            for block in self._modules:
                kind, number, index = comfy_block_key(block)
                model.set_model_attn2_replace(self._probe_patch(block, attention_probe), kind, number, index)
        shape = (1, 4, height // 8, width // 8)
        noise = torch.cat([comfy.sample.prepare_noise(torch.zeros(shape), seed + i) for i in range(b)])
        latent = torch.zeros((b,) + shape[1:])

        def callback(step: int, x0: Any, x: Any, total: int) -> None:
            if progress is not None:
                progress(step + 1, total)

        with torch.no_grad():
            samples = comfy.sample.sample(
                model, noise, steps, cfg, self.sampler_name, self.scheduler,
                cond, uncond, latent, seed=seed, callback=callback, disable_pbar=True,
            )  # unscaled latents (B, 4, h, w)
        return self.vae_decode(self._latent_format().process_in(samples.float().cpu()))

    @staticmethod
    def _probe_patch(block: str, probe: Callable[[str, Tensor], None]) -> Callable[..., Tensor]:
        def patch(q: Tensor, k: Tensor, v: Tensor, extra_options: Mapping[str, Any]) -> Tensor:
            order = list(extra_options.get("cond_or_uncond", [0]))

            def sink(probs: Tensor) -> None:  # (B_all, heads, N, 77); chunk i is cond when order[i] == 0
                chunks = probs.chunk(len(order))
                cond = [c for c, kind in zip(chunks, order, strict=True) if kind == 0]
                if cond:
                    probe(block, torch.cat(cond))

            return explicit_attention(q, k, v, int(extra_options["n_heads"]), sink=sink).to(q.dtype)

        return patch


__all__ = ["ATTACHMENT", "ComfyHost", "comfy_block_key", "effective_weight", "normal_tensor"]
