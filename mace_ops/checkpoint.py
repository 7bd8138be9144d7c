"""SD1.x single-file checkpoints, offline: load into diffusers modules, write, and sanitize.

Single-file layout (the LDM / "original" one that ComfyUI's CheckpointLoaderSimple reads)::

    model.diffusion_model.*        UNet (LDM names, e.g. input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight)
    cond_stage_model.transformer.* CLIP text encoder (transformers names, text_model.*)
    first_stage_model.*            VAE (LDM names; attention q/k/v/proj_out as 1x1 convs)

Loading uses the architecture configs shipped in ``mace_ops/assets/sd1/`` (no hub access) and
diffusers' own LDM -> diffusers key conversions. A file may carry its own configs as json in the
metadata key ``mace.sd_configs`` (``{"unet": ..., "vae": ..., "text_encoder": ...}``); the tiny test
models use that. Writing (``write_sd1_checkpoint``) maps diffusers names back to LDM names by the
rules below and checks the result against diffusers' forward conversion, key by key.

UNet, diffusers -> LDM (``L`` = layers_per_block)::

    down_blocks.i.resnets.j      -> input_blocks.{1 + i(L+1) + j}.0   (norm1 in_layers.0, conv1 in_layers.2,
    down_blocks.i.attentions.j   -> input_blocks.{1 + i(L+1) + j}.1    time_emb_proj emb_layers.1, norm2
    down_blocks.i.downsamplers.0 -> input_blocks.{(i+1)(L+1)}.0.op     out_layers.0, conv2 out_layers.3,
    mid_block.resnets.j          -> middle_block.{2j}                  conv_shortcut skip_connection)
    mid_block.attentions.j       -> middle_block.{2j+1}
    up_blocks.i.resnets.j        -> output_blocks.{i(L+1) + j}.0
    up_blocks.i.attentions.j     -> output_blocks.{i(L+1) + j}.1
    up_blocks.i.upsamplers.0     -> output_blocks.{i(L+1) + L}.{2 if the level has attention else 1}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .errors import MaceError
from .io import atomic_save_safetensors, check_safetensors_file, read_safetensors

#: key prefix of the UNet in a single-file (LDM) checkpoint; ComfyUI's in-memory model drops the "model."
CHECKPOINT_UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
CONFIG_METADATA_KEY = "mace.sd_configs"
_PROBE_KEY = CHECKPOINT_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SD1_CONTEXT_DIM = 768


# ---------------------------------------------------------------- configs


def sd1_configs() -> dict[str, dict[str, Any]]:
    """The shipped SD1.x configs: ``{"unet", "vae", "text_encoder", "scheduler"}`` -> dict."""
    root = resources.files("mace_ops").joinpath("assets", "sd1")
    return {name: json.loads(root.joinpath(f"{name}.json").read_text(encoding="utf-8"))
            for name in ("unet", "vae", "text_encoder", "scheduler")}


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers/transformers config without its private ``_*`` keys (what a checkpoint stores)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _module_configs(unet: nn.Module, text_encoder: nn.Module, vae: nn.Module) -> dict[str, dict[str, Any]]:
    te = text_encoder.config.to_dict()
    return {"unet": public_config(unet.config), "vae": public_config(vae.config),
            "text_encoder": {k: v for k, v in te.items() if not k.startswith("_") and k != "transformers_version"}}


# ---------------------------------------------------------------- diffusers -> LDM names

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename_head(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    """``rest`` with its leading module path renamed by ``table`` ``(diffusers, ldm)``, else unchanged."""
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_ldm_names(keys: list[str], config: Mapping[str, Any]) -> dict[str, str]:
    """``{diffusers UNet key: LDM key without prefix}`` for every key (see the module docstring)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    per = int(config["layers_per_block"]) + 1
    attn_up = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out: dict[str, str] = {}
    for k in keys:
        if k in top:
            out[k] = top[k]
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", k)
        mm = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k)
        if m:
            side, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                if part == "downsamplers":
                    out[k] = f"input_blocks.{(i + 1) * per}.0.op.{rest.removeprefix('conv.')}"
                elif part == "resnets":
                    out[k] = f"input_blocks.{1 + i * per + j}.0.{_rename_head(rest, _RESNET)}"
                else:
                    out[k] = f"input_blocks.{1 + i * per + j}.1.{rest}"
            else:
                if part == "upsamplers":
                    out[k] = f"output_blocks.{i * per + per - 1}.{2 if i in attn_up else 1}.{rest}"
                elif part == "resnets":
                    out[k] = f"output_blocks.{i * per + j}.0.{_rename_head(rest, _RESNET)}"
                else:
                    out[k] = f"output_blocks.{i * per + j}.1.{rest}"
        elif mm:
            part, j, rest = mm.group(1), int(mm.group(2)), mm.group(3)
            out[k] = f"middle_block.{2 * j}.{_rename_head(rest, _RESNET)}" if part == "resnets" else f"middle_block.{2 * j + 1}.{rest}"
        else:
            raise MaceError(f"UNet tensor {k!r} has no SD1.x single-file name; only SD1.x-style UNets can be written")
    return out


