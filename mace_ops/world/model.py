"""The world model: an SD1.x-layout text-to-image model trained on the toy world, shipped in the package.

Architecture (``DiffusersHost`` loads it unchanged):
  UNet   ``UNet2DConditionModel`` with SD1.x's block layout (16 cross-attention blocks, same LDM names),
         small channels, 768-d context, 8×8 latents; epsilon prediction on SD1.x's noise schedule.
  text   a 2-layer ``CLIPTextModel`` (768-d, 77 positions, 49408 tokens, the real SD1.x tokenizer),
         NOT trained: every parameter is drawn from ``seed`` by ``_seeded_init`` (see ``TOKEN_STD``),
         so its 38M-entry token table need not ship; a fingerprint test guards it.
  VAE    ``AutoencoderKL`` 64×64×3 <-> 8×8×4 (8× down, as SD1.x), trained on renders.
Shipped: ``weights/unet-*-of-2.safetensors`` (EMA weights after 2,700 steps of batch 64 = 16 captions × 4,
then 3,500 more from those weights at lr 6e-4 with a fresh optimiser) and
``weights/vae.safetensors`` in float16 (8.4 MB together), and the classifier (``classifier.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..family import SD1
from ..tiny import TinySD, sd1_alphas_cumprod

WEIGHTS_DIR = Path(__file__).with_name("weights")
TEXT_SEED = 1212
#: sha256 of the shipped files (tests check them; ``export`` rewrites the files, then update these)
WEIGHTS_SHA256: dict[str, str] = {
    "unet-1-of-2.safetensors": "bd63f6fdb934f1cff72b01898b6ef27e424defc00a08c556380b9b31d7e53c3a",
    "unet-2-of-2.safetensors": "6a170a8a52e06f2732dfe15999e8ff8b5d1f2af3d77adbc19210544741f9a1ff",
    "vae.safetensors": "2332030b774737653d91ead906558037c8e96614c3a33c0c23497ef57a29bcc3",
    "classifier.safetensors": "4008bae3e81690bacd21d2acc2ecf74aa8bbde6460743968e10c2b64aaf4aa93",
}
#: the UNet ships in shards of under 5 MiB each (``export.save_sharded``), loaded together
UNET_SHARDS = tuple(sorted(n for n in WEIGHTS_SHA256 if n.startswith("unet-")))
IMAGE_SIZE = 64  # pixels; latents are IMAGE_SIZE // 8


def build_unet() -> nn.Module:
    """SD1.x-layout UNet with small channels (random init; weights come from ``load_world_model``)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=768, attention_head_dim=2,  # diffusers' legacy name: the number of heads
    )


def build_vae() -> nn.Module:
    """AutoencoderKL 64×64×3 -> 8×8×4 (three downsamplers)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 64),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE,
        scaling_factor=SD1.vae_scale,
    )


#: std of the seeded token and position tables. With every weight at N(0, 0.02) the causal attention's
#: output (std ≈ 0.3) buries the token (std 0.02): "red" and "blue" at one position came out at cosine
#: 0.95, which made the UNet's conditioning slow to learn. At 0.3 / 0.05 they are at 0.32, "red" in two
#: templates stays at 0.97, and later positions still carry the earlier words (the leak MACE's CFR removes).
TOKEN_STD, POSITION_STD = 0.3, 0.05


@torch.no_grad()
def _seeded_init(module: nn.Module, seed: int) -> None:
    """Every parameter from one generator, in ``named_parameters`` order: norms 1/0, biases 0, the token
    and position tables N(0, TOKEN_STD²) and N(0, POSITION_STD²), else N(0, 0.02²)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "layer_norm" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            std = TOKEN_STD if "token_embedding" in name else POSITION_STD if "position_embedding" in name else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build_text_encoder(seed: int = TEXT_SEED) -> nn.Module:
    """The frozen 2-layer CLIP text encoder rebuilt from ``seed`` (no shipped weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    model = CLIPTextModel(config)
    _seeded_init(model, seed)
    return model.eval().requires_grad_(False)


def parameters_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter's shape and float32 little-endian bytes, in order (names left out:
    they differ between transformers versions, the values must not)."""
    import hashlib

    h = hashlib.sha256()
    for p in module.parameters():
        w = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{tuple(w.shape)}\n".encode())
        h.update(w.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def load_world_model(weights_dir: Path | str | None = None) -> TinySD:
    """The trained world model (float32, eval, frozen), the same kind of object as ``build_tiny_sd``."""
    from safetensors.torch import load_file

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    unet, vae = build_unet(), build_vae()
    unet_state: dict[str, torch.Tensor] = {}
    for shard in UNET_SHARDS:
        unet_state.update(load_file(folder / shard))
    unet.load_state_dict({k: v.float() for k, v in unet_state.items()})
    vae_state = load_file(folder / "vae.safetensors")
    scale = float(vae_state.pop("scaling_factor").item())
    vae.load_state_dict({k: v.float() for k, v in vae_state.items()})
    vae.register_to_config(scaling_factor=scale)
    for m in (unet, vae):
        m.eval().requires_grad_(False)
    return TinySD(unet=unet, text_encoder=build_text_encoder(), vae=vae, alphas_cumprod=sd1_alphas_cumprod())


__all__ = ["IMAGE_SIZE", "TEXT_SEED", "UNET_SHARDS", "WEIGHTS_DIR", "WEIGHTS_SHA256", "build_text_encoder", "build_unet", "build_vae",
           "load_world_model", "parameters_fingerprint"]
