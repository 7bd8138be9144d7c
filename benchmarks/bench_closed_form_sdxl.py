"""CFR and LoRA fusion at SDXL shapes: time and peak memory. Prints a table.

Shapes are read from the real SDXL base UNet config instantiated on the ``meta`` device (no memory,
no weights): its 70 cross-attention blocks (``mace_ops.tiny.ldm_cross_attention_names``) give 140
``to_k``/``to_v`` matrices, 20 of (640, 2048) and 120 of (1280, 2048). Data as in
``bench_closed_form.py``: per concept ``--prompts`` prompts × 77 tokens of synthetic 2048-d embeddings
(75 aligned pairs per prompt for CFR, all 77 tokens for the concept's Gram), one rank-1 LoRA per concept
and matrix, one preservation group (100 prompts, weight 1), float32 weights.

Timed (wall clock; the solves' process CPU time too, all threads, which a loaded machine inflates
less): stats (streaming float64 ``SecondMoment`` of C, G and each G_i), CFR of the 140 matrices
(``refine_cross_attention``), fusion ``add_concept`` per concept and one ``FusionProblem.solve()``.
Peak memory: the process's maximum RSS (includes torch and the W0, W1 float32 weights: 2 × 1.36 GB for
all 140 matrices; see "RSS after setup").

Lower bound: the output alone is Σ d_out × 2048 = 166,400 × 2048 = 341M numbers; any solve that forms
each ``W0 · M`` densely costs 166,400 × 2048² × 2 ≈ 1.4 TFLOP per product (float64), which is tens of
seconds on 2 CPU cores whatever the algorithm. Since issue 13 CFR forms one such product (``W0 · M``,
M shared) and fusion one (``(W0 − W1) · (P K⁻¹)``, ``P K⁻¹`` shared; none without preservation), the
concept terms staying low rank: ≈ 3.1 TFLOP for the solves at 100 rank-1 concepts, from ≈ 4.4 before.

    .venv/bin/python benchmarks/bench_closed_form_sdxl.py --concepts 100
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mace_ops.closed_form import FusionProblem, Preservation, refine_cross_attention  # noqa: E402
from mace_ops.family import SDXL  # noqa: E402
from mace_ops.tiny import ldm_cross_attention_names  # noqa: E402

D, TOKENS, SPAN = SDXL.context_dim, SDXL.max_length, (5, 7, 6)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sdxl_matrix_shapes() -> dict[str, int]:
    """``{<block>.to_k/.to_v: d_out}`` of the real SDXL base UNet, enumerated from a meta-device model."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=D,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=SDXL.adm_dim,
        )
    shapes = {}
    for path, ldm in ldm_cross_attention_names(unet).items():
        rows = int(unet.get_submodule(path).to_k.weight.shape[0])
        shapes[f"{ldm}.to_k"] = shapes[f"{ldm}.to_v"] = rows
    return shapes


def concept_data(i: int, prompts: int, shapes: dict[str, int]):
    g = torch.Generator().manual_seed(1000 + i)
    concept = torch.randn(prompts, TOKENS, D, generator=g)
    anchor = torch.randn(prompts, TOKENS, D, generator=g)
    a, b, c = SPAN
    e_f = torch.cat([concept[:, :a], concept[:, b:]], dim=1).reshape(-1, D)
    e_g = torch.cat([anchor[:, :a], anchor[:, c : c + TOKENS - b]], dim=1).reshape(-1, D)
    factors = {n: (0.01 * torch.randn(r, 1, generator=g), torch.randn(1, D, generator=g) * D**-0.5)
               for n, r in shapes.items()}
    return e_f, e_g, concept.reshape(-1, D), factors


def _note(what: str) -> None:
    """Progress on stderr as each phase ends (a long run stopped early still leaves its figures)."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}; peak RSS {_peak_mb():.0f} MB", file=sys.stderr, flush=True)


def run(n: int, prompts: int, matrices: int | None = None) -> dict:
    from mace_ops.statistics import SecondMoment

    shapes = sdxl_matrix_shapes()
    if matrices:  # a slice, every 140/matrices-th matrix (both widths): solves scale with Σ d_out
        names = list(shapes)[:: max(len(shapes) // matrices, 1)][:matrices]
        shapes = {k: shapes[k] for k in names}
    g = torch.Generator().manual_seed(0)
    w0 = {k: torch.randn(r, D, generator=g) * D**-0.5 for k, r in shapes.items()}
    w1 = {k: w + 0.01 * torch.randn(w.shape, generator=g) * D**-0.5 for k, w in w0.items()}
    pres = Preservation(SecondMoment(D).add(torch.randn(100 * TOKENS, D, generator=g)), 1.0)
    setup_mb = _peak_mb()
    cross, gram = SecondMoment(D), SecondMoment(D)
    problem = FusionProblem(w1, w0, [pres], 0.0)
    t_stats = t_add = cpu_add = 0.0
    for i in range(n):
        e_f, e_g, e_all, factors = concept_data(i, prompts, shapes)
        t0 = time.perf_counter()
        cross.add(e_g, e_f)
        gram.add(e_f)
        g_i = SecondMoment(D).add(e_all)
        t1, c1 = time.perf_counter(), time.process_time()
        problem.add_concept(g_i, factors)
        cpu_add += time.process_time() - c1
        t_stats, t_add = t_stats + t1 - t0, t_add + time.perf_counter() - t1
        if (i + 1) % 10 == 0 or i + 1 == n:
            _note(f"{i + 1}/{n} concepts: stats {t_stats:.1f} s, fusion add {t_add:.1f} s")
    t0, c0 = time.perf_counter(), time.process_time()
    refine_cross_attention(w0, cross, gram, [pres], 0.0)
    t_cfr = time.perf_counter() - t0
    _note(f"CFR solve {t_cfr:.2f} s")
    t0 = time.perf_counter()
    problem.solve()
    t_solve = time.perf_counter() - t0
    cpu = time.process_time() - c0 + cpu_add
    _note(f"fusion solve {t_solve:.2f} s; CPU time of the solves {cpu:.1f} s")
    return {"matrices": len(shapes), "rows": sum(shapes.values()), "stats": t_stats, "cfr": t_cfr, "add": t_add, "solve": t_solve,
            "cpu": cpu, "setup_mb": setup_mb, "peak_mb": _peak_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matrices", type=int, help="time a slice of the 140 matrices (solves scale with Σ d_out)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    r = run(args.concepts, args.prompts, args.matrices)
    solves = r["cfr"] + r["add"] + r["solve"]
    print(f"# SDXL shapes: {r['matrices']} matrices ({r['rows']} rows of 166400), d={D}; {args.concepts} concepts × {args.prompts} prompts × "
          f"{TOKENS} tokens; torch {torch.__version__}, {args.threads} threads; load average at start {load}")
    print("| concepts | stats (s) | CFR solve (s) | fusion add (s) | fusion solve (s) | **solves (s)** | "
          "solves CPU (s) | RSS after setup (MB) | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.concepts} | {r['stats']:.1f} | {r['cfr']:.2f} | {r['add']:.2f} | {r['solve']:.2f} | "
          f"**{solves:.2f}** | {r['cpu']:.1f} | {r['setup_mb']:.0f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
