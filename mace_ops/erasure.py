"""The product of a run, ``Erasure``: new to_k/to_v matrices, their provenance, and the erasure file.

One constructor (``Erasure.build``) for every producer: the pipeline (``run_erasure``), the Fuse LoRAs node
(``fuse_weights`` on a trained bank) and the fusion of LoRAs trained elsewhere (``fuse_external_loras``).
One provenance schema, ``Erasure.metadata``::

    {"source":         "run_erasure" | "fuse_weights" | "fuse_external_loras",
     "settings":       {...},   # ErasureSettings.as_metadata(), or the fusion weights of a Fuse node
     "losses":         {phrase: [loss, ...]},   # LoRA training losses ({} when none were trained)
     "external_loras": [{concept, file, style, ...}, ...]}   # [] unless source is fuse_external_loras

Files written before this schema (``{"settings", "losses"}`` from a run, ``{"fusion", "losses", "host"}``
from the Fuse LoRAs node, ``{"fusion", "external_loras"}`` from fused external LoRAs) load into it:
``fusion`` becomes ``settings`` and the source is inferred; keys it does not know are kept as they are.

Erasure file (``save_erasure``): only the changed matrices, as differences ``W_new - W0``, under the key
form that ComfyUI's stock LoRA loader applies as a full-weight difference::

    diffusion_model.<block>.to_k.diff      (d_out, d_ctx) float32
    diffusion_model.<block>.to_v.diff

(``comfy/lora.py``: ``model_lora_keys_unet`` maps ``diffusion_model.<path>`` -> ``<path>.weight`` and
``load_lora`` turns ``<key>.diff`` into a ``("diff", ...)`` patch, i.e. ``W = W0 + s·diff``.)
Metadata (all strings, ``Erasure.to_metadata``): ``mace.format`` = ``"mace-erasure"``,
``mace.format_version``, ``mace.base_fingerprint``, ``mace.concepts`` (json list of {phrase, anchor, kind}),
``mace.settings`` (json of ``Erasure.metadata``); ``save_erasure`` adds ``mace.matrices`` (json
{name: [d_out, d_ctx]}).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .concepts import Concept
from .errors import MaceError
from .io import atomic_save_safetensors, read_safetensors

ERASURE_FORMAT = "mace-erasure"
ERASURE_FORMAT_VERSION = 1
#: ComfyUI's key prefix of a UNet weight in a LoRA file (``diffusion_model.<block>.to_k``).
ERASURE_KEY_PREFIX = "diffusion_model."
DIFF_SUFFIX = ".diff"
#: SDXL's pooled channel (``mace_ops.pooled``): stored as ``diffusion_model.label_emb.0.0.diff``, which
#: ComfyUI's stock loader applies to ``label_emb.0.0.weight`` like any other diff
LABEL_EMB_NAME = "label_emb.0.0"
SOURCES = ("run_erasure", "fuse_weights", "fuse_external_loras")


def canonical_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` in the schema of this module (old shapes converted, unknown keys kept)."""
    meta = dict(metadata)
    if "source" in meta:
        source = str(meta.pop("source"))
    elif "external_loras" in meta:
        source = "fuse_external_loras"
    elif "fusion" in meta:
        source = "fuse_weights"
    else:
        source = "run_erasure"
    settings = meta.pop("settings", None)
    fusion = meta.pop("fusion", None)
    return {
        "source": source,
        "settings": dict(settings if settings is not None else fusion or {}),
        "losses": dict(meta.pop("losses", None) or {}),
        "external_loras": list(meta.pop("external_loras", None) or []),
        **meta,
    }


def concept_dicts(concepts: Sequence[Any]) -> list[dict[str, str]]:
    """``[{phrase, anchor, kind}]`` of Concepts, mappings or plain phrases (the ``mace.concepts`` json)."""
    out = []
    for c in concepts:
        if dataclasses.is_dataclass(c):
            d = dataclasses.asdict(c)
        elif isinstance(c, Mapping):
            d = dict(c)
        else:
            d = {"phrase": str(c)}
        out.append({k: d[k] for k in ("phrase", "anchor", "kind") if k in d})
    return out


