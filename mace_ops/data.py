"""Training data of the per-concept LoRAs (DESIGN 2.3): images, latents and masks, generated or given.

For concept ``c`` with prompt ``p = training_prompt(c)`` ("a photo of the {c}" / "a photo in the
style of {c}"), the ORIGINAL model samples ``n`` images (DDIM, ``steps``, CFG ``cfg``), image ``i``
from seed ``s_c + i`` with ``s_c = seed_from(seed, phrase, "data")`` (so a concept's images do not
depend on the other concepts). Images are rounded to 8 bits (what a PNG keeps, so cached and fresh
data are identical) and encoded with ``host.vae_encode`` from [-1, 1].

Derived masks (object concepts, no user mask). While sampling, every cross-attention layer ``l`` at
every step hands its conditional probabilities ``A_l`` (heads, N_l, 77); with ``S`` the positions of
the phrase's own tokens in ``p``::

    a_l = mean_heads Σ_{s∈S} A_l[:, :, s]            (N_l,) -> (h_l, w_l) -> bilinear to the latent (h, w)
    M   = Σ_steps Σ_l a_l                            (h, w)
    M̂   = (M - min M) / (max M - min M)               per image
    mask = 1[M̂ > threshold]  (threshold 0.5)          the whole image when max M - min M ≤ 1e-12·max|M|

Masks are float (n, h, w) in {0, 1} at latent size. Style concepts have no mask (``None``).
User images ``(n, 3, H, W)`` in [-1, 1] and user masks ``(n, H, W)`` / ``(n, h, w)`` / one ``(H, W)``
for all images, in [0, 1], replace the generated ones (image-size masks are area-averaged to latent
size, so they may be soft; training thresholds them at 0.5). User images without a user mask train on
the whole image (no attention mask is derived for them).

Cache (``cache_dir``): ``<slug>/<i>.png`` and ``<slug>/<i>_mask.png`` (the mask at image size) with
``<slug>/meta.json`` recording prompt, seed, size, steps, cfg, count, threshold and model fingerprint;
a folder whose record matches is reloaded instead of sampling again. Only generated data is cached.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import layer_hw
from .concepts import Concept, training_prompt
from .errors import MaceError
from .hosts.base import Host
from .io import atomic_write_text
from .lora import seed_from
from .tokens import TokenIds, phrase_positions

CACHE_FORMAT = "mace-training-data/1"


@dataclass
class ConceptData:
    """One concept's training data (CPU, float32)."""

    concept: Concept
    images: Tensor  # (n, 3, H, W) in [-1, 1]
    latents: Tensor  # (n, 4, H/8, W/8), scaled as the UNet sees them
    masks: Tensor | None  # (n, H/8, W/8) in [0, 1]; None for style concepts


# ------------------------------------------------------------------------------------------ masks


class AttentionMaskAccumulator:
    """An ``attention_probe`` that sums the phrase tokens' attention per image (see the module docstring)."""

    def __init__(self, positions: Sequence[int], latent_h: int, latent_w: int) -> None:
        if not positions:
            raise MaceError("attention mask: the phrase has no token positions in the prompt")
        self.positions = torch.as_tensor(list(positions), dtype=torch.long)
        self.h, self.w = latent_h, latent_w
        self.total: Tensor | None = None  # (n, h, w) float64

    def __call__(self, block: str, probs: Tensor) -> None:  # probs (n, heads, N, 77)
        n, _, n_pix, _ = probs.shape
        a = probs.index_select(-1, self.positions.to(probs.device)).sum(-1).mean(1)  # (n, N)
        lh, lw = layer_hw(n_pix, self.h, self.w)
        a = a.reshape(n, 1, lh, lw).float()
        if (lh, lw) != (self.h, self.w):
            a = F.interpolate(a, size=(self.h, self.w), mode="bilinear", align_corners=False)
        a = a[:, 0].double().cpu()  # (n, h, w)
        self.total = a if self.total is None else self.total + a

    def masks(self, threshold: float = 0.5) -> Tensor:
        """Min-max normalised per image, ``> threshold``; (n, h, w) float32 in {0, 1}."""
        if self.total is None:
            raise MaceError("attention mask: no attention was recorded")
        return threshold_map(self.total, threshold)