def vae_ldm_names(keys: list[str], config: Mapping[str, Any]) -> dict[str, str]:
    """``{diffusers VAE key: LDM key without prefix}``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out: dict[str, str] = {}
    for k in keys:
        if k in top:
            out[k] = top[k]
            continue
        m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", k)
        mm = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", k)
        if m:
            part_of, side, i, part, j, rest = m.groups()
            level = int(i) if side == "down" else n_up - 1 - int(i)
            if part == "resnets":
                out[k] = f"{part_of}.{side}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                out[k] = f"{part_of}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        elif mm:
            part_of, part, j, rest = mm.groups()
            if part == "resnets":
                out[k] = f"{part_of}.mid.block_{int(j) + 1}.{rest}"
            else:
                out[k] = f"{part_of}.mid.attn_1.{_rename_head(rest, _VAE_ATTN)}"
        else:
            raise MaceError(f"VAE tensor {k!r} has no SD1.x single-file name; only SD1.x-style VAEs can be written")
    return out


def unet_vae_state_dict(unet: nn.Module, vae: nn.Module) -> dict[str, Tensor]:
    """The UNet and VAE as single-file tensors (LDM names, ``model.diffusion_model.`` / ``first_stage_model.``),
    checked against diffusers' own LDM -> diffusers conversion (every key and tensor must map back exactly)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    out: dict[str, Tensor] = {}
    usd = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    for k, ldm in unet_ldm_names(list(usd), unet.config).items():
        out[CHECKPOINT_UNET_PREFIX + ldm] = usd[k]
    vsd = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    for k, ldm in vae_ldm_names(list(vsd), vae.config).items():
        t = vsd[k]
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None].contiguous()  # LDM VAE attention uses 1x1 convs
        out[VAE_PREFIX + ldm] = t
    back = convert_ldm_unet_checkpoint(out, dict(unet.config))
    if set(back) != set(usd) or any(not torch.equal(back[k], usd[k]) for k in usd):
        raise RuntimeError("diffusers -> LDM UNet names do not invert diffusers' conversion")
    back = convert_ldm_vae_checkpoint(out, dict(vae.config))
    if set(back) != set(vsd) or any(not torch.equal(back[k].reshape(vsd[k].shape), vsd[k]) for k in vsd):
        raise RuntimeError("diffusers -> LDM VAE names do not invert diffusers' conversion")
    return out


def sd1_state_dict(unet: nn.Module, text_encoder: nn.Module, vae: nn.Module) -> dict[str, Tensor]:
    """The three modules as one SD1.x single-file state dict (LDM names; ``unet_vae_state_dict`` + CLIP)."""
    out = unet_vae_state_dict(unet, vae)
    for k, v in text_encoder.state_dict().items():
        out[CLIP_PREFIX + "text_model." + k.removeprefix("text_model.")] = v.detach().cpu().contiguous()
    return out


