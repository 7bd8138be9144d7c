"""Concepts to erase, their prompt templates, concept lists as text, and the bundled presets.

A concept is a phrase (``"Taylor Swift"``), the anchor it is mapped to (``"a person"``) and a kind:
``object`` (objects, people, explicit content: trained with masks) or ``style`` (no masks).
Each concept expands to ~30 prompt pairs ``(template(phrase), template(anchor))`` with the SAME template.

Scale-free weights (the convention of every preset and of ``closed_form``)
-------------------------------------------------------------------------
Our objectives weight each preservation group ``k`` (general captions, retained names) by ``w_k`` times the
MEAN squared error over that group's token vectors::

    w_k · (1/N_k) Σ_{e ∈ group k} ||W e - W0 e||²          (P_k = Σ e eᵀ, N_k = its token count)

so a weight does not depend on how many preservation prompts there are. The reference multiplies RAW sums
by ``λ_ref``, so the same balance is ``w = λ_ref · N_ref``, with ``N_ref`` the number of token vectors the
reference summed: MS-COCO 2014 train+val captions, 616,767 × 77 = 47,491,059 tokens; for the retained group
we assume 100 names × 30 templates × 77 tokens = 231,000 (the reference ships that cache pre-built; see the
preset notes). Concept pair terms stay raw sums and the ridge ``λ ||W - W0||²_F`` is absolute, as in the
reference. Each preset JSON keeps a ``reference`` block with the raw λ values and N_ref used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

from .errors import MaceError
from .tokens import MAX_LENGTH, TokenIds, ids_fit, unpadded_length

KINDS = ("object", "style")
ARROW = "->"
#: Per-line kind: ``Van Gogh -> art :: style``. '::' because it reads as "of type", cannot be part of an
#: anchor that a user would write, and is unlike both '->' and the '#' comment.
KIND_MARK = "::"

# Our own templates. "{}" is the phrase (or the anchor, for the anchor twin).
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a portrait of {}",
    "a close-up photograph of {}",
    "a candid picture of {}",
    "a high resolution photo of {}",
    "a blurry snapshot of {}",
    "a film photograph of {}",
    "a watercolor painting of {}",
    "a pencil drawing of {}",
    "a cartoon of {}",
    "a 3D render of {}",
    "a vintage photograph of {}",
    "a studio shot of {}",
    "a poster featuring {}",
    "a magazine photo of {}",
    "an outdoor photo of {}",
    "a picture of {} at night",
    "{} in the morning light",
    "{} seen from a distance",
    "{} on a sunny day",
    "{} in a crowded place",
    "{} on a postcard",
    "a news photo showing {}",
    "a selfie with {}",
    "a colorful illustration of {}",
    "a mural depicting {}",
    "a sculpture of {}",
    "an album cover with {}",
    "a wide shot of {}",
    "a charcoal study of {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "artwork in the manner of {}",
    "a landscape painted by {}",
    "a portrait painted by {}",
    "a still life by {}",
    "a city scene in the style of {}",
    "a seascape in the style of {}",
    "an illustration in the style of {}",
    "a drawing in the manner of {}",
    "a print made by {}",
    "a canvas by {}",
    "a gallery piece by {}",
    "a museum painting by {}",
    "a mountain view painted in the style of {}",
    "a flower study by {}",
    "an abstract composition by {}",
    "a poster designed in the style of {}",
    "a book cover illustrated by {}",
    "a mural in the style of {}",
    "a sketchbook page by {}",
    "a dreamlike scene by {}",
    "a night scene painted by {}",
    "a figure study by {}",
    "a cat painted in the style of {}",
    "a house painted by {}",
    "a forest in the style of {}",
    "a work of art by {}",
    "the style of {}",
    "{} style painting of a river",
    "{} style artwork of a street",
)


@dataclass(frozen=True)
class Concept:
    """A phrase to erase, the anchor it maps to, and its kind ("object" | "style")."""

    phrase: str
    anchor: str
    kind: str = "object"


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise MaceError(f"unknown concept kind {kind!r}; use one of {', '.join(KINDS)}")
    return kind


def templates_for(kind: str) -> tuple[str, ...]:
    """The default templates of a kind."""
    return OBJECT_TEMPLATES if _check_kind(kind) == "object" else STYLE_TEMPLATES


def concept_prompt_pairs(concept: Concept, templates: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``[(template(phrase), template(anchor))]`` for every template (default: the kind's ~30)."""
    ts = templates_for(concept.kind) if templates is None else templates
    return [(t.format(concept.phrase), t.format(concept.anchor)) for t in ts]


