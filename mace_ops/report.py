"""The erasure report: report.json + report.html + PNG figures, from one function.

Mechanism numbers need no extra model (``kv_metrics``); for every matrix ``W`` (``W0`` original,
``W1`` erased) and stacked text-encoder token vectors (rows):

* anchor distance of concept ``c``: its ~30 prompt pairs ``(template(phrase), template(anchor))``,
  aligned positions ``(pos_f, pos_g)`` (``tokens.align_prompt_pair``), ``E_f``/``E_g`` the stacked
  token vectors there; ``T = E_g W0ᵀ`` (what the anchor's keys/values were) and

      d(W) = ||E_f Wᵀ - T||_F / ||T||_F          before: W = W0, after: W = W1

  averaged over the matrices. ``remaining = after / before``: 0 = keys/values now equal the anchor's,
  1 = nothing moved (the worst).
* drift of preserved prompts (all 77 positions ``E_p``): ``||E_p (W1 - W0)ᵀ||_F / ||E_p W0ᵀ||_F``,
  averaged over the matrices.
* attention mass on the concept tokens (generated images): the mean over sampler steps, blocks,
  heads and pixels of ``Σ_{s ∈ phrase tokens} softmax(QKᵀ/√d)[..., s]`` of the conditional branch.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .concepts import Concept, concept_prompt_pairs
from .data import to_uint8
from .errors import MaceError
from .tokens import aligned_rows, phrase_positions

REPORT_VERSION = 1
Encode = Callable[[Sequence[str]], Tensor]
TokenIds = Callable[[Sequence[str]], list[list[int]]]


# ---------------------------------------------------------------- numbers


def _matrices(original: Mapping[str, Tensor], erased: Mapping[str, Tensor]) -> list[str]:
    names = [n for n in original if n in erased]
    if not names:
        raise MaceError("report: the erased weights share no matrix with the original model")
    return names


def _segment_sums(x: Tensor, sizes: list[int]) -> Tensor:
    """Sum ``x`` (..., Σ sizes) over consecutive column groups -> (..., len(sizes))."""
    return torch.stack([part.sum(-1) for part in torch.split(x, sizes, dim=-1)], dim=-1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``sqrt(num / den)`` elementwise, 0 where both vanish."""
    out = torch.sqrt(num / den.clamp_min(torch.finfo(den.dtype).tiny))
    return torch.where((num == 0) & (den == 0), torch.zeros_like(out), out)


def kv_metrics(
    original_weights: Mapping[str, Tensor],
    erased_weights: Mapping[str, Tensor],
    encode: Encode,
    token_ids: TokenIds,
    concepts: Sequence[Concept],
    retained: Sequence[str] = (),
    *,
    max_prompts: int = 8,
    batch: int = 64,
) -> dict[str, Any]:
    """Anchor distance before/after per concept and the drift of ``retained`` prompts (module docstring).

    Uses the first ``max_prompts`` templates of each concept. All matrices are stacked into one
    ``(Σ d_out, d_ctx)`` matrix so each term is one matmul, on the device of the text encodings, in
    float32 (squared norms summed per matrix in float64). Returns ``{"concepts": [{phrase, anchor,
    kind, anchor_distance_before, anchor_distance_after, remaining, tokens}], "retained": {"prompts",
    "drift", "drift_per_prompt"}}``.
    """
    names = _matrices(original_weights, erased_weights)
    sizes = [int(original_weights[n].shape[0]) for n in names]
    w0_cpu = torch.cat([original_weights[n].detach().float().cpu() for n in names])  # (Σ d_out, d_ctx)
    w1_cpu = torch.cat([erased_weights[n].detach().float().cpu() for n in names])
    on: dict[Any, tuple[Tensor, Tensor]] = {}

    def weights_on(device: Any) -> tuple[Tensor, Tensor]:
        if device not in on:
            on[device] = (w0_cpu.to(device), w1_cpu.to(device))
        return on[device]

    def col_sq(x: Tensor) -> Tensor:  # (..., Σ d_out) -> per-matrix sums of squares (..., M), float64
        return _segment_sums(x.double() ** 2, sizes)

    out_concepts = []
    for c in concepts:
        pairs = concept_prompt_pairs(c)[: max(1, max_prompts)]
        fs, gs = [p for p, _ in pairs], [a for _, a in pairs]
        ids_f, ids_g = token_ids(fs), token_ids(gs)
        e_f, e_g = encode(fs).float(), encode(gs).float()  # (P, 77, d_ctx)
        ef, eg = aligned_rows(e_f, e_g, ids_f, ids_g)  # (n, d_ctx)
        w0, w1 = weights_on(ef.device)
        target = eg @ w0.T  # (n, Σ d_out): the anchor's keys/values before
        den = col_sq(target).sum(0)  # (M,)
        before = _ratio(col_sq(ef @ w0.T - target).sum(0), den)
        after = _ratio(col_sq(ef @ w1.T - target).sum(0), den)
        b, a = float(before.mean()), float(after.mean())
        out_concepts.append({
            "phrase": c.phrase, "anchor": c.anchor, "kind": c.kind,
            "anchor_distance_before": b, "anchor_distance_after": a,
            "remaining": a / b if b > 0 else 0.0, "tokens": int(ef.shape[0]),
        })
    drift_per_prompt: list[float] = []
    drift = 0.0
    if retained:
        nums, dens = [], []
        for k in range(0, len(retained), batch):
            e_p = encode(list(retained[k : k + batch])).float()  # (r, 77, d_ctx)
            w0, w1 = weights_on(e_p.device)
            nums.append(col_sq(e_p @ (w1 - w0).T).sum(1))  # (r, M): Σ over the 77 positions
            dens.append(col_sq(e_p @ w0.T).sum(1))
        num, den = torch.cat(nums), torch.cat(dens)  # (R, M)
        drift_per_prompt = [float(x) for x in _ratio(num, den).mean(1)]
        drift = float(_ratio(num.sum(0), den.sum(0)).mean())
    return {
        "concepts": out_concepts,
        "retained": {"prompts": list(retained), "drift": drift, "drift_per_prompt": drift_per_prompt},
    }


