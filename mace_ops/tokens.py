"""The SD1.x CLIP tokenizer without any hub, token ids, and token alignment of prompt pairs.

SD1.x tokenizes with OpenAI CLIP ViT-L/14's byte-level BPE: ``<|startoftext|>`` = 49406, then the
tokens, then ``<|endoftext|>`` = 49407, padded to 77 with 49407. The tokenizer is built from the BPE
file shipped in this package (``mace_ops.clip_bpe``: which file, and CLIP's vocab/merges from it).

Everything downstream takes a pluggable ``token_ids(prompts) -> list[list[int]]`` (``TokenIds``) so
that inside ComfyUI the host's own tokenizer is used; ``sd1_token_ids`` is the default.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .clip_bpe import bpe_source, clip_vocab_and_merges, read_bpe_text
from .errors import MaceError
from .io import atomic_write_text

TokenIds = Callable[[Sequence[str]], list[list[int]]]

START_ID = 49406
END_ID = 49407
MAX_LENGTH = 77


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) / "mace" / "clip_tokenizer"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        root = Path(tempfile.gettempdir()) / "mace_clip_tokenizer"
        root.mkdir(parents=True, exist_ok=True)
        return root


@lru_cache(maxsize=8)
def _tokenizer_dir(path: str, what: str, mtime_ns: int, size: int) -> Path:
    """A folder with vocab.json/merges.txt derived from the BPE source ``path``, cached on disk by the
    sha256 of its text (and in memory by path, mtime and size: one stat per tokenizer lookup)."""
    text = read_bpe_text(path, what)
    d = _cache_root() / hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return d
    vocab, merges = clip_vocab_and_merges(text, what)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(d / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    return d


@lru_cache(maxsize=4)
def _load_from_dir(d: str) -> Any:
    import transformers

    # transformers 4.x: the fast (Rust) tokenizer needs no ftfy; 5.x: CLIPTokenizer is the fast one
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    tok = cls.from_pretrained(
        d,
        local_files_only=True,
        model_max_length=MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if tok.pad_token_id != END_ID or tok.bos_token_id != START_ID:
        raise MaceError(f"tokenizer files in {d} are not SD1.x CLIP's; delete that folder and retry")
    return tok


def load_sd1_tokenizer(bpe_path: str | os.PathLike | None = None) -> Any:
    """SD1.x's CLIP tokenizer (openai/clip-vit-large-patch14) built offline, pad = end = 49407, max 77.

    The BPE file is ``bpe_path``, else env ``MACE_CLIP_BPE``, else the copy shipped in ``assets/clip``
    (``mace_ops.clip_bpe``); either override may be the ``.gz`` or a wheel/zip that contains it.
    """
    path, what = bpe_source(bpe_path)
    st = path.stat()
    key = (str(path), what, st.st_mtime_ns, st.st_size)
    d = _tokenizer_dir(*key)
    if not (d / "vocab.json").is_file():  # the on-disk cache was removed meanwhile: derive it again
        _tokenizer_dir.cache_clear()
        d = _tokenizer_dir(*key)
    return _load_from_dir(str(d))


def sd1_token_ids(prompts: Sequence[str], tokenizer: Any = None) -> list[list[int]]:
    """Token ids of each prompt, start + tokens + end, truncated/padded with 49407 to 77 (a ``TokenIds``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = tokenizer if tokenizer is not None else load_sd1_tokenizer()
    out = tok(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return [list(map(int, ids)) for ids in out["input_ids"]]


def padded_token_ids(
    prompts: Sequence[str], tokenizer: Any, pad_id: int = END_ID, max_length: int = MAX_LENGTH
) -> list[list[int]]:
    """``sd1_token_ids`` with every position after the first end token set to ``pad_id`` (OpenCLIP-H and
    bigG pad with 0): start + tokens + end, then ``pad_id`` up to ``max_length``. Positions are the same
    whatever the pad id, so alignment and the loss set S (both positional) do not depend on it."""
    if isinstance(prompts, str):
        prompts = [prompts]
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
    rows = []
    for ids in out["input_ids"]:
        ids = list(map(int, ids))
        n = unpadded_length(ids)
        rows.append(ids[:n] + [pad_id] * (len(ids) - n))
    return rows


def unpadded_length(ids: Sequence[int], end_id: int = END_ID) -> int:
    """Length up to and including the first end token (the whole sequence when there is none)."""
    ids = list(ids)
    return ids.index(end_id) + 1 if end_id in ids else len(ids)


def ids_token_count(ids: Sequence[int], end_id: int = END_ID) -> int:
    """Tokens of one encoded text without its start/end tokens (at most 75 from a truncating tokenizer)."""
    return max(unpadded_length(ids, end_id) - 2, 0)


def ids_fit(ids: Sequence[int], limit: int = MAX_LENGTH, end_id: int = END_ID) -> bool:
    """True when an encoded prompt surely fits in ``limit`` positions untruncated: its end token comes
    before the last position. A tokenizer that truncates keeps an end token at the last position, so a
    prompt that exactly fills it cannot be told from a truncated one and counts as too long."""
    return end_id in ids and unpadded_length(ids, end_id) < limit


def phrase_token_count(phrase: str, token_ids: TokenIds | None = None, end_id: int = END_ID) -> int:
    """Number of tokens of ``phrase`` without start/end tokens, as far as ``token_ids`` shows them: a
    tokenizer that truncates to 77 reports at most 75 (use ``prompt_fits`` for the limit check)."""
    return ids_token_count((token_ids or sd1_token_ids)([phrase])[0], end_id)


def prompt_fits(prompt: str, token_ids: TokenIds | None = None, end_id: int = END_ID) -> bool:
    """``ids_fit`` of ``prompt`` in 77 positions (one token of caution: 75 tokens count as too long)."""
    return ids_fit((token_ids or sd1_token_ids)([prompt])[0], MAX_LENGTH, end_id)


def align_prompt_pair(
    ids_concept: Sequence[int], ids_anchor: Sequence[int], end_id: int = END_ID
) -> tuple[Tensor, Tensor]:
    """Positions ``(pos_f, pos_g)`` pairing a concept prompt with its anchor twin, outside the differing span.

    With ``L = `` unpadded length (through the first end token) of each side:
    - the longest common prefix (incl. the start token) is taken FIRST and pairs index for index, ``i <-> i``;
    - then the longest common suffix of what is left of the unpadded parts (shared words after the span,
      then the end token) and the padding after it pair in order from the end token: ``L_f - k <-> L_g - k``
      before it and ``L_f + k <-> L_g + k`` after it;
    - when the spans differ in length, the longer unpadded side has fewer padding positions; the other
      side's surplus trailing positions are dropped so both lists have the same length.
    Prefix first matters when the span repeats a neighbouring token (``"a photo of a cat"`` vs
    ``"a photo of a a cat"``): the first ``a`` after ``of`` pairs with the first, as in the reference MACE code.
    Identical prompts pair all positions. Returns two int64 tensors of equal length, ascending.
    """
    f, g = list(ids_concept), list(ids_anchor)
    lf, lg = unpadded_length(f, end_id), unpadded_length(g, end_id)
    prefix = 0
    while prefix < min(lf, lg) and f[prefix] == g[prefix]:
        prefix += 1
    # common suffix of the unpadded parts (ends with the end token), never overlapping the prefix
    suffix = 0
    while suffix < min(lf, lg) - prefix and f[lf - 1 - suffix] == g[lg - 1 - suffix]:
        suffix += 1
    pos_f = list(range(prefix))
    pos_g = list(range(prefix))
    # suffix + padding: from the suffix start to the end of the shorter tail
    tail = min(len(f) - (lf - suffix), len(g) - (lg - suffix))
    pos_f += range(lf - suffix, lf - suffix + tail)
    pos_g += range(lg - suffix, lg - suffix + tail)
    return torch.tensor(pos_f, dtype=torch.long), torch.tensor(pos_g, dtype=torch.long)


def aligned_rows(
    e_f: Tensor, e_g: Tensor, ids_f: Sequence[Sequence[int]], ids_g: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor]:
    """The aligned token rows of prompt pairs: ``e_f``, ``e_g`` (P, 77, d) encodings of P concept prompts
    and their anchor twins, ``ids_*`` their token ids -> ``(x_f, x_g)`` (m, d) each, pairs stacked in order
    (``align_prompt_pair`` per prompt)."""
    rows_f, rows_g = [], []
    for j, (a, b) in enumerate(zip(ids_f, ids_g, strict=True)):
        pf, pg = align_prompt_pair(a, b)
        rows_f.append(e_f[j, pf.to(e_f.device)])  # (m_j, d)
        rows_g.append(e_g[j, pg.to(e_g.device)])
    return torch.cat(rows_f), torch.cat(rows_g)


def strip_special(ids: Sequence[int], start_id: int = START_ID, end_id: int = END_ID) -> list[int]:
    """The tokens between the start token and the first end token."""
    ids = list(ids)[: unpadded_length(ids, end_id)]
    if ids and ids[0] == start_id:
        ids = ids[1:]
    if ids and ids[-1] == end_id:
        ids = ids[:-1]
    return ids


def phrase_positions(
    prompt_ids: Sequence[int], phrase_ids: Sequence[int], start_id: int = START_ID, end_id: int = END_ID
) -> list[int]:
    """Every index of ``prompt_ids`` covered by an occurrence of the phrase's tokens (start/end removed
    from ``phrase_ids`` when present); all occurrences, sorted, each index once."""
    phrase = strip_special(phrase_ids, start_id, end_id)
    if not phrase:
        return []
    ids = list(prompt_ids)
    n = len(phrase)
    hits: set[int] = set()
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == phrase:
            hits.update(range(i, i + n))
    return sorted(hits)
