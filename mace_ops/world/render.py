"""Render a ``Look`` as a 64×64 RGB image (numpy/PIL only, seeded jitter).

image = bg · (1 − m) + rgb(colour) · m, then two eyes when ``face``:
``bg`` (H, W) is the style's grey two-tone pattern (period 16 px), ``m`` (H, W) ∈ [0, 1] the shape's
anti-aliased mask (drawn at 4× and box-filtered), centred within ±``jitter`` px, scaled by 0.9–1.05.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLOURS, STYLES, Look

SIZE = 64
_SS = 4  # supersampling factor of the shape mask
_PERIOD = 16.0


def colour_rgb(name: str) -> np.ndarray:
    """The colour's RGB in [0, 1]: HSV(hue, 0.9, 0.95)."""
    return np.array(colorsys.hsv_to_rgb(COLOURS[name] / 360.0, 0.9, 0.95), dtype=np.float32)


def background(style: str, size: int = SIZE) -> np.ndarray:
    """The style's grey pattern, (size, size) float32 in [0, 1]."""
    kind, lo, hi = STYLES[style]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    p = _PERIOD
    r = np.hypot(x - size / 2, y - size / 2)
    patterns = {
        "hstripes": (y % p) < p / 2,
        "vstripes": (x % p) < p / 2,
        "dstripes": ((x + y) % p) < p / 2,
        "checker": ((x // p + y // p) % 2) == 0,
        "dots": np.hypot(x % p - p / 2, y % p - p / 2) < p * 0.3,
        "grid": ((x % p) < 3) | ((y % p) < 3),
        "rings": (r % p) < p / 2,
        "waves": ((y + 3 * np.sin(2 * math.pi * x / 32)) % p) < p / 2,
        "zigzag": ((y + np.abs((x % p) - p / 2)) % p) < p / 2,
        "bricks": ((y % p) < 2) | (((x + (y // p % 2) * p / 2) % (2 * p)) < 2),
        "hatch": (((x + y) % p) < 3) | (((x - y) % p) < 3),
        "diamonds": (((x + y) // p + (x - y) // p) % 2) == 0,
        "weave": np.where((x // p + y // p) % 2 == 0, (y % 8) < 4, (x % 8) < 4),
        "border": (x < 6) | (y < 6) | (x > size - 6) | (y > size - 6),
        "halves": x < size / 2,
    }
    if kind == "plain":
        t = np.zeros_like(x)
    elif kind == "vgradient":
        t = y / size
    elif kind == "hgradient":
        t = x / size
    elif kind == "radial":
        t = np.clip(r / (size * 0.6), 0, 1)
    else:
        t = patterns[kind].astype(np.float32)
    return (lo + (hi - lo) * t).astype(np.float32)


def _polygon(n: int, radius: float, inner: float | None = None, start: float = -90.0) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon (or n-pointed star with ``inner`` radius), unit-centred at 0."""
    pts, k = [], 2 * n if inner is not None else n
    for i in range(k):
        a = math.radians(start + 360.0 * i / k)
        rad = radius if inner is None or i % 2 == 0 else inner
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Fill ``shape`` of half-size ``r`` centred at (cx, cy) with 255 on an 'L' canvas."""
    def poly(pts: list[tuple[float, float]]) -> None:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in pts], fill=255)

    def disc(x: float, y: float, rad: float, fill: int = 255) -> None:
        draw.ellipse([cx + (x - rad) * r, cy + (y - rad) * r, cx + (x + rad) * r, cy + (y + rad) * r], fill=fill)

    if shape == "circle":
        disc(0, 0, 0.95)
    elif shape == "square":
        poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif shape == "triangle":
        poly([(0, -1.0), (0.95, 0.75), (-0.95, 0.75)])
    elif shape == "star":
        poly(_polygon(5, 1.05, 0.45))
    elif shape == "cross":
        poly([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)])
    elif shape == "ring":
        disc(0, 0, 1.0)
        disc(0, 0, 0.55, fill=0)
    elif shape == "diamond":
        poly([(0, -1.05), (0.75, 0), (0, 1.05), (-0.75, 0)])
    elif shape == "heart":
        disc(-0.45, -0.35, 0.5)
        disc(0.45, -0.35, 0.5)
        poly([(-0.93, -0.2), (0.93, -0.2), (0, 0.95)])
    elif shape == "crescent":
        disc(0, 0, 0.95)
        disc(0.45, -0.2, 0.75, fill=0)
    elif shape == "arrow":
        poly([(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25), (-1, 0.25)])
    else:
        raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Anti-aliased mask (size, size) float32 in [0, 1] of ``shape`` centred at (cx, cy), half-size r (px)."""
    canvas = Image.new("L", (size * _SS, size * _SS), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx * _SS, cy * _SS, r * _SS)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def render(look: Look, rng: np.random.Generator | None = None, jitter: float = 3.0) -> np.ndarray:
    """The look as (64, 64, 3) uint8; ``rng`` draws the position/scale jitter (none when ``None``)."""
    dx, dy, scale = (0.0, 0.0, 1.0) if rng is None else (*rng.uniform(-jitter, jitter, 2), rng.uniform(0.9, 1.05))
    cx, cy, r = SIZE / 2 + dx, SIZE / 2 + dy, 22.0 * scale
    m = shape_mask(look.shape, cx, cy, r)[..., None]  # (H, W, 1)
    img = background(look.style)[..., None] * (1 - m) + colour_rgb(look.colour) * m  # (H, W, 3)
    if look.face:
        for ex in (-0.32, 0.32):
            white = shape_mask("circle", cx + ex * r, cy - 0.05 * r, 0.2 * r)[..., None]
            pupil = shape_mask("circle", cx + ex * r, cy - 0.05 * r, 0.09 * r)[..., None]
            img = img * (1 - white) + white
            img = img * (1 - pupil)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


__all__ = ["SIZE", "background", "colour_rgb", "render", "shape_mask"]
