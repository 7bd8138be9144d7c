"""Speed and memory of CFR and LoRA fusion at SD1.5 shapes, against the literal way. Prints a table.

SD1.5: 16 cross-attention blocks (5×320, 5×640, 6×1280 channels), 32 matrices to_k/to_v of shape
(d_out, 768). Each concept has ``--prompts`` prompts of 77 tokens of synthetic (random) embeddings,
generated per concept from a seed and never all held at once; its anchor twin differs in a 2-token span,
so each prompt gives 75 aligned pairs for CFR, and all 77 tokens enter the concept's Gram for fusion.
Every concept has a rank-1 LoRA on all 32 matrices. One preservation group (100 prompts, weight 1).

Ours (``mace_ops.closed_form``): (a) statistics streamed per concept into float64 SecondMoments (CFR's
C and G, the concept's G_i); (b) the solves: CFR of all 32 matrices, and fusion = add_concept per
concept + one solve (the CFR and fusion solves are timed best of 3; the streaming parts once). The literal way: all token embeddings stored and stacked (float64), then per
matrix the Gram and cross products are formed from the tokens (for fusion: a dense ΔW_i per concept
and matrix) and one explicit inverse is taken per matrix. The reference caches the preservation set as
a sum, so the literal way gets the same preservation statistics.

Each configuration runs in a fresh subprocess; peak memory is that process's maximum RSS (it includes
torch itself and the 2×32 float32 weight matrices, about 0.1 GB). The literal way is run only where its
stored tokens fit in a few GB; larger sizes are extrapolated linearly (its cost is linear in concepts)
and marked "~". In the literal runs, our result on the same data is compared with the literal one.

    .venv/bin/python benchmarks/bench_closed_form.py            # 1, 10, 100, 1000 concepts (~5 min idle, ~15 min under load)
    .venv/bin/python benchmarks/bench_closed_form.py --quick    # 1, 10, 100 concepts (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mace_ops.closed_form import FusionProblem, Preservation, refine_cross_attention  # noqa: E402
from mace_ops.hosts.base import matrix_names, sd1_block_names  # noqa: E402
from mace_ops.statistics import SecondMoment  # noqa: E402

D = 768
TOKENS = 77
SPAN = (5, 7, 6)  # concept occupies positions 5..6, anchor position 5: 75 aligned pairs per prompt
CHANNELS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
PRESERVE_PROMPTS, PRESERVE_WEIGHT, RIDGE = 100, 1.0, 0.0
REPEATS = 3
F64 = torch.float64


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sd15_weights(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """W0 and a nearby W1 (stand-in for the refined weights), float32, 32 matrices."""
    g = torch.Generator().manual_seed(seed)
    d_out = {b: c for b, c in zip(sd1_block_names(), CHANNELS, strict=True)}
    w0, w1 = {}, {}
    for name in matrix_names(sd1_block_names()):
        rows = d_out[name.rsplit(".", 1)[0]]
        w0[name] = torch.randn(rows, D, generator=g) * D**-0.5
        w1[name] = w0[name] + 0.01 * torch.randn(rows, D, generator=g) * D**-0.5
    return w0, w1


def concept_data(i: int, prompts: int, names: list[str], shapes: dict[str, int]):
    """Concept i's embeddings: pairs e_f, e_g (prompts·75, 768), all tokens (prompts·77, 768); rank-1 LoRA."""
    g = torch.Generator().manual_seed(1000 + i)
    concept = torch.randn(prompts, TOKENS, D, generator=g)
    anchor = torch.randn(prompts, TOKENS, D, generator=g)
    a, b, c = SPAN
    e_f = torch.cat([concept[:, :a], concept[:, b:]], dim=1).reshape(-1, D)
    e_g = torch.cat([anchor[:, :a], anchor[:, c : c + TOKENS - b]], dim=1).reshape(-1, D)
    factors = {
        n: (0.01 * torch.randn(shapes[n], 1, generator=g), torch.randn(1, D, generator=g) * D**-0.5)
        for n in names
    }
    return e_f, e_g, concept.reshape(-1, D), factors


def preservation() -> Preservation:
    g = torch.Generator().manual_seed(7)
    return Preservation(
        SecondMoment(D).add(torch.randn(PRESERVE_PROMPTS * TOKENS, D, generator=g)), PRESERVE_WEIGHT
    )


# --------------------------------------------------------------------------------------------------
# the two ways


