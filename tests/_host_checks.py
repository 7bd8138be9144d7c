"""Checks that a diffusers host was left as it was (imported by tests; not a test module)."""

from __future__ import annotations

import torch

from mace_ops.hosts.diffusers import DiffusersHost


def host_state(host: DiffusersHost) -> dict[str, torch.Tensor]:
    """Copies of every tensor of the host's UNet, text encoder and VAE (to prove they never change)."""
    out = {}
    for prefix, m in (("unet", host.unet), ("text", host.text_encoder), ("vae", host.vae)):
        out.update({f"{prefix}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return out


def attention_processors(host: DiffusersHost) -> dict[str, int]:
    """Identity of each attention processor of the UNet (to prove hooks were removed)."""
    return {k: id(v) for k, v in host.unet.attn_processors.items()}