@dataclass
class Erasure:
    """The new to_k/to_v matrices and their provenance (MACE_ERASURE). ``metadata`` is always in the
    schema of this module's docstring (``canonical_metadata`` is applied on construction)."""

    weights: dict[str, Tensor]  # "<block>.to_k" -> (d_out, d_ctx), float32, CPU
    base_fingerprint: str  # Host.model_fingerprint() of the ORIGINAL model
    concepts: list[Concept]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: SDXL pooled channel: ``label_emb.0.0.weight`` new − original, (d_t, 2816) float32; None: unchanged
    label_emb_diff: Tensor | None = None

    def __post_init__(self) -> None:
        self.metadata = canonical_metadata(self.metadata)

    @classmethod
    def build(cls, weights: Mapping[str, Tensor], *, base_fingerprint: str, concepts: Sequence[Concept],
              source: str, settings: Mapping[str, Any], losses: Mapping[str, Any] | None = None,
              external_loras: Sequence[Mapping[str, Any]] = (),
              hardening: Sequence[Mapping[str, Any]] = ()) -> Erasure:
        """The one constructor of every producer: weights detached to float32 CPU, metadata in the schema
        (``hardening``: the per-round record of ``mace_ops.harden``, kept only when there is one)."""
        if source not in SOURCES:
            raise ValueError(f"unknown erasure source {source!r}; one of {SOURCES}")
        return cls(
            weights={k: v.detach().float().cpu() for k, v in weights.items()},
            base_fingerprint=str(base_fingerprint),
            concepts=list(concepts),
            metadata={"source": source, "settings": dict(settings), "losses": dict(losses or {}),
                      "external_loras": [dict(e) for e in external_loras],
                      **({"hardening": [dict(h) for h in hardening]} if hardening else {})},
        )

    def diffs(self, original: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``W_new - W0`` per matrix (what the erasure file stores)."""
        missing = sorted(set(self.weights) - set(original))
        if missing:
            raise MaceError(f"the model lacks the erased matrices {missing[:3]}: is it the erasure's base model?")
        return {k: (w.float().cpu() - original[k].float().cpu()) for k, w in self.weights.items()}

    def to_metadata(self) -> dict[str, str]:
        """The erasure file's ``mace.*`` metadata strings (all but ``mace.matrices``)."""
        return {
            "mace.format": ERASURE_FORMAT,
            "mace.format_version": str(ERASURE_FORMAT_VERSION),
            "mace.base_fingerprint": str(self.base_fingerprint),
            "mace.concepts": json.dumps(concept_dicts(list(self.concepts))),
            "mace.settings": json.dumps(self.metadata, default=str, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], weights: Mapping[str, Tensor] | None = None, *,
                      where: str = "erasure file") -> Erasure:
        """Inverse of ``to_metadata`` (old metadata shapes accepted); ``MaceError`` naming ``where`` for a
        file that is not an erasure, is corrupt, or is newer than this MACE."""
        if meta.get("mace.format") != ERASURE_FORMAT:
            raise MaceError(f"{where} is not a MACE erasure file (format {meta.get('mace.format')!r}); "
                            "give a file written by MACE's save")
        try:
            version = int(meta.get("mace.format_version", "0"))
            concepts = [Concept(d["phrase"], d.get("anchor", ""), d.get("kind", "object"))
                        for d in json.loads(meta.get("mace.concepts", "[]"))]
            metadata = canonical_metadata(json.loads(meta.get("mace.settings", "{}")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MaceError(f"{where} has corrupt metadata ({type(e).__name__}: {e}); re-save it") from e
        if version > ERASURE_FORMAT_VERSION:
            raise MaceError(f"{where} has format version {version}, newer than this MACE "
                            f"({ERASURE_FORMAT_VERSION}); update comfyui-mace")
        return cls(weights=dict(weights or {}), base_fingerprint=meta.get("mace.base_fingerprint", ""),
                   concepts=concepts, metadata=metadata)


# ---------------------------------------------------------------- the erasure file


def erasure_key(name: str) -> str:
    """``<block>.to_k`` -> ``diffusion_model.<block>.to_k.diff`` (ComfyUI's generic diff key)."""
    return f"{ERASURE_KEY_PREFIX}{name}{DIFF_SUFFIX}"


def matrix_name(key: str) -> str:
    """Inverse of ``erasure_key``; ``MaceError`` for any other key."""
    if not (key.startswith(ERASURE_KEY_PREFIX) and key.endswith(DIFF_SUFFIX)):
        raise MaceError(f"erasure file key {key!r} is not of the form diffusion_model.<block>.to_k.diff")
    name = key[len(ERASURE_KEY_PREFIX) : -len(DIFF_SUFFIX)]
    if not (name.endswith(".to_k") or name.endswith(".to_v")):
        raise MaceError(f"erasure file key {key!r} is not a cross-attention to_k/to_v matrix")
    return name


def save_erasure(erasure: Erasure, original_weights: Mapping[str, Tensor], path: str | os.PathLike[str], *,
                 overwrite: bool = False, compact: float | None = None) -> Path:
    """Write ``erasure`` as differences to ``original_weights`` (only matrices that changed).

    ``diff[name] = W_new - W0`` in float32, key ``diffusion_model.<name>.diff``; with ``compact`` (a
    relative error, e.g. 0.01) each as float16 truncated-SVD factors instead (``mace_ops.compact``).
    """
    missing = sorted(set(erasure.weights) - set(original_weights))
    if missing:
        raise MaceError(f"erasure has matrices the base model lacks ({missing[0]!r}, {len(missing)} in all); "
                        "save it with the weights of the model it was made for")
    return save_erasure_diffs(erasure.diffs(original_weights), erasure, path, overwrite=overwrite, compact=compact)


def save_erasure_diffs(diffs: Mapping[str, Tensor], erasure: Erasure, path: str | os.PathLike[str], *,
                       overwrite: bool = False, compact: float | None = None) -> Path:
    """Write differences ``W_new - W0`` already at hand (e.g. a loaded erasure's) with ``erasure``'s
    fingerprint, concepts and metadata; the format of ``save_erasure``."""
    from .compact import compact_tensors

    meta = erasure.to_metadata()
    if compact is None:
        tensors = {erasure_key(n): d for n, d in sorted(diffs.items()) if bool(torch.any(d != 0))}
    else:
        tensors, ranks = compact_tensors(diffs, compact, ERASURE_KEY_PREFIX)
        meta["mace.compact"] = json.dumps({"tolerance": compact, "dtype": "float16", "ranks": ranks})
    if erasure.label_emb_diff is not None:
        tensors[f"{ERASURE_KEY_PREFIX}{LABEL_EMB_NAME}{DIFF_SUFFIX}"] = erasure.label_emb_diff.detach().float().cpu()
    meta["mace.matrices"] = json.dumps({n: list(diffs[n].shape) for n in sorted(diffs)})
    return atomic_save_safetensors(tensors, path, meta, overwrite=overwrite)


def _checked_diffs(tensors: Mapping[str, Tensor], shapes: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """The file's tensors keyed ``<block>.to_k``, each checked: a finite 2-D float matrix of its stated shape."""
    diffs: dict[str, Tensor] = {}
    for key, t in tensors.items():
        try:
            name = matrix_name(key)
        except MaceError as e:
            raise MaceError(f"{where}: {e}; the file is corrupt or not an erasure file") from None
        if t.ndim != 2 or not t.is_floating_point():
            raise MaceError(f"{where}: {key!r} is not a 2-D float matrix; the file is corrupt")
        if name in shapes and list(t.shape) != list(shapes[name]):
            raise MaceError(f"{where}: {key!r} has shape {list(t.shape)} but its metadata says {shapes[name]}")
        if not bool(torch.isfinite(t).all()):
            raise MaceError(f"{where}: {key!r} contains NaN or Inf; the file is corrupt, re-create it")
        diffs[name] = t.float()
    return diffs


def load_erasure(
    path: str | os.PathLike[str],
    *,
    original_weights: Mapping[str, Tensor] | None = None,
    expected_fingerprint: str | None = None,
) -> tuple[Erasure, dict[str, Tensor]]:
    """Read an erasure file: ``(Erasure, diffs)`` with ``diffs`` keyed ``<block>.to_k``.

    With ``original_weights`` the Erasure's weights are ``W0 + diff`` (shapes checked), else
    empty. ``expected_fingerprint`` refuses a file made for another base model.
    """
    tensors, meta = read_safetensors(path, "erasure file")
    where = f"erasure file {str(path)!r}"
    erasure = Erasure.from_metadata(meta, where=where)
    try:
        shapes = dict(json.loads(meta.get("mace.matrices", "{}")))
    except (ValueError, TypeError) as e:
        raise MaceError(f"{where} has corrupt metadata ({type(e).__name__}: {e}); re-save it") from e
    fingerprint = erasure.base_fingerprint
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise MaceError(f"{where} was made for base model {fingerprint!r}, not this one ({expected_fingerprint!r}); "
                        "apply it to the model it was made for")
    from .compact import expand_low_rank

    tensors = dict(tensors)
    tensors.update(expand_low_rank(tensors, where))  # a compact file: factors -> dense differences
    label = tensors.pop(f"{ERASURE_KEY_PREFIX}{LABEL_EMB_NAME}{DIFF_SUFFIX}", None)
    if label is not None and (label.ndim != 2 or not bool(torch.isfinite(label).all())):
        raise MaceError(f"{where}: its label_emb difference is not a finite 2-D matrix; the file is corrupt")
    erasure.label_emb_diff = None if label is None else label.float()
    diffs = _checked_diffs(tensors, shapes, where)
    if original_weights is not None:
        try:
            full = apply_erasure_weights(original_weights, diffs, 1.0)
        except MaceError as e:
            raise MaceError(f"{where}: {e}") from None
        erasure.weights = {n: full[n].float() for n in diffs}
    return erasure, diffs


def apply_erasure_weights(
    original: Mapping[str, Tensor], diffs: Mapping[str, Tensor], strength: float = 1.0
) -> dict[str, Tensor]:
    """``W0 + strength · diff`` for every matrix of ``original`` (untouched ones copied), dtype kept."""
    unknown = sorted(set(diffs) - set(original))
    if unknown:
        raise MaceError(f"erasure changes {unknown[0]!r}, which this model does not have ({len(unknown)} unknown "
                        "matrices): it was made for another model")
    out: dict[str, Tensor] = {}
    for name, w in original.items():
        if name not in diffs:
            out[name] = w.detach().clone()
            continue
        d = diffs[name]
        if tuple(d.shape) != tuple(w.shape):
            raise MaceError(f"erasure matrix {name!r} is {tuple(d.shape)} but the model's is {tuple(w.shape)}: "
                            "it was made for another model")
        out[name] = (w.detach().float() + float(strength) * d.to(w.device).float()).to(w.dtype)
    return out


def apply_label_emb_diff(original: Tensor | None, diff: Tensor, strength: float = 1.0, *,
                         model: str = "this model") -> Tensor:
    """SDXL's pooled channel: ``L0 + strength · diff`` (float32) for ``original`` = ``label_emb.0.0.weight``
    L0 (d_t, 2816) of the model the erasure is applied to; ``MaceError`` when the model has no label_emb of
    the diff's shape (``original`` None, e.g. SD1.x / SD2.x, or another width)."""
    if original is None or tuple(original.shape) != tuple(diff.shape):
        have = "no label_emb" if original is None else f"a label_emb of shape {tuple(original.shape)}"
        raise MaceError(f"model input: the erasure also edits SDXL's pooled channel (a label_emb difference of "
                        f"shape {tuple(diff.shape)}), but {model} has {have}; connect the SDXL checkpoint the "
                        "erasure was made from")
    return original.detach().float() + float(strength) * diff.to(original.device).float()


__all__ = [
    "ERASURE_FORMAT",
    "ERASURE_FORMAT_VERSION",
    "ERASURE_KEY_PREFIX",
    "Erasure",
    "LABEL_EMB_NAME",
    "apply_erasure_weights",
    "apply_label_emb_diff",
    "canonical_metadata",
    "concept_dicts",
    "erasure_key",
    "load_erasure",
    "matrix_name",
    "save_erasure",
    "save_erasure_diffs",
]