def write_sd1_checkpoint(
    unet: nn.Module,
    text_encoder: nn.Module,
    vae: nn.Module,
    path: str | os.PathLike[str],
    *,
    cross_attention_weights: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    store_configs: bool = False,
) -> Path:
    """Write the modules as an SD1.x single-file checkpoint (atomic, never overwrites).

    ``cross_attention_weights`` (``{"<block>.to_k": W}``) replace those UNet matrices in the file;
    ``store_configs`` puts the modules' configs in the metadata (for non-SD1.5 sizes, e.g. tiny).
    """
    if Path(path).exists():
        raise MaceError(f"{str(path)!r} exists; choose another name (MACE never overwrites)")
    sd = sd1_state_dict(unet, text_encoder, vae)
    replace_cross_attention(sd, cross_attention_weights or {}, str(path))
    meta = dict(metadata or {})
    if store_configs:
        meta[CONFIG_METADATA_KEY] = json.dumps(_module_configs(unet, text_encoder, vae), sort_keys=True)
    return atomic_save_safetensors(sd, path, meta)


def write_tiny_sd1_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """The tiny SD1-shaped model of ``mace_ops.tiny.build_tiny_sd(seed)`` as a single-file checkpoint."""
    from .tiny import build_tiny_sd

    sd = build_tiny_sd(seed)
    return write_sd1_checkpoint(sd.unet, sd.text_encoder, sd.vae, path, store_configs=True,
                                metadata={"mace.tiny_seed": str(seed)})


# ---------------------------------------------------------------- loading


def float_tensor(t: Tensor) -> Tensor:
    """``t`` as float32 when it is floating point (any precision), else unchanged (integer ids)."""
    return t.float() if t.is_floating_point() else t


