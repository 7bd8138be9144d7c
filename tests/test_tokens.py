"""SD1.x tokenizer built offline, token alignment of prompt pairs, phrase positions."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mace_ops import clip_bpe, tokens
from mace_ops.clip_bpe import BPE_FILENAME, SHIPPED_BPE, clip_vocab_and_merges, find_bpe_file, read_bpe_text
from mace_ops.errors import MaceError
from mace_ops.tokens import (
    END_ID,
    START_ID,
    align_prompt_pair,
    load_sd1_tokenizer,
    phrase_positions,
    phrase_token_count,
    prompt_fits,
    sd1_token_ids,
)

S, E = START_ID, END_ID


def test_exact_ids_taylor_swift():
    ids = sd1_token_ids(["a photo of Taylor Swift"])[0]
    assert ids[:7] == [49406, 320, 1125, 539, 3961, 8229, 49407]
    assert len(ids) == 77 and ids[7:] == [49407] * 70


def test_exact_ids_cat_and_tokenizer_call():
    tok = load_sd1_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert len(tok) == 49408
    assert tok.convert_ids_to_tokens([320, 1125]) == ["a</w>", "photo</w>"]


def test_lowercase_and_whitespace_normalised():
    a, b = sd1_token_ids(["A  PHOTO of\ttaylor swift", "a photo of Taylor Swift"])
    assert a == b


def test_truncation_keeps_end_token():
    ids = sd1_token_ids(["cat " * 100])[0]
    assert len(ids) == 77 and ids[0] == S and ids[-1] == E and ids[1:-1] == [2368] * 75
    assert not prompt_fits("cat " * 100)
    # 74 tokens leave one pad; 75 tokens cannot be told from a truncated prompt and count as too long
    assert prompt_fits("cat " * 74) and not prompt_fits("cat " * 75)


def test_phrase_token_count():
    assert phrase_token_count("Taylor Swift") == 2
    assert phrase_token_count("a photo of Taylor Swift") == 5
    assert phrase_token_count("") == 0
    assert phrase_token_count("cat " * 100) == 75  # truncated view


def test_tokenizer_is_cached():
    assert load_sd1_tokenizer() is load_sd1_tokenizer()


SHIPPED_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # OpenAI CLIP's file


def test_shipped_bpe_file_is_pinned_and_licensed():
    assert SHIPPED_BPE.name == BPE_FILENAME and SHIPPED_BPE.parent.name == "clip"
    assert hashlib.sha256(SHIPPED_BPE.read_bytes()).hexdigest() == SHIPPED_SHA256
    notice = (SHIPPED_BPE.parent / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Copyright (c) 2021 OpenAI" in notice and "MIT License" in notice and SHIPPED_SHA256 in notice


def test_shipped_file_is_used_without_open_clip(monkeypatch, tmp_path):
    """No open_clip / clip package findable, no env: the shipped copy is used and tokenizes correctly."""
    real_find_spec = importlib.util.find_spec

    def no_clip_packages(name, *args, **kwargs):
        return None if name.split(".")[0] in ("open_clip", "clip") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_clip_packages)
    monkeypatch.delenv("MACE_CLIP_BPE", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert importlib.util.find_spec("open_clip") is None
    assert find_bpe_file() == SHIPPED_BPE
    tokens._tokenizer_dir.cache_clear()
    tok = load_sd1_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tmp_path / "cache" / "mace" / "clip_tokenizer").is_dir()  # derived from the shipped file just now


def test_bpe_lookup_order(monkeypatch, tmp_path):
    monkeypatch.delenv("MACE_CLIP_BPE", raising=False)
    assert find_bpe_file() == SHIPPED_BPE
    copy = tmp_path / "x.txt.gz"
    shutil.copy(SHIPPED_BPE, copy)
    monkeypatch.setenv("MACE_CLIP_BPE", str(copy))
    assert find_bpe_file() == copy
    assert find_bpe_file(SHIPPED_BPE) == SHIPPED_BPE  # the argument wins over the env
    monkeypatch.setenv("MACE_CLIP_BPE", str(tmp_path / "missing.gz"))
    with pytest.raises(MaceError, match="MACE_CLIP_BPE"):
        find_bpe_file()
    with pytest.raises(MaceError, match="does not exist"):
        find_bpe_file(tmp_path / "missing.gz")


def _wheel_with_bpe(path, member="open_clip/" + BPE_FILENAME, data=None):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("open_clip/__init__.py", "raise SystemExit('never imported')\n")
        zf.writestr(member, SHIPPED_BPE.read_bytes() if data is None else data)
    return path


def test_bpe_from_a_wheel_or_zip(monkeypatch, tmp_path):
    """A wheel/zip holding the .gz anywhere inside works as MACE_CLIP_BPE and as the argument."""
    wheel = _wheel_with_bpe(tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl")
    nested = _wheel_with_bpe(tmp_path / "bundle.zip", member="deep/er/" + BPE_FILENAME)
    expected = gzip.decompress(SHIPPED_BPE.read_bytes()).decode("utf-8")
    for source in (wheel, nested):
        assert read_bpe_text(source) == expected
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MACE_CLIP_BPE", str(wheel))
    tok = load_sd1_tokenizer()
    assert tok("a photo of Taylor Swift")["input_ids"] == [49406, 320, 1125, 539, 3961, 8229, 49407]
    monkeypatch.delenv("MACE_CLIP_BPE")
    tok2 = load_sd1_tokenizer(nested)
    assert tok2("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not any(p.name == BPE_FILENAME for p in tmp_path.rglob("*") if p.parent != tmp_path)  # not extracted


def test_bad_bpe_sources_are_refused_clearly(monkeypatch, tmp_path):
    text = tmp_path / "vocab.txt"
    text.write_text("not a vocabulary", encoding="utf-8")
    no_member = tmp_path / "other.whl"
    with zipfile.ZipFile(no_member, "w") as zf:
        zf.writestr("pkg/readme.txt", "hello")
    broken_gz = tmp_path / "broken.txt.gz"
    broken_gz.write_bytes(SHIPPED_BPE.read_bytes()[:5000])
    wrong_gz = tmp_path / "wrong.txt.gz"
    wrong_gz.write_bytes(gzip.compress(b"#version\nonly two\nlines here\n"))
    bad_member = _wheel_with_bpe(tmp_path / "bad_member.whl", data=b"PK not gzip at all")
    cases = [(text, "neither a gzip file nor a wheel/zip"), (no_member, "without " + BPE_FILENAME),
             (broken_gz, "is damaged"), (bad_member, "is damaged"), (wrong_gz, "not a valid"),
             (tmp_path, "is not a file")]
    for path, message in cases:
        monkeypatch.setenv("MACE_CLIP_BPE", str(path))
        with pytest.raises(MaceError, match=message) as err:
            load_sd1_tokenizer()
        msg = str(err.value)
        # names the variable and its value, and says how to fix it
        assert f"MACE_CLIP_BPE={str(path)!r}" in msg and "unset MACE_CLIP_BPE" in msg, msg
        with pytest.raises(MaceError, match=message):  # the same through the argument
            load_sd1_tokenizer(path)


def test_oversized_bpe_member_is_refused_unread(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_bpe, "MAX_BYTES", 1000)
    with pytest.raises(MaceError, match="larger than 1000 bytes"):
        read_bpe_text(_wheel_with_bpe(tmp_path / "big.whl"))
    with pytest.raises(MaceError, match="larger than 1000 bytes"):
        read_bpe_text(SHIPPED_BPE)


def test_clip_vocab_matches_the_tokenizer():
    """Independent check of the derivation: merges are the file's lines 1..48894 and ids follow CLIP's layout."""
    text = gzip.decompress(SHIPPED_BPE.read_bytes()).decode("utf-8")
    vocab, merges = clip_vocab_and_merges(text)
    lines = text.split("\n")
    assert merges[0] == lines[1] and merges[-1] == lines[48894] and len(vocab) == 49408
    assert vocab["a</w>"] == 320 and vocab["<|startoftext|>"] == START_ID and vocab["<|endoftext|>"] == END_ID
    assert vocab[merges[0].replace(" ", "")] == 512  # first merge follows the 2 x 256 byte tokens


def _pad(ids: list[int], n: int = 12) -> list[int]:
    return ids + [E] * (n - len(ids))


def test_align_identical_prompts_pairs_all_77():
    ids = sd1_token_ids(["a photo of Taylor Swift"])[0]
    pf, pg = align_prompt_pair(ids, ids)
    assert pf.tolist() == list(range(77)) and pg.tolist() == list(range(77))
    assert pf.dtype == torch.long


def test_align_different_span_lengths_by_hand():
    # concept: S a photo of X1 X2 X3 E ...   anchor: S a photo of Y E ...  (12 positions)
    f = _pad([S, 1, 2, 3, 91, 92, 93, E])  # end at 7, pads 8..11
    g = _pad([S, 1, 2, 3, 50, E])  # end at 5, pads 6..11
    pf, pg = align_prompt_pair(f, g)
    # prefix 0..3 <-> 0..3; end 7 <-> 5; pads 8..11 <-> 6..9; anchor pads 10, 11 dropped
    assert pf.tolist() == [0, 1, 2, 3, 7, 8, 9, 10, 11]
    assert pg.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    # swapped roles: the concept side now has the surplus pads
    pf2, pg2 = align_prompt_pair(g, f)
    assert pf2.tolist() == pg.tolist() and pg2.tolist() == pf.tolist()


def test_align_common_words_after_span():
    # "a photo of X1 X2 on stage" vs "a photo of Y on stage"
    f = _pad([S, 1, 2, 3, 91, 92, 60, 61, E])  # end at 8
    g = _pad([S, 1, 2, 3, 50, 60, 61, E])  # end at 7
    pf, pg = align_prompt_pair(f, g)
    assert pf.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert pg.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    # the paired tokens are equal on both sides
    assert [f[i] for i in pf] == [g[i] for i in pg]


def test_align_phrase_at_start_and_real_tokenizer():
    a, b = sd1_token_ids(["Taylor Swift on stage", "a woman on stage"])
    pf, pg = align_prompt_pair(a, b)
    # S | taylor swift | on stage E pad...  vs  S | a woman | on stage E pad...
    assert pf.tolist() == [0] + list(range(3, 77)) and pg.tolist() == [0] + list(range(3, 77))
    c, d = sd1_token_ids(["a photo of Taylor Swift", "a photo of a person"])
    pf, pg = align_prompt_pair(c, d)
    assert len(pf) == len(pg) == 77 - 2
    assert [c[i] for i in pf] == [d[i] for i in pg]


def test_align_prefix_and_suffix_never_overlap():
    # anchor is the concept with one token inserted: the shared token may not be used twice
    f = _pad([S, 7, 7, E], 6)
    g = _pad([S, 7, 7, 7, E], 6)
    pf, pg = align_prompt_pair(f, g)
    assert len(set(pf.tolist())) == len(pf) and len(set(pg.tolist())) == len(pg)
    # prefix first (S 7 7), then the suffix of the rest (E): the anchor's third 7 is the unpaired one
    assert pf.tolist() == [0, 1, 2, 3, 4] and pg.tolist() == [0, 1, 2, 4, 5]
    assert [f[i] for i in pf] == [g[i] for i in pg]


def _brute_force_pairs(f: list[int], g: list[int], end: int = E) -> list[tuple[int, int]]:
    """Independent statement of the rule: among all (p, s) with the first p tokens equal, the last s
    unpadded tokens equal and p + s <= min(L_f, L_g), the largest p, then the largest s; then pairs
    i <-> i below p and, from the suffix start on, position for position while both sides have one."""
    lf = next((i + 1 for i, t in enumerate(f) if t == end), len(f))
    lg = next((i + 1 for i, t in enumerate(g) if t == end), len(g))
    shortest = min(lf, lg)
    p = max(n for n in range(shortest + 1) if all(f[i] == g[i] for i in range(n)))
    s = max(n for n in range(shortest - p + 1) if all(f[lf - 1 - k] == g[lg - 1 - k] for k in range(n)))
    pairs = [(i, i) for i in range(p)]
    i, j = lf - s, lg - s
    while i < len(f) and j < len(g):
        pairs.append((i, j))
        i, j = i + 1, j + 1
    return pairs


def test_align_repeated_token_takes_the_prefix_first():
    """'a photo of a cat' vs 'a photo of a a cat' (and the reverse): the repeated 'a' after 'of' pairs
    with the first 'a' (prefix first, as the reference MACE code), and the second one is the span."""
    cat, double = sd1_token_ids(["a photo of a cat", "a photo of a a cat"])
    assert cat[:7] == [S, 320, 1125, 539, 320, 2368, E] and double[:8] == [S, 320, 1125, 539, 320, 320, 2368, E]
    for f, g in ((cat, double), (double, cat)):
        pf, pg = align_prompt_pair(f, g)
        assert list(zip(pf.tolist(), pg.tolist(), strict=True)) == _brute_force_pairs(f, g)
    pf, pg = align_prompt_pair(cat, double)
    # S a photo of a <-> same positions; cat E <-> the anchor's cat E; the anchor's position 5 is unpaired
    assert pf.tolist() == list(range(77 - 1)) and pg.tolist() == [0, 1, 2, 3, 4] + list(range(6, 77))
    pf, pg = align_prompt_pair(double, cat)
    assert pf.tolist() == [0, 1, 2, 3, 4] + list(range(6, 77)) and pg.tolist() == list(range(77 - 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 2), max_size=8), st.lists(st.integers(1, 2), max_size=8))
def test_align_matches_brute_force(body_f, body_g):
    n = 12
    f, g = _pad([S, *body_f, E], n), _pad([S, *body_g, E], n)
    pf, pg = align_prompt_pair(f, g)
    assert list(zip(pf.tolist(), pg.tolist(), strict=True)) == _brute_force_pairs(f, g)


def test_phrase_positions_all_occurrences():
    tok_ids = sd1_token_ids(["a photo of Taylor Swift with Taylor Swift", "Taylor Swift"])
    prompt, phrase = tok_ids
    assert phrase_positions(prompt, phrase) == [4, 5, 7, 8]
    assert phrase_positions(prompt, [3961, 8229]) == [4, 5, 7, 8]  # without start/end tokens too
    assert phrase_positions(prompt, sd1_token_ids(["cat"])[0]) == []
    # overlapping occurrences: each index once
    assert phrase_positions([S, 5, 5, 5, E], [5, 5]) == [1, 2, 3]
    assert phrase_positions([S, 5, E], [S, E]) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 3), max_size=10),
    st.lists(st.integers(1, 3), max_size=10),
)
def test_align_properties(body_f, body_g):
    n = 14
    f, g = _pad([S, *body_f, E], n), _pad([S, *body_g, E], n)
    pf, pg = (t.tolist() for t in align_prompt_pair(f, g))
    assert len(pf) == len(pg)
    assert pf == sorted(set(pf)) and pg == sorted(set(pg))
    assert [f[i] for i in pf] == [g[j] for j in pg]  # paired positions carry the same token
    assert pf[0] == 0 and pg[0] == 0  # start tokens pair
    ef, eg = len(body_f) + 1, len(body_g) + 1
    assert pf.index(ef) == pg.index(eg)  # end tokens pair with each other
    # the unpaired positions of each side are one contiguous span before its end token, plus dropped
    # trailing pads on the side with the longer tail
    for pos, end in ((pf, ef), (pg, eg)):
        missing = sorted(set(range(n)) - set(pos))
        inner = [i for i in missing if i < end]
        if inner:
            assert inner == list(range(inner[0], inner[-1] + 1))
        tail = [i for i in missing if i > end]
        assert tail == list(range(n - len(tail), n))
    if body_f == body_g:
        assert pf == pg == list(range(n))