class Clock:
    """Accumulated wall and process-CPU seconds of the sections run inside ``with clock:``."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def _best(fn, repeats: int = REPEATS) -> Clock:
    """The clock of the fastest (wall) of ``repeats`` calls of ``fn()``."""
    clocks = []
    for _ in range(repeats):
        with Clock() as clock:
            fn()
        clocks.append(clock)
    return min(clocks, key=lambda c: c.wall)


def run_ours(n: int, prompts: int) -> dict:
    w0, w1 = sd15_weights(0)
    names, shapes = list(w0), {k: v.shape[0] for k, v in w0.items()}
    pres = preservation()
    base = _peak_mb()
    cross, gram = SecondMoment(D), SecondMoment(D)
    problem = FusionProblem(w1, w0, [pres], RIDGE)
    stats, add = Clock(), Clock()
    for i in range(n):
        e_f, e_g, e_all, factors = concept_data(i, prompts, names, shapes)
        with stats:
            cross.add(e_g, e_f)
            gram.add(e_f)
            g_i = SecondMoment(D).add(e_all)
        with add:
            problem.add_concept(g_i, factors)
    cfr = _best(lambda: refine_cross_attention(w0, cross, gram, [pres], RIDGE))
    solve = _best(problem.solve)
    return {
        "stats_s": stats.wall,
        "cfr_s": cfr.wall,
        "fusion_add_s": add.wall,
        "fusion_solve_s": solve.wall,
        "solves_s": cfr.wall + add.wall + solve.wall,
        "solves_cpu_s": cfr.cpu + add.cpu + solve.cpu,
        "base_mb": base,
        "peak_mb": _peak_mb(),
    }


def run_literal(n: int, prompts: int) -> dict:
    w0s, w1s = sd15_weights(0)
    names, shapes = list(w0s), {k: v.shape[0] for k, v in w0s.items()}
    pres = preservation()
    p_w = PRESERVE_WEIGHT * pres.moments.mean()  # the cached preservation sum, as the reference has it
    eye = torch.eye(D, dtype=F64)
    with Clock() as stats:  # includes generating the data (small next to the solves)
        fs, gs, alls, loras = [], [], [], []
        for i in range(n):
            e_f, e_g, e_all, factors = concept_data(i, prompts, names, shapes)
            fs.append(e_f.to(F64))
            gs.append(e_g.to(F64))
            alls.append(e_all.to(F64))
            loras.append(factors)
        e_f, e_g = torch.cat(fs), torch.cat(gs)  # stacked token values
        del fs, gs

    with Clock() as solves:
        cfr = {}
        for name in names:
            w0 = w0s[name].to(F64)
            values = e_g @ w0.T  # (pairs, d_out)
            lhs = values.T @ e_f + w0 @ p_w + RIDGE * w0
            mat = e_f.T @ e_f + p_w + RIDGE * eye
            cfr[name] = lhs @ torch.linalg.inv(mat)
        fused = {}
        for name in names:
            w0, w1 = w0s[name].to(F64), w1s[name].to(F64)
            lhs = torch.zeros_like(w1)
            mat = torch.zeros(D, D, dtype=F64)
            for e_i, lora in zip(alls, loras, strict=True):
                up, down = lora[name]
                delta = up.to(F64) @ down.to(F64)  # dense ΔW_i (d_out, d)
                target = e_i @ (w1 + delta).T  # (tokens, d_out)
                lhs += target.T @ e_i
                mat += e_i.T @ e_i
            lhs += w0 @ p_w + RIDGE * w1
            mat += p_w + RIDGE * eye
            fused[name] = lhs @ torch.linalg.inv(mat)
    peak = _peak_mb()

    # our result on the same data (after the peak was read)
    cross, gram = SecondMoment(D).add(e_g, e_f), SecondMoment(D).add(e_f)
    ours_cfr = refine_cross_attention(w0s, cross, gram, [pres], RIDGE)
    problem = FusionProblem(w1s, w0s, [pres], RIDGE)
    for e_i, lora in zip(alls, loras, strict=True):
        problem.add_concept(SecondMoment(D).add(e_i), lora)
    ours_fused = problem.solve()

    def rel(a: dict, b: dict) -> float:
        return max(float((a[k].to(F64) - b[k]).abs().max() / b[k].abs().max()) for k in b)

    return {
        "stats_s": stats.wall,
        "solves_s": solves.wall,
        "solves_cpu_s": solves.cpu,
        "peak_mb": peak,
        "rel_diff": max(rel(ours_cfr, cfr), rel(ours_fused, fused)),
    }


# --------------------------------------------------------------------------------------------------
# driver


def _worker(kind: str, n: int, prompts: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--prompts", str(prompts)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _extrapolate(lit: dict[int, dict], n: int, key: str) -> float:
    """Linear in the number of concepts, through the two largest measured sizes (slope clamped at 0
    when timing noise makes it negative, which can only under-estimate the literal way)."""
    (n1, a), (n2, b) = sorted((m, r[key]) for m, r in lit.items())[-2:]
    return b + max(b - a, 0.0) * (n - n2) / (n2 - n1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1, 10, 100 concepts; literal way at 1 and 4")
    ap.add_argument("--concepts", type=int, nargs="+", help="concept counts (default 1 10 100 1000)")
    ap.add_argument(
        "--literal", type=int, nargs="+", help="concept counts run the literal way (default 1 10)"
    )
    ap.add_argument("--prompts", type=int, default=30, help="prompts per concept (default 30)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=["ours", "literal"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        fn = run_ours if args.worker == "ours" else run_literal
        print("RESULT " + json.dumps(fn(args.n, args.prompts)), flush=True)
        return

    concepts = args.concepts or ([1, 10, 100] if args.quick else [1, 10, 100, 1000])
    literal_ns = args.literal or ([1, 4] if args.quick else [1, 10])
    print(f"load average at the start: {' '.join(open('/proc/loadavg').read().split()[:3])}", file=sys.stderr)
    print(
        f"# CFR + fusion at SD1.5 shapes (32 matrices, d=768), {args.prompts} prompts × {TOKENS} tokens per "
        f"concept, rank-1 LoRAs, torch {torch.__version__}, {args.threads} threads",
        file=sys.stderr,
    )
    lit: dict[int, dict] = {}
    for n in literal_ns:
        print(f"literal way, {n} concept(s) ...", file=sys.stderr, flush=True)
        lit[n] = _worker("literal", n, args.prompts)
    rows = []
    for n in concepts:
        print(f"ours, {n} concept(s) ...", file=sys.stderr, flush=True)
        ours = _worker("ours", n, args.prompts)
        if n in lit:
            ref, mark = {k: lit[n][k] for k in ("solves_s", "solves_cpu_s", "stats_s", "peak_mb")}, ""
            diff = f"{lit[n]['rel_diff']:.0e}"
        elif len(lit) >= 2:
            ref, mark, diff = (
                {k: _extrapolate(lit, n, k) for k in ("solves_s", "solves_cpu_s", "stats_s", "peak_mb")},
                "~",
                "–",
            )
        else:
            rows.append(_row(n, ours, ["–"] * 6))
            continue
        literal = [
            f"{mark}{ref['solves_s']:.1f}",
            f"{mark}{ref['solves_cpu_s']:.1f}",
            f"{mark}{ref['peak_mb']:.0f}",
            f"{mark}{ref['solves_s'] / ours['solves_s']:.0f}× / {ref['solves_cpu_s'] / ours['solves_cpu_s']:.0f}×",
            f"{mark}{(ref['solves_s'] + ref['stats_s']) / (ours['solves_s'] + ours['stats_s']):.0f}×",
            diff,
        ]
        rows.append(_row(n, ours, literal))
    print(
        "| concepts | stats (s) | CFR solve (s) | fusion add (s) | fusion solve (s) | **solves (s)** | solves CPU (s) "
        "| RSS after setup (MB) | peak RSS (MB) | literal solves (s) | literal solves CPU (s) | literal peak RSS (MB) "
        "| speed-up, solves (wall / CPU) | speed-up, stats + solves | max rel. diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nload average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}", file=sys.stderr)


def _row(n: int, ours: dict, literal: list[str]) -> str:
    return (
        f"| {n} | {ours['stats_s']:.2f} | {ours['cfr_s']:.2f} | {ours['fusion_add_s']:.2f} | "
        f"{ours['fusion_solve_s']:.2f} | **{ours['solves_s']:.2f}** | {ours['solves_cpu_s']:.2f} | "
        f"{ours['base_mb']:.0f} | {ours['peak_mb']:.0f} | " + " | ".join(literal) + " |"
    )


if __name__ == "__main__":
    main()