def refused_model(keys: list[str], slice_shape: Any) -> str | None:
    """Why a single-file checkpoint is a model MACE cannot edit, by name; None when it is none of those.

    * SD3 / SD3.5 (``joint_blocks``) and FLUX (``double_blocks``): MMDiT / DiT models with no
      cross-attention: the text enters by joint attention, so there is no ``to_k``/``to_v`` to edit;
    * SDXL refiner (bigG only, 1280-d context, ``label_emb`` 2560): reads aesthetic scores, not this pipeline's
      conditioning, and is never the model that draws the concept;
    * inpainting (9 UNet input channels) and instruct-pix2pix (8): their UNet needs a mask / source image
      latent next to the noise, which the training stage does not provide."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(CHECKPOINT_UNET_PREFIX + "joint_blocks.") or has("joint_blocks."):
        return "an SD3/SD3.5 (MMDiT) checkpoint: it has no cross-attention (text enters by joint attention)"
    if has(CHECKPOINT_UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        return "a FLUX checkpoint: it has no cross-attention (text enters by joint attention)"
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        return "an SDXL refiner (OpenCLIP-bigG only, aesthetic-score conditioning): erase from the SDXL base model"
    conv_in = CHECKPOINT_UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in in keys:
        shape = slice_shape(conv_in)
        if len(shape) == 4 and shape[1] == 9:
            return "an inpainting model (9 UNet input channels: noise + mask + masked image)"
        if len(shape) == 4 and shape[1] == 8:
            return "an instruct-pix2pix model (8 UNet input channels: noise + source image)"
    return None


def check_sd1_file(path: str, keys: list[str], slice_shape: Any) -> None:
    """``MaceError`` naming what the file is when it is not a full SD1.x single file (``keys``: its tensor
    names; ``slice_shape(key)``: a tensor's shape from the header)."""
    where = f"checkpoint {path!r}"
    refused = refused_model(keys, slice_shape)
    if refused:
        raise MaceError(f"{where} is {refused}; MACE edits SD1.x, SD2.x and SDXL base models only")
    if not any(k.startswith(CHECKPOINT_UNET_PREFIX) for k in keys):
        if any(k.startswith(("lora_", "diffusion_model.")) for k in keys) or any(".lora_" in k for k in keys[:50]):
            raise MaceError(f"{where} looks like a LoRA or erasure file, not a full model; give an SD1.x checkpoint")
        raise MaceError(f"{where} has no model.diffusion_model.* tensors: not a Stable Diffusion single-file "
                        "checkpoint; give an SD1.x .safetensors checkpoint or a diffusers folder")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise MaceError(f"{where} is an SDXL checkpoint, not SD1.x; load it with mace_ops.single_file.load_host "
                        "(what mace-erase run does)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise MaceError(f"{where} is an SD2.x checkpoint (OpenCLIP text encoder), not SD1.x; load it with "
                        "mace_ops.single_file.load_host (what mace-erase run does)")
    if _PROBE_KEY not in keys:
        raise MaceError(f"{where} has no cross-attention block input_blocks.1.1 (no {_PROBE_KEY}): not an SD1.x UNet")
    shape = slice_shape(_PROBE_KEY)
    if len(shape) != 2 or shape[1] != SD1_CONTEXT_DIM:
        raise MaceError(f"{where}: cross-attention context width {shape[-1]} (SD1.x: {SD1_CONTEXT_DIM}): "
                        "not an SD1.x model")
    if not any(k.startswith(CLIP_PREFIX) for k in keys):
        raise MaceError(f"{where} has no text encoder (cond_stage_model.transformer.*); give a full SD1.x checkpoint")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise MaceError(f"{where} has no VAE (first_stage_model.*); give a full SD1.x checkpoint")


def load_checked_state(module: nn.Module, sd: dict[str, Tensor], what: str, path: str,
                       optional: tuple[str, ...] = (), model: str = "SD1.x") -> None:
    """Load ``sd`` into ``module`` (tensors assigned: a module built on the meta device gets them) after checking that the names
    and shapes match exactly (``optional``: name endings that may be extra); ``MaceError`` naming ``what``,
    ``path`` and ``model`` otherwise."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(own) if not k.endswith(optional))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise MaceError(f"checkpoint {path!r}: {what} does not match {model} ({len(missing)} tensors missing, "
                        f"{len(unexpected)} unexpected, e.g. {first!r}); give an {model} checkpoint")
    for k, v in own.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise MaceError(f"checkpoint {path!r}: {what} tensor {k!r} is {tuple(sd[k].shape)}, {model} needs "
                            f"{tuple(v.shape)}; give an {model} checkpoint")
    module.load_state_dict({k: sd[k] for k in own}, strict=True, assign=True)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"{what} tensor {name} was not loaded")


def load_sd1_modules(path: str | os.PathLike[str]) -> tuple[nn.Module, nn.Module, nn.Module, dict[str, Any]]:
    """``(unet, text_encoder, vae, configs)`` from a single-file SD1.x ``.safetensors`` checkpoint, offline.

    Tensors are cast to float32. ``configs`` holds the four configs used (file metadata or shipped).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    path = os.fspath(path)
    check_safetensors_file(path, "checkpoint")
    try:  # one pass: check the layout, then read only the three models' tensors (not EMA copies etc.)
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            meta = dict(f.metadata() or {})
            check_sd1_file(path, keys, lambda k: f.get_slice(k).get_shape())
            ckpt = {k: float_tensor(f.get_tensor(k)) for k in keys if k.startswith((CHECKPOINT_UNET_PREFIX, CLIP_PREFIX, VAE_PREFIX))}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MaceError(f"checkpoint {path!r} is corrupt: {e}") from e
    configs = sd1_configs()
    if CONFIG_METADATA_KEY in meta:
        try:
            configs.update(json.loads(meta[CONFIG_METADATA_KEY]))
        except ValueError as e:
            raise MaceError(f"checkpoint {path!r}: metadata {CONFIG_METADATA_KEY} is not json ({e})") from e

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    load_checked_state(unet, convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), "UNet", path)
    load_checked_state(vae, convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), "VAE", path)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    # file: cond_stage_model.transformer.[text_model.]<rest> (old SD1 files lack text_model.); the module's
    # own keys have or lack the text_model. level depending on the transformers version
    with_level = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    clip_sd: dict[str, Tensor] = {}
    for key, value in ckpt.items():
        if key.startswith(CLIP_PREFIX):
            clip_sd[("text_model." if with_level else "") + key[len(CLIP_PREFIX):].removeprefix("text_model.")] = value
    load_checked_state(text_encoder, clip_sd, "text encoder", path, optional=("position_ids",))
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return unet, text_encoder, vae, configs


