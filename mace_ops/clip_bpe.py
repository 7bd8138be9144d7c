"""The SD1.x CLIP BPE vocabulary: which file is used, how it is read, and CLIP's vocab/merges from it.

``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT licence: ``assets/clip/LICENSE.txt``) ships in this
package, so a plain ``pip install`` tokenizes offline with nothing else installed. Lookup order:

    the ``bpe_path`` argument  >  env ``MACE_CLIP_BPE``  >  the shipped ``assets/clip`` copy

Either override may be the ``.gz`` itself or a wheel/zip that holds it anywhere inside (e.g. an
``open_clip_torch-*.whl``): that member is read in memory (no extraction to disk, nothing unpickled,
sizes bounded). CLIP's encoder tables follow from the file's text:

    merges = lines 1 .. 48894 (line 0 is a version header)
    vocab  = 256 byte characters, the same + "</w>", each merge joined, <|startoftext|>, <|endoftext|>
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import MaceError

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SHIPPED_BPE = Path(__file__).resolve().parent / "assets" / "clip" / BPE_FILENAME
ENV_BPE = "MACE_CLIP_BPE"
END_ID = 49407
N_MERGES = 49152 - 256 - 2  # 48894 merges: CLIP's vocabulary is 49408 entries
MAX_BYTES = 16 * 2**20  # CLIP's file: 1.36 MB packed, 3.1 MB unpacked; anything far larger is not it
_GZIP_MAGIC = b"\x1f\x8b"
_FIX = (f"point {ENV_BPE} (or the bpe_path argument) at {BPE_FILENAME} or at a wheel/zip that contains "
        f"it (e.g. open_clip_torch-*.whl), or unset {ENV_BPE} to use the copy shipped with MACE")


def bpe_source(bpe_path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``(file, label)`` of the BPE source to use: the argument, env ``MACE_CLIP_BPE``, else the shipped
    copy. ``label`` names where it came from, for error messages."""
    if bpe_path is not None:
        p, what = Path(bpe_path), f"CLIP BPE file {str(bpe_path)!r}"
    elif os.environ.get(ENV_BPE):
        p, what = Path(os.environ[ENV_BPE]), f"{ENV_BPE}={os.environ[ENV_BPE]!r}"
    else:
        p, what = SHIPPED_BPE, f"the CLIP BPE file shipped with MACE ({SHIPPED_BPE})"
        if not p.is_file():
            raise MaceError(f"{what} is missing: the installation is incomplete; reinstall comfyui-mace, "
                            f"or set {ENV_BPE} to a copy of {BPE_FILENAME}")
    if not p.is_file():
        raise MaceError(f"{what} does not exist or is not a file: {_FIX}")
    return p, what


def find_bpe_file(bpe_path: str | os.PathLike | None = None) -> Path:
    """The file ``bpe_source`` picks (a ``.gz``, or a wheel/zip that holds one)."""
    return bpe_source(bpe_path)[0]


def _bounded(stream: io.BufferedIOBase, what: str, part: str) -> bytes:
    """All of ``stream``, refused when larger than ``MAX_BYTES`` (read at most one byte more)."""
    data = stream.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise MaceError(f"{what}: {part} is larger than {MAX_BYTES} bytes, so it is not CLIP's vocabulary: {_FIX}")
    return data


def _gz_member_of_zip(path: Path, what: str) -> bytes:
    """The packed bytes of the first member named ``BPE_FILENAME`` (any folder) of a wheel/zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            hits = sorted((i for i in zf.infolist() if PurePosixPath(i.filename).name == BPE_FILENAME
                           and not i.is_dir()), key=lambda i: i.filename)
            if not hits:
                raise MaceError(f"{what} is a wheel/zip without {BPE_FILENAME} inside: {_FIX}")
            with zf.open(hits[0]) as member:
                return _bounded(member, what, hits[0].filename)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
        raise MaceError(f"{what} is a damaged or unreadable wheel/zip ({e}): {_FIX}") from e


def read_bpe_text(path: str | os.PathLike, what: str | None = None) -> str:
    """The unpacked text of a BPE source: a gzip file, or a wheel/zip with ``BPE_FILENAME`` inside."""
    p = Path(path)
    what = what or f"CLIP BPE file {str(p)!r}"
    with p.open("rb") as f:
        is_gzip = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        packed = _bounded(f, what, "the file") if is_gzip else b""
    if not is_gzip:
        if not zipfile.is_zipfile(p):
            raise MaceError(f"{what} is neither a gzip file nor a wheel/zip: {_FIX}")
        packed = _gz_member_of_zip(p, what)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as g:
            return _bounded(g, what, "the unpacked vocabulary").decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise MaceError(f"{what}: {BPE_FILENAME} is damaged ({type(e).__name__}: {e}): {_FIX}") from e


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode character table (256 entries, bijective), in CLIP's order:
    the printable bytes first (mapped to themselves), then the others (mapped to chr(256 + k))."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_vocab_and_merges(text: str, what: str = "CLIP BPE file") -> tuple[dict[str, int], list[str]]:
    """CLIP's ``vocab`` (token -> id, 49408 entries) and ``merges`` ("a b" lines) from the BPE text."""
    merges = text.split("\n")[1 : N_MERGES + 1]
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise MaceError(f"{what} is not a valid {BPE_FILENAME} (expected {N_MERGES} merge lines): {_FIX}")
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or vocab["<|endoftext|>"] != END_ID:
        raise MaceError(f"{what} gives an unexpected vocabulary (not CLIP's {BPE_FILENAME}): {_FIX}")
    return vocab, merges
