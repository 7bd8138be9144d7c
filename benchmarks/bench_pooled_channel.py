"""How much of a concept's signal SDXL's two text channels carry, before and after erasure (tiny SDXL).

Model: ``mace_ops.tiny.build_tiny_sdxl(0)`` (the real 70-block layout, 2048-d context, ``label_emb``
2816 inputs; random weights). Concepts: 3 people → "a person". Preservation: 64 prompts of the default
corpus. Three models: the original ``W0``; "cross-attention only" = CFR on the 140 ``to_k``/``to_v``
(``refine_weights``, what every closed-form eraser edits); "cross-attention + pooled" = the same plus
``pooled_channel_edit`` of ``label_emb``'s pooled columns.

For each concept prompt ``c`` and its anchor twin ``a`` (4 templates per concept), the same noisy
latent and timestep (seeded; t = 300), with ``ε_m(ctx, y)`` the model's output for token
states ``ctx`` and pooled embedding ``y``, the concept's signal left in model ``m`` is measured against the
ORIGINAL model on the anchor prompt, ``ref = ε_0(ctx_a, y_a)``::

    total        ||ε_m(ctx_c, y_c) − ref||      both channels see the concept
    cross only   ||ε_m(ctx_c, y_a) − ref||      the concept only in the token states
    pooled only  ||ε_m(ctx_a, y_c) − ref||      the concept only in the pooled embedding

each as a ratio of the original model's value (1.00 = nothing erased), summed over prompts. Also the
channel itself: ``||P y_c − P0 y_a|| / ||P0 y_c − P0 y_a||`` on the pooled columns, and the drift of 32
held-out prompts ``||(P − P0) y|| / ||P0 y||``.

    .venv/bin/python benchmarks/bench_pooled_channel.py
    .venv/bin/python benchmarks/bench_pooled_channel.py --sweep 1,10,100,1000 [--keep 64]   # pooled columns only

``--sweep W,...``: the pooled columns alone (no UNet forward, seconds): for each preservation weight,
the concept→anchor residual ``||P y_c − P0 y_a|| / ||P0 y_c − P0 y_a||`` over all ~30 prompt pairs per
concept and the held-out drift, as above.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mace_ops.concepts import Concept, concept_prompt_pairs  # noqa: E402
from mace_ops.hosts.diffusers import DiffusersHost  # noqa: E402
from mace_ops.pipeline import preservation_statistics, refine_weights  # noqa: E402
from mace_ops.pooled import pooled_channel_edit  # noqa: E402
from mace_ops.preservation import default_corpus  # noqa: E402

CONCEPTS = [Concept("Taylor Swift", "a person"), Concept("Brad Pitt", "a person"), Concept("Oprah Winfrey", "a person")]
TEMPLATES = 4
TIMESTEPS = (300,)


def _eps(host: DiffusersHost, ctx: torch.Tensor, y: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), host.instrument() as unet:
        return unet(x, t, ctx, pooled=y).float()


def sweep(weights: list[float], n_keep: int = 64) -> None:
    """Residual and held-out drift of the pooled-column edit for each preservation weight (``n_keep``
    preservation prompts from the corpus; the held-out ones are its last 32)."""
    from mace_ops.closed_form import Preservation
    from mace_ops.pooled import edit_pooled_columns, pooled_moments, pooled_pair_moments

    base = DiffusersHost.from_tiny(0, family="sdxl")
    corpus = default_corpus()
    keep, held_out = corpus[:n_keep], corpus[-32:]
    cross, gram = pooled_pair_moments(base.encode_pooled, CONCEPTS)
    keep_m = pooled_moments(base.encode_pooled, keep)
    pairs = [p for c in CONCEPTS for p in concept_prompt_pairs(c)]
    yc = base.encode_pooled([p for p, _ in pairs]).double()
    ya = base.encode_pooled([q for _, q in pairs]).double()
    yh = base.encode_pooled(held_out).double()
    w0 = base.label_emb_weight()
    p0 = w0[:, :1280].double()
    print(f"tiny SDXL, {len(CONCEPTS)} concepts ({len(pairs)} prompt pairs), {len(keep)} preservation prompts, "
          f"{len(held_out)} held-out")
    print("| preservation weight | concept→anchor residual | held-out drift |")
    print("|---:|---:|---:|")
    for w in weights:
        p1 = edit_pooled_columns(w0, cross, gram, [Preservation(keep_m, w)])[:, :1280].double()
        residual = float((yc @ p1.T - ya @ p0.T).norm() / (yc @ p0.T - ya @ p0.T).norm())
        drift = float((yh @ (p1 - p0).T).norm() / (yh @ p0.T).norm())
        print(f"| {w:g} | {residual:.4f} | {drift:.4f} |")


def main() -> None:
    torch.set_num_threads(2)
    if "--sweep" in sys.argv:
        keep = int(sys.argv[sys.argv.index("--keep") + 1]) if "--keep" in sys.argv else 64
        sweep([float(x) for x in sys.argv[sys.argv.index("--sweep") + 1].split(",")], keep)
        return
    base = DiffusersHost.from_tiny(0, family="sdxl")
    corpus = default_corpus()
    keep, held_out = corpus[:64], corpus[-32:]
    print("built the tiny SDXL model", file=sys.stderr, flush=True)
    stats = preservation_statistics(base, keep)
    cross_only = base.with_weights(refine_weights(base, CONCEPTS, stats.groups(1.0)))
    both = cross_only.with_label_emb(pooled_channel_edit(base, CONCEPTS, keep, preserve_weight=1.0))
    print("edited: cross-attention (CFR) and pooled columns", file=sys.stderr, flush=True)
    models = {"original": base, "cross-attention only": cross_only, "cross-attention + pooled": both}

    pairs = [p for c in CONCEPTS for p in concept_prompt_pairs(c)[:TEMPLATES]]
    f, a = [p for p, _ in pairs], [q for _, q in pairs]
    ctx_c, y_c = base.encode_with_pooled(f)
    ctx_a, y_a = base.encode_with_pooled(a)
    g = torch.Generator().manual_seed(0)
    rows: dict[str, dict[str, float]] = {m: {"total": 0.0, "cross only": 0.0, "pooled only": 0.0} for m in models}
    for t_val in TIMESTEPS:
        x = torch.randn(len(pairs), 4, 8, 8, generator=g)
        t = torch.full((len(pairs),), t_val)
        ref = _eps(base, ctx_a, y_a, x, t)
        for name, host in models.items():
            rows[name]["total"] += float((_eps(host, ctx_c, y_c, x, t) - ref).norm())
            rows[name]["cross only"] += float((_eps(host, ctx_c, y_a, x, t) - ref).norm())
            rows[name]["pooled only"] += float((_eps(host, ctx_a, y_c, x, t) - ref).norm())

    p0 = base.label_emb_weight()[:, :1280].double()
    p1 = both.label_emb_weight()[:, :1280].double()
    yc, ya, yh = y_c.double(), y_a.double(), base.encode_pooled(held_out).double()
    channel = float((yc @ p1.T - ya @ p0.T).norm() / (yc @ p0.T - ya @ p0.T).norm())
    drift = float((yh @ (p1 - p0).T).norm() / (yh @ p0.T).norm())

    print(f"tiny SDXL, {len(CONCEPTS)} concepts × {TEMPLATES} templates, t ∈ {TIMESTEPS}; ratios to the original model")
    print("| model | total | cross only | pooled only |")
    print("|---|---:|---:|---:|")
    orig = rows["original"]
    for name, r in rows.items():
        print(f"| {name} | {r['total'] / orig['total']:.3f} | {r['cross only'] / orig['cross only']:.3f} | "
              f"{r['pooled only'] / orig['pooled only']:.3f} |")
    print(f"original: pooled-only / total = {orig['pooled only'] / orig['total']:.3f}, "
          f"cross-only / total = {orig['cross only'] / orig['total']:.3f}")
    print(f"pooled columns: concept→anchor residual {channel:.4f} (1 before); held-out drift {drift:.4f}")


if __name__ == "__main__":
    main()
