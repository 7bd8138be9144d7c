"""Draw the pack's registry icon, ``docs/icon.png`` (256×256, square; the registry allows up to 400×400).

A 4×4 grid of coloured tiles (many concepts) crossed by an eraser stroke that has wiped the tiles it
passed over back to the background: mass concept erasure. Drawn with PIL only, no font, so the file is
the same wherever it is rebuilt: ``python docs/make_icon.py`` (``--check`` compares instead of writing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

SIZE = 256
OUT = Path(__file__).resolve().parent / "icon.png"
BACKGROUND = (24, 26, 33)
TILES = [(231, 76, 60), (241, 196, 15), (46, 204, 113), (52, 152, 219), (155, 89, 182), (230, 126, 34),
         (26, 188, 156), (236, 240, 241)]
ERASED = {(0, 3), (1, 2), (2, 1), (3, 0), (1, 3), (2, 2), (3, 1)}  # (row, column) under the stroke


def draw_icon(size: int = SIZE) -> Image.Image:
    """The icon as an RGB image of ``size``×``size``."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    margin, gap = size // 8, size // 32
    cell = (size - 2 * margin - 3 * gap) // 4
    for r in range(4):
        for c in range(4):
            x, y = margin + c * (cell + gap), margin + r * (cell + gap)
            box = (x, y, x + cell, y + cell)
            if (r, c) in ERASED:
                d.rounded_rectangle(box, radius=cell // 6, outline=(70, 74, 88), width=max(1, size // 128))
            else:
                d.rounded_rectangle(box, radius=cell // 6, fill=TILES[(r * 4 + c) % len(TILES)])
    # the eraser: a rounded white block at the lower-left end of the wiped band
    e = size // 6
    cx, cy = margin + cell, size - margin - cell // 2
    d.rounded_rectangle((cx - e, cy - e // 2, cx + e // 2, cy + e // 2), radius=e // 5, fill=(250, 250, 250),
                        outline=(231, 76, 60), width=max(2, size // 64))
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with docs/icon.png; write nothing")
    args = ap.parse_args(argv)
    img = draw_icon()
    if args.check:
        with Image.open(OUT) as old:
            same = old.size == img.size and ImageChops.difference(old.convert("RGB"), img).getbbox() is None
        print("docs/icon.png is up to date" if same else "docs/icon.png is stale: run python docs/make_icon.py")
        return 0 if same else 1
    img.save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
