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