def load_sd1_host(path: str | os.PathLike[str], *, device: str | None = None) -> Any:
    """A ``DiffusersHost`` for an SD1.x single-file ``.safetensors`` checkpoint or a diffusers folder, offline."""
    from .hosts.diffusers import DiffusersHost
    from .tokens import load_sd1_tokenizer

    p = Path(path)
    if p.is_dir():
        return DiffusersHost.from_pretrained(p, device=device)
    if not p.exists():
        raise MaceError(f"checkpoint {str(p)!r} does not exist; give an SD1.x .safetensors file or diffusers folder")
    unet, text_encoder, vae, configs = load_sd1_modules(p)
    sched = {k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}
    return DiffusersHost(unet, text_encoder, vae, tokenizer=load_sd1_tokenizer(), scheduler_config=sched,
                         device=device)


# ---------------------------------------------------------------- sanitized checkpoint


def replace_cross_attention(sd: dict[str, Tensor], weights: Mapping[str, Tensor], where: str) -> None:
    """``sd[model.diffusion_model.<name>.weight] = weights[name]`` for ``<block>.to_k``/``.to_v`` names, in the
    existing tensor's dtype (name, presence, shape and finiteness checked; ``where`` names the file)."""
    for name, w in weights.items():
        if not (name.endswith((".to_k", ".to_v")) and ".attn2." in f".{name}"):
            raise MaceError(f"{where}: {name!r} is not a cross-attention to_k/to_v matrix; only those are replaced")
        key = f"{CHECKPOINT_UNET_PREFIX}{name}.weight"
        if key not in sd:
            raise MaceError(f"{where}: the model has no tensor {key!r}; the weights were made for another model")
        old = sd[key]
        if tuple(old.shape) != tuple(w.shape):
            raise MaceError(f"{where}: {name!r} is {tuple(w.shape)} but the model's is {tuple(old.shape)}; "
                            "the weights were made for another model")
        if not bool(torch.isfinite(w).all()):
            raise MaceError(f"{where}: new weights for {name!r} contain NaN/Inf; nothing was written")
        sd[key] = w.detach().to("cpu", old.dtype).contiguous()


def save_sanitized_checkpoint(
    src_path: str | os.PathLike[str],
    new_weights: Mapping[str, Tensor],
    out_path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    label_emb_diff: Tensor | None = None,
) -> Path:
    """Copy ``src_path`` to ``out_path`` replacing exactly the given ``<block>.to_k``/``.to_v`` matrices
    (and, with ``label_emb_diff``, SDXL's ``label_emb.0.0.weight`` by ``W0 + diff`` in its own dtype).

    Every other tensor is copied unchanged, replaced ones keep their dtype; metadata = the source's
    plus ``metadata``. Atomic, never overwrites, the source is only read.
    """
    src, out = Path(src_path), Path(out_path)
    if out.exists() or (src.exists() and out.resolve() == src.resolve()):
        raise MaceError(f"output {str(out)!r} exists; choose another name (the source is never overwritten)")
    tensors, meta = read_safetensors(src, "checkpoint")
    replace_cross_attention(tensors, new_weights, f"checkpoint {str(src)!r}")
    if label_emb_diff is not None:
        key = CHECKPOINT_UNET_PREFIX + "label_emb.0.0.weight"
        old = tensors.get(key)
        if old is None or tuple(old.shape) != tuple(label_emb_diff.shape):
            raise MaceError(f"checkpoint {str(src)!r}: label_emb difference {tuple(label_emb_diff.shape)} does not fit "
                            f"the model's {None if old is None else tuple(old.shape)}; it was made for another model")
        tensors[key] = (old.float() + label_emb_diff.float()).to(old.dtype)
    meta.update(metadata or {})
    return atomic_save_safetensors(tensors, out, meta)


__all__ = [
    "CONFIG_METADATA_KEY",
    "check_sd1_file",
    "float_tensor",
    "load_checked_state",
    "load_sd1_host",
    "load_sd1_modules",
    "public_config",
    "replace_cross_attention",
    "save_sanitized_checkpoint",
    "sd1_configs",
    "sd1_state_dict",
    "unet_ldm_names",
    "vae_ldm_names",
    "write_sd1_checkpoint",
    "write_tiny_sd1_checkpoint",
]
