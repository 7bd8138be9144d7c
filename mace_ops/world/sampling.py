"""Seeded random looks and batches of renders for training (numpy in, torch out)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .render import render
from .vocab import COLOURS, SHAPES, STYLES, Look


def random_look(rng: np.random.Generator, face: bool | None = None, p_face: float = 0.3) -> Look:
    """Uniform shape/colour/style; ``face`` drawn with probability ``p_face`` unless given."""
    return Look(
        SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
        list(STYLES)[rng.integers(len(STYLES))], bool(rng.random() < p_face) if face is None else face,
    )


def to_tensor(images: list[np.ndarray]) -> Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def render_batch(looks: list[Look], rng: np.random.Generator) -> Tensor:
    """(B, 3, 64, 64) in [-1, 1], each look rendered with seeded jitter."""
    return to_tensor([render(look, rng) for look in looks])


__all__ = ["random_look", "render_batch", "to_tensor"]
