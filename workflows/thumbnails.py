"""Thumbnails of the bundled workflows for ComfyUI's template browser, drawn from the graph itself.

The browser shows ``example_workflows/<name>.jpg`` beside ``<name>.json``. We draw the UI-format graph
as the canvas shows it, scaled to fit: its groups (tinted boxes with their titles), its links (curves
coloured by type, from an output slot to an input slot) and its nodes (title bar and body), with the
workflow's title (the first line of its Note) in a band at the bottom. PIL only, the bitmap default
font, no model or browser, so ``build_workflows.py`` writes them with the JSON and a test re-draws them.
"""

from __future__ import annotations

import io
import re
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFont

SIZE = (480, 270)  # 16:9, like the browser's cards
BACKGROUND = (32, 32, 32)
NODE_BODY, NODE_TITLE, NODE_TEXT = (53, 53, 53), (34, 34, 34), (220, 220, 220)
LINK_COLORS = {"MODEL": (178, 157, 255), "CLIP": (255, 210, 0), "VAE": (255, 108, 108), "IMAGE": (100, 183, 231)}
OTHER_LINK = (160, 200, 160)  # MACE's own types
SLOT_Y0, SLOT_DY, TITLE_H = 14.0, 22.0, 30.0  # LiteGraph's slot layout in graph units
QUALITY = 82


def _rgb(color: str) -> tuple[int, int, int]:
    """'#abc' or '#aabbcc' -> (r, g, b)."""
    h = color.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _label(node: dict[str, Any]) -> str:
    """The node's title, or its type without the 'Mace' prefix and split at capitals."""
    if node.get("title"):
        return str(node["title"])
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", re.sub(r"^Mace", "", node["type"]))


def _bounds(wf: dict[str, Any]) -> tuple[float, float, float, float]:
    boxes = [tuple(g["bounding"]) for g in wf.get("groups", [])]
    boxes += [(n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H) for n in wf["nodes"]]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return x0, y0, x1, y1


def _bezier(p0: tuple[float, float], p3: tuple[float, float], steps: int = 24) -> list[tuple[float, float]]:
    """LiteGraph's link curve: horizontal tangents at both ends."""
    dx = max(abs(p3[0] - p0[0]) * 0.5, 20.0)
    p1, p2 = (p0[0] + dx, p0[1]), (p3[0] - dx, p3[1])
    pts = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
        pts.append((a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]))
    return pts


def render(wf: dict[str, Any], size: tuple[int, int] = SIZE) -> Image.Image:
    """The thumbnail of a UI-format workflow as an RGB image of ``size``."""
    w, h = size
    band = 26  # the title band at the bottom
    x0, y0, x1, y1 = _bounds(wf)
    s = min((w - 16) / (x1 - x0), (h - band - 16) / (y1 - y0))
    ox, oy = (w - (x1 - x0) * s) / 2 - x0 * s, (h - band - (y1 - y0) * s) / 2 - y0 * s

    def at(x: float, y: float) -> tuple[float, float]:
        return ox + x * s, oy + y * s

    img = Image.new("RGB", size, BACKGROUND)
    d = ImageDraw.Draw(img, "RGBA")
    font = ImageFont.load_default()
    for g in wf.get("groups", []):
        gx, gy, gw, gh = g["bounding"]
        r, gg, b = _rgb(g.get("color", "#888"))
        d.rectangle((*at(gx, gy), *at(gx + gw, gy + gh)), fill=(r, gg, b, 70), outline=(r, gg, b, 200))
        d.text((at(gx, gy)[0] + 3, at(gx, gy)[1] + 2), g["title"][:48], fill=(235, 235, 235), font=font)
    by_id = {n["id"]: n for n in wf["nodes"]}
    for _, src, out_slot, dst, in_slot, kind in wf.get("links", []):
        a, b = by_id[src], by_id[dst]
        p0 = at(a["pos"][0] + a["size"][0], a["pos"][1] + SLOT_Y0 + out_slot * SLOT_DY)
        p3 = at(b["pos"][0], b["pos"][1] + SLOT_Y0 + in_slot * SLOT_DY)
        d.line(_bezier(p0, p3), fill=LINK_COLORS.get(kind, OTHER_LINK), width=2)
    for n in wf["nodes"]:
        nx, ny = n["pos"]
        nw, nh = n["size"]
        body = _rgb(n["bgcolor"]) if n.get("bgcolor") else NODE_BODY
        title = _rgb(n["color"]) if n.get("color") else NODE_TITLE
        d.rounded_rectangle((*at(nx, ny - TITLE_H), *at(nx + nw, ny + nh)), radius=3, fill=body)
        d.rounded_rectangle((*at(nx, ny - TITLE_H), *at(nx + nw, ny)), radius=3, fill=title)
        tx, ty = at(nx, ny - TITLE_H)
        d.text((tx + 2, ty + 1), _label(n)[: max(3, int(nw * s / 6))], fill=NODE_TEXT, font=font)
    note = next((n for n in wf["nodes"] if n["type"] == "Note"), None)
    caption = (note["widgets_values"][0].split("\n", 1)[0] if note else "")[:78]
    d.rectangle((0, h - band, w, h), fill=(18, 18, 18))
    d.text((8, h - band + 7), caption, fill=(255, 255, 255), font=font)
    return img


def thumbnail_bytes(wf: dict[str, Any]) -> bytes:
    """The JPEG file of ``render(wf)``."""
    buf = io.BytesIO()
    render(wf).save(buf, format="JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()


def same_picture(a: Image.Image, b: Image.Image, tolerance: float = 8.0) -> bool:
    """Equal sizes and, in every 8×8 block, a mean absolute grey difference under ``tolerance``: JPEG coders
    differ by a few levels, a changed label or box changes some block by far more."""
    if a.size != b.size:
        return False
    diff = ImageChops.difference(a.convert("L"), b.convert("L"))
    blocks = diff.resize((max(1, a.width // 8), max(1, a.height // 8)), Image.Resampling.BOX)
    return blocks.getextrema()[1] < tolerance
