"""Before/after verdict of an erasure on the world model: labelled image grid + classifier numbers.

For every listed concept (erased ones and their retained neighbours) ``n`` samples of its own prompts
are drawn from the original and the erased model with the same seeds and read by the classifier;
``before``/``after`` are the recognition rates (``evaluate.recognition``). The grid has one row per
concept: n "before" images | n "after" images, each captioned with what the classifier read.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .classifier import Reading, WorldClassifier, read_images
from .evaluate import WorldConcept, sample_images

_CELL = 96  # px per image in the grid (64-px samples upscaled, plus a caption strip)
_LABEL_W = 230


def _label(r: Reading) -> str:
    return r.identity or f"{r.colour} {r.shape}, {r.style}"


def _row(title: str, stats: str, images: np.ndarray, readings: list[Reading], hits: list[bool]) -> Image.Image:
    """One grid row: label column, then the images with what was read under each (green = recognised)."""
    n = len(images)
    row = Image.new("RGB", (_LABEL_W + n * _CELL, _CELL + 14), "white")
    d = ImageDraw.Draw(row)
    d.text((4, 30), title[:34], fill="black")
    d.text((4, 48), stats, fill="black")
    for i, (img, r, hit) in enumerate(zip(images, readings, hits, strict=True)):
        x = _LABEL_W + i * _CELL
        row.paste(Image.fromarray(img).resize((_CELL - 6, _CELL - 6), Image.NEAREST), (x + 3, 3))
        d.text((x + 3, _CELL - 2), _label(r)[:15], fill=(0, 130, 0) if hit else (200, 0, 0))
    return row


def _uint8(images) -> np.ndarray:  # (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8
    return ((images.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy()


def write_verdict(out_dir: Path, original_host, erased_host, classifier: WorldClassifier,
                  erased: Sequence[WorldConcept], retained: Sequence[WorldConcept], n: int = 6,
                  seed: int = 0) -> dict:
    """Write ``verdict.png``, ``verdict.json`` and ``verdict.html`` into ``out_dir``; returns the numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, items = [], []
    for role, concepts in (("erased", erased), ("retained", retained)):
        for c in concepts:
            imgs, reads = [], []
            for host in (original_host, erased_host):
                x = sample_images(host, c.prompts(), n, seed)
                imgs.append(_uint8(x))
                reads.append(read_images(classifier, x))
            hits = [[c.recognised(r) for r in rs] for rs in reads]
            before, after = float(np.mean(hits[0])), float(np.mean(hits[1]))
            items.append({"role": role, "kind": c.kind, "phrase": c.phrase, "prompt": c.prompts()[0],
                          "before": before, "after": after})
            rows.append(_row(f"{role}: {c.phrase}", f"{c.kind}  {before:.0%} -> {after:.0%}",
                             np.concatenate(imgs), reads[0] + reads[1], hits[0] + hits[1]))
    header = Image.new("RGB", (rows[0].width, 18), "white")
    ImageDraw.Draw(header).text((_LABEL_W, 3), f"before ({n} seeds)", fill="black")
    ImageDraw.Draw(header).text((_LABEL_W + n * _CELL, 3), f"after (same {n} seeds)", fill="black")
    grid = Image.new("RGB", (rows[0].width, 18 + sum(r.height for r in rows)), "white")
    grid.paste(header, (0, 0))
    y = 18
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(out_dir / "verdict.png")
    (out_dir / "verdict.json").write_text(json.dumps({"samples_per_concept": n, "items": items}, indent=2))
    (out_dir / "verdict.html").write_text(verdict_html(items, n), encoding="utf-8")
    return {"samples_per_concept": n, "items": items}


def verdict_html(items: list[dict], n: int) -> str:
    """An HTML fragment: the grid and a table of recognition rates before -> after."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(i['role'])}</td><td>{e(i['kind'])}</td><td>{e(i['phrase'])}</td>"
                   f"<td>{e(i['prompt'])}</td><td>{i['before']:.0%} → {i['after']:.0%}</td></tr>" for i in items)
    return (f"<h2>Does it erase? (classifier verdict, {n} samples per concept)</h2>"
            "<p>Each row: the concept's first prompt sampled with the same seeds before (left) and after (right) "
            "the erasure; under each image what the world classifier read (green: the concept was recognised).</p>"
            '<img src="verdict.png"><table><tr><th>role</th><th>kind</th><th>concept</th><th>prompts (first)</th>'
            f"<th>recognised before → after</th></tr>{rows}</table>")


__all__ = ["verdict_html", "write_verdict"]
