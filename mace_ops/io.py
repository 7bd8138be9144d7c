"""Files, safely: atomic safetensors writes, checked reads, and the erasure file.

Writes go to a temporary file in the target folder, then are moved into place, so a failed write
(full disk, interrupt) never leaves a partial file and an existing file is never overwritten unless
asked. Reads refuse pickles and zip checkpoints by their first bytes (nothing is ever unpickled)
and name the file and what is wrong with it when it is truncated or corrupt.

Erasure file (``save_erasure``): only the changed matrices, as differences ``W_new - W0``, under
the key form that ComfyUI's stock LoRA loader applies as a full-weight difference::

    diffusion_model.<block>.to_k.diff      (d_out, d_ctx) float32
    diffusion_model.<block>.to_v.diff

(``comfy/lora.py``: ``model_lora_keys_unet`` maps ``diffusion_model.<path>`` -> ``<path>.weight``
and ``load_lora`` turns ``<key>.diff`` into a ``("diff", ...)`` patch, i.e. ``W = W0 + s·diff``.)
SDXL's pooled-channel edit adds ``diffusion_model.label_emb.0.0.diff``. A compact file
(``save_erasure(..., compact=tol)``, ``mace_ops.compact``) stores ``<key>.lora_up.weight`` /
``.lora_down.weight`` factors instead of ``.diff`` (also a form the stock loader applies) and the
metadata ``mace.compact`` (json {tolerance, dtype, ranks; 0 = stored dense}); ``load_erasure`` reads both forms.
Metadata (all strings): ``mace.format`` = ``"mace-erasure"``, ``mace.format_version``,
``mace.base_fingerprint``, ``mace.concepts`` (json list of {phrase, anchor, kind}), ``mace.matrices``
(json {name: [d_out, d_ctx]}), ``mace.settings`` (json of ``Erasure.metadata``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import MaceError

ERASURE_FORMAT = "mace-erasure"
ERASURE_FORMAT_VERSION = 1
UNET_PREFIX = "diffusion_model."
DIFF_SUFFIX = ".diff"
#: SDXL's pooled channel (``mace_ops.pooled``): stored as ``diffusion_model.label_emb.0.0.diff``, which
#: ComfyUI's stock loader applies to ``label_emb.0.0.weight`` like any other diff
LABEL_EMB_NAME = "label_emb.0.0"

# First bytes of files we refuse without reading further.
_PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2 (torch.save legacy format, .ckpt/.pt/.bin)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save zip format
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


# ---------------------------------------------------------------- writing


def unique_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if it does not exist, else the first free ``<stem>_00001<suffix>``, ``_00002`` ..."""
    p = Path(path)
    if not p.exists():
        return p
    for i in range(1, 100_000):
        q = p.with_name(f"{p.stem}_{i:05d}{p.suffix}")
        if not q.exists():
            return q
    raise MaceError(f"no free file name next to {str(p)!r}; clean up that folder")


