"""CFR and LoRA fusion (mace_ops.closed_form) against independent computations.

References: ``torch.linalg.lstsq`` on the explicitly stacked, weighted sample matrix (float64), and the
objective evaluated by brute force over the individual samples. Agreement tolerances are relative to the
size of the weights and stated at each check.
"""

from __future__ import annotations

import pytest
import torch

from mace_ops.closed_form import (
    FusionProblem,
    Preservation,
    cfr_right_factor,
    fuse_loras,
    refine_cross_attention,
)
from mace_ops.errors import MaceError
from mace_ops.statistics import SecondMoment

F64 = torch.float64
D = 12  # embedding dimension of the toy problems
SHAPES = {"a.to_k": 5, "a.to_v": 5, "b.to_k": 9, "b.to_v": 9}  # name -> d_out
LSTSQ_RTOL = 1e-9  # float64 solve vs float64 lstsq on well-conditioned toy problems


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {n: torch.randn(d_out, D, generator=g, dtype=F64).to(dtype) for n, d_out in SHAPES.items()}


def _moments(x: torch.Tensor, y: torch.Tensor | None = None) -> SecondMoment:
    return SecondMoment(x.shape[-1]).add(x, y)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return float((a - b).abs().max()) <= rtol * max(1.0, float(b.abs().max()))


