"""How well the world model draws what it is asked, judged by the classifier (before any erasure).

For every concept of a kind, ``n`` samples of its own prompts (and of its paraphrase prompts):

    accuracy(kind) = mean over concepts c of kind, samples i of [classifier recognises c in sample i]

    python -m mace_ops.world.accuracy --samples 5 --json runs/accuracy.json
    python -m mace_ops.world.accuracy --samples 2 --paraphrase --cfg 2   # another guidance (default SAMPLE_CFG)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from .classifier import load_classifier, read_images
from .evaluate import SAMPLE_CFG, all_concepts, sample_images


def kind_accuracy(host, classifier, kind: str, n: int, seed: int = 0, paraphrase: bool = False,
                  cfg: float = SAMPLE_CFG) -> dict:
    """Recognition rate over all concepts of ``kind`` (guidance ``cfg``), and per concept."""
    hits, per = [], {}
    for c in [c for c in all_concepts() if c.kind == kind]:
        reads = read_images(classifier, sample_images(host, c.prompts(paraphrase), n, seed, cfg=cfg))
        per[c.phrase] = float(np.mean([c.recognised(r) for r in reads]))
        hits.append(per[c.phrase])
    return {"accuracy": float(np.mean(hits)), "per_concept": per}


def clean_render_accuracy(classifier, n: int = 1000, seed: int = 2024) -> dict[str, float]:
    """Classifier accuracy per head on ``n`` seeded clean renders (face with p 0.5), and identity
    accuracy on one seeded render of every identity."""
    from .render import render
    from .sampling import random_look, to_tensor
    from .vocab import IDENTITIES

    rng = np.random.default_rng(seed)
    looks = [random_look(rng, p_face=0.5) for _ in range(n)]
    reads = read_images(classifier, to_tensor([render(x, rng) for x in looks]))
    out = {h: float(np.mean([getattr(r, h) == getattr(x, h) for r, x in zip(reads, looks, strict=True)]))
           for h in ("shape", "colour", "style", "face")}
    names = list(IDENTITIES)
    reads = read_images(classifier, to_tensor([render(IDENTITIES[m], rng) for m in names]))
    out["identity"] = float(np.mean([r.identity == m for r, m in zip(reads, names, strict=True)]))
    return out


def main() -> None:
    from ..hosts.diffusers import DiffusersHost

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=5, help="samples per concept and prompt set")
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    p.add_argument("--paraphrase", action="store_true", help="also the paraphrase prompts")
    p.add_argument("--cfg", type=float, default=SAMPLE_CFG, help=f"guidance (default {SAMPLE_CFG}, the world's sampler)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--classifier-only", type=int, default=0, metavar="N",
                   help="only the classifier's accuracy on N clean renders per head")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.classifier_only:
        print("classifier on clean renders:", clean_render_accuracy(load_classifier(), a.classifier_only))
        return
    if a.weights:
        from .model import load_world_model

        sd = load_world_model(a.weights)
        host = DiffusersHost(sd.unet, sd.text_encoder, sd.vae, alphas_cumprod=sd.alphas_cumprod)
    else:
        host = DiffusersHost.from_world()
    classifier, out = load_classifier(), {}
    for kind in ("object", "style", "identity"):
        for para in (False, True) if a.paraphrase else (False,):
            t = time.time()
            r = kind_accuracy(host, classifier, kind, a.samples, paraphrase=para, cfg=a.cfg)
            key = f"{kind}{'_paraphrase' if para else ''}"
            out[key] = r
            print(f"{key:22s} accuracy {r['accuracy']:.3f}  ({a.samples} samples per concept, {time.time() - t:.0f} s)",
                  flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"samples": a.samples, "cfg": a.cfg, **out}, f, indent=2)


if __name__ == "__main__":
    main()
