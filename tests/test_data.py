"""Training data: seeded images, latents, attention-derived masks, user overrides and the PNG cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mace_ops.concepts import Concept, training_prompt
from mace_ops.data import generate_training_data, quantize_images, threshold_map
from mace_ops.errors import MaceError
from mace_ops.lora import seed_from

OBJ = Concept("Taylor Swift", "a woman", "object")
STYLE = Concept("Van Gogh", "art", "style")
KW = {"n_images": 2, "steps": 2, "size": 64, "seed": 7}


class _NoSampling:
    """The host, except that sampling fails (proves a cache hit)."""

    def __init__(self, host):
        self._host = host

    def __getattr__(self, name):
        return getattr(self._host, name)

    def generate(self, *args, **kwargs):
        raise AssertionError("sampled although the cache should have been used")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def base_data(tiny_host, cache_dir):
    """Generated once (and written to ``cache_dir``); later tests reload it from there."""
    seen = []
    data = generate_training_data(
        tiny_host, [OBJ, STYLE], cache_dir=cache_dir, progress=lambda d, t, p: seen.append((d, t, p)), **KW
    )
    assert seen[-1] == (8, 8, STYLE.phrase) and seen[0] == (2, 8, OBJ.phrase)
    return data


def test_shapes_kinds_and_seeds(tiny_host, base_data):
    obj, style = base_data
    assert obj.concept == OBJ and style.concept == STYLE
    assert obj.images.shape == (2, 3, 64, 64) and obj.latents.shape == (2, 4, 8, 8)
    assert obj.masks.shape == (2, 8, 8) and 0 <= obj.masks.min() and obj.masks.max() <= 1
    assert set(obj.masks.unique().tolist()) <= {0.0, 1.0} and obj.masks.sum() > 0
    assert style.masks is None
    # independent: the host's own sampler at the documented seed, rounded to 8 bits. It attends with
    # scaled-dot-product attention, the data with explicit probabilities (to derive the masks): the two
    # differ by float rounding, which moves a value that sits on an 8-bit boundary by one level.
    s = seed_from(KW["seed"], OBJ.phrase, "data")
    ref = quantize_images(tiny_host.generate([training_prompt(OBJ)] * 2, seed=s, steps=2, height=64, width=64))
    torch.testing.assert_close(obj.images, ref, rtol=0, atol=2 / 255 + 1e-6)
    assert (obj.images != ref).float().mean() < 1e-3  # seen: 1 of 24,576 values
    torch.testing.assert_close(obj.latents, tiny_host.vae_encode(obj.images))


def test_deterministic_and_order_independent(tiny_host, base_data):
    again = generate_training_data(tiny_host, [STYLE, OBJ], **KW)
    assert torch.equal(again[1].images, base_data[0].images)
    assert torch.equal(again[1].masks, base_data[0].masks)
    assert torch.equal(again[0].latents, base_data[1].latents)
    other = generate_training_data(tiny_host, [STYLE], **{**KW, "seed": 8})
    assert not torch.equal(other[0].images, base_data[1].images)
    # one image per sampler call: same seeds, so the same images up to batch rounding (one 8-bit level)
    single = generate_training_data(tiny_host, [STYLE], batch_size=1, **KW)
    torch.testing.assert_close(single[0].images, base_data[1].images, rtol=0, atol=2 / 255 + 1e-6)


def test_mask_is_thresholded_phrase_attention(tiny_host, base_data):
    prompt = training_prompt(OBJ)
    ids = tiny_host.token_ids([prompt])[0]
    phrase = tiny_host.token_ids([OBJ.phrase])[0][1:3]  # "taylor swift": two tokens
    pos = [i for i in range(77 - 1) if ids[i : i + 2] == phrase]
    positions = [pos[0], pos[0] + 1]
    total = torch.zeros(2, 8, 8, dtype=torch.float64)

    def probe(block, probs):  # independent aggregation with explicit loops over heads and tokens
        n, heads, n_pix, _ = probs.shape
        side = int(round(n_pix**0.5))
        acc = torch.zeros(n, n_pix, dtype=torch.float64)
        for h in range(heads):
            for s in positions:
                acc += probs[:, h, :, s].double() / heads
        up = F.interpolate(acc.float().reshape(n, 1, side, side), size=(8, 8), mode="bilinear", align_corners=False)
        total.add_(up[:, 0].double())

    s = seed_from(KW["seed"], OBJ.phrase, "data")
    tiny_host.generate([prompt] * 2, seed=s, steps=2, height=64, width=64, attention_probe=probe)
    for i in range(2):
        m = total[i]
        expect = ((m - m.min()) / (m.max() - m.min()) > 0.5).float()
        assert torch.equal(base_data[0].masks[i], expect)


def test_threshold_map_flat_map_is_whole_image():
    maps = torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).reshape(3, 3)])
    got = threshold_map(maps, 0.5)
    assert torch.equal(got[0], torch.ones(3, 3))
    assert torch.equal(got[1], (torch.arange(9.0).reshape(3, 3) / 8 > 0.5).float())


def test_user_masks_and_images_override(tiny_host, base_data, cache_dir):
    host = _NoSampling(tiny_host)  # the generated images come from the cache
    big = torch.zeros(2, 64, 64)
    big[:, :32] = 1.0
    got = generate_training_data(host, [OBJ], user_masks={OBJ.phrase: big}, cache_dir=cache_dir, **KW)[0]
    assert torch.equal(got.images, base_data[0].images)
    assert torch.equal(got.masks, torch.cat([torch.ones(2, 4, 8), torch.zeros(2, 4, 8)], 1))
    small = torch.rand(2, 8, 8)
    got = generate_training_data(host, [OBJ], user_masks={OBJ.phrase: small}, cache_dir=cache_dir, **KW)[0]
    assert torch.equal(got.masks, small)

    images = torch.rand(3, 3, 32, 48) * 2 - 1
    got = generate_training_data(_NoSampling(tiny_host), [OBJ, STYLE], user_images={OBJ.phrase: images, STYLE.phrase: images}, **KW)
    assert torch.equal(got[0].images, images) and got[0].latents.shape == (3, 4, 4, 6)
    assert torch.equal(got[0].masks, torch.ones(3, 4, 6)) and got[1].masks is None


def test_bad_user_input_is_refused(tiny_host, base_data, cache_dir):
    host, kw = _NoSampling(tiny_host), {**KW, "cache_dir": cache_dir}  # generated images: from the cache
    with pytest.raises(MaceError, match=r"Taylor Swift.*\(2, 64, 64\)"):
        generate_training_data(host, [OBJ], user_masks={OBJ.phrase: torch.ones(2, 32, 32)}, **kw)
    with pytest.raises(MaceError, match="Taylor Swift"):
        generate_training_data(host, [OBJ], user_masks={OBJ.phrase: torch.ones(3, 64, 64)}, **kw)
    with pytest.raises(MaceError, match="style"):
        generate_training_data(host, [STYLE], user_masks={STYLE.phrase: torch.ones(2, 64, 64)}, **kw)
    with pytest.raises(MaceError, match="Taylor Swift"):
        generate_training_data(host, [OBJ], user_images={OBJ.phrase: torch.ones(2, 3, 60, 64)}, **kw)
    with pytest.raises(MaceError, match="not in the concept list"):
        generate_training_data(host, [OBJ], user_masks={"cat": torch.ones(2, 64, 64)}, **kw)


def test_cache_reload_is_identical(tiny_host, base_data, cache_dir):
    folder = cache_dir / "Taylor_Swift"
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "0_mask.png", "1.png", "1_mask.png", "meta.json"]
    assert json.loads((folder / "meta.json").read_text())["steps"] == 2
    assert not (cache_dir / "Van_Gogh" / "0_mask.png").exists()
    again = generate_training_data(_NoSampling(tiny_host), [OBJ, STYLE], cache_dir=cache_dir, **KW)
    for a, b in zip(base_data, again, strict=True):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.latents, b.latents)
        assert (a.masks is None and b.masks is None) or torch.equal(a.masks, b.masks)
    # different settings: the record does not match, so it samples again
    with pytest.raises(AssertionError, match="sampled"):
        generate_training_data(_NoSampling(tiny_host), [OBJ], cache_dir=cache_dir, **{**KW, "steps": 3})


def test_interrupt_propagates(tiny_host):
    calls = []

    def check():
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_training_data(tiny_host, [OBJ], check_interrupt=check, **KW)
    assert calls == [1]