def _lstsq(rows: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W Σ ||W a − t||² over stacked rows a (n, d) and targets t (n, d_out): W (d_out, d)."""
    a, t = torch.cat(rows), torch.cat(targets)
    return torch.linalg.lstsq(a, t, driver="gelsd").solution.T


# --------------------------------------------------------------------------------------------------
# CFR fixture: pairs (e_f, e_g), two preservation groups of different sizes, a ridge


def _cfr_data(seed: int = 0, n_pairs: int = 30):
    g = _gen(seed)
    e_f = torch.randn(n_pairs, D, generator=g, dtype=F64)
    e_g = torch.randn(n_pairs, D, generator=g, dtype=F64)
    groups = [torch.randn(n, D, generator=g, dtype=F64) for n in (40, 17)]
    weights = [0.7, 3.0]
    return e_f, e_g, groups, weights


def _cfr_stack(w0, e_f, e_g, groups, weights, ridge, pair_scale=None):
    """Stacked weighted rows for one matrix: pairs, sqrt(w/n)·e_p, sqrt(λ)·I."""
    s = torch.ones(len(e_f), 1, dtype=F64) if pair_scale is None else pair_scale[:, None]
    rows, targets = [s * e_f], [s * (e_g @ w0.T)]
    for x, w in zip(groups, weights, strict=True):
        c = (w / len(x)) ** 0.5
        rows.append(c * x)
        targets.append(c * (x @ w0.T))
    eye = torch.eye(D, dtype=F64)
    rows.append(ridge**0.5 * eye)
    targets.append(ridge**0.5 * w0.T)
    return rows, targets


def _cfr_loss(w, w0, e_f, e_g, groups, weights, ridge):
    """The CFR objective by brute force, one sample at a time."""
    loss = sum(float(((w @ f - w0 @ t) ** 2).sum()) for f, t in zip(e_f, e_g, strict=True))
    for x, wk in zip(groups, weights, strict=True):
        loss += wk / len(x) * sum(float(((w @ e - w0 @ e) ** 2).sum()) for e in x)
    return loss + ridge * float(((w - w0) ** 2).sum())


def _cfr_stats(e_f, e_g, groups, weights):
    pres = [Preservation(_moments(x), w) for x, w in zip(groups, weights, strict=True)]
    return _moments(e_g, e_f), _moments(e_f), pres


@pytest.mark.parametrize("ridge", [0.0, 0.25])
def test_cfr_matches_lstsq_on_stacked_samples(ridge):
    e_f, e_g, groups, weights = _cfr_data()
    cross, gram, pres = _cfr_stats(e_f, e_g, groups, weights)
    w0s = _weights(1)
    out = refine_cross_attention(w0s, cross, gram, pres, ridge)
    assert set(out) == set(w0s)
    for name, w0 in w0s.items():
        ref = _lstsq(*_cfr_stack(w0, e_f, e_g, groups, weights, ridge))
        assert out[name].shape == w0.shape
        assert _close(out[name], ref, LSTSQ_RTOL), name


def test_cfr_without_preservation_matches_lstsq_with_enough_pairs():
    e_f, e_g, _, _ = _cfr_data(seed=2, n_pairs=50)
    w0s = _weights(3)
    out = refine_cross_attention(w0s, _moments(e_g, e_f), _moments(e_f))
    for name, w0 in w0s.items():
        ref = _lstsq(*_cfr_stack(w0, e_f, e_g, [], [], 0.0))
        assert _close(out[name], ref, LSTSQ_RTOL), name


def test_cfr_right_factor_is_shared_and_float64():
    e_f, e_g, groups, weights = _cfr_data(seed=4)
    cross, gram, pres = _cfr_stats(e_f, e_g, groups, weights)
    m = cfr_right_factor(cross, gram, pres, 0.1)
    assert m.shape == (D, D) and m.dtype == F64
    w0 = torch.randn(7, D, dtype=F64, generator=_gen(5))  # any d_out
    ref = _lstsq(*_cfr_stack(w0, e_f, e_g, groups, weights, 0.1))
    assert _close(w0 @ m, ref, LSTSQ_RTOL)


def test_cfr_optimality_identity():
    """L(W + Δ) − L(W) = Σ_a ||Δ a||² ≥ 0 over all weighted sample vectors a (incl. the ridge)."""
    e_f, e_g, groups, weights = _cfr_data(seed=6)
    ridge = 0.3
    cross, gram, pres = _cfr_stats(e_f, e_g, groups, weights)
    w0 = torch.randn(6, D, dtype=F64, generator=_gen(7))
    w = refine_cross_attention({"m": w0}, cross, gram, pres, ridge)["m"]
    base = _cfr_loss(w, w0, e_f, e_g, groups, weights, ridge)
    g = _gen(8)
    for _ in range(4):
        delta = torch.randn(w.shape, dtype=F64, generator=g)
        quad = sum(float(((delta @ f) ** 2).sum()) for f in e_f)
        for x, wk in zip(groups, weights, strict=True):
            quad += wk / len(x) * sum(float(((delta @ e) ** 2).sum()) for e in x)
        quad += ridge * float((delta**2).sum())
        gain = _cfr_loss(w + delta, w0, e_f, e_g, groups, weights, ridge) - base
        assert gain >= 0
        assert abs(gain - quad) <= 1e-9 * max(1.0, quad)


def test_duplicated_pair_equals_doubled_weight():
    e_f, e_g, groups, weights = _cfr_data(seed=9)
    dup_f, dup_g = torch.cat([e_f, e_f[:3]]), torch.cat([e_g, e_g[:3]])  # pairs 0..2 twice
    cross, gram, pres = _cfr_stats(dup_f, dup_g, groups, weights)
    w0 = torch.randn(4, D, dtype=F64, generator=_gen(10))
    out = refine_cross_attention({"m": w0}, cross, gram, pres, 0.0)["m"]
    scale = torch.ones(len(e_f), dtype=F64)
    scale[:3] = 2.0**0.5  # weight 2 on pairs 0..2 in the stacked problem
    ref = _lstsq(*_cfr_stack(w0, e_f, e_g, groups, weights, 0.0, pair_scale=scale))
    assert _close(out, ref, LSTSQ_RTOL)


def test_preservation_weight_is_scale_free():
    """A group given every prompt twice (twice the tokens) gives the same W."""
    e_f, e_g, groups, weights = _cfr_data(seed=11)
    w0s = _weights(12)
    cross, gram, pres = _cfr_stats(e_f, e_g, groups, weights)
    once = refine_cross_attention(w0s, cross, gram, pres, 0.05)
    _, _, pres2 = _cfr_stats(e_f, e_g, [torch.cat([x, x]) for x in groups], weights)
    twice = refine_cross_attention(w0s, cross, gram, pres2, 0.05)
    assert pres2[0].moments.count == 2 * pres[0].moments.count
    for name in w0s:
        assert _close(twice[name], once[name], 1e-12)


def test_cfr_singular_system_raises():
    e_f, e_g, _, _ = _cfr_data(seed=13, n_pairs=D - 3)  # fewer pairs than dimensions
    with pytest.raises(MaceError, match="singular.*preservation.*ridge"):
        refine_cross_attention(_weights(0), _moments(e_g, e_f), _moments(e_f))
    with pytest.raises(MaceError, match="singular"):
        cfr_right_factor(SecondMoment(D), SecondMoment(D))  # no data at all
    # the same data become solvable with a ridge
    out = refine_cross_attention(_weights(0), _moments(e_g, e_f), _moments(e_f), ridge=1e-3)
    assert all(torch.isfinite(w).all() for w in out.values())


def test_cfr_bad_inputs_raise():
    e_f, e_g, groups, weights = _cfr_data(seed=14)
    cross, gram, pres = _cfr_stats(e_f, e_g, groups, weights)
    with pytest.raises(MaceError, match="'bad' has 7 input features"):
        refine_cross_attention({"bad": torch.zeros(3, 7)}, cross, gram, pres)
    with pytest.raises(MaceError, match="'flat' must be a 2-d"):
        refine_cross_attention({"flat": torch.zeros(D)}, cross, gram, pres)
    with pytest.raises(MaceError, match="weight must be a finite number >= 0"):
        cfr_right_factor(cross, gram, [Preservation(pres[0].moments, -1.0)])
    with pytest.raises(MaceError, match="ridge"):
        cfr_right_factor(cross, gram, pres, ridge=-0.1)
    with pytest.raises(MaceError, match="no tokens"):
        cfr_right_factor(cross, gram, [Preservation(SecondMoment(D), 1.0)])
    with pytest.raises(MaceError, match="preservation group 0: statistics are 5-d"):
        cfr_right_factor(cross, gram, [Preservation(SecondMoment(5).add(torch.ones(2, 5)), 1.0)])
    with pytest.raises(MaceError, match="same aligned pairs"):
        cfr_right_factor(_moments(e_g[:-1], e_f[:-1]), gram, pres)


# --------------------------------------------------------------------------------------------------
# Fusion fixture: concepts with their tokens and LoRA factors (ranks differ between matrices)


RANKS = {"a.to_k": 1, "a.to_v": 2, "b.to_k": 3, "b.to_v": 1}  # LoRA rank per matrix


def _lora(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = _gen(seed)
    return {
        n: (
            torch.randn(d_out, RANKS[n], generator=g, dtype=F64),
            torch.randn(RANKS[n], D, generator=g, dtype=F64),
        )
        for n, d_out in SHAPES.items()
    }


def _fusion_data(seed: int = 20, n_concepts: int = 5, tokens: int = 6):
    g = _gen(seed)
    concepts = [torch.randn(tokens, D, generator=g, dtype=F64) for _ in range(n_concepts)]
    loras = [_lora(seed + 1 + i) for i in range(n_concepts)]
    groups = [torch.randn(n, D, generator=g, dtype=F64) for n in (25, 9)]
    return concepts, loras, groups, [0.5, 2.0]


def _fusion_stack(name, w1, w0, concepts, loras, groups, weights, ridge):
    rows, targets = [], []
    for e, lora in zip(concepts, loras, strict=True):
        up, down = lora[name]
        rows.append(e)
        targets.append(e @ (w1 + up @ down).T)
    for x, w in zip(groups, weights, strict=True):
        c = (w / len(x)) ** 0.5
        rows.append(c * x)
        targets.append(c * (x @ w0.T))
    rows.append(ridge**0.5 * torch.eye(D, dtype=F64))
    targets.append(ridge**0.5 * w1.T)
    return rows, targets


def _fusion_loss(w, name, w1, w0, concepts, loras, groups, weights, ridge):
    loss = 0.0
    for e_i, lora in zip(concepts, loras, strict=True):
        up, down = lora[name]
        loss += sum(float(((w @ e - (w1 @ e + up @ (down @ e))) ** 2).sum()) for e in e_i)
    for x, wk in zip(groups, weights, strict=True):
        loss += wk / len(x) * sum(float(((w @ e - w0 @ e) ** 2).sum()) for e in x)
    return loss + ridge * float(((w - w1) ** 2).sum())


@pytest.mark.parametrize("ridge", [0.0, 0.4])
def test_fusion_matches_lstsq_on_stacked_samples(ridge):
    concepts, loras, groups, weights = _fusion_data()
    w1s, w0s = _weights(30), _weights(31)
    pres = [Preservation(_moments(x), w) for x, w in zip(groups, weights, strict=True)]
    out = fuse_loras(
        w1s, w0s, ((_moments(e), lora) for e, lora in zip(concepts, loras, strict=True)), pres, ridge
    )
    assert set(out) == set(w1s)
    for name in w1s:
        ref = _lstsq(*_fusion_stack(name, w1s[name], w0s[name], concepts, loras, groups, weights, ridge))
        assert _close(out[name], ref, LSTSQ_RTOL), name


def test_fusion_streaming_buffer_and_gram_tensor_agree_with_lstsq():
    """Concepts flushed in several small batches, Grams given as plain tensors."""
    concepts, loras, groups, weights = _fusion_data(seed=40, n_concepts=7, tokens=3)
    w1s, w0s = _weights(41), _weights(42)
    pres = [Preservation(_moments(x), w) for x, w in zip(groups, weights, strict=True)]
    problem = FusionProblem(w1s, w0s, pres, 0.2, buffer_concepts=3)
    for e, lora in zip(concepts, loras, strict=True):
        problem.add_concept(e.T @ e, lora)
    assert problem.num_concepts == 7
    out = problem.solve()
    again = problem.solve()
    for name in w1s:
        ref = _lstsq(*_fusion_stack(name, w1s[name], w0s[name], concepts, loras, groups, weights, 0.2))
        assert _close(out[name], ref, LSTSQ_RTOL), name
        assert torch.equal(out[name], again[name])


def test_fusion_optimality_identity():
    concepts, loras, groups, weights = _fusion_data(seed=50, n_concepts=3, tokens=4)
    ridge = 0.2
    w1s, w0s = _weights(51), _weights(52)
    pres = [Preservation(_moments(x), w) for x, w in zip(groups, weights, strict=True)]
    out = fuse_loras(
        w1s, w0s, [(_moments(e), lora) for e, lora in zip(concepts, loras, strict=True)], pres, ridge
    )
    name = "b.to_v"
    args = (name, w1s[name], w0s[name], concepts, loras, groups, weights, ridge)
    base = _fusion_loss(out[name], *args)
    g = _gen(53)
    for _ in range(4):
        delta = torch.randn(out[name].shape, dtype=F64, generator=g)
        quad = sum(float(((delta @ e) ** 2).sum()) for e_i in concepts for e in e_i)
        for x, wk in zip(groups, weights, strict=True):
            quad += wk / len(x) * sum(float(((delta @ e) ** 2).sum()) for e in x)
        quad += ridge * float((delta**2).sum())
        gain = _fusion_loss(out[name] + delta, *args) - base
        assert gain >= 0
        assert abs(gain - quad) <= 1e-9 * max(1.0, quad)


def test_one_lora_without_preservation_reproduces_it():
    """One concept with ≥ d tokens, no preservation, λ → 0: W* e = (W1 + ΔW) e on its embeddings."""
    g = _gen(60)
    e = torch.randn(3 * D, D, generator=g, dtype=F64)
    lora = _lora(61)
    w1s, w0s = _weights(62), _weights(63)
    out = fuse_loras(w1s, w0s, [(_moments(e), lora)], ridge=1e-10)
    for name, (up, down) in lora.items():
        target = e @ (w1s[name] + up @ down).T
        assert _close(e @ out[name].T, target, 1e-8), name


def test_duplicated_concept_token_equals_doubled_weight():
    concepts, loras, groups, weights = _fusion_data(seed=70, n_concepts=2, tokens=5)
    w1s, w0s = _weights(71), _weights(72)
    pres = [Preservation(_moments(x), w) for x, w in zip(groups, weights, strict=True)]
    dup = [torch.cat([concepts[0], concepts[0][:1]]), concepts[1]]  # token 0 of concept 0 twice
    out = fuse_loras(w1s, w0s, [(_moments(e), lora) for e, lora in zip(dup, loras, strict=True)], pres, 0.1)
    heavy = [concepts[0].clone(), concepts[1]]
    heavy[0][0] *= 2.0**0.5  # weight 2 on that token: stacked row and its target scale by sqrt(2)
    for name in w1s:
        ref = _lstsq(*_fusion_stack(name, w1s[name], w0s[name], heavy, loras, groups, weights, 0.1))
        assert _close(out[name], ref, LSTSQ_RTOL), name


def test_fusion_singular_system_raises():
    concepts, loras, _, _ = _fusion_data(seed=80, n_concepts=2, tokens=3)  # 6 tokens < D
    with pytest.raises(MaceError, match="fusion system.*singular.*preservation.*ridge"):
        fuse_loras(
            _weights(0), _weights(1), [(_moments(e), lo) for e, lo in zip(concepts, loras, strict=True)]
        )
    with pytest.raises(MaceError, match="singular"):
        FusionProblem(_weights(0), _weights(1)).solve()  # nothing at all


def test_fusion_bad_inputs_raise():
    w1s, w0s = _weights(90), _weights(91)
    e = torch.randn(20, D, dtype=F64, generator=_gen(92))
    gram = _moments(e)
    with pytest.raises(MaceError, match="name different matrices"):
        FusionProblem(w1s, {k: v for k, v in w0s.items() if k != "a.to_k"})
    with pytest.raises(MaceError, match="'a.to_v' has shape"):
        FusionProblem(w1s, {**w0s, "a.to_v": torch.zeros(4, D)})
    with pytest.raises(MaceError, match="input features"):
        FusionProblem({**w1s, "c": torch.zeros(3, D + 1)}, {**w0s, "c": torch.zeros(3, D + 1)})
    with pytest.raises(MaceError, match="weight must be a finite number >= 0"):
        FusionProblem(w1s, w0s, [Preservation(gram, -2.0)])
    problem = FusionProblem(w1s, w0s, ridge=1.0)
    lora = _lora(93)
    with pytest.raises(MaceError, match="concept 0: no LoRA factors for matrix 'b.to_k'"):
        problem.add_concept(gram, {k: v for k, v in lora.items() if k != "b.to_k"})
    with pytest.raises(MaceError, match="unknown matrix 'z'"):
        problem.add_concept(gram, {**lora, "z": lora["a.to_k"]})
    up, down = lora["b.to_v"]
    with pytest.raises(MaceError, match="factor for 'b.to_v' has d_out 5 but the weight has 9"):
        problem.add_concept(gram, {**lora, "b.to_v": (up[:5], down)})
    with pytest.raises(MaceError, match="factor for 'b.to_v' has 4 input features"):
        problem.add_concept(gram, {**lora, "b.to_v": (up, down[:, :4])})
    with pytest.raises(MaceError, match="up \\(d_out, r\\) and down \\(r, d\\)"):
        problem.add_concept(gram, {**lora, "b.to_v": (up, torch.cat([down, down]))})
    with pytest.raises(MaceError, match="'b.to_v' must be tensors"):
        problem.add_concept(gram, {**lora, "b.to_v": (up.tolist(), down)})
    with pytest.raises(MaceError, match="must be a pair"):
        problem.add_concept(gram, {**lora, "b.to_v": up})
    with pytest.raises(MaceError, match="Gram matrix is 5×5"):
        problem.add_concept(torch.eye(5, dtype=F64), lora)
    assert problem.num_concepts == 0  # rejected concepts leave no trace
    problem.add_concept(gram, lora)
    assert problem.num_concepts == 1


# --------------------------------------------------------------------------------------------------
# dtypes: float64 inside, input dtype outside; inputs untouched


def _ill_conditioned_cfr(seed: int):
    """Pairs whose Gram has condition number ~1e8: a float32 solve loses most digits here."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    scales = torch.logspace(0, -4, D, dtype=F64)
    e_f = torch.randn(4 * D, D, generator=g, dtype=F64) * scales @ q.T
    e_g = e_f + 0.1 * torch.randn(4 * D, D, generator=g, dtype=F64)
    return e_f, e_g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cfr_computes_in_float64_and_keeps_dtype(dtype):
    e_f, e_g = _ill_conditioned_cfr(100)
    w0s = _weights(101, dtype)
    before = {k: v.clone() for k, v in w0s.items()}
    out = refine_cross_attention(w0s, _moments(e_g, e_f), _moments(e_f))
    for name, w0 in w0s.items():
        assert out[name].dtype == dtype and out[name].shape == w0.shape
        assert torch.equal(w0, before[name])
        ref = _lstsq(*_cfr_stack(w0.to(F64), e_f, e_g, [], [], 0.0))  # float64 answer of these inputs
        # equal to the float64 answer rounded once to `dtype` (within one rounding of the output)
        assert _close(out[name].to(F64), ref, 2 * torch.finfo(dtype).eps), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fusion_computes_in_float64_and_keeps_dtype(dtype):
    concepts, loras, groups, weights = _fusion_data(seed=110)
    w1s, w0s = _weights(111, dtype), _weights(112, dtype)
    lora32 = [{k: (u.to(dtype), d.to(dtype)) for k, (u, d) in lo.items()} for lo in loras]
    pres = [Preservation(_moments(x), w) for x, w in zip(groups, weights, strict=True)]
    out = fuse_loras(w1s, w0s, [(_moments(e), lo) for e, lo in zip(concepts, lora32, strict=True)], pres, 0.0)
    loras64 = [{k: (u.to(F64), d.to(F64)) for k, (u, d) in lo.items()} for lo in lora32]
    for name in w1s:
        assert out[name].dtype == dtype
        ref = _lstsq(
            *_fusion_stack(
                name, w1s[name].to(F64), w0s[name].to(F64), concepts, loras64, groups, weights, 0.0
            )
        )
        assert _close(out[name].to(F64), ref, 2 * torch.finfo(dtype).eps), name


def test_relative_ridge_is_a_ridge_on_the_mean_eigenvalue_and_matches_lstsq():
    """``relative_ridge`` ε acts as ``λ = ε · tr(K)/d``, with tr(K) = Σ_pairs ||e_f||² + Σ_k w_k mean ||e_p||²
    counted sample by sample, for CFR; for fusion tr(K) = Σ_i Σ_e ||e||² + Σ_k w_k mean ||e_p||²."""
    eps = 1e-3
    e_f, e_g, groups, weights = _cfr_data(seed=8)
    pres_trace = sum(w / len(x) * sum(float(e @ e) for e in x) for x, w in zip(groups, weights, strict=True))
    lam = eps * (sum(float(e @ e) for e in e_f) + pres_trace) / D
    cross, gram, pres = _cfr_stats(e_f, e_g, groups, weights)
    w0s = _weights(9)
    out = refine_cross_attention(w0s, cross, gram, pres, ridge=0.0, relative_ridge=eps)
    for name, w0 in w0s.items():
        assert _close(out[name], _lstsq(*_cfr_stack(w0, e_f, e_g, groups, weights, lam)), LSTSQ_RTOL), name

    concepts, loras, groups, weights = _fusion_data(seed=40)
    pres_trace = sum(w / len(x) * sum(float(e @ e) for e in x) for x, w in zip(groups, weights, strict=True))
    lam = 0.1 + eps * (sum(float(e @ e) for c in concepts for e in c) + pres_trace) / D
    w1s, w0s = _weights(41), _weights(42)
    pres = [Preservation(_moments(x), w) for x, w in zip(groups, weights, strict=True)]
    out = fuse_loras(
        w1s, w0s, ((_moments(e), lora) for e, lora in zip(concepts, loras, strict=True)), pres,
        ridge=0.1, relative_ridge=eps,
    )
    for name in w1s:
        ref = _lstsq(*_fusion_stack(name, w1s[name], w0s[name], concepts, loras, groups, weights, lam))
        assert _close(out[name], ref, LSTSQ_RTOL), name
