"""Compact erasure files: truncated-SVD factors of each ΔW (``mace_ops.compact``), checked against a
matrix with a known spectrum and, through ``save_erasure`` / ``load_erasure``, against the dense ΔW."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mace_ops.compact import low_rank_factors
from mace_ops.erasure import load_erasure, save_erasure
from mace_ops.errors import MaceError
from mace_ops.pipeline import Erasure


def _known_spectrum(d_out: int, d_in: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.T


@pytest.mark.parametrize("tol", [0.3, 0.1, 0.01, 1e-4])
def test_rank_is_the_smallest_within_the_tolerance(tol):
    s = 0.8 ** torch.arange(40, dtype=torch.float64)  # known singular values
    d = _known_spectrum(64, 2048, s, seed=1)
    # independent: the Eckart-Young error of rank r is sqrt(Σ_{i≥r} s_i²); the smallest r within tol
    want = next(r for r in range(41) if float(s[r:].square().sum().sqrt()) <= tol * float(s.square().sum().sqrt()))
    up, down = low_rank_factors(d.float(), tol)
    assert up.shape == (64, max(want, 1)) and down.shape == (max(want, 1), 2048)
    err = torch.linalg.matrix_norm(d - up.double() @ down.double()) / torch.linalg.matrix_norm(d)
    assert float(err) <= tol * (1 + 1e-5) + 1e-6  # float32 factors


def test_bad_tolerance_is_refused():
    with pytest.raises(MaceError, match="relative error"):
        low_rank_factors(torch.ones(2, 2), 1.5)


def test_compact_file_round_trips_within_tolerance(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = [f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_{kv}" for i in (4, 5) for kv in "kv"]
    original = {n: torch.randn(64, 2048, generator=g) for n in names}
    s = 0.9 ** torch.arange(64, dtype=torch.float64)
    diffs = {n: _known_spectrum(64, 2048, s, seed=i).float() for i, n in enumerate(names)}
    erasure = Erasure(weights={n: original[n] + diffs[n] for n in names}, base_fingerprint="fp", concepts=[])
    dense, compact = tmp_path / "dense.safetensors", tmp_path / "compact.safetensors"
    save_erasure(erasure, original, dense)
    tol = 0.01
    save_erasure(erasure, original, compact, compact=tol)
    with safe_open(str(compact), framework="pt") as f:
        meta = json.loads(f.metadata()["mace.compact"])
        assert all(k.endswith((".lora_up.weight", ".lora_down.weight")) for k in f.keys())
    assert meta["tolerance"] == tol and set(meta["ranks"]) == set(names)
    data = sum(meta["ranks"].values()) * (64 + 2048) * 2  # float16 factors
    assert data <= compact.stat().st_size <= data + 16384 and dense.stat().st_size >= len(names) * 64 * 2048 * 4
    _, got = load_erasure(compact)
    _, exact = load_erasure(dense)
    for n in names:  # the dense file's ΔW = (W0 + D) − W0 in float32
        torch.testing.assert_close(exact[n], diffs[n], atol=1e-6, rtol=0)
        rel = torch.linalg.matrix_norm(got[n] - exact[n]) / torch.linalg.matrix_norm(exact[n])
        assert float(rel) <= tol + 2e-3, n  # + float16 storage of the factors (~2^-11 relative)