def concept_prompts(concept: Concept, templates: Sequence[str] | None = None) -> list[str]:
    """The concept's own prompts (the first element of each pair)."""
    return [f for f, _ in concept_prompt_pairs(concept, templates)]


def training_prompt(concept: Concept) -> str:
    """Prompt of the LoRA training images: "a photo of the {phrase}" / "a photo in the style of {phrase}"."""
    if _check_kind(concept.kind) == "style":
        return f"a photo in the style of {concept.phrase}"
    return f"a photo of the {concept.phrase}"


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _key(text: str) -> str:
    return _normalise(text).casefold()


def longest_template(templates: Sequence[str], token_ids: TokenIds) -> str:
    """The template with the most tokens around its placeholder."""
    lengths = [unpadded_length(row) for row in token_ids([t.format("") for t in templates])]
    return templates[max(range(len(templates)), key=lambda i: lengths[i])]


class ConceptLine(NamedTuple):
    """One concept-list line split into its parts (not yet checked)."""

    phrase: str  # spaces normalised
    anchor: str  # the normalised default anchor when the line has no '->'
    arrows: int  # number of '->' parts (1: no arrow, 2: one arrow, more: an error)
    kind: str | None  # the casefolded word after '::', None when the line has no '::'
    kind_marks: int  # number of '::' parts (1: none, 2: one, more: an error)


def split_concept_line(raw: str, default_anchor: str) -> ConceptLine | None:
    """One concept-list line ``phrase [-> anchor] [:: kind]`` -> its parts; None for a blank or comment
    line. The kind marker comes last: ``Van Gogh -> art :: style``; ``cat :: object`` keeps the default
    anchor."""
    line = raw.split("#", 1)[0].strip()
    if not line:
        return None
    body, *kinds = line.split(KIND_MARK)
    kind = _normalise(kinds[0]).casefold() if kinds else None
    parts = body.split(ARROW)
    anchor = _normalise(parts[1]) if len(parts) == 2 else default_anchor
    return ConceptLine(_normalise(parts[0]), anchor, len(parts), kind, 1 + len(kinds))


def _line_error(split: ConceptLine, default_anchor: str) -> str | None:
    """What is wrong with one split line on its own (None: nothing)."""
    if split.kind_marks > 2:
        return f"more than one '{KIND_MARK}'; write at most one ':: kind' at the end of the line"
    if split.kind is not None and split.kind not in KINDS:
        what = "empty kind" if not split.kind else f"unknown kind {split.kind!r}"
        return f"{what} after '{KIND_MARK}'; use one of {', '.join(KINDS)} or drop the ':: kind'"
    if split.arrows > 2:
        return f"more than one '{ARROW}'; write one 'phrase -> anchor' per line"
    if not split.phrase:
        return f"empty phrase; write the phrase to erase before '{ARROW}'"
    if split.arrows == 2 and not split.anchor:
        return (f"empty anchor after '{ARROW}'; give an anchor or drop the arrow to use "
                f"the default anchor {default_anchor!r}")
    if not split.anchor:
        return "no anchor and the default anchor is empty; write 'phrase -> anchor'"
    if _key(split.phrase) == _key(split.anchor):
        return f"phrase {split.phrase!r} equals its anchor; give a different anchor"
    return None


