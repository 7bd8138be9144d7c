"""Write the smallest SD1.5 checkpoint that ComfyUI's stock CheckpointLoaderSimple detects and loads.

UNet: 320 base channels (SD1.5 detection needs them), one level, one res block, one transformer block
per block (4 cross-attention blocks); CLIP: the full CLIP-L layout the SD1 loader always builds;
VAE: TAESD format. Random weights, seeded. ~290 MB, float32. Run with ComfyUI importable:

    COMFYUI_PATH=... python tests/comfy/make_tiny_checkpoint.py OUT.safetensors [seed]
"""

from __future__ import annotations

import os
import sys

import torch
from _tiny_comfy import sd1_unet_config

UNET_CONFIG = sd1_unet_config(320, 1)  # one level: the smallest layout detected as SD1.5


def _fill(module: torch.nn.Module, std: float) -> None:
    for p in module.parameters():
        if p.dtype.is_floating_point:
            p.copy_(torch.randn_like(p) * std)


def write_tiny_checkpoint(path: str, seed: int = 0) -> str:
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    torch.manual_seed(seed)
    with torch.inference_mode():
        config = comfy.supported_models.SD15(dict(UNET_CONFIG))
        base = config.get_model({})
        _fill(base.diffusion_model, 0.02)
        model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        clip = comfy.sd.CLIP(config.clip_target())
        _fill(clip.cond_stage_model, 0.02)
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        _fill(taesd, 0.05)
        vae = comfy.sd.VAE(sd=taesd.state_dict())
        comfy.sd.save_checkpoint(path, model, clip, vae, metadata={"mace.test": "tiny SD1.5, random weights"})
    return path


def main() -> None:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, os.path.abspath(comfy_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    out = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print(write_tiny_checkpoint(out, seed))


if __name__ == "__main__":
    main()
