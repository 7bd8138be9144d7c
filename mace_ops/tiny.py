"""Tiny SD1.x-shaped models built in code (random init, seeded) and the LDM names of diffusers' blocks.

The tiny UNet has SD1.x's block layout (3 cross-attention down levels + a plain one, a cross-attention
middle, a plain up level + 3 cross-attention ones, 2 layers per block), hence the same 16
cross-attention blocks with the same LDM names, and a 768-d context, but small channels; the text
encoder is a 2-layer CLIP text model with SD1.x's 768-d output, 77 positions and 49408-token vocabulary
(used with the real SD1.x tokenizer); the VAE downsamples 8× into 4 latent channels.

``ldm_cross_attention_names(unet)`` maps diffusers module paths to SD1.x LDM state-dict paths
(without ``diffusion_model.``), computed from the UNet's own modules so smaller layouts map too:

    input_blocks:  [conv_in] then per down level: one block per resnet (+ its attention at ``.1``),
                   then its downsampler when present
    middle_block:  resnet, attention, resnet, attention, ... -> attention j at ``middle_block.{2j+1}``
    output_blocks: per up level one block per resnet (+ its attention at ``.1``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .family import SD1


def sd1_alphas_cumprod(
    num_steps: int = SD1.train_steps, beta_start: float = SD1.beta_start, beta_end: float = SD1.beta_end
) -> Tensor:
    """SD1.x training schedule ("scaled_linear"): β_t = linspace(√β0, √β1, T)², ᾱ_t = Π_{s≤t} (1 - β_s); float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class TinySD:
    """A tiny SD-shaped model set (eval mode, frozen)."""

    unet: nn.Module  # diffusers UNet2DConditionModel
    text_encoder: nn.Module  # transformers CLIPTextModel
    vae: nn.Module  # diffusers AutoencoderKL
    alphas_cumprod: Tensor  # (1000,) float64
    text_encoder_2: nn.Module | None = None  # SDXL: CLIPTextModelWithProjection (bigG-shaped)
    family: str = "sd1"


def build_tiny_sd(seed: int = 0) -> TinySD:
    """Build the tiny UNet, text encoder and VAE with weights drawn from ``torch.manual_seed``-style seeds."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=768,
            attention_head_dim=2,  # diffusers' legacy name: the number of heads (SD1.x: 8)
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=SD1.vae_scale,
        )
    for m in (unet, text_encoder, vae):
        m.eval().requires_grad_(False)
    return TinySD(unet=unet, text_encoder=text_encoder, vae=vae, alphas_cumprod=sd1_alphas_cumprod())


def _tiny_clip(seed: int, hidden: int, projection: int | None = None) -> nn.Module:
    """A 2-layer CLIP text model with a real ``hidden``-d output, 77 positions and 49408 tokens;
    with ``projection``: a ``CLIPTextModelWithProjection`` (its pooled output projected to that width)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if projection else "quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=projection or hidden,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _tiny_vae(seed: int, scaling_factor: float) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=scaling_factor,
    )


def build_tiny_sdxl(seed: int = 0) -> TinySD:
    """A tiny SDXL base: the real UNet layout (3 levels, transformer depths 0/2/10, 10-deep middle, 70
    cross-attention blocks, LDM names ``input_blocks.4/5/7/8``, ``middle_block.1``, ``output_blocks.0–5``),
    2048-d context, ``label_emb`` with 2816 inputs (1280 pooled + 6 × 256), channels 16/32/64; CLIP-L- and
    bigG-shaped 2-layer text encoders (768 and 1280 wide, bigG's pooled output projected to 1280)."""
    from diffusers import UNet2DConditionModel

    from .family import SDXL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64), layers_per_block=2, norm_num_groups=8,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4), use_linear_projection=True,
            cross_attention_dim=SDXL.context_dim, addition_embed_type="text_time",
            addition_time_embed_dim=SDXL.size_embed_dim, projection_class_embeddings_input_dim=SDXL.adm_dim,
        )
        text_encoder = _tiny_clip(seed + 1, 768)
        text_encoder_2 = _tiny_clip(seed + 3, 1280, projection=1280)
        vae = _tiny_vae(seed + 2, SDXL.vae_scale)
    for m in (unet, text_encoder, text_encoder_2, vae):
        m.eval().requires_grad_(False)
    return TinySD(unet, text_encoder, vae, sd1_alphas_cumprod(), text_encoder_2=text_encoder_2, family="sdxl")


def build_tiny_sd2(seed: int = 0) -> TinySD:
    """A tiny SD2.x: SD1.x's layout (16 cross-attention blocks) with linear projections in the
    transformers, 1024-d context, an OpenCLIP-H-shaped 2-layer text encoder (1024 wide)."""
    from diffusers import UNet2DConditionModel

    from .family import SD2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
            cross_attention_dim=SD2.context_dim, attention_head_dim=2, use_linear_projection=True,
        )
        text_encoder = _tiny_clip(seed + 1, 1024)
        vae = _tiny_vae(seed + 2, SD2.vae_scale)
    for m in (unet, text_encoder, vae):
        m.eval().requires_grad_(False)
    return TinySD(unet, text_encoder, vae, sd1_alphas_cumprod(), family="sd2")


def build_tiny(family: str = "sd1", seed: int = 0) -> TinySD:
    """The tiny model of a family: "sd1" (``build_tiny_sd``), "sd2" or "sdxl"."""
    from .family import family_by_name

    builders = {"sd1": build_tiny_sd, "sd2": build_tiny_sd2, "sdxl": build_tiny_sdxl}
    return builders[family_by_name(family).name](seed)


def _attn2_names(attention: nn.Module, diffusers_path: str, ldm_path: str) -> dict[str, str]:
    """``{<diffusers_path>.transformer_blocks.<k>.attn2: <ldm_path>.transformer_blocks.<k>.attn2}``."""
    return {
        f"{diffusers_path}.transformer_blocks.{k}.attn2": f"{ldm_path}.transformer_blocks.{k}.attn2"
        for k in range(len(attention.transformer_blocks))
    }


def ldm_cross_attention_names(unet: nn.Module) -> dict[str, str]:
    """``{diffusers module path: LDM block name}`` for every cross-attention (``attn2``) of ``unet``, in forward order."""
    names: dict[str, str] = {}
    index = 1  # input_blocks.0 is conv_in
    for level, block in enumerate(unet.down_blocks):
        for j, att in enumerate(getattr(block, "attentions", None) or []):
            names.update(_attn2_names(att, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index + j}.1"))
        index += len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
    mid = getattr(unet, "mid_block", None)
    for j, att in enumerate(getattr(mid, "attentions", None) or []):
        # attention j sits between resnets j and j + 1
        names.update(_attn2_names(att, f"mid_block.attentions.{j}", f"middle_block.{2 * j + 1}"))
    index = 0
    for level, block in enumerate(unet.up_blocks):
        for j, att in enumerate(getattr(block, "attentions", None) or []):
            names.update(_attn2_names(att, f"up_blocks.{level}.attentions.{j}", f"output_blocks.{index + j}.1"))
        index += len(block.resnets)
    modules = dict(unet.named_modules())
    return {d: n for d, n in names.items() if getattr(modules[d], "is_cross_attention", False)}


__all__ = ["TinySD", "build_tiny", "build_tiny_sd", "build_tiny_sd2", "build_tiny_sdxl", "ldm_cross_attention_names", "sd1_alphas_cumprod"]
