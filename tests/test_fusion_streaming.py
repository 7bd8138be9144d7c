"""Fusion's streamed, low-rank solve (``FusionProblem.solve``) against independent computations.

The solve forms ``W* = W1 + (W0 − W1)(P K⁻¹) + ups (rows K⁻¹)`` one matrix at a time, folding a matrix's
concept factors into a dense ``U`` once they outgrow it. References here: the pre-issue-13 formula
``W* = W1 + (U + (W0 − W1) P) K⁻¹`` with a dense ``U = Σ_i up_i down_i G_i`` and one LU solve
(``torch.linalg.solve``), and ``torch.linalg.lstsq`` on the stacked samples. Tolerances are relative to
the largest entry of the reference and stated at each check.
"""

from __future__ import annotations

import pytest
import torch

from mace_ops.closed_form import FusionProblem, Preservation
from mace_ops.statistics import SecondMoment

F64 = torch.float64
# float64 rounding of two different orderings of the same solve on systems with cond(K) ~ 1e2..1e3
ROUNDING_RTOL = 1e-12


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.to(F64) - ref).abs().max()) / float(ref.abs().max())


def _problem_data(seed: int, shapes: dict[str, int], ranks: dict[str, int], dim: int, n_concepts: int,
                  tokens: int, pres_tokens: int):
    g = _gen(seed)
    w0 = {n: torch.randn(r, dim, generator=g, dtype=F64) * dim**-0.5 for n, r in shapes.items()}
    w1 = {n: w + 0.05 * torch.randn(w.shape, generator=g, dtype=F64) * dim**-0.5 for n, w in w0.items()}
    concepts = [torch.randn(tokens, dim, generator=g, dtype=F64) for _ in range(n_concepts)]
    loras = [
        {n: (0.1 * torch.randn(r, ranks[n], generator=g, dtype=F64), torch.randn(ranks[n], dim, generator=g, dtype=F64))
         for n, r in shapes.items()}
        for _ in range(n_concepts)
    ]
    pres = [Preservation(SecondMoment(dim).add(torch.randn(pres_tokens, dim, generator=g, dtype=F64)), 2.0)]
    return w0, w1, concepts, loras, pres


def _old_formula(w1, w0, concepts, loras, pres, ridge):
    """``W1 + (Σ_i up_i down_i G_i + (W0 − W1) Σ w P) K⁻¹``, ``K = Σ G_i + Σ w P + λI``, by LU."""
    grams = [e.T @ e for e in concepts]  # (d, d) each
    p = sum(grp.weight * grp.moments.mean() for grp in pres)  # (d, d)
    k = sum(grams) + p + ridge * torch.eye(grams[0].shape[0], dtype=F64)
    out = {}
    for name in w1:
        u = sum(lo[name][0] @ (lo[name][1] @ gi) for lo, gi in zip(loras, grams, strict=True))  # (d_out, d)
        rhs = u + (w0[name] - w1[name]) @ p
        out[name] = w1[name] + torch.linalg.solve(k, rhs.T).T  # K symmetric: (K⁻¹ rhsᵀ)ᵀ = rhs K⁻¹
    return out


def _fused(w1, w0, concepts, loras, pres, ridge, buffer_concepts=64):
    problem = FusionProblem(w1, w0, pres, ridge, buffer_concepts=buffer_concepts)
    for e, lo in zip(concepts, loras, strict=True):
        problem.add_concept(SecondMoment(e.shape[-1]).add(e), lo)
    return problem, problem.solve()


def test_sd1_width_equals_the_old_dense_formula_within_float64_rounding():
    """SD1.x width (d = 768) and row counts (320, 640), rank-1 LoRAs (low-rank path) and rank-300 ones
    on the 320-row matrix (folded into a dense U: 300 · (320 + 768) > 320 · 768)."""
    shapes = {"in.to_k": 320, "in.to_v": 320, "mid.to_k": 640}
    ranks = {"in.to_k": 1, "in.to_v": 300, "mid.to_k": 2}
    w0, w1, concepts, loras, pres = _problem_data(0, shapes, ranks, 768, n_concepts=3, tokens=300,
                                                  pres_tokens=1000)
    problem, out = _fused(w1, w0, concepts, loras, pres, 0.5)
    assert problem._dense[0] is None and problem._dense[1] is not None  # both paths are exercised
    ref = _old_formula(w1, w0, concepts, loras, pres, 0.5)
    for name in shapes:
        assert _rel_err(out[name], ref[name]) <= ROUNDING_RTOL, name