class AttentionMass:
    """Probe for ``Host.generate``: mean attention mass on token positions ``positions[b]`` of prompt ``b``."""

    def __init__(self, positions: Sequence[Sequence[int]]) -> None:
        self.positions = [list(p) for p in positions]
        self.total = torch.zeros(len(positions), dtype=torch.float64)
        self.count = 0

    def __call__(self, block: str, probs: Tensor) -> None:  # probs (B, heads, N, 77)
        p = probs.detach().double().cpu()
        mass = torch.stack([p[b, :, :, pos].sum(-1).mean() if pos else torch.zeros((), dtype=torch.float64)
                            for b, pos in enumerate(self.positions)])
        self.total += mass
        self.count += 1

    def means(self) -> list[float]:
        if self.count == 0:
            raise MaceError("attention probe saw no cross-attention call; the host did not report attention")
        return [float(x) for x in self.total / self.count]


# ---------------------------------------------------------------- images and figures


def _to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return to_uint8(image.detach().float().cpu()).permute(1, 2, 0).numpy()


def save_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(_to_uint8(image)).save(path)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    return Figure(figsize=(width, height), dpi=100)


def _bar_figure(path: Path, labels: list[str], before: list[float], after: list[float], title: str, xlabel: str) -> None:
    n = len(labels)
    fig = _figure(7, max(2.0, 0.35 * n + 1.2))
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y - 0.2, before, height=0.4, label="before", color="#999999")
    ax.barh(y + 0.2, after, height=0.4, label="after", color="#d62728")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def _loss_figure(path: Path, losses: Mapping[str, Sequence[float]]) -> None:
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for phrase, curve in losses.items():
        if len(curve):
            ax.plot(range(1, len(curve) + 1), list(curve), label=phrase)
    ax.set_xlabel("training step")
    ax.set_ylabel("attention loss")
    ax.set_title("LoRA training loss per concept")
    if 0 < len(losses) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def _drift_figure(path: Path, prompts: list[str], drift: list[float]) -> None:
    fig = _figure(7, max(2.0, 0.3 * len(prompts) + 1.2))
    ax = fig.add_subplot()
    ax.barh(np.arange(len(prompts)), drift, color="#1f77b4")
    ax.set_yticks(np.arange(len(prompts)), [p[:50] for p in prompts])
    ax.invert_yaxis()
    ax.set_xlabel("relative K/V change ||(W1 - W0)e|| / ||W0 e||")
    ax.set_title("drift of preserved prompts (lower is better)")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- the report


