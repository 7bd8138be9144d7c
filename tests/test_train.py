"""Attention-map loss, token positions and the LoRA training loop on the tiny SD-shaped host."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _host_checks import assert_same_training, attention_processors, host_state

import mace_ops.train as train_module
from mace_ops.concepts import Concept
from mace_ops.data import ConceptData
from mace_ops.errors import MaceError
from mace_ops.io import read_safetensors
from mace_ops.lora import load_bank, save_bank
from mace_ops.tokens import sd1_token_ids
from mace_ops.train import TrainConfig, attention_map_loss, concept_token_positions, train_concept_loras


def _brute_force_loss(probs, mask, positions, squared):
    out = []
    for b in range(probs.shape[0]):
        total = 0.0
        for h in range(probs.shape[1]):
            for n in range(probs.shape[2]):
                if not mask[b, n]:
                    continue
                for s in range(probs.shape[3]):
                    if positions[b, s]:
                        total += float(probs[b, h, n, s]) ** 2
        out.append(total if squared else total**0.5)
    return torch.tensor(out, dtype=torch.float64)


def test_attention_map_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 2, 6, 9, generator=g, dtype=torch.float64).softmax(-1)
    mask = torch.rand(3, 6, generator=g) > 0.4
    positions = torch.rand(3, 9, generator=g) > 0.5
    mask[2] = False  # an empty mask: loss 0, finite gradient
    for squared in (False, True):
        got = attention_map_loss(probs, mask, positions, squared=squared)
        torch.testing.assert_close(got, _brute_force_loss(probs, mask, positions, squared), rtol=1e-12, atol=1e-12)
    p = probs.clone().requires_grad_(True)
    attention_map_loss(p, mask, positions).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad[2].abs().sum() == 0


def test_attention_map_loss_gradient_matches_autograd_of_brute_force():
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64).softmax(-1)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    a = probs.clone().requires_grad_(True)
    attention_map_loss(a, mask, positions).sum().backward()
    b = probs.clone().requires_grad_(True)
    sel = b * mask[:, None, :, None] * positions[:, None, None, :]
    sel.flatten(1).norm(dim=1).sum().backward()  # independent: masked Frobenius norm per sample
    torch.testing.assert_close(a.grad, b.grad)


def test_token_positions_phrase_plus_end_and_padding():
    prompt = "a photo of the Taylor Swift"
    ids = sd1_token_ids([prompt])[0]
    phrase = sd1_token_ids(["Taylor Swift"])[0][1:3]
    assert ids[5:7] == phrase and ids[7] == 49407  # <start> a photo of the taylor swift <end> <pad...>
    with_end = concept_token_positions(sd1_token_ids, prompt, "Taylor Swift")
    assert with_end.nonzero().flatten().tolist() == list(range(5, 77))
    only = concept_token_positions(sd1_token_ids, prompt, "Taylor Swift", include_end_tokens=False)
    assert only.nonzero().flatten().tolist() == [5, 6]


# --------------------------------------------------------------------------------------------------
# Training loop on the tiny host (8×8 latents, a few steps)

PHRASES = ("cat", "golden retriever", "owl")


def _data(phrases=PHRASES, n=3, hw=8, seed=0) -> list[ConceptData]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(phrases):
        latents = torch.randn(n, 4, hw, hw, generator=g)
        masks = (torch.rand(n, hw, hw, generator=g) > 0.3) if i != 1 else None  # one concept without masks
        out.append(ConceptData(concept=Concept(p, "a thing", "object"), images=None, latents=latents, masks=masks))
    return out


def _config(**kw) -> TrainConfig:
    base = {"steps": 4, "lr": 1e-2, "seed": 0}  # large lr: visible progress in a few steps
    return TrainConfig(**{**base, **kw})


def test_training_lowers_loss_and_changes_only_the_loras(tiny_host):
    before = host_state(tiny_host)
    procs = attention_processors(tiny_host)
    data = _data(PHRASES[:1])
    bank, losses = train_concept_loras(tiny_host, data, _config(steps=8))
    curve = losses["cat"]
    assert len(curve) == 8 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-2:]) / 2 < 0.8 * sum(curve[:2]) / 2  # observed 8.7 -> 4.5 (means of 2)
    after = host_state(tiny_host)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical base model
    assert all(p.grad is None and not p.requires_grad for p in tiny_host.unet.parameters())
    assert attention_processors(tiny_host) == procs
    ups = [p for p in bank.ups]
    assert any(p.abs().sum() > 0 for p in ups)  # started at 0, moved


def test_base_weights_default_and_given_agree(tiny_host):
    data = _data(PHRASES[:1])
    a, la = train_concept_loras(tiny_host, data, _config(steps=1))
    b, lb = train_concept_loras(tiny_host, data, _config(steps=1), base_weights=tiny_host.cross_attention_weights())
    assert la == lb
    shifted = {k: w * 1.5 for k, w in tiny_host.cross_attention_weights().items()}
    _, lc = train_concept_loras(tiny_host, data, _config(steps=1), base_weights=shifted)
    assert lc != la  # the LoRA sits on the given weights


def test_hooks_removed_after_exception_in_loop(tiny_host):
    procs = attention_processors(tiny_host)

    def progress(step, total, phrase, loss):
        if step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train_concept_loras(tiny_host, _data(PHRASES[:2]), _config(concepts_per_batch=1), progress=progress)
    assert attention_processors(tiny_host) == procs
    assert all(p.grad is None for p in tiny_host.unet.parameters())


def test_three_concepts_batched_equal_three_separate_runs(tiny_host):
    data = _data()
    cfg = _config(steps=3)
    batched, lb = train_concept_loras(tiny_host, data, cfg)
    separate = [train_concept_loras(tiny_host, [d], cfg) for d in data]
    for i, phrase in enumerate(PHRASES):
        bank_i, losses_i = separate[i]
        # float32; only the batch size of the UNet forward differs -> rounding. Tolerance: 1e-4 relative
        # on the losses, 5e-5 absolute on factors of size ~1e-1 (observed max diff ~1e-5 after 10 steps).
        torch.testing.assert_close(torch.tensor(lb[phrase]), torch.tensor(losses_i[phrase]), rtol=1e-4, atol=1e-5)
        fb, fs = batched.factors(i), bank_i.factors(0)
        for name in fb:
            torch.testing.assert_close(fb[name][0], fs[name][0], rtol=0, atol=5e-5)
            torch.testing.assert_close(fb[name][1], fs[name][1], rtol=0, atol=5e-5)


def test_batch_size_above_one_and_inference_mode_caller(tiny_host):
    with torch.inference_mode():
        bank, losses = train_concept_loras(tiny_host, _data(PHRASES[:2]), _config(steps=2, batch_size=2))
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in losses.values())
    assert bank.up("input_blocks.1.1.transformer_blocks.0.attn2.to_k").abs().sum() > 0


def test_diverging_concept_is_named_and_others_kept(tiny_host, tmp_path):
    data = _data(PHRASES[:2])
    data[1].latents[0, 0, 0, 0] = float("nan")
    data[1].latents[1:] = float("nan")
    seen = []
    with pytest.raises(MaceError, match="golden retriever") as e:
        train_concept_loras(
            tiny_host, data, _config(steps=2, batch_size=2), cache_dir=tmp_path,
            progress=lambda s, t, p, loss: seen.append(p),
        )
    assert "'cat'" not in str(e.value)
    assert seen.count("cat") == 2 and "golden retriever" not in seen
    assert len(list(tmp_path.glob("lora-cat-*.safetensors"))) == 1


def test_resume_skips_finished_concepts(tiny_host, tmp_path):
    data = _data(PHRASES[:2])
    cfg = _config(steps=2, concepts_per_batch=1)
    full, full_losses = train_concept_loras(tiny_host, data, cfg)

    class Stop(Exception):
        pass

    seen: list[str] = []

    def interrupt_on_second(step, total, phrase, loss):
        seen.append(phrase)

    def check():
        if "golden retriever" in seen:
            raise Stop

    with pytest.raises(Stop):
        train_concept_loras(tiny_host, data, cfg, cache_dir=tmp_path, progress=interrupt_on_second, check_interrupt=check)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # only the finished concept

    (cat_file,) = tmp_path.glob("*.safetensors")
    cat_tensors, _ = read_safetensors(cat_file)

    seen.clear()
    bank, losses = train_concept_loras(tiny_host, data, cfg, cache_dir=tmp_path, progress=interrupt_on_second)
    assert set(seen) == {"golden retriever"} and len(seen) == 2  # "cat" came from the cache
    for name, (up, down) in bank.factors(0).items():  # read back from its file: bit-identical
        assert torch.equal(up, cat_tensors[f"{name}.up"]) and torch.equal(down, cat_tensors[f"{name}.down"])
    assert_same_training(full, full_losses, bank, losses)  # trained again: equal up to float32 rounding

    seen.clear()
    train_concept_loras(tiny_host, data, cfg, cache_dir=tmp_path, progress=interrupt_on_second)
    assert seen == []  # all cached: no training
    seen.clear()
    train_concept_loras(tiny_host, data, _config(steps=1, lr=2e-2, concepts_per_batch=1), cache_dir=tmp_path,
                        progress=interrupt_on_second)
    assert set(seen) == {"cat", "golden retriever"}  # another config: nothing reused


def test_a_group_interrupted_mid_run_goes_on_from_its_checkpoint(tiny_host, tmp_path, monkeypatch):
    """3 concepts in one group, 6 steps: a checkpoint every 2 steps, so a stop after step 3 costs one step."""
    monkeypatch.setattr(train_module, "CHECKPOINT_MIN_SECONDS", 0.0)  # tiny steps: no time floor
    data = _data(PHRASES)
    cfg = _config(steps=6)
    full, full_losses = train_concept_loras(tiny_host, data, cfg)

    class Stop(Exception):
        pass

    calls = []

    def stop_after_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        train_concept_loras(tiny_host, data, cfg, cache_dir=tmp_path, check_interrupt=stop_after_third_step)
    (checkpoint,) = tmp_path.glob("group-*.safetensors")  # no concept finished, one group checkpoint
    saved = json.loads(read_safetensors(checkpoint)[1]["losses"])
    assert [len(row) for row in saved] == [2, 2, 2]  # written after step 2 (every ceil(6 / 3) steps)

    steps: list[tuple[int, str]] = []
    bank, losses = train_concept_loras(tiny_host, data, cfg, cache_dir=tmp_path,
                                       progress=lambda step, total, phrase, loss: steps.append((step, phrase)))
    assert len(steps) == 4 * 3 and steps[0][0] == 2 * 3 + 1  # steps 3..6 of each concept, counted on from 6
    assert [losses[p][:2] for p in PHRASES] == saved  # the first two steps come from the checkpoint
    assert_same_training(full, full_losses, bank, losses)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["lora"] * 3  # checkpoint removed


def test_trained_bank_round_trip_with_host_fingerprint(tiny_host, tmp_path):
    bank, _ = train_concept_loras(tiny_host, _data(PHRASES[:2]), _config(steps=2))
    fp = tiny_host.model_fingerprint()
    path = save_bank(bank, tmp_path / "bank.safetensors", metadata={"fingerprint": fp, "anchors": ["a thing"] * 2})
    shapes = {n: tuple(w.shape) for n, w in tiny_host.cross_attention_weights().items()}
    loaded, meta = load_bank(path, expected_fingerprint=fp, expected_shapes=shapes)
    assert meta["concepts"] == list(PHRASES[:2])
    for i in range(2):
        for name, (up, down) in bank.factors(i).items():
            assert torch.equal(loaded.factors(i)[name][0], up) and torch.equal(loaded.factors(i)[name][1], down)
    with pytest.raises(MaceError, match=fp[:12]):
        load_bank(path, expected_fingerprint="0" * 64)
