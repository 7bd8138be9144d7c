"""Preservation statistics: ``P = Σ e eᵀ`` over all 77 positions of every preservation prompt.

The closed forms keep the cross-attention output of preservation embeddings ``e_p`` unchanged; they only
need the 768×768 second moment ``P`` and its token count ``N`` (weights are scale-free: ``w · P / N``, see
``concepts``). ``P`` is accumulated batch by batch in float64 and never keeps per-token values. It is cached
as safetensors keyed by sha256(text-encoder fingerprint, prompt list).

The default corpus is our own: ~2,500 everyday, COCO-like captions generated deterministically from word
lists below (people, animals, food, streets, rooms, vehicles, landscapes, objects).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .concepts import templates_for
from .errors import MaceError
from .io import atomic_save_safetensors, read_safetensors
from .statistics import SecondMoment

Encode = Callable[[Sequence[str]], Tensor]  # prompts -> (B, 77, d) text-encoder outputs

# ---------------------------------------------------------------- default corpus (our own word lists)


def _words(text: str) -> list[str]:
    return text.split("|")


_PEOPLE = _words(
    "man|woman|young man|young woman|little boy|little girl|old man|old "
    "woman|child|teenager|chef|police officer|farmer|student|tourist|surfer|skier|baseball "
    "player|tennis player|skateboarder|soldier|nurse|couple|family"
)
_PERSON_ACTIONS = _words(
    "riding a bicycle|holding an umbrella|eating a sandwich|talking on a cell phone|walking a "
    "dog|reading a newspaper|carrying a surfboard|throwing a frisbee|flying a kite|sitting on a "
    "bench|standing next to a fire hydrant|cutting a cake|drinking a cup of coffee|playing a video "
    "game|swinging a tennis racket|holding a baseball bat|taking a picture|pushing a stroller|waiting "
    "for a bus|looking at a laptop|riding a horse|carrying a backpack|brushing their teeth|slicing "
    "vegetables|crossing the road|waving at the camera"
)
_PLACES = _words(
    "on a busy city street|in a park|on the beach|in a kitchen|at the train station|in a living "
    "room|on a snowy hill|near a lake|in front of a store|at an airport|in a crowded market|on a "
    "sidewalk|in a parking lot|on a wooden pier|in an office|at a restaurant table|under a "
    "tree|beside a brick wall|on a tennis court|in a field"
)
_ANIMALS = _words(
    "dog|cat|horse|cow|sheep|elephant|giraffe|zebra|bear|bird|duck|pigeon|goat|puppy|kitten|brown "
    "bear|black and white cat|large dog|small bird|pony|seagull|squirrel|rabbit|owl"
)
_ANIMAL_ACTIONS = _words(
    "sleeping|eating grass|lying down|standing|running|drinking water|looking at the camera|playing "
    "with a ball|sitting quietly|walking slowly|resting in the shade|grazing|perched on a "
    "branch|jumping over a log"
)
_ANIMAL_PLACES = _words(
    "in a grassy field|on a couch|next to a fence|in the snow|on a dirt road|by the river|in a zoo "
    "enclosure|on a bed|in the backyard|near some trees|on a rocky hillside|inside a barn|on a window "
    "sill|in tall grass"
)
_FOODS = _words(
    "pizza|broccoli|pasta|sushi|sandwiches|donuts|fried rice|salad|pancakes|hot dogs|fruit|soup|steak "
    "and potatoes|cupcakes|tacos|noodles|oranges|bananas|grilled vegetables|eggs and toast"
)
_FOOD_CONTEXTS = _words(
    "on a white plate|on a wooden table|in a plastic container|next to a glass of water|on a kitchen "
    "counter|served at a restaurant|in a paper box|on a tray|with a fork and knife|in a bowl|on a "
    "picnic blanket|ready to be eaten"
)
_VEHICLES = _words(
    "a red bus|a white truck|a yellow taxi|a blue car|an old train|a motorcycle|a fire truck|a "
    "sailboat|a small airplane|a delivery van|a tractor|a police car|a passenger jet|a green "
    "bicycle|a school bus|a fishing boat"
)
_VEHICLE_ACTIONS = _words("parked|driving|stopped|waiting|moving slowly|passing by|turning|lined up")
_VEHICLE_PLACES = _words(
    "on the side of the road|at an intersection|near a gas station|on a highway|in the harbor|on a "
    "runway|in a small town|under a bridge|at the curb|in the rain|on a country road|in front of a "
    "building"
)
_ROOMS = _words("kitchen|living room|bedroom|bathroom|office|dining room|hotel room|classroom|hallway|garage")
_ROOM_ADJ = _words("clean|small|bright|cozy|messy|modern|empty|large|sunny|dark")
_FURNITURE = _words(
    "a wooden table|a large window|a white sink|a leather couch|a bookshelf|a tiled floor|a flat "
    "screen television|a potted plant|a double bed|a refrigerator|a ceiling fan|a desk and chair|a "
    "rug|a mirror|a stove|a lamp"
)
_LANDSCAPES = _words(
    "a mountain range|a sandy beach|a quiet lake|a green valley|a forest trail|a river|a desert "
    "road|a field of flowers|a snowy forest|a rocky coastline|a small village|a city skyline|a farm|a "
    "waterfall"
)
_LANDSCAPE_DETAILS = _words(
    "under a cloudy sky|at sunset|in the early morning|covered in fog|on a clear day|after the "
    "rain|in autumn|seen from above|with a few trees|under a blue sky"
)
_COUNTS = _words("two|three|four|several|a group of|a few|many|five")
_PLURALS = _words("people|children|friends|men|women|kids|players|tourists|workers|students")
_GROUP_ACTIONS = _words(
    "standing together|playing frisbee|sitting at a table|walking|watching a game|waiting in "
    "line|having lunch|posing for a photo|talking|riding skateboards"
)
_OBJECTS = _words(
    "clock|vase of flowers|laptop|teddy bear|pair of scissors|umbrella|suitcase|traffic light|stop "
    "sign|bench|kite|toilet|cell phone|computer keyboard|remote control|bowl of apples|book|wine "
    "glass|fire hydrant|parking meter"
)
_OBJECT_ADJ = _words("red|old|broken|shiny|small|large|colorful|wooden|white|black")
_OBJECT_PLACES = _words(
    "on a table|next to a wall|on the sidewalk|in a window|on a shelf|by the door|in the grass|on a "
    "desk|at the corner of a street|near a building"
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption_patterns(rng: random.Random) -> Iterable[str]:
    c = rng.choice
    while True:
        p = c(_PEOPLE)
        yield f"{_article(p)} {p} {c(_PERSON_ACTIONS)} {c(_PLACES)}"
        a = c(_ANIMALS)
        yield f"{_article(a)} {a} {c(_ANIMAL_ACTIONS)} {c(_ANIMAL_PLACES)}"
        yield f"a plate of {c(_FOODS)} {c(_FOOD_CONTEXTS)}"
        yield f"{c(_VEHICLES)} {c(_VEHICLE_ACTIONS)} {c(_VEHICLE_PLACES)}"
        adj = c(_ROOM_ADJ)
        f1, f2 = rng.sample(_FURNITURE, 2)
        yield f"{_article(adj)} {adj} {c(_ROOMS)} with {f1} and {f2}"
        yield f"{c(_LANDSCAPES)} {c(_LANDSCAPE_DETAILS)}"
        yield f"{c(_COUNTS)} {c(_PLURALS)} {c(_GROUP_ACTIONS)} {c(_PLACES)}"
        adj = c(_OBJECT_ADJ)
        yield f"{_article(adj)} {adj} {c(_OBJECTS)} {c(_OBJECT_PLACES)}"


DEFAULT_CORPUS_SIZE = 2500


@cache
def _default_corpus() -> tuple[str, ...]:
    rng = random.Random(20240614)
    seen: dict[str, None] = {}
    for caption in _caption_patterns(rng):
        seen.setdefault(caption, None)
        if len(seen) == DEFAULT_CORPUS_SIZE:
            return tuple(seen)
    raise AssertionError("unreachable")


def default_corpus() -> list[str]:
    """Our default preservation prompts: 2,500 distinct everyday captions, same list on every call."""
    return list(_default_corpus())


def prompt_lines(text: str) -> list[str]:
    """The prompts of a text, one per line: blank lines and ``#`` comment lines skipped, spaces normalised."""
    return [" ".join(s.split()) for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with ``#`` are skipped
    (a ``#`` inside a prompt is kept). Whitespace runs collapse to one space."""
    p = Path(path)
    if not p.is_file():
        raise MaceError(f"prompt file {p} does not exist; give a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MaceError(f"prompt file {p} is not UTF-8 text ({e}); save it as UTF-8") from e
    prompts = prompt_lines(text)
    if not prompts:
        raise MaceError(f"prompt file {p} has no prompts; write one prompt per line")
    return prompts


def retained_prompts(names: Sequence[str], kind: str) -> list[str]:
    """Prompts of a retained group (e.g. celebrities or artists to keep): every template of ``kind``
    applied to every name."""
    ts = templates_for(kind)
    return [t.format(" ".join(n.split())) for n in names for t in ts]


# ---------------------------------------------------------------- statistics


def preservation_moments(
    encode: Encode,
    prompts: Sequence[str],
    *,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> SecondMoment:
    """``P = Σ_prompts Σ_{p<77} e_p e_pᵀ`` (float64) and its token count, streaming over batches.

    ``encode(batch)`` returns (B, 77, d); ``progress(done, total)`` is called after each batch and
    ``check_interrupt()`` before each (it may raise to stop).
    """
    prompts = list(prompts)
    if not prompts:
        raise MaceError("preservation prompt list is empty; give at least one prompt")
    if batch_size < 1:
        raise MaceError(f"batch_size {batch_size} must be at least 1")
    moment: SecondMoment | None = None
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            if check_interrupt is not None:
                check_interrupt()
            batch = prompts[start : start + batch_size]
            e = encode(batch)  # (B, 77, d)
            if e.ndim != 3 or e.shape[0] != len(batch):
                raise MaceError(
                    f"text encoder returned shape {tuple(e.shape)} for {len(batch)} prompts; "
                    f"expected (batch, tokens, dim)"
                )
            if moment is None:
                moment = SecondMoment(e.shape[-1])
            moment.add(e.detach())
            if progress is not None:
                progress(min(start + batch_size, len(prompts)), len(prompts))
    assert moment is not None
    return moment


def cache_key(fingerprint: str, prompts: Sequence[str]) -> str:
    """sha256 hex of the text-encoder fingerprint and the exact prompt list (order matters)."""
    payload = json.dumps({"fingerprint": fingerprint, "prompts": list(prompts)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def state_fingerprint(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 hex of named tensors (names, dtypes, shapes, bytes): e.g. ``model.named_parameters()``."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_cached(path: Path, key: str, fingerprint: str, n_prompts: int) -> SecondMoment | None:
    """The cached moment, or None when absent, unreadable, or not for this key."""
    if not path.is_file():
        return None
    try:
        tensors, meta = read_safetensors(path, "preservation cache file")
        s, count = tensors["sum"], int(tensors["count"])
        ok = (
            meta.get("key") == key
            and meta.get("fingerprint") == fingerprint
            and int(meta.get("n_prompts", -1)) == n_prompts
            and int(meta.get("count", -1)) == count
            and s.ndim == 2
            and s.shape[0] == s.shape[1]
            and s.dtype == torch.float64
            and bool(torch.isfinite(s).all())
        )
    except Exception:  # noqa: BLE001 - an unreadable file (truncated, bad header) is rebuilt, never trusted
        return None
    return SecondMoment.from_state_dict(tensors) if ok else None


def cached_preservation_moments(
    encode: Encode,
    prompts: Sequence[str],
    *,
    fingerprint: str,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> SecondMoment:
    """``preservation_moments`` cached in ``cache_dir/preservation_<sha256>.safetensors``.

    The key is sha256(``fingerprint``, prompt list); metadata records count, n_prompts and fingerprint.
    Written atomically (temp file + ``os.replace``); a corrupted or mismatching file is ignored and rebuilt.
    """
    prompts = list(prompts)
    key = cache_key(fingerprint, prompts)
    path = Path(cache_dir) / f"preservation_{key[:40]}.safetensors"
    hit = _load_cached(path, key, fingerprint, len(prompts))
    if hit is not None:
        return hit
    moment = preservation_moments(
        encode, prompts, batch_size=batch_size, progress=progress, check_interrupt=check_interrupt
    )
    meta = {
        "key": key,
        "fingerprint": fingerprint,
        "n_prompts": str(len(prompts)),
        "count": str(moment.count),
        "dim": str(moment.dim),
        "format": "mace.preservation.v1",
    }
    try:
        atomic_save_safetensors(moment.state_dict(), path, meta, overwrite=True)
    except MaceError as e:  # a read-only cache must not fail the job
        import warnings

        warnings.warn(f"could not write preservation cache {path}: {e}", stacklevel=2)
    return moment