def _generate(host: Any, prompts: list[str], positions: list[list[int]], seed: int, steps: int, cfg: float,
              size: int) -> tuple[Tensor, list[float]]:
    probe = AttentionMass(positions)
    images = host.generate(prompts, seed=seed, steps=steps, cfg=cfg, height=size, width=size, attention_probe=probe)
    return images, probe.means()


def _html(report: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for c in report["concepts"]:
        img = c.get("images") or {}
        cells = "".join(f'<td><img src="{e(img[k])}" width="128"></td>' for k in
                        ("prompt_before", "prompt_after", "anchor_before", "anchor_after") if k in img)
        mass = c.get("attention_mass_before")
        mass_txt = "" if mass is None else f"{mass:.3f} → {c['attention_mass_after']:.3f}"
        rows.append(
            f"<tr><td>{e(c['phrase'])}</td><td>{e(c['anchor'])}</td><td>{e(c['kind'])}</td>"
            f"<td>{c['anchor_distance_before']:.3f} → {c['anchor_distance_after']:.3f}</td>"
            f"<td>{c['remaining']:.3f}</td><td>{mass_txt}</td>{cells}</tr>"
        )
    kept = []
    for r in report["retained"]["items"]:
        img = r.get("images") or {}
        cells = "".join(f'<td><img src="{e(img[k])}" width="128"></td>' for k in ("before", "after") if k in img)
        kept.append(f"<tr><td>{e(r['prompt'])}</td><td>{r['drift']:.4f}</td>{cells}</tr>")
    figs = "".join(f'<figure><img src="{e(p)}"><figcaption>{e(k)}</figcaption></figure>'
                   for k, p in report["figures"].items())
    s = report["summary"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MACE erasure report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px;font-size:13px}}figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>MACE erasure report</h1>
