"""Files, safely: atomic safetensors and text writes, and checked safetensors reads.

Writes go to a temporary file in the target folder, then are moved into place, so a failed write
(full disk, interrupt) never leaves a partial file and an existing file is never overwritten unless
asked. Reads refuse pickles and zip checkpoints by their first bytes (nothing is ever unpickled)
and name the file and what is wrong with it when it is truncated or corrupt.

The bottom layer: it imports nothing of ``mace_ops`` but ``errors`` (which imports nothing), so every
module may use it. The erasure file format lives in ``mace_ops.erasure``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import MaceError

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


__all__ = [
    "atomic_save_safetensors",
    "atomic_write_text",
    "check_safetensors_file",
    "read_safetensors",
    "read_safetensors_metadata",
    "unique_path",
]
