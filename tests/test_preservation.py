"""Preservation statistics against brute force, the safetensors cache, corpus and prompt files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mace_ops.concepts import OBJECT_TEMPLATES, STYLE_TEMPLATES
from mace_ops.errors import MaceError
from mace_ops.preservation import (
    cached_preservation_moments,
    default_corpus,
    preservation_moments,
    read_prompt_file,
    retained_prompts,
    state_fingerprint,
)
from mace_ops.tokens import sd1_token_ids

DIM = 16


class TinyEncoder(nn.Module):
    """A deterministic stand-in text encoder: embedding of SD1 token ids + position, then a linear layer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = nn.Embedding(49408, DIM)
        self.pos = nn.Parameter(torch.randn(77, DIM, generator=g))
        self.lin = nn.Linear(DIM, DIM)
        with torch.no_grad():
            self.tok.weight.copy_(torch.randn(49408, DIM, generator=g))
            self.lin.weight.copy_(torch.randn(DIM, DIM, generator=g))
            self.lin.bias.copy_(torch.randn(DIM, generator=g))
        self.calls = 0

    def __call__(self, prompts):  # (B,) -> (B, 77, DIM) float32
        self.calls += 1
        ids = torch.tensor(sd1_token_ids(list(prompts)))
        return self.lin(self.tok(ids) + self.pos)


PROMPTS = default_corpus()[:37] + ["a photo of Taylor Swift", "a cat"]


def _brute_force(enc: TinyEncoder, prompts) -> torch.Tensor:
    rows = [enc([p])[0].detach().double() for p in prompts]  # one prompt at a time
    e = torch.cat(rows).reshape(-1, DIM)
    return e.T @ e


def test_moments_equal_brute_force_any_batch_size():
    enc = TinyEncoder()
    expected = _brute_force(enc, PROMPTS)
    for bs in (1, 8, 64):
        m = preservation_moments(enc, PROMPTS, batch_size=bs)
        assert m.count == 77 * len(PROMPTS)
        assert m.sum.dtype == torch.float64
        torch.testing.assert_close(m.sum, expected, rtol=1e-10, atol=1e-8)


def test_progress_and_interrupt():
    enc = TinyEncoder()
    seen = []
    preservation_moments(enc, PROMPTS, batch_size=10, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(10, 39), (20, 39), (30, 39), (39, 39)]

    class Stop(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        preservation_moments(enc, PROMPTS, batch_size=10, check_interrupt=interrupt)
    with pytest.raises(MaceError, match="empty"):
        preservation_moments(enc, [])


def test_cache_hit_miss_and_corruption(tmp_path):
    enc = TinyEncoder()
    fp = state_fingerprint(enc.named_parameters())
    m1 = cached_preservation_moments(enc, PROMPTS, fingerprint=fp, cache_dir=tmp_path, batch_size=16)
    n_calls = enc.calls
    assert n_calls == 3
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    # hit: identical tensors, encoder not called
    m2 = cached_preservation_moments(enc, PROMPTS, fingerprint=fp, cache_dir=tmp_path, batch_size=16)
    assert enc.calls == n_calls
    assert torch.equal(m1.sum, m2.sum) and m1.count == m2.count
    # a changed fingerprint or prompt set misses
    other = TinyEncoder(seed=1)
    fp_other = state_fingerprint(other.named_parameters())
    assert fp_other != fp
    m3 = cached_preservation_moments(other, PROMPTS, fingerprint=fp_other, cache_dir=tmp_path, batch_size=16)
    assert other.calls == 3 and not torch.equal(m3.sum, m1.sum)
    cached_preservation_moments(enc, PROMPTS[:-1], fingerprint=fp, cache_dir=tmp_path, batch_size=16)
    assert enc.calls == n_calls + 3
    cached_preservation_moments(enc, PROMPTS[::-1], fingerprint=fp, cache_dir=tmp_path, batch_size=16)
    assert enc.calls == n_calls + 6
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    # corrupted file: ignored and rebuilt (and rewritten)
    files[0].write_bytes(b"\x00garbage" * 10)
    before = enc.calls
    m4 = cached_preservation_moments(enc, PROMPTS, fingerprint=fp, cache_dir=tmp_path, batch_size=16)
    assert enc.calls == before + 3
    torch.testing.assert_close(m4.sum, m1.sum, rtol=0, atol=0)
    cached_preservation_moments(enc, PROMPTS, fingerprint=fp, cache_dir=tmp_path, batch_size=16)
    assert enc.calls == before + 3  # rewritten file is a hit again
    # truncated file: rebuilt too
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    cached_preservation_moments(enc, PROMPTS, fingerprint=fp, cache_dir=tmp_path, batch_size=16)
    assert enc.calls == before + 6


def test_cached_values_equal_brute_force(tmp_path):
    enc = TinyEncoder()
    prompts = PROMPTS[:5]
    cached_preservation_moments(enc, prompts, fingerprint="x", cache_dir=tmp_path)
    hit = cached_preservation_moments(enc, prompts, fingerprint="x", cache_dir=tmp_path)
    torch.testing.assert_close(hit.sum, _brute_force(enc, prompts), rtol=1e-10, atol=1e-8)
    assert hit.count == 5 * 77


def test_state_fingerprint_sees_values():
    a, b = TinyEncoder(), TinyEncoder()
    assert state_fingerprint(a.named_parameters()) == state_fingerprint(b.named_parameters())
    with torch.no_grad():
        b.lin.weight[0, 0] += 1e-3
    assert state_fingerprint(a.named_parameters()) != state_fingerprint(b.named_parameters())


def test_default_corpus_size_unique_and_stable():
    c = default_corpus()
    assert len(c) >= 2000 and len(set(c)) == len(c)
    assert c == default_corpus()
    assert all(c_.strip() == c_ and c_ for c_ in c)
    # varied: many distinct first words / nouns, and all fit in 77 tokens
    assert len({s.split()[1] for s in c}) > 50
    ids = sd1_token_ids(c[:500])
    assert all(row[-1] == 49407 and row[-2] == 49407 for row in ids)


def test_read_prompt_file(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text(
        "# my prompts\n a  dog on a   beach \n\n   # indented comment\na #hashtag sign\n", encoding="utf-8"
    )
    assert read_prompt_file(p) == ["a dog on a beach", "a #hashtag sign"]
    with pytest.raises(MaceError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(MaceError, match="no prompts"):
        read_prompt_file(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MaceError, match="UTF-8"):
        read_prompt_file(tmp_path / "b.txt")


def test_retained_prompts():
    ps = retained_prompts(["Aaron Paul", "Alec  Baldwin"], "object")
    assert len(ps) == 2 * len(OBJECT_TEMPLATES)
    assert ps[0] == OBJECT_TEMPLATES[0].format("Aaron Paul")
    assert ps[len(OBJECT_TEMPLATES)] == OBJECT_TEMPLATES[0].format("Alec Baldwin")
    assert len(retained_prompts(["Monet"], "style")) == len(STYLE_TEMPLATES)
    with pytest.raises(MaceError, match="unknown concept kind"):
        retained_prompts(["x"], "thing")
