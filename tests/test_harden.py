"""Hardening CFR against concept inversion (``mace_ops.harden``, ``closed_form.add_recovered_pairs``).

The closed form with recovered pairs is checked against ``torch.linalg.lstsq`` on stacked, weighted
rows; the recovered pairs against an independently edited text encoder; the orchestration on the tiny
model by the least-squares inequality it must satisfy; the effect on the world model by sampling.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mace_ops.closed_form import Preservation, add_recovered_pairs, refine_cross_attention
from mace_ops.concepts import Concept, concept_prompt_pairs
from mace_ops.errors import MaceError
from mace_ops.harden import HardenConfig, harden_refinement, recovered_pair_moments
from mace_ops.inversion import PLACEHOLDER, placeholder_embedding, placeholder_id
from mace_ops.pipeline import ErasureSettings, concept_pair_moments
from mace_ops.statistics import SecondMoment
from mace_ops.tokens import aligned_rows

F64 = torch.float64


def _moments(x_f: torch.Tensor, x_g: torch.Tensor) -> tuple[SecondMoment, SecondMoment]:
    cross, gram = SecondMoment(x_f.shape[1]), SecondMoment(x_f.shape[1])
    return cross.add(x_g, x_f), gram.add(x_f)


def test_recovered_pairs_closed_form_matches_lstsq():
    """W0·M(C + wC_r, G + wG_r) = argmin Σ||W e_f − W0 e_g||² + w Σ||W e_r − W0 e_g'||² + w_p mean||W e_p − W0 e_p||²
    + λ||W − W0||², solved by lstsq on the stacked rows (tolerance 1e-9 relative, float64)."""
    gen = torch.Generator().manual_seed(3)
    d, d_out, w, w_p, lam = 6, 4, 2.5, 0.7, 0.3
    W0 = torch.randn(d_out, d, generator=gen, dtype=F64)
    e_f, e_g = torch.randn(5, d, generator=gen, dtype=F64), torch.randn(5, d, generator=gen, dtype=F64)
    e_r, e_gr = torch.randn(3, d, generator=gen, dtype=F64), torch.randn(3, d, generator=gen, dtype=F64)
    e_p = torch.randn(7, d, generator=gen, dtype=F64)
    cross, gram = _moments(e_f, e_g)
    before = (cross.sum.clone(), gram.sum.clone(), cross.count)
    c2, g2 = add_recovered_pairs(cross, gram, [_moments(e_r[:2], e_gr[:2]), _moments(e_r[2:], e_gr[2:])], w)
    assert torch.equal(cross.sum, before[0]) and torch.equal(gram.sum, before[1]) and cross.count == before[2]
    assert c2.count == g2.count == 8
    got = refine_cross_attention({"m": W0}, c2, g2, [Preservation(SecondMoment(d).add(e_p), w_p)], ridge=lam)["m"]
    s_p, s_w, s_l = (w_p / 7) ** 0.5, w ** 0.5, lam ** 0.5
    A = torch.cat([e_f, s_w * e_r, s_p * e_p, s_l * torch.eye(d, dtype=F64)])  # rows a: W a ≈ target
    B = torch.cat([e_g @ W0.T, s_w * e_gr @ W0.T, s_p * e_p @ W0.T, s_l * W0.T])
    expected = torch.linalg.lstsq(A, B).solution.T  # (d_out, d)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_recovered_pairs_refuse_bad_weights_and_mismatched_statistics():
    cross, gram = _moments(torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64))
    for bad in (-1.0, float("nan")):
        with pytest.raises(MaceError, match="hardening weight"):
            add_recovered_pairs(cross, gram, [], bad)
    with pytest.raises(MaceError, match="recovered pairs 0"):
        add_recovered_pairs(cross, gram, [(SecondMoment(4), SecondMoment(5))])


def test_harden_config_refuses_bad_values_by_name():
    assert HardenConfig().check().rounds == 0
    for field, value, name in (("rounds", -1, "rounds"), ("images", 0, "images"), ("steps", 0, "steps"),
                               ("lr", 0.0, "lr"), ("weight", -1.0, "weight")):
        with pytest.raises(MaceError, match=f"harden {name}"):
            dataclasses.replace(HardenConfig(), **{field: value}).check()
    with pytest.raises(MaceError, match="harden rounds"):
        ErasureSettings(harden_rounds=-2).harden()


def test_recovered_pair_moments_equal_an_edited_text_encoder(tiny_host):
    """The pairs of '<template>(*)' with * read as v: the same as a text encoder whose table row of * is v."""
    concept = Concept("Van Gogh", "art", "style")
    v = torch.randn(768, generator=torch.Generator().manual_seed(5))
    cross, gram = recovered_pair_moments(tiny_host, concept, v)
    pairs = concept_prompt_pairs(Concept(PLACEHOLDER, "art", "style"))
    edited = copy.deepcopy(tiny_host.text_encoder)
    with torch.no_grad():
        edited.get_input_embeddings().weight[placeholder_id(tiny_host)] = v
    ids_r, ids_g = tiny_host.token_ids([f for f, _ in pairs]), tiny_host.token_ids([g for _, g in pairs])
    e_r = edited(input_ids=torch.tensor(ids_r)).last_hidden_state.double()
    x_r, x_g = aligned_rows(e_r, tiny_host.encode([g for _, g in pairs]).double(), ids_r, ids_g)
    assert gram.count == cross.count == len(x_r) == 76 * len(pairs)  # one token each side: 76 aligned positions
    torch.testing.assert_close(gram.sum, x_r.T @ x_r, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cross.sum, x_g.T @ x_r, rtol=1e-4, atol=1e-3)


def test_one_round_lowers_the_recovered_tokens_residual_and_is_seeded(tiny_host):
    """Adding the recovered pairs to CFR's objective and re-solving cannot raise their residual
    Σ||W e_r − W0 e_g||² (least squares); measured independently here; two runs are identical."""
    concepts = [Concept("Van Gogh", "art", "style")]
    W0 = {k: v.float() for k, v in tiny_host.cross_attention_weights().items()}
    cross, gram = concept_pair_moments(tiny_host, concepts)
    pres = [Preservation(SecondMoment(768).add(tiny_host.encode(["a photo of a dog", "a house"])), 0.5)]
    kw = dict(preserve=pres, ridge=0.1, sampler=dict(steps=1, height=16, width=16), seed=1)
    cfr, none = harden_refinement(tiny_host, concepts, W0, cross, gram, HardenConfig(rounds=0), **kw)
    assert none == [] and all(torch.equal(cfr[k], v) for k, v in refine_cross_attention(
        W0, cross, gram, pres, 0.1).items())
    config = HardenConfig(rounds=1, images=1, steps=2, lr=1e-2)
    hard, record = harden_refinement(tiny_host, concepts, W0, cross, gram, config, **kw)
    again, _ = harden_refinement(tiny_host, concepts, W0, cross, gram, config, **kw)
    assert all(torch.equal(hard[k], again[k]) for k in hard)
    assert [(r["round"], r["concept"]) for r in record] == [(1, "Van Gogh")]
    for r, c in zip(record, concepts, strict=True):
        pairs = concept_prompt_pairs(Concept(PLACEHOLDER, c.anchor, c.kind))
        ids_r, ids_g = tiny_host.token_ids([f for f, _ in pairs]), tiny_host.token_ids([g for _, g in pairs])
        with placeholder_embedding(tiny_host, r["vector"]):
            e_r = tiny_host.encode([f for f, _ in pairs])
        x_r, x_g = aligned_rows(e_r, tiny_host.encode([g for _, g in pairs]), ids_r, ids_g)  # (m, 768) each
        assert _residual(hard, W0, x_r, x_g) < _residual(cfr, W0, x_r, x_g), c.phrase


def _residual(W: dict, W0: dict, x_r: torch.Tensor, x_g: torch.Tensor) -> float:
    """Σ_matrices Σ_pairs ||W e_r − W0 e_g||² on the stacked rows."""
    return sum(float(((x_r.double() @ w.double().T - x_g.double() @ W0[k].double().T) ** 2).sum())
               for k, w in W.items())


def test_probe_report_says_when_an_erasure_was_hardened():
    from mace_ops.probe_cli import hardening_note

    assert hardening_note({"settings": {"harden_rounds": 0}}) is None and hardening_note({}) is None
    note = hardening_note({"settings": {"harden_rounds": 2, "harden_steps": 25, "seed": 3}})
    assert "hardened against concept inversion (2 round(s) of 25 steps" in note and "seed 50003" in note