def parse_concept_list(
    text: str,
    *,
    default_anchor: str,
    kind: str = "object",
    token_ids: TokenIds | None = None,
    max_concepts: int | None = None,
) -> list[Concept]:
    """Parse one ``phrase -> anchor :: kind`` per line; ``-> anchor`` is optional (``default_anchor``), and
    so is ``:: kind`` (``kind``), so one list mixes objects and styles: ``Van Gogh -> art :: style``.

    ``#`` starts a comment (full line or trailing; a phrase cannot contain ``#``); blank lines are ignored;
    runs of whitespace collapse to one space; the kind word is case-insensitive. All problems are reported
    at once, each naming its line: more than one ``::``, an empty or unknown kind, empty phrase or anchor,
    more than one ``->``, phrase equal to its anchor, duplicate phrases (case/space-insensitive), and, when
    ``token_ids`` is given, a phrase or anchor whose longest template prompt (of the line's kind) does not
    fit in 77 tokens.
    """
    _check_kind(kind)
    default_anchor = _normalise(default_anchor)
    errors: list[str] = []
    concepts: list[Concept] = []
    lines_of: list[int] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        split = split_concept_line(raw, default_anchor)
        if split is None:
            continue
        where = f"concept list line {n} ({raw.strip()!r})"
        problem = _line_error(split, default_anchor)
        if problem is None and _key(split.phrase) in seen:
            problem = f"phrase {split.phrase!r} repeats line {seen[_key(split.phrase)]}; remove one of them"
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        seen[_key(split.phrase)] = n
        concepts.append(Concept(split.phrase, split.anchor, split.kind or kind))
        lines_of.append(n)
    if not concepts and not errors:
        raise MaceError("concept list is empty; write one 'phrase -> anchor' per line")
    if max_concepts is not None and len(concepts) > max_concepts:
        errors.append(
            f"concept list has {len(concepts)} concepts, more than the limit of {max_concepts}; "
            f"split it or raise the limit"
        )
    if token_ids is not None and concepts:
        longest = {k: longest_template(templates_for(k), token_ids) for k in {c.kind for c in concepts}}
        checks = [(n, role, longest[c.kind].format(words), words) for c, n in zip(concepts, lines_of, strict=True)
                  for role, words in (("phrase", c.phrase), ("anchor", c.anchor))]
        # one tokenizer call for all prompts (thousands of concepts)
        rows = token_ids([prompt for _, _, prompt, _ in checks])
        for (n, role, prompt, words), ids in zip(checks, rows, strict=True):
            if not ids_fit(ids):
                errors.append(
                    f"concept list line {n}: {role} {words!r} is too long: the prompt "
                    f"{prompt!r} exceeds {MAX_LENGTH} tokens; shorten it"
                )
    if errors:
        raise MaceError("\n".join(errors))
    return concepts


def format_concept_list(concepts: Sequence[Concept], kind: str = "object") -> str:
    """The text form ``phrase -> anchor`` one per line, `` :: kind`` on the lines whose kind is not
    ``kind`` (inverse of ``parse_concept_list(..., kind=kind)``)."""
    return "\n".join(
        f"{c.phrase} {ARROW} {c.anchor}" + ("" if c.kind == kind else f" {KIND_MARK} {c.kind}") for c in concepts
    )


# ---------------------------------------------------------------- presets

WEIGHT_KEYS = ("cfr_preserve", "cfr_retained", "fusion_preserve", "fusion_retained", "ridge")
TRAIN_KEYS = ("lr", "steps", "timesteps")


@dataclass(frozen=True)
class Preset:
    """A bundled task: concepts, retained names (second preservation group), scale-free weights, training."""

    name: str
    kind: str
    concepts: list[Concept]
    retained: list[str]
    weights: dict[str, float]
    train: dict[str, Any]
    notes: str = ""
    reference: dict[str, Any] = field(default_factory=dict)

    def concept_text(self) -> str:
        """The concept list as editable text."""
        return format_concept_list(self.concepts, self.kind)


def _preset_dir():
    return resources.files("mace_ops").joinpath("assets", "presets")


def list_presets() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


@cache
def _read_preset(name: str) -> dict[str, Any]:
    return json.loads(_preset_dir().joinpath(f"{name}.json").read_text(encoding="utf-8"))


def load_preset(name: str) -> Preset:
    """Load a bundled preset by name (see ``list_presets``)."""
    names = list_presets()
    if not re.fullmatch(r"[A-Za-z0-9_]+", name or "") or name not in names:
        raise MaceError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    d = _read_preset(name)
    kind = _check_kind(d["kind"])
    concepts = [Concept(_normalise(c["phrase"]), _normalise(c["anchor"]), kind) for c in d["concepts"]]
    weights = {k: float(d["weights"][k]) for k in WEIGHT_KEYS}
    train = {k: d["train"][k] for k in TRAIN_KEYS}
    return Preset(
        name=name,
        kind=kind,
        concepts=concepts,
        retained=list(d.get("retained", [])),
        weights=weights,
        train=train,
        notes=d.get("notes", ""),
        reference=d.get("reference", {}),
    )
