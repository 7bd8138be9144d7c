"""The robustness probe on the world model: concepts by phrase, the classifier as judge.

A phrase is looked up among the world's concepts (object "red star", style "striped", identity
"Zorblat Quenn"); its paraphrase prompts are the world's generality set (``captions.paraphrase_prompts``,
synonyms in held-out templates). The judge recognises a concept as ``evaluate.WorldConcept.recognised``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import MaceError
from ..probe import Judge, ProbeConcept
from .classifier import WorldClassifier, read_images
from .demo import preservation_prompts
from .evaluate import ANCHORS, WorldConcept, all_concepts


def world_concept(phrase: str) -> WorldConcept:
    """The world concept named ``phrase`` (case and spacing ignored)."""
    key = " ".join(phrase.lower().split())
    found = next((c for c in all_concepts() if c.phrase.lower() == key), None)
    if found is None:
        raise MaceError(f"concept {phrase!r} is not in the world model's vocabulary (objects like 'red star', "
                        "styles like 'striped', identities like the demo's); check the spelling")
    return found


def probe_concept(c: WorldConcept) -> ProbeConcept:
    """The probe's view of a world concept: own and paraphrase prompts from the world's caption sets."""
    kind = "style" if c.kind == "style" else "object"
    return ProbeConcept(c.phrase, kind, ANCHORS[c.kind], tuple(c.prompts()), tuple(c.prompts(paraphrase=True)))


def classifier_judge(classifier: WorldClassifier) -> Judge:
    """Judge = the world classifier: image i counts when its reading recognises the named concept."""

    def judge(phrase: str, images: Tensor) -> list[bool]:
        c = world_concept(phrase)
        return [c.recognised(r) for r in read_images(classifier, images)]

    return judge


def unrelated_prompts(erased: Sequence[WorldConcept], n: int = 16, seed: int = 0) -> list[str]:
    """World captions that depict none of the erased concepts (relearning data)."""
    return preservation_prompts(list(erased), n=n, seed=seed + 1)


def control_concept(erased: Sequence[WorldConcept]) -> WorldConcept:
    """An unrelated concept for the inversion control: a style the world model draws well, not erased and
    sharing no word with an erased concept."""
    words = {w for c in erased for w in c.phrase.split()}
    for phrase in ("gridded", "pillared", "dotted", "checkered"):
        if phrase not in words:
            return WorldConcept("style", phrase)
    raise MaceError("no unrelated control concept left; erase fewer styles")


__all__ = ["classifier_judge", "control_concept", "probe_concept", "unrelated_prompts", "world_concept"]