<p>{s['concepts']} concepts erased; base model {e(report['base_fingerprint'][:16])}; seed {report['seed']}.
Mean anchor distance {s['mean_anchor_distance_before']:.3f} → {s['mean_anchor_distance_after']:.3f}
(remaining {s['mean_remaining']:.3f}; 0 = keys/values equal the anchor's); preserved-prompt drift
{s['retained_drift']:.4f}. Concepts are sorted worst first (most remaining).</p>
<h2>Erased concepts</h2>
<table><tr><th>phrase</th><th>anchor</th><th>kind</th><th>anchor distance before → after</th><th>remaining</th>
<th>attention on concept tokens before → after</th><th>prompt before</th><th>prompt after</th><th>anchor before</th>
<th>anchor after</th></tr>{''.join(rows)}</table>
<h2>Preserved prompts</h2>
<table><tr><th>prompt</th><th>K/V drift</th><th>before</th><th>after</th></tr>{''.join(kept)}</table>
<h2>Figures</h2>{figs}
</body></html>
"""


@dataclass
class BeforeAfter:
    """Images of the same prompts and seeds from the original and the erased model, with the attention
    mass on each prompt's concept tokens. Prompts: ``(template(phrase), template(anchor))`` per imaged
    concept, then the retained prompts."""

    prompts: list[str]
    positions: list[list[int]]  # concept token positions per prompt ([] for anchors and retained prompts)
    before: list[Tensor] = field(default_factory=list)
    after: list[Tensor] = field(default_factory=list)
    mass_before: list[float] = field(default_factory=list)
    mass_after: list[float] = field(default_factory=list)


def sample_before_after(original_host: Any, erased_host: Any, imaged: Sequence[Concept], kept: Sequence[str], *,
                        seed: int, steps: int, cfg: float, image_size: int, batch_size: int,
                        progress: Callable[[int, int], None] | None = None) -> BeforeAfter:
    """Generate every prompt with both hosts, ``batch_size`` prompts per sampler call; prompt ``k`` uses
    seed ``seed + k`` in both."""
    prompts: list[str] = []
    positions: list[list[int]] = []
    for c in imaged:
        prompt, anchor_prompt = concept_prompt_pairs(c)[0]
        ids = original_host.token_ids([prompt, c.phrase])
        prompts += [prompt, anchor_prompt]
        positions += [phrase_positions(ids[0], ids[1]), []]
    prompts += list(kept)
    positions += [[] for _ in kept]
    out = BeforeAfter(prompts, positions)
    chunks = range(0, len(prompts), max(1, batch_size))
    for n, k in enumerate(chunks):
        sl = slice(k, k + max(1, batch_size))
        imgs, mass = _generate(original_host, prompts[sl], positions[sl], seed + k, steps, cfg, image_size)
        out.before += list(imgs)
        out.mass_before += mass
        imgs, mass = _generate(erased_host, prompts[sl], positions[sl], seed + k, steps, cfg, image_size)
        out.after += list(imgs)
        out.mass_after += mass
        if progress is not None:
            progress(n + 1, len(chunks))
    return out


def _concept_rows(concepts: Sequence[Concept], metrics: Sequence[Mapping[str, Any]],
                  losses: Mapping[str, list[float]], images: BeforeAfter,
                  image_paths: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """One row per concept (worst ``remaining`` first): its kv metrics, loss curve and, for the first
    ``len(image_paths)`` concepts, its prompts, image files and attention mass (else None)."""
    rows = []
    for i, (c, m) in enumerate(zip(concepts, metrics, strict=True)):
        e = dict(m)
        imaged = i < len(image_paths)
        e.update(prompt=images.prompts[2 * i] if imaged else None,
                 anchor_prompt=images.prompts[2 * i + 1] if imaged else None,
                 images=image_paths[i] if imaged else None,
                 concept_token_positions=images.positions[2 * i] if imaged else None,
                 attention_mass_before=images.mass_before[2 * i] if imaged else None,
                 attention_mass_after=images.mass_after[2 * i] if imaged else None)
        curve = losses.get(c.phrase, [])
        e.update(loss_first=curve[0] if curve else None, loss_last=curve[-1] if curve else None, losses=curve)
        rows.append(e)
    rows.sort(key=lambda r: -r["remaining"])  # worst first
    return rows


def _summary(rows: Sequence[Mapping[str, Any]], retained: Mapping[str, Any], n_retained: int,
             seconds: float) -> dict[str, Any]:
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows])) if rows else 0.0

    return {
        "concepts": len(rows),
        "mean_anchor_distance_before": mean("anchor_distance_before"),
        "mean_anchor_distance_after": mean("anchor_distance_after"),
        "mean_remaining": mean("remaining"),
        "worst_concept": rows[0]["phrase"] if rows else None,
        "retained_prompts": n_retained,
        "retained_drift": retained["drift"],
        "report_seconds": round(seconds, 3),
    }


DEFINITIONS = {
    "anchor_distance": "mean over to_k/to_v matrices of ||E_f W^T - E_g W0^T||_F / ||E_g W0^T||_F on aligned "
                       "token positions of the concept's prompt pairs; before W = W0, after W = W1",
    "remaining": "anchor_distance_after / anchor_distance_before (0 = erased to the anchor, 1 = unchanged)",
    "drift": "mean over matrices of ||E_p (W1 - W0)^T||_F / ||E_p W0^T||_F over all 77 positions",
    "attention_mass": "mean over sampler steps, blocks, heads, pixels of the attention probability on the "
                      "concept's tokens (conditional branch)",
}


# ---------------------------------------------------------------- rendering


def _report_folder(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if (out / "report.json").exists():
        raise MaceError(f"report folder {str(out)!r} already holds a report; choose another folder")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MaceError(f"cannot create report folder {str(out)!r} ({e.strerror or e}); choose a writable folder") from e
    return out


def _save_images(out: Path, images: BeforeAfter, n_imaged: int, n_kept: int
                 ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """PNGs of every image; ``(concept paths, retained paths)``, each ``{key: path relative to out}``."""
    concept_paths, retained_paths = [], []
    for i in range(n_imaged):
        paths = {}
        for key, img in (("prompt_before", images.before[2 * i]), ("prompt_after", images.after[2 * i]),
                         ("anchor_before", images.before[2 * i + 1]), ("anchor_after", images.after[2 * i + 1])):
            paths[key] = f"images/concept{i:03d}_{key}.png"
            save_png(img, out / paths[key])
        concept_paths.append(paths)
    for j in range(n_kept):
        paths = {}
        for key, img in (("before", images.before[2 * n_imaged + j]), ("after", images.after[2 * n_imaged + j])):
            paths[key] = f"images/retained{j:03d}_{key}.png"
            save_png(img, out / paths[key])
        retained_paths.append(paths)
    return concept_paths, retained_paths


def _write_figures(out: Path, rows: Sequence[Mapping[str, Any]], retained_items: Sequence[Mapping[str, Any]],
                   any_losses: bool) -> dict[str, str]:
    """The report's PNG figures; ``{title: file name}``."""
    figures: dict[str, str] = {}
    labels = [r["phrase"][:40] for r in rows]
    figures["anchor distance per concept"] = "anchor_distance.png"
    _bar_figure(out / figures["anchor distance per concept"], labels,
                [r["anchor_distance_before"] for r in rows], [r["anchor_distance_after"] for r in rows],
                "K/V distance to the anchor's (worst first; lower after = erased)",
                "||W e_concept - W0 e_anchor|| / ||W0 e_anchor||")
    with_mass = [r for r in rows if r["attention_mass_before"] is not None]
    if with_mass:
        figures["attention on concept tokens"] = "attention_mass.png"
        _bar_figure(out / figures["attention on concept tokens"], [r["phrase"][:40] for r in with_mass],
                    [r["attention_mass_before"] for r in with_mass], [r["attention_mass_after"] for r in with_mass],
                    "attention mass on the concept tokens in generated images", "mean attention probability mass")
    if any_losses:
        figures["LoRA loss curves"] = "losses.png"
        _loss_figure(out / figures["LoRA loss curves"], {r["phrase"]: r["losses"] for r in rows})
    if retained_items:
        figures["preserved prompt drift"] = "retained_drift.png"
        _drift_figure(out / figures["preserved prompt drift"], [r["prompt"] for r in retained_items],
                      [r["drift"] for r in retained_items])
    return figures


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    erasure: Any,
    original_host: Any,
    erased_host: Any,
    concepts: Sequence[Concept],
    retained: Sequence[str] = (),
    losses: Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
    steps: int = 30,
    cfg: float = 7.5,
    image_size: int = 512,
    max_image_concepts: int = 8,
    max_retained_images: int = 4,
    max_prompts: int = 8,
    batch_size: int = 8,
    settings: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write report.json, report.html and PNGs into ``out_dir`` (created; must not hold a report).

    Images (before = ``original_host``, after = ``erased_host``, same seeds) for the first
    ``max_image_concepts`` concepts (its first template with the phrase and with the anchor) and the
    first ``max_retained_images`` retained prompts, ``batch_size`` prompts per sampler call (prompt
    ``k`` of that list uses seed ``seed + k`` in both). Returns the report dict (also report.json).
    """
    out = _report_folder(out_dir)
    t0 = time.time()
    losses = {k: [float(x) for x in v] for k, v in (losses or {}).items()}
    numbers = kv_metrics(original_host.cross_attention_weights(), erased_host.cross_attention_weights(),
                         original_host.encode, original_host.token_ids, concepts, retained, max_prompts=max_prompts)
    imaged = list(concepts)[: max(0, max_image_concepts)]
    kept = list(retained)[: max(0, max_retained_images)]
    images = sample_before_after(original_host, erased_host, imaged, kept, seed=seed, steps=steps, cfg=cfg,
                                 image_size=image_size, batch_size=batch_size, progress=progress)
    concept_paths, retained_paths = _save_images(out, images, len(imaged), len(kept))
    rows = _concept_rows(concepts, numbers["concepts"], losses, images, concept_paths)
    drift = numbers["retained"]
    retained_items = [{"prompt": p, "drift": d, "images": retained_paths[j] if j < len(retained_paths) else None}
                      for j, (p, d) in enumerate(zip(drift["prompts"], drift["drift_per_prompt"], strict=True))]
    figures = _write_figures(out, rows, retained_items, any(losses.values()))
    report = {
        "version": REPORT_VERSION,
        "base_fingerprint": str(erasure.base_fingerprint),
        "seed": int(seed),
        "sampler": {"steps": int(steps), "cfg": float(cfg), "image_size": int(image_size)},
        "settings": dict(settings) if settings is not None else dict(getattr(erasure, "metadata", {}) or {}),
        "summary": _summary(rows, drift, len(retained_items), time.time() - t0),
        "concepts": rows,
        "retained": {"drift": drift["drift"], "items": retained_items},
        "figures": figures,
        "definitions": DEFINITIONS,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (out / "report.html").write_text(_html(report), encoding="utf-8")
    return report


__all__ = ["AttentionMass", "BeforeAfter", "kv_metrics", "sample_before_after", "save_png", "write_report"]
