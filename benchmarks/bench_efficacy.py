"""Erasure efficacy on the world model, judged by the world classifier, with the paper's ablations.

For N erased concepts (mixed kinds, seeded picks) and retained concepts (half of them sharing a word
with an erased one: erase "red star", keep "red circle" / "blue star"), ``--samples`` seeded samples
per concept and prompt set:

    Acc_e = mean over erased c of acc(c, own prompts)          (lower is better)
    Acc_s = mean over retained c of acc(c, own prompts)        (higher is better)
    Acc_g = mean over erased c of acc(c, paraphrase prompts)   (lower is better; never seen by erasure)
    H_o   = harmonic mean of (1 - Acc_e), Acc_s, (1 - Acc_g)

Methods: original; CFR only; CFR + LoRAs naively summed (W1 + Σ ΔW_i); LoRAs fused without CFR (LoRAs
trained on W0, fused onto W0); full MACE; a closed-form-only UCE-style baseline (the bare phrase's last
token, end token and padding states mapped onto the anchor's, with the same preservation).

Acc_e and Acc_g are averaged over at most ``--eval-concepts`` of the erased concepts (a seeded random
subset when N is larger: an unbiased estimate of the mean over all N, at a fixed sampling cost).

    python benchmarks/bench_efficacy.py --quick --json out.json     # N in {1, 10}, 20 samples
    python benchmarks/bench_efficacy.py                              # N in {1, 10, 50, 100}, 50 samples
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from mace_ops.closed_form import refine_cross_attention
from mace_ops.data import generate_training_data
from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.pipeline import ErasureSettings, fuse_weights, preservation_statistics, refine_weights
from mace_ops.statistics import SecondMoment
from mace_ops.train import train_concept_loras
from mace_ops.world.classifier import load_classifier
from mace_ops.world.demo import preservation_prompts
from mace_ops.world.evaluate import WorldConcept, all_concepts, recognition, word_neighbours

METHODS = ("original", "cfr_only", "naive_sum", "fused_no_cfr", "mace", "uce_style")


def bench_settings(seed: int = 0) -> ErasureSettings:
    """The world demo's settings (mace_ops.cli.world_demo_settings) with 4 images per concept."""
    from mace_ops.cli import world_demo_settings

    return world_demo_settings(seed)


def pick_concepts(n: int, seed: int) -> tuple[list[WorldConcept], list[WorldConcept]]:
    """N erased (objects/identities/styles ≈ 4.5 : 4.5 : 1, at least one of each from N = 3) and up to
    10 retained: word-neighbours of the erased first, then random others."""
    rng = np.random.default_rng(seed)
    pools = {k: [c for c in all_concepts() if c.kind == k] for k in ("object", "identity", "style")}
    n_style = min(len(pools["style"]), max(1 if n >= 3 else 0, round(n * 0.1)))
    n_obj = (n - n_style + 1) // 2
    counts = {"object": n_obj, "identity": n - n_style - n_obj, "style": n_style}
    erased = [pools[k][i] for k, m in counts.items() for i in rng.choice(len(pools[k]), m, replace=False)]
    near = sorted({o for c in erased for o in word_neighbours(c)} - set(erased), key=lambda c: (c.kind, c.phrase))
    rng.shuffle(near)
    others = [c for c in all_concepts() if c not in erased and c not in near]
    rng.shuffle(others)
    retained = near[:5] + others[: 10 - len(near[:5])]
    return erased, retained


def uce_style_weights(host: DiffusersHost, concepts: list[WorldConcept], preserve, original, settings) -> dict:
    """Closed form on the bare phrase: rows (last phrase token, end token, padding) -> the anchor's."""
    cross = gram = None
    for c in concepts:
        k = c.concept()
        ids = host.token_ids([k.phrase, k.anchor])
        e = host.encode([k.phrase, k.anchor])  # (2, 77, d)
        ends = [row.index(49407) for row in ids]  # first end token
        n = 77 - max(ends) + 1
        x_f, x_g = e[0, ends[0] - 1: ends[0] - 1 + n], e[1, ends[1] - 1: ends[1] - 1 + n]  # (n, d)
        if cross is None:
            cross, gram = SecondMoment(e.shape[-1]), SecondMoment(e.shape[-1])
        cross.add(x_g, x_f)
        gram.add(x_f)
    return refine_cross_attention(original, cross, gram, preserve, settings.ridge, settings.relative_ridge)


def naive_sum(refined: Mapping[str, Tensor], bank, concepts: list) -> dict[str, Tensor]:
    """W1 + Σ_i up_i down_i."""
    out = {k: v.clone().double() for k, v in refined.items()}
    for c in concepts:
        for name, (up, down) in bank.factors(bank.index(c.phrase)).items():
            out[name] += up.double() @ down.double()
    return {k: v.float() for k, v in out.items()}


