"""Judging a (possibly erased) world model: sample prompts, read the images, count recognitions.

A world concept is ``(kind, phrase)``: object "red star" (recognised when the classifier reads that
shape and colour), style "striped" (that style), identity "Zorblat Quenn" (a face with exactly that
look). For a concept c and prompts P, sample i uses prompt P[i mod |P|] and seed ``seed + i``:

    acc(c, P) = (1/n) Σ_i [classifier(sample_i) recognises c]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..concepts import Concept
from .captions import own_prompts, paraphrase_prompts
from .classifier import Reading, WorldClassifier, read_images
from .model import IMAGE_SIZE
from .vocab import IDENTITIES, OBJECTS, STYLES

ANCHORS = {"object": "a shape", "style": "art", "identity": "a person"}
#: the world model's sampler: every judged sample and every erasure's training images (DDIM steps,
#: guidance). The guidance was chosen on the model's own accuracy before any erasure, own and paraphrase
#: prompts (4th-session weights: objects 92.5 / 89.5 %, their paraphrases 81 / 91.5 % at CFG 2 / 3; on the
#: 3rd-session weights objects were 70 / 79 / 85 % at CFG 5 / 3 / 2: strong guidance pushed hues to a
#: neighbour's, green -> teal, magenta -> red). benchmarks/README.md, "Does the model draw what it is asked".
SAMPLE_STEPS = 20
SAMPLE_CFG = 3.0


@dataclass(frozen=True)
class WorldConcept:
    """One concept of the world: ``kind`` in object / style / identity and its canonical ``phrase``."""

    kind: str
    phrase: str

    def concept(self) -> Concept:
        """The pipeline's concept: identities and objects are erased as objects, styles as styles."""
        return Concept(self.phrase, ANCHORS[self.kind], "style" if self.kind == "style" else "object")

    def recognised(self, r: Reading) -> bool:
        if self.kind == "object":
            return f"{r.colour} {r.shape}" == self.phrase
        if self.kind == "style":
            return r.style == self.phrase
        return r.identity == self.phrase

    def prompts(self, paraphrase: bool = False) -> list[str]:
        return paraphrase_prompts(self.kind, self.phrase) if paraphrase else own_prompts(self.kind, self.phrase)


def all_concepts() -> list[WorldConcept]:
    """Every concept: 100 objects, 20 styles, 100 identities."""
    return ([WorldConcept("object", p) for p in OBJECTS] + [WorldConcept("style", s) for s in STYLES]
            + [WorldConcept("identity", n) for n in IDENTITIES])


def word_neighbours(c: WorldConcept) -> list[WorldConcept]:
    """Concepts of the same kind sharing a word with ``c`` (red star -> red circle, blue star, ...)."""
    words = set(c.phrase.split())
    return [o for o in all_concepts() if o.kind == c.kind and o != c and words & set(o.phrase.split())]


def sample_images(host, prompts: Sequence[str], n: int, seed: int, *, steps: int = SAMPLE_STEPS,
                  cfg: float = SAMPLE_CFG, batch: int = 50) -> torch.Tensor:
    """``n`` samples, prompt ``i mod len(prompts)`` with seed ``seed + i``: (n, 3, 64, 64) in [-1, 1]."""
    wanted = [prompts[i % len(prompts)] for i in range(n)]
    out = [host.generate(wanted[k:k + batch], seed=seed + k, steps=steps, cfg=cfg, height=IMAGE_SIZE,
                         width=IMAGE_SIZE) for k in range(0, n, batch)]
    return torch.cat(out)


def recognition(host, classifier: WorldClassifier, concept: WorldConcept, n: int = 50, seed: int = 0,
                paraphrase: bool = False, **sampler) -> float:
    """acc(c, P) on ``n`` samples of the concept's own (or paraphrase) prompts."""
    images = sample_images(host, concept.prompts(paraphrase), n, seed, **sampler)
    return float(np.mean([concept.recognised(r) for r in read_images(classifier, images)]))


__all__ = ["ANCHORS", "SAMPLE_CFG", "SAMPLE_STEPS", "WorldConcept", "all_concepts", "recognition",
           "sample_images", "word_neighbours"]
