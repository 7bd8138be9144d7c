"""Shared fixtures: the tiny SD1.x-shaped models and a diffusers host over them (built once per session).

The host's modules are frozen and never written by the code under test; tests that need to check
that must compare ``state_dict``s, not rebuild.
"""

from __future__ import annotations

import pytest

from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.tiny import TinySD, build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd() -> TinySD:
    """Tiny UNet / text encoder / VAE, seed 0 (16 cross-attention blocks, 768-d context)."""
    return build_tiny_sd(0)


@pytest.fixture(scope="session")
def tiny_host(tiny_sd: TinySD) -> DiffusersHost:
    """A ``DiffusersHost`` over ``tiny_sd`` (CPU, float32, the real SD1.x tokenizer)."""
    return DiffusersHost(
        tiny_sd.unet, tiny_sd.text_encoder, tiny_sd.vae, alphas_cumprod=tiny_sd.alphas_cumprod
    )

