"""A tiny SD1.x model inside ComfyUI, built without a file (random weights, seeded)."""

from __future__ import annotations

import torch


def sd1_unet_config(model_channels: int, levels: int) -> dict:
    """A UNet layout ComfyUI's SD15 config accepts: ``levels`` levels (channel_mult 1, 2, ...), one res
    block and one transformer per block, 768-d context. SD1.5 detection from a file needs 320 channels."""
    return {
        "context_dim": 768,
        "model_channels": model_channels,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "in_channels": 4,
        "out_channels": 4,
        "num_res_blocks": [1] * levels,
        "transformer_depth": [1] * levels,
        "transformer_depth_output": [1] * (2 * levels),
        "channel_mult": [i + 1 for i in range(levels)],
        "transformer_depth_middle": 1,
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
    }


#: built without a file: 2 levels, 64 channels
TINY_UNET_CONFIG = sd1_unet_config(64, 2)


def build_tiny_parts(seed: int = 0):
    """(ModelPatcher, CLIP with a 1-layer text encoder, TAESD-format VAE), created under inference mode
    like ComfyUI's loaders (so the weights are inference tensors)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    torch.manual_seed(seed)
    with torch.inference_mode():
        config = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG))
        base = config.get_model({})
        for p in base.diffusion_model.parameters():  # ComfyUI's ops skip init: give every weight values
            p.copy_(torch.randn_like(p) * 0.05)
        patcher = comfy.model_patcher.ModelPatcher(
            base,
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        clip = comfy.sd.CLIP(config.clip_target(), model_options={"clip_l_model_config": {"num_hidden_layers": 1}})
        for p in clip.cond_stage_model.parameters():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn_like(p) * 0.05)
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        for p in taesd.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        vae = comfy.sd.VAE(sd=taesd.state_dict())
    return patcher, clip, vae


def sdxl_unet_config(model_channels: int, channel_mult: list[int]) -> dict:
    """SDXL base's UNet layout (3 levels of 2 res blocks, transformer depths 0/2/10, 10-deep middle: 70
    cross-attention blocks, 2048-d context, ``label_emb`` with 2816 inputs) with ``model_channels`` and
    ``channel_mult`` of our choice. Stock SDXL detection from a file needs 320 channels (``channel_mult``
    is not checked)."""
    return {
        "context_dim": 2048,
        "model_channels": model_channels,
        "use_linear_in_transformer": True,
        "adm_in_channels": 2816,
        "num_classes": "sequential",
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "in_channels": 4,
        "out_channels": 4,
        "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": 10,
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
    }


def sd2_unet_config(model_channels: int) -> dict:
    """SD2.x's UNet layout (SD1.x's 16 cross-attention blocks, linear projections, 1024-d context)."""
    return {
        "context_dim": 1024,
        "model_channels": model_channels,
        "use_linear_in_transformer": True,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "in_channels": 4,
        "out_channels": 4,
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        "channel_mult": [1, 1, 2, 2],
        "transformer_depth_middle": 1,
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
    }


#: the small text encoders of the tiny SDXL / SD2 models (penultimate layer: at least 3 layers) (ComfyUI's configs otherwise: 768/1280/1024 wide)
SMALL_TEXT = {"num_hidden_layers": 3, "intermediate_size": 128, "num_attention_heads": 4}


def build_family_parts(family: str, seed: int = 0, *, model_channels: int = 32, channel_mult=(1, 2, 2),
                       head_channels: int = 32, text_config: dict | None = None, dtype: torch.dtype = torch.float32):
    """(ModelPatcher, CLIP, VAE) of a tiny "sdxl" or "sd2" model built in process with ComfyUI's own
    ``supported_models.SDXL`` / ``SD20``: the real block layout, small channels, 3-layer text encoders of
    the real widths (``text_config`` replaces SMALL_TEXT), in ``dtype`` (float16: computed in float32 by
    ComfyUI's manual cast); under inference mode like ComfyUI's loaders."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    torch.manual_seed(seed)
    if family == "sdxl":
        config = comfy.supported_models.SDXL(sdxl_unet_config(model_channels, list(channel_mult)))
        small = SMALL_TEXT if text_config is None else text_config
        text = {"clip_l_model_config": dict(small), "clip_g_model_config": dict(small)}
    else:
        config = comfy.supported_models.SD20(sd2_unet_config(model_channels))
        small = SMALL_TEXT if text_config is None else text_config
        text = {"clip_h_model_config": dict(small, hidden_act="quick_gelu")}
    config.unet_config["num_head_channels"] = head_channels  # ComfyUI's 64 would leave small levels headless
    if dtype != torch.float32:
        config.set_inference_dtype(dtype, torch.float32)
    with torch.inference_mode():
        base = config.get_model({})
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        patcher = comfy.model_patcher.ModelPatcher(
            base,
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        clip = comfy.sd.CLIP(config.clip_target(), model_options={**text, "dtype": dtype})
        for p in clip.cond_stage_model.parameters():
            if p.dtype.is_floating_point:
                p.copy_(torch.randn_like(p) * 0.05)
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        for p in taesd.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        vae = comfy.sd.VAE(sd=taesd.state_dict())
    return patcher, clip, vae
