"""Captions of the toy world: the training caption bank and the evaluation prompt sets.

A caption comes with what it pins down, a ``Spec`` (``None`` = unconstrained, drawn at random when an
image is rendered for it). Training captions mix our own world templates with the pipeline's
erasure templates (``mace_ops.concepts``), and use each paraphrase word (``*_SYNONYMS``) with
probability 0.3, so the model knows the paraphrases. Evaluation prompts:

    own        canonical phrase in erasure-style templates ("a photo of red star")  -> Acc_e / Acc_s
    paraphrase synonyms in templates no training or erasure caption uses            -> Acc_g
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..concepts import OBJECT_TEMPLATES, STYLE_TEMPLATES
from .vocab import COLOUR_SYNONYMS, COLOURS, IDENTITIES, SHAPE_SYNONYMS, SHAPES, STYLE_SYNONYMS, STYLES, Look

WORLD_TEMPLATES: tuple[str, ...] = ("a photo of {}", "a painting of {}", "a drawing of {}", "{}",
                                    "an image of {}", "a picture of {}", "a portrait of {}", "a render of {}")
STYLE_SUFFIXES: tuple[str, ...] = (" in {} style", " in the style of {}", ", {} art", " painted in the manner of {}")
#: held out from training and erasure: only the paraphrase evaluation uses them
PARAPHRASE_TEMPLATES: tuple[str, ...] = ("an illustration that shows {}", "there is {} here",
                                         "{}, as seen by a camera")


@dataclass(frozen=True)
class Spec:
    """What a caption pins down; ``None`` fields are free."""

    shape: str | None = None
    colour: str | None = None
    style: str | None = None
    face: bool | None = None

    def draw(self, rng: np.random.Generator, p_face: float = 0.3) -> Look:
        """A look satisfying the spec, free fields uniform (face with probability ``p_face``)."""
        pick = lambda v, pool: v if v is not None else pool[rng.integers(len(pool))]  # noqa: E731
        face = self.face if self.face is not None else bool(rng.random() < p_face)
        return Look(pick(self.shape, SHAPES), pick(self.colour, list(COLOURS)), pick(self.style, list(STYLES)), face)


def _word(word: str, synonyms: dict[str, str], rng: np.random.Generator, p: float = 0.3) -> str:
    return synonyms[word] if rng.random() < p else word


def _template(rng: np.random.Generator, style: bool = False) -> str:
    pool = WORLD_TEMPLATES + (STYLE_TEMPLATES if style else OBJECT_TEMPLATES)
    return pool[rng.integers(len(pool))]


def _article(rng: np.random.Generator) -> str:
    return ("a ", "the ", "")[rng.integers(3)]


def caption_bank(seed: int = 0) -> dict[str, list[tuple[str, Spec]]]:
    """``{kind: [(caption, spec), ...]}`` for kinds object / identity / partial / empty (deterministic)."""
    rng = np.random.default_rng(seed)
    bank: dict[str, list[tuple[str, Spec]]] = {"object": [], "identity": [], "partial": [], "empty": [("", Spec())]}
    for colour in COLOURS:
        for shape in SHAPES:
            for style in [None] * 3 + list(STYLES):
                phrase = f"{_article(rng)}{_word(colour, COLOUR_SYNONYMS, rng)} {_word(shape, SHAPE_SYNONYMS, rng)}"
                if style is not None:
                    suffix = STYLE_SUFFIXES[rng.integers(len(STYLE_SUFFIXES))]
                    phrase += suffix.format(_word(style, STYLE_SYNONYMS, rng))
                bank["object"].append((_template(rng).format(phrase), Spec(shape, colour, style, False)))
    for name, look in IDENTITIES.items():
        for template in WORLD_TEMPLATES + OBJECT_TEMPLATES[:4]:
            bank["identity"].append((template.format(name), Spec(look.shape, look.colour, look.style, True)))
    partial = bank["partial"]
    for shape in SHAPES:
        for word in (shape, SHAPE_SYNONYMS[shape]):
            partial += [(_template(rng).format(f"a {word}"), Spec(shape=shape, face=False)) for _ in range(3)]
    for colour in COLOURS:
        for word in (colour, COLOUR_SYNONYMS[colour]):
            partial += [(_template(rng).format(f"a {word} shape"), Spec(colour=colour, face=False)) for _ in range(3)]
    for style in STYLES:
        for word in (style, STYLE_SYNONYMS[style]):
            partial += [(_template(rng, style=True).format(word), Spec(style=style)) for _ in range(5)]
    for t in WORLD_TEMPLATES:
        partial += [(t.format("a person"), Spec(face=True)), (t.format("a shape"), Spec(face=False)),
                    (t.format("art"), Spec())]
    return bank


def own_prompts(kind: str, phrase: str) -> list[str]:
    """Prompts with the canonical phrase, in the erasure's own templates (the first 5 of each list)."""
    templates = STYLE_TEMPLATES[:5] if kind == "style" else OBJECT_TEMPLATES[:5]
    return [t.format(phrase) for t in templates]


def paraphrase_prompts(kind: str, phrase: str) -> list[str]:
    """Prompts that name the concept with its paraphrase words in held-out templates (identities: the
    first name alone and the name in held-out templates)."""
    if kind == "object":
        colour, shape = phrase.split(" ")
        words = [f"a {COLOUR_SYNONYMS[colour]} {SHAPE_SYNONYMS[shape]}", f"a {COLOUR_SYNONYMS[colour]} {shape}",
                 f"a {colour} {SHAPE_SYNONYMS[shape]}"]
    elif kind == "style":
        words = [f"a shape in {STYLE_SYNONYMS[phrase]} style", f"art in the {STYLE_SYNONYMS[phrase]} manner"]
    else:
        words = [phrase]
    return [t.format(w) for t in PARAPHRASE_TEMPLATES for w in words]


__all__ = ["PARAPHRASE_TEMPLATES", "STYLE_SUFFIXES", "Spec", "WORLD_TEMPLATES", "caption_bank", "own_prompts",
           "paraphrase_prompts"]
