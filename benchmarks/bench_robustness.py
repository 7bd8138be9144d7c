"""Robustness of erasures on the world model: leak rates under attack for full MACE, CFR only (= fast),
CFR hardened against concept inversion and UCE-style, with what each keeps of the retained concepts.

N erased concepts (``bench_efficacy.pick_concepts``, seeded), erased three ways:

    mace       full MACE (CFR + one LoRA per concept + closed-form fusion)
    cfr_only   stage 1 alone; the fast mode (``mace-erase run --fast``, ``closed_form_only``) stops
               after CFR's closed form, so its weights are exactly these: this row is the fast mode
    cfr_harden CFR + ``--harden N`` rounds of hardening (``mace_ops.harden``: invert each concept on the
               erased model, add the recovered token's pairs to CFR, re-solve); the hardening's inversion
               has the probe's budget (steps, lr) but its own images (``training_prompt``, seeds
               seed + 50,000 + 1000·i), templates (the kind's 6th on) and seeds: the probe's inversion is held out
    uce_style  another closed form with no LoRA (the UCE-style edit of ``bench_efficacy``)

and probed (``mace_ops.probe.run_probe``, the world classifier as judge) under: own prompts,
paraphrases (the world's generality set), concept inversion (a token learnt on the erased model from
the original's images) and relearning (to_k/to_v fine-tuned on unrelated world captions). Per method
and attack the table sums over concepts:

    leak = Σ_c k_c / Σ_c n_c     (recognised samples of the erased model; the original model's beside it)

The original model's samples are drawn once and shared by the methods (same seeds). What an erasure
costs: ``Acc_s`` = mean recognition of the retained concepts (``bench_efficacy.pick_concepts``; half
are word-neighbours of the erased) on their own prompts, ``--samples`` each, the probe's sampler and seed.

    python benchmarks/bench_robustness.py --quick --json runs/robustness.json   # N = 10, small budgets, --harden 1
    python benchmarks/bench_robustness.py                                         # N = 10, 20 samples, 200 steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataclasses  # noqa: E402

from bench_efficacy import bench_settings, pick_concepts, uce_style_weights  # noqa: E402

from mace_ops.data import generate_training_data  # noqa: E402
from mace_ops.hosts.diffusers import DiffusersHost  # noqa: E402
from mace_ops.pipeline import fuse_weights, harden_weights, preservation_statistics, refine_weights  # noqa: E402
from mace_ops.probe import ProbeSettings, run_probe  # noqa: E402
from mace_ops.train import train_concept_loras  # noqa: E402
from mace_ops.world.classifier import load_classifier  # noqa: E402
from mace_ops.world.demo import preservation_prompts  # noqa: E402
from mace_ops.world.evaluate import SAMPLE_CFG, recognition  # noqa: E402
from mace_ops.world.probe import classifier_judge, control_concept, probe_concept, unrelated_prompts  # noqa: E402

METHODS = ("mace", "cfr_only", "cfr_harden", "uce_style")


def erase(host: DiffusersHost, erased, retained, seed: int, harden: dict, methods=METHODS) -> tuple[dict, dict]:
    """The to_k/to_v weights of each method in ``methods`` and the seconds each took; ``harden``:
    ErasureSettings fields of the cfr_harden row."""
    s, times, out = bench_settings(seed), {}, {}
    concepts = [c.concept() for c in erased]
    stats = preservation_statistics(host, preservation_prompts(erased, seed=seed),
                                    [p for c in retained for p in c.prompts()[:2]])
    cfr_groups = stats.groups(s.cfr_preserve, s.cfr_retained)
    W0 = host.cross_attention_weights()
    t = time.time()
    W1 = refine_weights(host, concepts, cfr_groups, s.ridge, relative_ridge=s.relative_ridge, original=W0)
    times["cfr_only"], out["cfr_only"] = time.time() - t, W1
    if "cfr_harden" in methods:
        t = time.time()
        out["cfr_harden"], _ = harden_weights(host, concepts, dataclasses.replace(s, **harden), cfr_groups,
                                              original=W0)
        times["cfr_harden"] = time.time() - t
    if "mace" in methods:
        t = time.time()
        data = generate_training_data(host, concepts, token_ids=host.token_ids, n_images=s.n_images, seed=s.seed,
                                      steps=s.sample_steps, cfg=s.cfg, size=s.image_size)
        bank, _ = train_concept_loras(host.with_weights(W1), data, s.train, token_ids=host.token_ids,
                                      base_weights=W1)
        out["mace"] = fuse_weights(host, W1, bank, concepts, stats.groups(s.fusion_preserve, s.fusion_retained),
                                   s.ridge, relative_ridge=s.fusion_ridge_epsilon(), original=W0,
                                   tokens=s.fusion_tokens)
        times["mace"] = time.time() - t + times["cfr_only"]
    if "uce_style" in methods:
        t = time.time()
        out["uce_style"] = uce_style_weights(host, erased, cfr_groups, W0, s)
        times["uce_style"] = time.time() - t
    return out, times


def retained_accuracy(host: DiffusersHost, classifier, retained, settings: ProbeSettings) -> float:
    """Acc_s: mean over retained concepts of the recognised fraction of ``settings.samples`` own-prompt samples."""
    return sum(recognition(host, classifier, c, settings.samples, settings.seed, steps=settings.sample_steps,
                           cfg=settings.cfg) for c in retained) / len(retained)


def totals(report) -> dict[str, dict[str, int]]:
    """{attack: {k_erased, k_original, n}} summed over concepts (judged rows only)."""
    out: dict[str, dict[str, int]] = {}
    for c in report.concepts:
        for r in c.rows:
            t = out.setdefault(r.attack, {"k_erased": 0, "k_original": 0, "n": 0, "n_original": 0})
            t["k_erased"] += r.erased.hits or 0
            t["n"] += r.erased.n
            t["k_original"] += r.original.hits or 0
            t["n_original"] += r.original.n
    return out


def _cell(k: int, n: int) -> str:
    return f"{k}/{n} ({k / n:.0%})" if n else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 samples of 10 DDIM steps, 25 inversion steps at lr 3e-2")
    p.add_argument("--n", type=int, default=10, help="erased concepts")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the concept pick and the erasure")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the probe's samples and attacks")
    p.add_argument("--harden", type=int, default=1, help="hardening rounds of the cfr_harden row")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every number here")
    a = p.parse_args()
    methods = [m for m in METHODS if m in a.methods.split(",")]
    if not methods or set(a.methods.split(",")) - set(METHODS):
        p.error(f"--methods {a.methods!r}: choose among {', '.join(METHODS)}")
    torch.set_num_threads(a.threads)
    quick = dict(samples=10, sample_steps=10, inversion_steps=25, inversion_lr=3e-2) if a.quick else {}
    settings = ProbeSettings(seed=a.probe_seed, cfg=SAMPLE_CFG, attacks=("own", "paraphrase", "inversion", "relearning"),
                             **{**quick, **({"samples": a.samples} if a.samples else {})})
    harden = dict(harden_rounds=a.harden, harden_images=settings.inversion_images,
                  harden_steps=settings.inversion_steps, harden_lr=settings.inversion_lr)
    t0 = time.time()
    host, classifier = DiffusersHost.from_world(), load_classifier()
    judge = classifier_judge(classifier)
    erased, retained = pick_concepts(a.n, a.seed + a.n)
    print("erased: " + ", ".join(c.phrase for c in erased), flush=True)
    weights, erase_seconds = erase(host, erased, retained, a.seed, harden, methods)
    print("erase seconds: " + ", ".join(f"{m} {v:.0f}" for m, v in erase_seconds.items()), flush=True)
    probe_kw = dict(relearn_prompts=unrelated_prompts(erased, n=16, seed=a.probe_seed),
                    control=probe_concept(control_concept(erased)), cache={})
    rows = {"original": {"Acc_s": retained_accuracy(host, classifier, retained, settings)}}
    for m in methods:
        t = time.time()
        erased_host = host.with_weights(weights[m])
        report = run_probe(host, erased_host, [probe_concept(c) for c in erased], judge, settings, **probe_kw)
        rows[m] = {"attacks": totals(report), "control": None if report.control is None else {
            "k": report.control.erased.hits, "n": report.control.erased.n, "k_original": report.control.original.hits},
            "per_concept": report.to_dict()["concepts"], "Acc_s": retained_accuracy(erased_host, classifier, retained,
                                                                                     settings),
            "probe_seconds": time.time() - t, "erase_seconds": erase_seconds[m]}
        print(f"{m}: probed in {rows[m]['probe_seconds']:.0f} s", flush=True)
        if a.json:  # after every method, so that an interrupted run keeps what it measured
            _write(a, settings, erased, rows, t0, harden)
    print_table(rows, settings, a.n, len(retained), methods)
    print(f"\ntotal {time.time() - t0:.0f} s", flush=True)


def print_table(rows: dict, settings: ProbeSettings, n: int, n_retained: int, methods: list[str]) -> None:
    """The markdown table: one row per method (and the original model), a column per attack, then Acc_s."""
    attacks = [x for x in settings.attacks if any(x in r.get("attacks", {}) for r in rows.values())]
    print(f"\nN = {n}, {settings.samples} samples per concept and attack, inversion {settings.inversion_steps} steps, "
          f"relearning {settings.relearn_steps} steps; cells: recognised k/n (erased model); Acc_s: "
          f"{n_retained} retained concepts x {settings.samples} samples")
    print("| method | " + " | ".join(attacks) + " | inversion control (unrelated concept) | Acc_s |")
    print("|---|" + "---:|" * (len(attacks) + 2))
    first = rows[methods[0]]["attacks"]
    print("| original model | " + " | ".join(_cell(first[x]["k_original"], first[x]["n_original"]) for x in attacks)
          + f" | - | {rows['original']['Acc_s']:.1%} |")
    for m in methods:
        r, c = rows[m]["attacks"], rows[m]["control"]
        ctrl = "-" if c is None else _cell(c["k"], c["n"])
        print(f"| {m} | " + " | ".join(_cell(r[x]["k_erased"], r[x]["n"]) for x in attacks)
              + f" | {ctrl} | {rows[m]['Acc_s']:.1%} |")


def _write(a: argparse.Namespace, settings: ProbeSettings, erased, rows: dict, t0: float, harden: dict) -> None:
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump({"n": a.n, "seed": a.seed, "settings": settings.__dict__, "erased": [c.phrase for c in erased],
                   "harden": harden, "methods": rows, "seconds": time.time() - t0}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
