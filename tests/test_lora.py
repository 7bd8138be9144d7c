"""LoRA bank: init, per-sample banked projection, factors, safetensors save/load and refusals."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mace_ops.errors import MaceError
from mace_ops.lora import LoRABank, load_bank, save_bank

SHAPES = {"a.attn2.to_k": (6, 12), "a.attn2.to_v": (6, 12), "b.attn2.to_k": (10, 12), "b.attn2.to_v": (10, 12)}


def _bank(concepts=("cat", "dog", "owl"), rank=2, seed=0) -> LoRABank:
    bank = LoRABank(SHAPES, list(concepts), rank, seed=seed)
    with torch.no_grad():  # non-zero ups so the LoRA term matters
        g = torch.Generator().manual_seed(1)
        for p in bank.ups:
            p.copy_(torch.randn(p.shape, generator=g))
    return bank


def _base(seed=2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def test_init_up_zero_down_std_one_over_rank():
    rank = 4
    bank = LoRABank({"m.to_k": (8, 768)}, [f"c{i}" for i in range(16)], rank)
    assert torch.count_nonzero(bank.ups[0]) == 0
    down = bank.downs[0]  # (16, 4, 768): 49k draws
    assert down.shape == (16, rank, 768)
    assert abs(down.std().item() - 1 / rank) < 0.01 * (1 / rank) * 5  # 5 % of 1/r
    assert abs(down.mean().item()) < 0.01


def test_concept_init_independent_of_bank_members():
    alone = LoRABank(SHAPES, ["dog"], 1, seed=7)
    shared = LoRABank(SHAPES, ["cat", "dog", "owl"], 1, seed=7)
    for i in range(len(SHAPES)):
        assert torch.equal(alone.downs[i][0], shared.downs[i][1])
    other_seed = LoRABank(SHAPES, ["dog"], 1, seed=8)
    assert not torch.equal(alone.downs[0], other_seed.downs[0])


def test_banked_linears_match_dense_per_sample_weights():
    bank, base = _bank(), _base()
    rows = torch.tensor([2, 0, 0, 1, 2])
    ctx = torch.randn(5, 7, 12)
    fns = bank.banked_linears(base, rows)
    for name in SHAPES:
        out = fns[name](ctx)
        assert out.shape == (5, 7, SHAPES[name][0])
        i = bank.names.index(name)
        for b, c in enumerate(rows.tolist()):
            dense = base[name].double() + bank.ups[i][c].double() @ bank.downs[i][c].double()  # (d_out, d_ctx)
            want = ctx[b].double() @ dense.T
            torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-5)


def test_banked_linears_with_precomputed_base_outputs_match_dense_weights():
    """Training passes ``W ctx`` computed once; the result must still be the dense per-sample product."""
    bank, base = _bank(), _base()
    with torch.no_grad():
        for up in bank.ups:
            up.normal_()
    rows = torch.tensor([1, 2, 0])
    ctx = torch.randn(3, 7, 12)
    fixed = {n: ctx @ w.T for n, w in base.items()}
    fns = bank.banked_linears(base, rows, fixed)
    for name in SHAPES:
        i = bank.names.index(name)
        for b, c in enumerate(rows.tolist()):
            dense = base[name].double() + bank.ups[i][c].double() @ bank.downs[i][c].double()
            torch.testing.assert_close(fns[name](ctx)[b].double(), ctx[b].double() @ dense.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(MaceError, match="base outputs"):
        bank.banked_linears(base, rows[:2], fixed)["a.attn2.to_k"](ctx[:2])


def test_banked_linears_share_one_down_product_per_context_and_recompute_for_another():
    """All matrices see the same context in a forward; a second, different context must not reuse it."""
    bank, base = _bank(), _base()
    with torch.no_grad():
        for up in bank.ups:
            up.normal_()
    rows = torch.tensor([0, 2])
    fns = bank.banked_linears(base, rows)
    for ctx in (torch.randn(2, 7, 12), torch.randn(2, 7, 12)):
        for name in SHAPES:
            i = bank.names.index(name)
            for b, c in enumerate(rows.tolist()):
                dense = base[name].double() + bank.ups[i][c].double() @ bank.downs[i][c].double()
                torch.testing.assert_close(fns[name](ctx)[b].double(), ctx[b].double() @ dense.T, rtol=1e-5, atol=1e-5)


def test_banked_gradient_reaches_only_the_samples_concepts():
    bank, base = _bank(), _base()
    rows = torch.tensor([0, 2])
    out = bank.banked_linears(base, rows)["a.attn2.to_k"](torch.randn(2, 7, 12))
    out.square().sum().backward()
    g_up = bank.ups[0].grad
    assert g_up[1].abs().sum() == 0 and g_up[0].abs().sum() > 0 and g_up[2].abs().sum() > 0
    # autograd against the dense formula for concept 2, sample 1
    ctx1 = torch.randn(1, 7, 12)
    up = bank.ups[0].detach()[2].clone().requires_grad_(True)
    down = bank.downs[0].detach()[2]
    (ctx1[0] @ (base["a.attn2.to_k"] + up @ down).T).square().sum().backward()
    bank.zero_grad()
    bank.banked_linears(base, torch.tensor([2]))["a.attn2.to_k"](ctx1).square().sum().backward()
    # float32: the bank forms down·ctx for all matrices in one product, so sums are associated differently
    torch.testing.assert_close(bank.ups[0].grad[2], up.grad, rtol=1e-4, atol=1e-4)


def test_banked_linears_refuse_bad_batches():
    bank, base = _bank(), _base()
    with pytest.raises(MaceError, match="indices"):
        bank.banked_linears(base, torch.tensor([0, 3]))
    fn = bank.banked_linears(base, torch.tensor([0, 1]))["a.attn2.to_k"]
    with pytest.raises(MaceError, match="batch of 3"):
        fn(torch.randn(3, 7, 12))


def test_factors_are_detached_copies():
    bank = _bank()
    f = bank.factors(1)
    assert set(f) == set(SHAPES)
    up, down = f["b.attn2.to_v"]
    assert up.shape == (10, 2) and down.shape == (2, 12) and not up.requires_grad
    up.zero_()
    assert bank.up("b.attn2.to_v")[1].abs().sum() > 0
    fresh = LoRABank(SHAPES, ["x", "y", "z"], 2)
    fresh.set_factors(2, bank.factors(1))
    for name in SHAPES:
        assert torch.equal(fresh.up(name)[2], bank.up(name)[1])
        assert torch.equal(fresh.down(name)[2], bank.down(name)[1])


def _meta():
    return {
        "anchors": ["a cat", "a dog", "a bird"],
        "kinds": ["object"] * 3,
        "hyper_parameters": {"lr": 1e-4, "steps": 50},
        "fingerprint": "sha256:abc",
    }


def test_save_load_round_trip(tmp_path):
    bank = _bank()
    path = save_bank(bank, tmp_path / "bank.safetensors", metadata=_meta())
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]  # no temp file left
    loaded, meta = load_bank(path, expected_fingerprint="sha256:abc", expected_shapes=SHAPES, expected_rank=2)
    assert loaded.concepts == bank.concepts and loaded.rank == 2 and loaded.names == bank.names
    for name in SHAPES:
        assert torch.equal(loaded.up(name), bank.up(name))
        assert torch.equal(loaded.down(name), bank.down(name))
    assert meta["anchors"] == _meta()["anchors"]
    assert meta["hyper_parameters"] == {"lr": 1e-4, "steps": 50}
    assert meta["shapes"] == {n: list(s) for n, s in SHAPES.items()}


def test_save_refuses_overwrite_unless_asked(tmp_path):
    path = tmp_path / "bank.safetensors"
    save_bank(_bank(seed=0), path, metadata=_meta())
    with pytest.raises(MaceError, match="exists"):
        save_bank(_bank(seed=1), path, metadata=_meta())
    save_bank(_bank(concepts=("fox",)), path, metadata=_meta(), overwrite=True)
    assert load_bank(path)[0].concepts == ["fox"]


def test_load_refuses_other_fingerprint_shapes_rank(tmp_path):
    path = save_bank(_bank(), tmp_path / "bank.safetensors", metadata=_meta())
    with pytest.raises(MaceError) as e:
        load_bank(path, expected_fingerprint="sha256:other")
    assert "sha256:abc" in str(e.value) and "sha256:other" in str(e.value)
    wrong = dict(SHAPES, **{"b.attn2.to_k": (20, 12)})
    with pytest.raises(MaceError) as e:
        load_bank(path, expected_shapes=wrong)
    assert "b.attn2.to_k" in str(e.value) and "(10, 12)" in str(e.value) and "(20, 12)" in str(e.value)
    with pytest.raises(MaceError, match="rank 2 but rank 1"):
        load_bank(path, expected_rank=1)


class _Bomb:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_pickle_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    bad = tmp_path / "bank.safetensors"
    bad.write_bytes(pickle.dumps({"x": _Bomb(str(marker))}))
    with pytest.raises(MaceError, match="pickle/zip"):
        load_bank(bad)
    assert not marker.exists()
    zipped = tmp_path / "zip.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(MaceError, match="pickle/zip"):
        load_bank(zipped)


def test_load_refuses_foreign_safetensors(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(MaceError, match="not a MACE LoRA bank"):
        load_bank(path)