def _umask() -> int:
    """The process umask: read from /proc on Linux (setting it to read it would race other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(folder: Path, name: str) -> str:
    """A new empty file next to ``folder / name`` (hidden, unique, mode 0o600 until ``_place``); its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file through a temporary file in its folder and ``os.replace`` (replaces ``path``)."""
    path = Path(path)
    tmp = _temp_file(path.parent, path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        _place(tmp, path, overwrite=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_safetensors(tensors: Mapping[str, Tensor], path: str, metadata: dict[str, str] | None) -> None:
    """The actual write (a seam for fault-injection tests)."""
    save_file(dict(tensors), path, metadata=metadata)


def _place(tmp: str, path: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``path``; without ``overwrite`` never replaces a file that appeared meanwhile.

    The file gets the mode ``open()`` would give (0o666 minus the umask), not the temp file's 0o600 (which
    safetensors also sets when it writes): a saved checkpoint or erasure is then as readable by others as
    any other file of the user's."""
    os.chmod(tmp, 0o666 & ~_umask())
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and fails if path exists
    except FileExistsError:
        raise MaceError(f"{str(path)!r} exists; choose another name (e.g. {unique_path(path).name!r})") from None
    except OSError:  # file system without hard links
        if path.exists():
            raise MaceError(f"{str(path)!r} exists; choose another name (e.g. {unique_path(path).name!r})") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def atomic_save_safetensors(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` to ``path`` as safetensors via a temp file in the same folder + rename.

    Refuses an existing ``path`` unless ``overwrite``; on any failure (full disk, interrupt) the
    temp file is removed and nothing is left at ``path``. Creates missing parent folders.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MaceError(f"{str(path)!r} exists; choose another name (e.g. {unique_path(path).name!r})")
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must be str -> str; bad keys: {bad[:3]}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = _temp_file(folder, path.name)
    except OSError as e:
        raise MaceError(f"cannot write in folder {str(folder)!r} ({e.strerror or e}); choose a writable folder") from e
    try:
        clean: dict[str, Tensor] = {}
        seen: set[int] = set()
        for k, v in tensors.items():
            t = v.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            clean[k] = t.clone() if ptr in seen and t.numel() else t  # safetensors refuses shared memory
            seen.add(ptr)
        _write_safetensors(clean, tmp, dict(metadata) if metadata is not None else None)
        _place(tmp, path, overwrite)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, MaceError):
            raise
        if isinstance(e, OSError):
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise MaceError(f"could not write {str(path)!r}: {why}; nothing was written, free space or "
                            "choose another folder") from e
        raise
    return path


# ---------------------------------------------------------------- reading


def check_safetensors_file(path: str | os.PathLike[str], what: str = "file") -> int:
    """Validate ``path`` as a complete safetensors file without unpickling anything.

    Returns the header length. Raises ``MaceError`` naming the file for: missing, pickle/zip
    checkpoints, a header that is not json, tensors whose data run past the end of the file.
    """
    p = Path(path)
    if not p.is_file():
        raise MaceError(f"{what} {str(p)!r} does not exist; check the path")
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(9)
        # safetensors: u64 header length n, then n bytes of json starting with "{". A valid length may
        # itself begin with 0x80, so the pickle/zip magic is only looked at when that layout fails.
        n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        if len(head) < 9 or head[8:9] != b"{" or n < 2:
            if head.startswith(_ZIP_MAGIC) or (head[:1] == _PICKLE_MAGIC and head[1:2] in b"\x02\x03\x04\x05"):
                raise MaceError(f"{what} {str(p)!r} is a pickle/zip (torch.save) checkpoint; it is refused and "
                                "never unpickled: convert it to .safetensors first")
            if len(head) < 9:
                raise MaceError(f"{what} {str(p)!r} is truncated ({size} bytes): not a complete safetensors "
                                "file; re-download or re-save it")
            raise MaceError(f"{what} {str(p)!r} is corrupt or not a safetensors file (no json header); "
                            "give a .safetensors file, or re-download or re-save it")
        f.seek(8)
        if n + 8 > size:
            raise MaceError(f"{what} {str(p)!r} is truncated or not safetensors: header of {n} bytes but the file "
                            f"has {size}; re-download or re-save it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a json object")
    except (UnicodeDecodeError, ValueError) as e:
        raise MaceError(f"{what} {str(p)!r} is corrupt: its safetensors header is unreadable ({e})") from e
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for s in info["shape"]:
                count *= int(s)
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise MaceError(f"{what} {str(p)!r} is corrupt: bad header entry for {key!r}") from e
        if width is not None and stop - start != count * width:
            raise MaceError(f"{what} {str(p)!r} is corrupt: tensor {key!r} has the wrong byte size")
        end = max(end, stop)
    if 8 + n + end > size:
        raise MaceError(f"{what} {str(p)!r} is truncated: {8 + n + end} bytes expected, {size} found; "
                        "re-download or re-save it")
    return n


def read_safetensors_metadata(path: str | os.PathLike[str], what: str = "file") -> dict[str, str]:
    """The ``__metadata__`` of a checked safetensors file (no tensors read)."""
    check_safetensors_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise MaceError(f"{what} {str(path)!r} is corrupt: {e}") from e


def read_safetensors(path: str | os.PathLike[str], what: str = "file") -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, after ``check_safetensors_file``."""
    check_safetensors_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MaceError(f"{what} {str(path)!r} is corrupt: {e}") from e
    return tensors, meta


# ---------------------------------------------------------------- erasure file


def erasure_key(name: str) -> str:
    """``<block>.to_k`` -> ``diffusion_model.<block>.to_k.diff`` (ComfyUI's generic diff key)."""
    return f"{UNET_PREFIX}{name}{DIFF_SUFFIX}"


def matrix_name(key: str) -> str:
    """Inverse of ``erasure_key``; ``MaceError`` for any other key."""
    if not (key.startswith(UNET_PREFIX) and key.endswith(DIFF_SUFFIX)):
        raise MaceError(f"erasure file key {key!r} is not of the form diffusion_model.<block>.to_k.diff")
    name = key[len(UNET_PREFIX) : -len(DIFF_SUFFIX)]
    if not (name.endswith(".to_k") or name.endswith(".to_v")):
        raise MaceError(f"erasure file key {key!r} is not a cross-attention to_k/to_v matrix")
    return name


def concept_dicts(concepts: list) -> list[dict[str, str]]:
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


def _to_concepts(items: list[dict[str, str]]) -> list:
    from .concepts import Concept  # here, not at the top: concepts -> tokens -> io

    return [Concept(d["phrase"], d.get("anchor", ""), d.get("kind", "object")) for d in items]


def save_erasure(erasure: Any, original_weights: Mapping[str, Tensor], path: str | os.PathLike[str], *,
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


def save_erasure_diffs(diffs: Mapping[str, Tensor], erasure: Any, path: str | os.PathLike[str], *,
                       overwrite: bool = False, compact: float | None = None) -> Path:
    """Write differences ``W_new - W0`` already at hand (e.g. a loaded erasure's) with ``erasure``'s
    fingerprint, concepts and metadata; the format of ``save_erasure``."""
    from .compact import compact_tensors

    extra: dict[str, str] = {}
    if compact is None:
        tensors = {erasure_key(n): d for n, d in sorted(diffs.items()) if bool(torch.any(d != 0))}
    else:
        tensors, ranks = compact_tensors(diffs, compact, UNET_PREFIX)
        extra["mace.compact"] = json.dumps({"tolerance": compact, "dtype": "float16", "ranks": ranks})
    label = getattr(erasure, "label_emb_diff", None)
    if label is not None:
        tensors[f"{UNET_PREFIX}{LABEL_EMB_NAME}{DIFF_SUFFIX}"] = label.detach().float().cpu()
    meta = {
        "mace.format": ERASURE_FORMAT,
        "mace.format_version": str(ERASURE_FORMAT_VERSION),
        "mace.base_fingerprint": str(erasure.base_fingerprint),
        "mace.concepts": json.dumps(concept_dicts(list(erasure.concepts))),
        "mace.matrices": json.dumps({n: list(diffs[n].shape) for n in sorted(diffs)}),
        "mace.settings": json.dumps(erasure.metadata, default=str, sort_keys=True),
        **extra,
    }
    return atomic_save_safetensors(tensors, path, meta, overwrite=overwrite)


def load_erasure(
    path: str | os.PathLike[str],
    *,
    original_weights: Mapping[str, Tensor] | None = None,
    expected_fingerprint: str | None = None,
) -> tuple[Any, dict[str, Tensor]]:
    """Read an erasure file: ``(Erasure, diffs)`` with ``diffs`` keyed ``<block>.to_k``.

    With ``original_weights`` the Erasure's weights are ``W0 + diff`` (shapes checked), else
    empty. ``expected_fingerprint`` refuses a file made for another base model.
    """
    from .pipeline import Erasure

    tensors, meta = read_safetensors(path, "erasure file")
    where = f"erasure file {str(path)!r}"
    if meta.get("mace.format") != ERASURE_FORMAT:
        raise MaceError(f"{where} is not a MACE erasure file (format {meta.get('mace.format')!r}); "
                        "give a file written by MACE's save")
    try:
        version = int(meta.get("mace.format_version", "0"))
        concepts = _to_concepts(json.loads(meta.get("mace.concepts", "[]")))
        settings = json.loads(meta.get("mace.settings", "{}"))
        shapes = dict(json.loads(meta.get("mace.matrices", "{}")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MaceError(f"{where} has corrupt metadata ({type(e).__name__}: {e}); re-save it") from e
    if version > ERASURE_FORMAT_VERSION:
        raise MaceError(f"{where} has format version {version}, newer than this MACE ({ERASURE_FORMAT_VERSION}); "
                        "update comfyui-mace")
    fingerprint = meta.get("mace.base_fingerprint", "")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise MaceError(f"{where} was made for base model {fingerprint!r}, not this one ({expected_fingerprint!r}); "
                        "apply it to the model it was made for")
    from .compact import expand_low_rank

    tensors.update(expand_low_rank(tensors, where))  # a compact file: factors -> dense differences
    diffs: dict[str, Tensor] = {}
    label = tensors.pop(f"{UNET_PREFIX}{LABEL_EMB_NAME}{DIFF_SUFFIX}", None)
    if label is not None and (label.ndim != 2 or not bool(torch.isfinite(label).all())):
        raise MaceError(f"{where}: its label_emb difference is not a finite 2-D matrix; the file is corrupt")
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
    weights: dict[str, Tensor] = {}
    if original_weights is not None:
        try:
            full = apply_erasure_weights(original_weights, diffs, 1.0)
        except MaceError as e:
            raise MaceError(f"{where}: {e}") from None
        weights = {n: full[n].float() for n in diffs}
    erasure = Erasure(weights=weights, base_fingerprint=fingerprint, concepts=concepts, metadata=settings,
                      label_emb_diff=None if label is None else label.float())
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


__all__ = [
    "ERASURE_FORMAT",
    "ERASURE_FORMAT_VERSION",
    "apply_erasure_weights",
    "atomic_save_safetensors",
    "check_safetensors_file",
    "concept_dicts",
    "erasure_key",
    "load_erasure",
    "matrix_name",
    "read_safetensors",
    "read_safetensors_metadata",
    "save_erasure",
    "unique_path",
]
