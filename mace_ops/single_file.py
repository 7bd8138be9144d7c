"""SD1.x, SD2.x and SDXL single-file checkpoints: the family from the tensors, the host, tiny files.

The family is read from the header alone (tensor names and shapes, never the file name): the context
width ``d`` = columns of the UNet's cross-attention ``attn2.to_k.weight`` and ``adm`` = columns of
``label_emb.0.0.weight`` (0 when absent) give ``family_from_unet_dims(d, adm)``; models MACE cannot
edit are refused by name first (``checkpoint.refused_model``: SD3, FLUX, SDXL refiner, inpainting).

Layouts (UNet ``model.diffusion_model.*`` and VAE ``first_stage_model.*`` as SD1.x)::

    sd1   cond_stage_model.transformer.*            CLIP-L (transformers names)
    sd2   cond_stage_model.model.*                  OpenCLIP-H (open_clip names)
    sdxl  conditioner.embedders.0.transformer.*     CLIP-L
          conditioner.embedders.1.model.*           OpenCLIP-bigG, with text_projection (pooled channel)

Loading uses diffusers' own conversions (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_open_clip_checkpoint``; the ones ``from_single_file`` uses) with the configs shipped in
``assets/<family>/`` or the file's ``mace.sd_configs`` metadata (tiny test models). OpenCLIP, written
(the inverse of ``convert_open_clip_checkpoint``): ``transformer.resblocks.i.attn.in_proj_* = cat(q, k, v)``,
``ln_1/ln_2/mlp.c_fc/mlp.c_proj`` = ``layer_norm1/layer_norm2/mlp.fc1/mlp.fc2``, ``text_projection =
Wᵀ``. SD2: diffusers drops OpenCLIP-H's last layer (24 -> 23), so the encoder is built with the layer
count the converted tensors have and its output after the final LN is "penultimate + LN" (the host's
rule); a tiny file keeps all its layers and the host reads the penultimate one.

Prediction type (``prediction_type``): SD1.x and SDXL predict epsilon. SD2.x ``"auto"`` follows
ComfyUI's ``SD20.model_type``: v-prediction when ``std(output_blocks.11.1.transformer_blocks.0.norm1.bias)
> 0.09`` (the 768-v models), else epsilon (512-base); a single file records no training step, so
diffusers' ``global_step == 875000`` rule cannot be used. ``--prediction-type`` overrides it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINT_UNET_PREFIX,
    CONFIG_METADATA_KEY,
    VAE_PREFIX,
    check_sd1_file,
    float_tensor,
    load_checked_state,
    load_sd1_host,
    load_sd1_modules,
    public_config,
    refused_model,
    replace_cross_attention,
    sd1_state_dict,
    unet_vae_state_dict,
)
from .errors import MaceError
from .family import SD1, SD2, ModelFamily, family_from_unet_dims
from .io import atomic_save_safetensors, check_safetensors_file

LABEL_EMB_KEY = CHECKPOINT_UNET_PREFIX + "label_emb.0.0.weight"
SD2_V_PROBE = CHECKPOINT_UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
#: per family: (config name, tensor prefix, layout "clip" | "openclip") for each text encoder, in order
TEXT_ENCODER_LAYOUT: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.", "clip"),),
    "sd2": (("text_encoder", "cond_stage_model.model.", "openclip"),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
}
_TITLE = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


# ---------------------------------------------------------------- family and checks


def detect_family(keys: Sequence[str], slice_shape: Any, where: str = "checkpoint") -> ModelFamily:
    """The family of a single-file checkpoint from its tensor names and shapes (``slice_shape(key)``)."""
    refused = refused_model(list(keys), slice_shape)
    if refused:
        raise MaceError(f"{where} is {refused}; MACE edits SD1.x, SD2.x and SDXL base models only")
    probe = next((k for k in keys if k.startswith(CHECKPOINT_UNET_PREFIX) and k.endswith(".attn2.to_k.weight")), None)
    if probe is None:
        if any(k.startswith(("lora_", "diffusion_model.")) for k in keys) or any(".lora_" in k for k in keys[:50]):
            raise MaceError(f"{where} looks like a LoRA or erasure file, not a full model; give a checkpoint")
        if not any(k.startswith(CHECKPOINT_UNET_PREFIX) for k in keys):
            raise MaceError(f"{where} has no model.diffusion_model.* tensors: not a Stable Diffusion single-file "
                            "checkpoint; give an SD1.x, SD2.x or SDXL .safetensors checkpoint or a diffusers folder")
        raise MaceError(f"{where} has no cross-attention (no model.diffusion_model.*.attn2.to_k.weight): "
                        "not an SD1.x, SD2.x or SDXL UNet")
    context = int(slice_shape(probe)[-1])
    adm = int(slice_shape(LABEL_EMB_KEY)[-1]) if LABEL_EMB_KEY in keys else 0
    try:
        return family_from_unet_dims(context, adm)
    except MaceError as e:
        raise MaceError(f"{where}: {e}") from None


def _check_layout(family: ModelFamily, keys: Sequence[str], where: str) -> None:
    """SD2.x / SDXL: every text encoder and the VAE are in the file."""
    for _, prefix, _ in TEXT_ENCODER_LAYOUT[family.name]:
        if not any(k.startswith(prefix) for k in keys):
            raise MaceError(f"{where} is {_TITLE[family.name]} but has no text encoder {prefix}*; give a full "
                            f"{_TITLE[family.name]} checkpoint (UNet, text encoders and VAE)")
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise MaceError(f"{where} has no VAE (first_stage_model.*); give a full {_TITLE[family.name]} checkpoint")


def _read_header(path: str) -> tuple[ModelFamily, list[str], dict[str, str]]:
    """``(family, keys, metadata)`` of a checked single file; the layout is checked too."""
    where = f"checkpoint {path!r}"
    check_safetensors_file(path, "checkpoint")
    try:
        with safe_open(path, framework="pt") as f:
            keys, meta = list(f.keys()), dict(f.metadata() or {})
            shape = lambda k: f.get_slice(k).get_shape()  # noqa: E731
            family = detect_family(keys, shape, where)
            if family is SD1:
                check_sd1_file(path, keys, shape)
            else:
                _check_layout(family, keys, where)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MaceError(f"{where} is corrupt: {e}") from e
    return family, keys, meta


def check_source(path: str | os.PathLike[str]) -> Path:
    """Cheap check, headers only, that ``path`` loads as an SD1.x, SD2.x or SDXL model: a complete
    single-file ``.safetensors`` or a diffusers folder. Returns the path; ``MaceError`` says what it is instead."""
    from .hosts.diffusers import check_diffusers_folder

    p = Path(path)
    if p.is_dir():
        check_diffusers_folder(p)
        return p
    if not p.exists():
        raise MaceError(f"checkpoint {str(p)!r} does not exist; give a .safetensors checkpoint or a diffusers folder")
    if not p.is_file():
        raise MaceError(f"checkpoint {str(p)!r} is neither a file nor a folder; give a .safetensors checkpoint "
                        "or a diffusers folder")
    _read_header(os.fspath(p))
    return p


def family_configs(family: ModelFamily) -> dict[str, dict[str, Any]]:
    """The shipped configs of ``family`` (``assets/<name>/*.json``): unet, vae, text encoder(s), scheduler."""
    root = resources.files("mace_ops").joinpath("assets", family.name)
    names = ["unet", "vae", "scheduler"] + [n for n, _, _ in TEXT_ENCODER_LAYOUT[family.name]]
    return {n: json.loads(root.joinpath(f"{n}.json").read_text(encoding="utf-8")) for n in names}


# ---------------------------------------------------------------- loading


def _prefixed(module: nn.Module, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` (keys with or without ``text_model.``) keyed as ``module``'s own state dict is."""
    with_level = any(k.startswith("text_model.") for k in module.state_dict())
    out = {}
    for k, v in sd.items():
        bare = k.removeprefix("text_model.")
        out[("text_model." + bare) if with_level and not k.startswith("text_projection") else bare] = v
    return out


def _text_encoder(config: Mapping[str, Any], layout: str, prefix: str, ckpt: Mapping[str, Tensor],
                  path: str, title: str) -> nn.Module:
    """One text encoder from the file's tensors under ``prefix`` (see the module docstring)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if layout == "clip":
        sd = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    else:
        holder = CLIPTextModel(CLIPTextConfig(hidden_size=int(config["hidden_size"]), num_hidden_layers=1,
                                              intermediate_size=4, num_attention_heads=1, vocab_size=4,
                                              bos_token_id=0, eos_token_id=1, pad_token_id=1))
        sd = convert_open_clip_checkpoint(holder, ckpt, prefix=prefix)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"(?:text_model\.)?encoder\.layers\.(\d+)\.", k))}
    config = {**dict(config), "num_hidden_layers": max(layers) + 1 if layers else 0}
    with_projection = "text_projection.weight" in sd
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    module = cls(CLIPTextConfig.from_dict(config))
    load_checked_state(module, _prefixed(module, sd), f"text encoder {prefix}*", path,
                        optional=("position_ids",), model=title)
    return module


def load_modules(path: str | os.PathLike[str]) -> tuple[ModelFamily, nn.Module, list[nn.Module], nn.Module, dict]:
    """``(family, unet, text_encoders, vae, configs)`` of a single-file SD2.x or SDXL checkpoint, offline,
    float32 (SD1.x: ``checkpoint.load_sd1_modules``). ``configs``: the shipped ones, updated by the
    file's ``mace.sd_configs`` metadata."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    path = os.fspath(path)
    family, keys, meta = _read_header(path)
    if family is SD1:
        unet, text_encoder, vae, configs = load_sd1_modules(path)
        return family, unet, [text_encoder], vae, configs
    title = _TITLE[family.name]
    prefixes = (CHECKPOINT_UNET_PREFIX, VAE_PREFIX) + tuple(p for _, p, _ in TEXT_ENCODER_LAYOUT[family.name])
    try:  # only the models' tensors (not EMA copies etc.), as float32
        with safe_open(path, framework="pt") as f:
            ckpt = {k: float_tensor(f.get_tensor(k)) for k in keys if k.startswith(prefixes)}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MaceError(f"checkpoint {path!r} is corrupt: {e}") from e
    configs = family_configs(family)
    if CONFIG_METADATA_KEY in meta:
        try:
            configs.update(json.loads(meta[CONFIG_METADATA_KEY]))
        except ValueError as e:
            raise MaceError(f"checkpoint {path!r}: metadata {CONFIG_METADATA_KEY} is not json ({e})") from e
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    load_checked_state(unet, convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), "UNet", path, model=title)
    load_checked_state(vae, convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), "VAE", path, model=title)
    encoders = [_text_encoder(configs[name], layout, prefix, ckpt, path, title)
                for name, prefix, layout in TEXT_ENCODER_LAYOUT[family.name]]
    for m in (unet, vae, *encoders):
        m.eval().requires_grad_(False)
    return family, unet, encoders, vae, configs


def prediction_type(family: ModelFamily, choice: str, unet_state: Mapping[str, Tensor] | None = None) -> str:
    """``epsilon`` or ``v_prediction`` for a checkpoint (see the module docstring); ``unet_state``: the
    LDM UNet tensors without prefix, read for SD2.x's ``auto`` rule."""
    if choice not in PREDICTION_TYPES:
        raise MaceError(f"--prediction-type {choice!r}: use one of {', '.join(PREDICTION_TYPES)}")
    if choice != "auto":
        return choice
    if family is not SD2:
        return "epsilon"
    probe = (unet_state or {}).get(SD2_V_PROBE.removeprefix(CHECKPOINT_UNET_PREFIX))
    return "v_prediction" if probe is not None and float(probe.float().std(unbiased=False)) > 0.09 else "epsilon"


def load_host(path: str | os.PathLike[str], *, device: str | None = None, prediction: str = "auto",
              dtype: torch.dtype | None = None) -> Any:
    """A ``DiffusersHost`` for an SD1.x, SD2.x or SDXL single-file ``.safetensors`` checkpoint or a diffusers
    folder, offline; ``prediction``: "auto" (see the module docstring), "epsilon" or "v_prediction";
    ``dtype``: the UNet's and text encoders' weights (``set_precision``; None: float32)."""
    host = _load_float32_host(path, device=device, prediction=prediction)
    return set_precision(host, dtype) if dtype is not None else host


def set_precision(host: Any, dtype: torch.dtype) -> Any:
    """``host`` (a freshly loaded ``DiffusersHost``, its modules its own) with its UNet and text encoders
    cast in place to ``dtype``; the VAE stays float32 (SDXL's VAE overflows in float16; 84M parameters).
    LoRA factors, optimiser state, statistics and closed forms keep their own precision (float32/float64)."""
    host.unet.to(dtype)
    for enc in host.text_encoders:
        enc.to(dtype)
    host.dtype = dtype
    return host


def source_dtype(path: str | os.PathLike[str]) -> torch.dtype:
    """The dtype of the UNet's floating tensors in a checkpoint file or diffusers folder (headers only):
    what a sanitized checkpoint is written in."""
    p = Path(path)
    files = sorted((p / "unet").glob("*.safetensors")) if p.is_dir() else [p]
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    for file in files:
        with safe_open(os.fspath(file), framework="pt") as f:
            for key in f.keys():
                kind = f.get_slice(key).get_dtype()
                if kind in names and (p.is_dir() or key.startswith(CHECKPOINT_UNET_PREFIX)):
                    return names[kind]
    return torch.float32


def _load_float32_host(path: str | os.PathLike[str], *, device: str | None, prediction: str) -> Any:
    from .hosts.diffusers import DiffusersHost
    from .tokens import load_sd1_tokenizer

    if prediction not in PREDICTION_TYPES:
        raise MaceError(f"--prediction-type {prediction!r}: use one of {', '.join(PREDICTION_TYPES)}")
    p = Path(path)
    if p.is_dir():
        return DiffusersHost.from_pretrained(p, device=device)
    if not p.exists():
        raise MaceError(f"checkpoint {str(p)!r} does not exist; give a .safetensors checkpoint or a diffusers folder")
    family, _, _ = _read_header(os.fspath(p))
    if family is SD1 and prediction in ("auto", "epsilon"):
        return load_sd1_host(p, device=device)
    family, unet, encoders, vae, configs = load_modules(p)
    probe = {}
    if family is SD2 and prediction == "auto":
        with safe_open(os.fspath(p), framework="pt") as f:
            if SD2_V_PROBE in f.keys():
                probe[SD2_V_PROBE.removeprefix(CHECKPOINT_UNET_PREFIX)] = f.get_tensor(SD2_V_PROBE)
    sched = {k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}
    sched["prediction_type"] = prediction_type(family, prediction, probe)
    return DiffusersHost(unet, encoders[0], vae, text_encoder_2=encoders[1] if len(encoders) > 1 else None,
                         family=family, tokenizer=load_sd1_tokenizer(), scheduler_config=sched, device=device)


# ---------------------------------------------------------------- writing


def openclip_state_dict(encoder: nn.Module, prefix: str) -> dict[str, Tensor]:
    """A transformers CLIP text model as OpenCLIP tensors under ``prefix`` (see the module docstring),
    checked against diffusers' ``convert_open_clip_checkpoint`` (every tensor must map back exactly)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    own = {k.removeprefix("text_model."): v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out = {prefix + ldm: own[k] for k, ldm in top.items()}
    width = int(own["embeddings.token_embedding.weight"].shape[1])
    proj = own.get("text_projection.weight")
    out[prefix + "text_projection"] = (proj.T if proj is not None else torch.eye(width)).contiguous()
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # OpenCLIP's log(100); not read by any loader
    n = 1 + max(int(m.group(1)) for k in own if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [own[f"{src}self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")]).contiguous()
            for new, old in _OPENCLIP_LAYER:
                out[f"{dst}{old}.{kind}"] = own[f"{src}{new}.{kind}"]
    back = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(encoder, out, prefix).items()}
    expect = {k: v for k, v in own.items() if k != "text_projection.weight" or prefix.startswith("conditioner.")}
    if n == 24 and prefix.startswith("cond_stage_model."):  # diffusers drops SD2's last layer on purpose
        expect = {k: v for k, v in expect.items() if not k.startswith("encoder.layers.23.")}
    if set(back) != set(expect) or any(not torch.equal(back[k], expect[k]) for k in expect):
        raise RuntimeError("transformers -> OpenCLIP names do not invert diffusers' conversion")
    return out


def family_state_dict(family: ModelFamily, unet: nn.Module, text_encoders: Sequence[nn.Module],
                      vae: nn.Module) -> dict[str, Tensor]:
    """The modules as one single-file state dict of ``family``'s layout (see the module docstring)."""
    if family is SD1:
        return sd1_state_dict(unet, text_encoders[0], vae)
    out = unet_vae_state_dict(unet, vae)
    for (_, prefix, layout), enc in zip(TEXT_ENCODER_LAYOUT[family.name], text_encoders, strict=True):
        if layout == "openclip":
            out.update(openclip_state_dict(enc, prefix))
        else:
            out.update({prefix + "text_model." + k.removeprefix("text_model."): v.detach().cpu().contiguous()
                        for k, v in enc.state_dict().items()})
    return out


def write_checkpoint(
    family: ModelFamily, unet: nn.Module, text_encoders: Sequence[nn.Module], vae: nn.Module,
    path: str | os.PathLike[str], *, cross_attention_weights: Mapping[str, Tensor] | None = None,
    label_emb: Tensor | None = None, metadata: Mapping[str, str] | None = None, store_configs: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the modules as a single-file checkpoint of ``family`` (atomic, never overwrites);
    ``cross_attention_weights`` / ``label_emb`` replace those UNet tensors; ``store_configs`` puts the
    modules' configs in the metadata (sizes other than the shipped ones, e.g. tiny); ``dtype``: floating
    tensors stored in that dtype (e.g. float16, as most published checkpoints)."""
    if Path(path).exists():
        raise MaceError(f"{str(path)!r} exists; choose another name (MACE never overwrites)")
    sd = family_state_dict(family, unet, text_encoders, vae)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    replace_cross_attention(sd, cross_attention_weights or {}, str(path))
    if label_emb is not None:
        replace_label_emb(sd, label_emb, str(path))
    meta = dict(metadata or {})
    if store_configs:
        configs = {"unet": public_config(unet.config), "vae": public_config(vae.config)}
        for (name, _, _), enc in zip(TEXT_ENCODER_LAYOUT[family.name], text_encoders, strict=True):
            configs[name] = {k: v for k, v in enc.config.to_dict().items()
                             if not k.startswith("_") and k != "transformers_version"}
        meta[CONFIG_METADATA_KEY] = json.dumps(configs, sort_keys=True)
    return atomic_save_safetensors(sd, path, meta)


def replace_label_emb(sd: dict[str, Tensor], weight: Tensor, where: str) -> None:
    """``sd[model.diffusion_model.label_emb.0.0.weight] = weight`` (shape and finiteness checked, dtype kept)."""
    old = sd.get(LABEL_EMB_KEY)
    if old is None or tuple(old.shape) != tuple(weight.shape):
        raise MaceError(f"{where}: label_emb weight {tuple(weight.shape)} does not fit the model's "
                        f"{None if old is None else tuple(old.shape)}; the edit was made for another model")
    if not bool(torch.isfinite(weight).all()):
        raise MaceError(f"{where}: the new label_emb weight contains NaN/Inf; nothing was written")
    sd[LABEL_EMB_KEY] = weight.detach().to("cpu", old.dtype).contiguous()


def write_tiny_checkpoint(path: str | os.PathLike[str], family: str = "sdxl", seed: int = 0,
                          dtype: torch.dtype | None = None) -> Path:
    """The tiny model of ``mace_ops.tiny.build_tiny(family, seed)`` as a single-file checkpoint."""
    from .family import family_by_name
    from .tiny import build_tiny

    fam = family_by_name(family)
    sd = build_tiny(fam.name, seed)
    encoders = [sd.text_encoder] + ([sd.text_encoder_2] if sd.text_encoder_2 is not None else [])
    return write_checkpoint(fam, sd.unet, encoders, sd.vae, path, store_configs=True, dtype=dtype,
                            metadata={"mace.tiny_seed": str(seed), "mace.tiny_family": fam.name})


__all__ = [
    "LABEL_EMB_KEY",
    "PREDICTION_TYPES",
    "check_source",
    "detect_family",
    "family_configs",
    "family_state_dict",
    "load_host",
    "load_modules",
    "set_precision",
    "source_dtype",
    "openclip_state_dict",
    "prediction_type",
    "replace_label_emb",
    "write_checkpoint",
    "write_tiny_checkpoint",
]