def test_float32_weights_round_to_the_same_float32_result():
    """float32 W0, W1 (the pipeline's dtype): the float64 answer rounded once, as before the change."""
    shapes, ranks = {"a": 48, "b": 96}, {"a": 1, "b": 4}
    w0, w1, concepts, loras, pres = _problem_data(1, shapes, ranks, 64, n_concepts=4, tokens=20, pres_tokens=200)
    w0f, w1f = ({n: w.float() for n, w in ws.items()} for ws in (w0, w1))
    _, out = _fused(w1f, w0f, concepts, loras, pres, 0.1)
    ref = _old_formula({n: w.double() for n, w in w1f.items()}, {n: w.double() for n, w in w0f.items()},
                       concepts, loras, pres, 0.1)
    for name in shapes:
        assert out[name].dtype == torch.float32
        # one float32 rounding of the float64 answer: within eps32 of each entry's magnitude
        assert float((out[name].double() - ref[name]).abs().max()) <= torch.finfo(torch.float32).eps * float(
            ref[name].abs().max()), name


@pytest.mark.parametrize("buffer_concepts", [1, 2, 64])
def test_fold_midstream_matches_lstsq(buffer_concepts):
    """Factors folded into U after some concepts, low-rank ones added after the fold: lstsq on the
    stacked samples (tokens, sqrt(w/n)·preservation tokens, sqrt(λ)·I) gives the same weights."""
    dim, shapes, ranks = 10, {"a": 6, "b": 12}, {"a": 2, "b": 1}  # fold when R > 60/16 (a), 120/22 (b)
    w0, w1, concepts, loras, pres = _problem_data(2, shapes, ranks, dim, n_concepts=5, tokens=4, pres_tokens=15)
    ridge = 0.3
    problem, out = _fused(w1, w0, concepts, loras, pres, ridge, buffer_concepts)
    assert problem._dense[0] is not None  # "a": 5 concepts × rank 2 = 10 > 3.75
    if buffer_concepts < 5:
        assert problem._low[0][1].shape[0] > 0 or problem._low[1][1].shape[0] > 0
    # P = S / n as stacked rows: a square root of the mean second moment (eigh), weight 2
    evals, evecs = torch.linalg.eigh(pres[0].moments.mean())
    root = (evecs * evals.clamp_min(0).sqrt()).T  # (d, d): rootᵀ root = P
    for name in shapes:
        rows, targets = [], []
        for e, lo in zip(concepts, loras, strict=True):
            up, down = lo[name]
            rows.append(e)
            targets.append(e @ (w1[name] + up @ down).T)
        rows.append(2.0**0.5 * root)
        targets.append(2.0**0.5 * root @ w0[name].T)
        rows.append(ridge**0.5 * torch.eye(dim, dtype=F64))
        targets.append(ridge**0.5 * w1[name].T)
        ref = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution.T
        assert _rel_err(out[name], ref) <= 1e-9, name


def test_solve_twice_is_identical_and_inputs_untouched():
    shapes, ranks = {"a": 8, "b": 16}, {"a": 1, "b": 2}
    w0, w1, concepts, loras, pres = _problem_data(3, shapes, ranks, 12, n_concepts=3, tokens=5, pres_tokens=30)
    before = {n: (w0[n].clone(), w1[n].clone()) for n in shapes}
    problem, out = _fused(w1, w0, concepts, loras, pres, 0.2)
    again = problem.solve()
    for name in shapes:
        assert torch.equal(out[name], again[name])
        assert torch.equal(w0[name], before[name][0]) and torch.equal(w1[name], before[name][1])
