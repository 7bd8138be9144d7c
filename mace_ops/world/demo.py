"""The demo's choices on the world model: what it erases, what it keeps, which captions it preserves.

Erased: one object, one style, one identity. Retained neighbours share a word with an erased concept
(``red star`` -> ``red circle``, ``blue star``; an identity -> one with the same surname) or, for the
style, are another stripe pattern. Preservation prompts are training-style world captions that do not
depict an erased concept (the world's analogue of the COCO captions).
"""

from __future__ import annotations

from .captions import Spec, caption_bank
from .evaluate import WorldConcept
from .vocab import IDENTITIES

_IDENTITY = next(iter(IDENTITIES))  # the first identity of the seeded list
DEMO_ERASED: tuple[WorldConcept, ...] = (
    WorldConcept("object", "red star"), WorldConcept("style", "striped"), WorldConcept("identity", _IDENTITY),
)


def _same_surname(name: str) -> str:
    return next(n for n in IDENTITIES if n != name and n.split()[1] == name.split()[1])


DEMO_RETAINED: tuple[WorldConcept, ...] = (
    WorldConcept("object", "red circle"), WorldConcept("object", "blue star"), WorldConcept("style", "pillared"),
    WorldConcept("identity", _same_surname(_IDENTITY)),
)


def preservation_prompts(erased: list[WorldConcept], n: int = 300, seed: int = 0) -> list[str]:
    """``n`` world captions (objects, identities, partial) whose spec depicts none of the erased concepts
    (neighbours sharing a word stay in)."""
    import numpy as np

    def depicts(spec: Spec, c: WorldConcept) -> bool:
        if c.kind == "object":
            return f"{spec.colour} {spec.shape}" == c.phrase
        if c.kind == "style":
            return spec.style == c.phrase
        look = IDENTITIES[c.phrase]
        return spec == Spec(look.shape, look.colour, look.style, True)

    bank = caption_bank()
    pool = [cap for kind in ("object", "identity", "partial") for cap, spec in bank[kind]
            if not any(depicts(spec, c) for c in erased)]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]


__all__ = ["DEMO_ERASED", "DEMO_RETAINED", "preservation_prompts"]