def erase_all(host: DiffusersHost, erased: list[WorldConcept], retained: list[WorldConcept], seed: int) -> tuple:
    """Every method's weights and the wall time of each stage."""
    s, times = bench_settings(seed), {}
    concepts = [c.concept() for c in erased]
    t = time.time()
    stats = preservation_statistics(host, preservation_prompts(erased, seed=seed),
                                    [p for c in retained for p in c.prompts()[:2]])
    times["preservation"] = time.time() - t
    W0 = host.cross_attention_weights()
    t = time.time()
    W1 = refine_weights(host, concepts, stats.groups(s.cfr_preserve, s.cfr_retained), s.ridge,
                        relative_ridge=s.relative_ridge, original=W0)
    times["cfr"] = time.time() - t
    t = time.time()
    data = generate_training_data(host, concepts, token_ids=host.token_ids, n_images=s.n_images, seed=s.seed,
                                  steps=s.sample_steps, cfg=s.cfg, size=s.image_size)
    times["data"] = time.time() - t
    fuse_groups = stats.groups(s.fusion_preserve, s.fusion_retained)
    weights = {"original": W0, "cfr_only": W1}
    for label, base in (("mace", W1), ("fused_no_cfr", W0)):
        t = time.time()
        bank, _ = train_concept_loras(host.with_weights(base), data, s.train, token_ids=host.token_ids,
                                      base_weights=base)
        times[f"loras_on_{'W1' if base is W1 else 'W0'}"] = time.time() - t
        t = time.time()
        weights[label] = fuse_weights(host, base, bank, concepts, fuse_groups, s.ridge,
                                      relative_ridge=s.fusion_ridge_epsilon(), original=W0, tokens=s.fusion_tokens)
        times[f"fusion_{label}"] = time.time() - t
        if label == "mace":
            weights["naive_sum"] = naive_sum(W1, bank, concepts)
    t = time.time()
    weights["uce_style"] = uce_style_weights(host, erased, stats.groups(s.cfr_preserve, s.cfr_retained), W0, s)
    times["uce_style"] = time.time() - t
    return weights, times


def harmonic(*xs: float) -> float:
    return 0.0 if min(xs) <= 0 else len(xs) / sum(1 / x for x in xs)


def judged_subset(erased: list[WorldConcept], k: int, seed: int) -> list[WorldConcept]:
    """The erased concepts Acc_e / Acc_g are measured on: all of them, or a seeded random ``k``."""
    if len(erased) <= k:
        return list(erased)
    rng = np.random.default_rng(seed + 7)
    return [erased[i] for i in sorted(rng.choice(len(erased), size=k, replace=False))]


def evaluate(host, classifier, weights, erased, retained, samples: int, seed: int) -> dict:
    h = host.with_weights(weights)
    acc = lambda cs, para: float(np.mean([recognition(h, classifier, c, samples, seed, paraphrase=para)  # noqa: E731
                                          for c in cs]))
    e, g, s = acc(erased, False), acc(erased, True), acc(retained, False)
    return {"Acc_e": e, "Acc_s": s, "Acc_g": g, "H_o": harmonic(1 - e, s, 1 - g)}


def print_table(results: list[dict]) -> None:
    """One markdown table: a row per (N, method); cfr_only is what ``mace-erase run --fast`` does."""
    print("\n| N | method | Acc_e | Acc_s | Acc_g | H_o |\n|---|---|---|---|---|---|")
    for row in results:
        for m, r in row["methods"].items():
            label = "cfr_only (--fast)" if m == "cfr_only" else m
            print(f"| {row['N']} | {label} | {100 * r['Acc_e']:.1f} | {100 * r['Acc_s']:.1f} | "
                  f"{100 * r['Acc_g']:.1f} | {100 * r['H_o']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N in {1, 10} instead of {1, 10, 50, 100}")
    p.add_argument("--n", type=int, nargs="*", help="explicit list of N")
    p.add_argument("--samples", type=int, default=None, help="samples per concept and prompt set (50; --quick 20)")
    p.add_argument("--eval-concepts", type=int, default=20, help="erased concepts judged (a seeded subset above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every number here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    host, classifier = DiffusersHost.from_world(), load_classifier()
    ns = a.n or ([1, 10] if a.quick else [1, 10, 50, 100])
    a.samples = a.samples or (20 if a.quick else 50)
    results = []
    for n in ns:
        erased, retained = pick_concepts(n, a.seed + n)
        t0 = time.time()
        weights, times = erase_all(host, erased, retained, a.seed)
        row = {"N": n, "erased": [c.phrase for c in erased], "retained": [c.phrase for c in retained],
               "stage_seconds": times, "erase_seconds": time.time() - t0, "methods": {}}
        judged = judged_subset(erased, a.eval_concepts, a.seed + n)
        row["judged_erased"] = [c.phrase for c in judged]
        for m in METHODS:
            t = time.time()
            row["methods"][m] = evaluate(host, classifier, weights[m], judged, retained, a.samples, a.seed)
            row["methods"][m]["eval_seconds"] = time.time() - t
            r = row["methods"][m]
            print(f"N={n:3d} {m:13s} Acc_e {r['Acc_e']:.3f} Acc_s {r['Acc_s']:.3f} Acc_g {r['Acc_g']:.3f} "
                  f"H_o {r['H_o']:.3f}", flush=True)
        print(f"N={n} stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()), flush=True)
        results.append(row)
        if a.json:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump({"samples": a.samples, "seed": a.seed, "rows": results}, f, indent=2)
    print_table(results)


if __name__ == "__main__":
    main()