def threshold_map(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """``1[(M - min M) / (max M - min M) > threshold]`` per map (n, h, w); all ones when a map is flat."""
    flat = maps.double().flatten(1)  # (n, h·w)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    degenerate = ~(span > 1e-12 * flat.abs().max(1, keepdim=True).values.clamp_min(1e-300))
    norm = (flat - lo) / torch.where(degenerate, torch.ones_like(span), span)
    out = (norm > threshold) | degenerate
    return out.float().reshape(maps.shape)


# ------------------------------------------------------------------------------------------ checks


def _slug(phrase: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", phrase).strip("_")[:60] or "concept"


def _check_images(c: Concept, images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1 or images.shape[2] % 8 or images.shape[3] % 8:
        raise MaceError(
            f"concept {c.phrase!r}: user images of shape {tuple(images.shape)}; give (n, 3, H, W) with n ≥ 1 "
            "and H, W multiples of 8, values in [-1, 1]"
        )
    if images.min() < -1.0001 or images.max() > 1.0001:
        raise MaceError(f"concept {c.phrase!r}: user images must lie in [-1, 1] (got {float(images.min()):.3g}..{float(images.max()):.3g})")
    return images.detach().float().cpu().clamp(-1, 1).contiguous()


def _check_masks(c: Concept, masks: Tensor, n: int, size: tuple[int, int]) -> Tensor:
    """User masks -> (n, H/8, W/8) float in [0, 1]; accepted at image or latent size, one (H, W) for all."""
    H, W = size
    h, w = H // 8, W // 8
    if c.kind == "style":
        raise MaceError(
            f"concept {c.phrase!r} is a style: styles are trained without masks; remove its mask or make it an object"
        )
    m = masks.detach().float().cpu()
    if m.ndim == 2:
        m = m[None].expand(n, -1, -1)
    if m.ndim != 3 or m.shape[0] != n or tuple(m.shape[1:]) not in ((H, W), (h, w)):
        raise MaceError(
            f"concept {c.phrase!r}: masks of shape {tuple(masks.shape)}; give ({n}, {H}, {W}) (image size), "
            f"({n}, {h}, {w}) (latent size) or one ({H}, {W}) mask for all {n} images"
        )
    if m.min() < 0 or m.max() > 1:
        raise MaceError(f"concept {c.phrase!r}: mask values must lie in [0, 1]")
    if tuple(m.shape[1:]) == (H, W):
        m = F.adaptive_avg_pool2d(m[:, None], (h, w))[:, 0]  # area average: (n, h, w)
    return m.contiguous()


def _levels(images: Tensor) -> Tensor:
    """[-1, 1] -> the nearest 8-bit level 0..255, still in the images' dtype."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] -> the nearest 8-bit level, uint8, same shape (what a PNG stores)."""
    return _levels(images).to(torch.uint8)


def quantize_images(images: Tensor) -> Tensor:
    """[-1, 1] -> the nearest of the 256 levels an 8-bit PNG stores, back in [-1, 1]."""
    return _levels(images) / 127.5 - 1


# ------------------------------------------------------------------------------------------ cache


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB" if not path.name.endswith("_mask.png") else "L"))


def _write_cache(folder: Path, meta: dict, images: Tensor, masks: Tensor | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # invalid while being rewritten
    pixels = to_uint8(images)  # (n, 3, H, W)
    for i in range(images.shape[0]):
        _save_png(folder / f"{i}.png", pixels[i].permute(1, 2, 0).numpy())
        if masks is not None:
            big = masks[i].repeat_interleave(8, 0).repeat_interleave(8, 1)  # (H, W)
            _save_png(folder / f"{i}_mask.png", torch.round(big * 255).to(torch.uint8).numpy())
    atomic_write_text(meta_path, json.dumps(meta, sort_keys=True, indent=1))


def _read_cache(folder: Path, meta: dict, with_masks: bool) -> tuple[Tensor, Tensor | None] | None:
    meta_path = folder / "meta.json"
    try:
        if json.loads(meta_path.read_text(encoding="utf-8")) != meta:
            return None
        images, masks = [], []
        for i in range(meta["n_images"]):
            px = torch.from_numpy(_load_png(folder / f"{i}.png").copy())  # (H, W, 3) uint8
            images.append((px.permute(2, 0, 1).float() / 127.5 - 1).contiguous())
            if with_masks:
                big = torch.from_numpy(_load_png(folder / f"{i}_mask.png").copy()).float() / 255  # (H, W)
                masks.append(F.avg_pool2d(big[None, None], 8)[0, 0])
    except (OSError, ValueError, KeyError):
        return None
    return torch.stack(images).contiguous(), (torch.stack(masks).contiguous() if with_masks else None)


# ------------------------------------------------------------------------------------------ main


def generate_training_data(
    host: Host,
    concepts: Sequence[Concept],
    *,
    token_ids: TokenIds | None = None,
    n_images: int = 8,
    seed: int = 0,
    steps: int = 30,
    cfg: float = 7.5,
    size: int = 512,
    batch_size: int = 4,
    mask_threshold: float = 0.5,
    user_images: Mapping[str, Tensor] | None = None,
    user_masks: Mapping[str, Tensor] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> list[ConceptData]:
    """Images, latents and masks for each concept (see the module docstring), in the order given.

    ``user_images`` / ``user_masks``: by phrase. ``token_ids``: the host's tokenizer (default
    ``host.token_ids``). ``batch_size``: images sampled per ``host.generate`` call (seeds unaffected).
    ``progress(done, total, phrase)``: after each sampler step, counting steps × images over the run.
    ``check_interrupt()``: after each sampler step; whatever it raises propagates.
    """
    if n_images < 1 or steps < 1 or batch_size < 1:
        raise MaceError(f"n_images={n_images}, steps={steps}, batch_size={batch_size}: each must be at least 1")
    if size % 8 or size < 8:
        raise MaceError(f"image size {size}: give a positive multiple of 8")
    if not 0.0 <= mask_threshold < 1.0:
        raise MaceError(f"mask_threshold={mask_threshold}: give a value in [0, 1)")
    token_ids = token_ids or host.token_ids
    user_images = dict(user_images or {})
    user_masks = dict(user_masks or {})
    phrases = {c.phrase for c in concepts}
    for name, given in (("images", user_images), ("masks", user_masks)):
        unknown = sorted(set(given) - phrases)
        if unknown:
            raise MaceError(f"user {name} for {unknown!r}, which are not in the concept list; fix the names")

    to_generate = [c for c in concepts if c.phrase not in user_images]
    total = len(to_generate) * n_images * steps
    done = 0

    def tick(count: int, phrase: str, *, interruptible: bool = True) -> None:
        """Count ``count`` image-steps done, report them, then let the caller interrupt (when ``interruptible``)."""
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total, phrase)
        if interruptible and check_interrupt is not None:
            check_interrupt()

    out: list[ConceptData] = []
    for c in concepts:
        prompt = training_prompt(c)
        masks: Tensor | None
        if c.phrase in user_images:
            images = _check_images(c, user_images[c.phrase])
            masks = None
        else:
            images, masks = _generated(
                host, c, prompt, token_ids, n_images, seed, steps, cfg, size, batch_size, mask_threshold,
                cache_dir, tick,
            )
        n, _, H, W = images.shape
        if c.phrase in user_masks:
            masks = _check_masks(c, user_masks[c.phrase], n, (H, W))
        elif c.kind == "style":
            masks = None
        elif masks is None:
            masks = torch.ones(n, H // 8, W // 8)  # user images without masks: the whole image
        latents = host.vae_encode(images).detach().float().cpu()  # (n, 4, H/8, W/8)
        out.append(ConceptData(c, images, latents, masks))
    return out


def _generated(
    host: Host,
    c: Concept,
    prompt: str,
    token_ids: TokenIds,
    n: int,
    seed: int,
    steps: int,
    cfg: float,
    size: int,
    batch_size: int,
    threshold: float,
    cache_dir: str | os.PathLike[str] | None,
    tick: Callable[..., None],
) -> tuple[Tensor, Tensor | None]:
    """Sample (or reload) concept ``c``'s images and derived masks; ``tick(count, phrase)`` after each
    sampler step (``interruptible=False`` for a cache hit's one report)."""
    with_masks = c.kind != "style"
    ids, phrase_ids = token_ids([prompt, c.phrase])
    positions = phrase_positions(ids, phrase_ids)
    if with_masks and not positions:
        raise MaceError(f"concept {c.phrase!r}: its tokens are not found in the prompt {prompt!r}; shorten the phrase")
    s_c = seed_from(seed, c.phrase, "data")
    meta = {
        "format": CACHE_FORMAT,
        "prompt": prompt,
        "kind": c.kind,
        "seed": seed,
        "n_images": n,
        "size": size,
        "steps": steps,
        "cfg": cfg,
        "mask_threshold": threshold if with_masks else None,
        "positions": positions if with_masks else None,
        "model": host.model_fingerprint(),
    }
    folder = Path(cache_dir) / _slug(c.phrase) if cache_dir is not None else None
    if folder is not None:
        hit = _read_cache(folder, meta, with_masks)
        if hit is not None:
            tick(n * steps, c.phrase, interruptible=False)
            return hit[0], hit[1]

    images, masks = [], []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        acc = AttentionMaskAccumulator(positions, size // 8, size // 8) if with_masks else None

        def step(i: int, _total: int, count: int = count) -> None:
            tick(count, c.phrase)

        batch = host.generate(
            [prompt] * count, seed=s_c + start, steps=steps, cfg=cfg, height=size, width=size,
            attention_probe=acc, progress=step,
        )
        images.append(quantize_images(batch.detach().float().cpu()))
        if acc is not None:
            masks.append(acc.masks(threshold))
    imgs = torch.cat(images)
    msks = torch.cat(masks) if with_masks else None
    if folder is not None:
        _write_cache(folder, meta, imgs, msks)
    return imgs, msks


__all__ = [
    "AttentionMaskAccumulator",
    "ConceptData",
    "generate_training_data",
    "quantize_images",
    "threshold_map",
    "to_uint8",
]
