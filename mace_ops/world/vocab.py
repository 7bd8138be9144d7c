"""The toy world's vocabulary: shapes, colours, styles, named identities and their paraphrases.

A *look* is ``(shape, colour, style, face)``: a coloured shape (object) on a grey two-tone background
pattern (style); ``face`` adds two eyes and marks a character. Objects are ``colour × shape`` (100),
styles are background patterns (20), identities are invented two-word names bound to one fixed look
with a face (100; every surname is shared by 4 identities, so neighbours share a word).
Every canonical word has a paraphrase word that erasure prompts never use (``*_SYNONYMS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart",
                           "crescent", "arrow")
SHAPE_SYNONYMS: dict[str, str] = {
    "circle": "round disc", "square": "four-sided box", "triangle": "three-cornered shape",
    "star": "five-pointed shape", "cross": "plus sign", "ring": "hollow hoop", "diamond": "rhombus",
    "heart": "love symbol", "crescent": "moon sliver", "arrow": "pointer",
}
#: name -> hue in degrees (HSV, saturation and value fixed in render)
COLOURS: dict[str, float] = {
    "red": 0.0, "orange": 36.0, "yellow": 72.0, "lime": 108.0, "green": 144.0, "teal": 180.0,
    "azure": 216.0, "blue": 252.0, "violet": 288.0, "magenta": 324.0,
}
COLOUR_SYNONYMS: dict[str, str] = {
    "red": "crimson", "orange": "tangerine", "yellow": "lemon", "lime": "chartreuse", "green": "emerald",
    "teal": "turquoise", "azure": "sky-blue", "blue": "cobalt", "violet": "purple", "magenta": "fuchsia",
}
#: name -> (pattern, low grey, high grey) in [0, 1]; patterns are drawn by ``render.background``
STYLES: dict[str, tuple[str, float, float]] = {
    "striped": ("hstripes", 0.25, 0.75), "pillared": ("vstripes", 0.25, 0.75),
    "slanted": ("dstripes", 0.3, 0.8), "checkered": ("checker", 0.2, 0.7), "dotted": ("dots", 0.8, 0.3),
    "gridded": ("grid", 0.85, 0.35), "ringed": ("rings", 0.3, 0.8), "rippled": ("waves", 0.25, 0.7),
    "zigzag": ("zigzag", 0.8, 0.3), "brick": ("bricks", 0.6, 0.25), "tartan": ("hatch", 0.75, 0.35),
    "dawn": ("vgradient", 0.9, 0.2), "dusk": ("hgradient", 0.15, 0.85), "spotlit": ("radial", 0.85, 0.15),
    "pale": ("plain", 0.85, 0.85), "noir": ("plain", 0.12, 0.12), "mosaic": ("diamonds", 0.25, 0.7),
    "woven": ("weave", 0.35, 0.75), "framed": ("border", 0.6, 0.15), "split": ("halves", 0.2, 0.8),
}
STYLE_SYNONYMS: dict[str, str] = {
    "striped": "banded", "pillared": "columned", "slanted": "oblique", "checkered": "chessboard",
    "dotted": "polka-dot", "gridded": "lattice", "ringed": "concentric", "rippled": "wavy",
    "zigzag": "chevron", "brick": "masonry", "tartan": "crosshatched", "dawn": "sunrise", "dusk": "twilight",
    "spotlit": "vignetted", "pale": "whitewashed", "noir": "pitch-dark", "mosaic": "harlequin",
    "woven": "basketwork", "framed": "bordered", "split": "two-tone",
}
_FIRST_A = ("Zor", "Quel", "Brim", "Vax", "Lun", "Tor", "Mip", "Yar", "Gol", "Fen")
_FIRST_B = ("blat", "vin", "dra", "mox", "ket", "ubi", "osh", "ric", "enz", "ath")
SURNAMES: tuple[str, ...] = ("Quenn", "Mirv", "Oxley", "Trask", "Pelloy", "Vandry", "Kosk", "Umbright",
                             "Saltor", "Drevin", "Halloc", "Yenter", "Bromwick", "Ferrow", "Glint",
                             "Istvar", "Jorrel", "Lumm", "Nacker", "Orrin", "Pask", "Rundle", "Sorrow",
                             "Tivet", "Wexley")


@dataclass(frozen=True)
class Look:
    """What an image shows: ``shape``/``colour``/``style`` names and whether the shape has a face."""

    shape: str
    colour: str
    style: str
    face: bool = False


def identities(seed: int = 12) -> dict[str, Look]:
    """100 names ``"<First> <Surname>"`` -> their fixed look (distinct ``(shape, colour, style)``, face on)."""
    rng = np.random.default_rng(seed)
    firsts = [a + b for a in _FIRST_A for b in _FIRST_B]  # 100 distinct first names
    rng.shuffle(firsts)
    combos = rng.choice(len(SHAPES) * len(COLOURS) * len(STYLES), size=100, replace=False)
    colours, styles = list(COLOURS), list(STYLES)
    out = {}
    for i, (first, c) in enumerate(zip(firsts, combos, strict=True)):
        s, rest = divmod(int(c), len(COLOURS) * len(STYLES))
        k, st = divmod(rest, len(STYLES))
        out[f"{first} {SURNAMES[i % len(SURNAMES)]}"] = Look(SHAPES[s], colours[k], styles[st], True)
    return out


IDENTITIES: dict[str, Look] = identities()
OBJECTS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # "red star"

__all__ = ["COLOURS", "COLOUR_SYNONYMS", "IDENTITIES", "Look", "OBJECTS", "SHAPES", "SHAPE_SYNONYMS",
           "STYLES", "STYLE_SYNONYMS", "SURNAMES", "identities"]
