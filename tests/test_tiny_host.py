"""The tiny SD1.x-shaped models and the diffusers host over them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mace_ops.errors import MaceError
from mace_ops.hosts.base import Host, matrix_names, sd1_block_names
from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.tiny import ldm_cross_attention_names


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def _processors(unet):
    return {name: m.processor for name, m in unet.named_modules() if hasattr(m, "set_processor")}


def test_tiny_unet_has_the_sd1_block_names(tiny_sd):
    names = ldm_cross_attention_names(tiny_sd.unet)
    assert list(names.values()) == sd1_block_names()
    assert list(names)[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert names["mid_block.attentions.0.transformer_blocks.0.attn2"] == "middle_block.1.transformer_blocks.0.attn2"
    assert names["up_blocks.3.attentions.2.transformer_blocks.0.attn2"] == "output_blocks.11.1.transformer_blocks.0.attn2"
    for path in names:
        m = tiny_sd.unet.get_submodule(path)
        assert m.is_cross_attention and m.to_k.weight.shape[1] == 768


def test_ldm_names_of_a_smaller_layout():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    # LDM layout, written out by hand: input_blocks 0 conv_in, 1 res+attn, 2 downsample, 3 res;
    # middle res, attn, res; output_blocks 0, 1 (+ upsample) plain, 2, 3 res+attn
    assert list(ldm_cross_attention_names(unet).values()) == [
        "input_blocks.1.1.transformer_blocks.0.attn2",
        "middle_block.1.transformer_blocks.0.attn2",
        "output_blocks.2.1.transformer_blocks.0.attn2",
        "output_blocks.3.1.transformer_blocks.0.attn2",
    ]


def test_host_protocol_blocks_and_weights(tiny_host):
    assert isinstance(tiny_host, Host)
    blocks = tiny_host.cross_attention_blocks()
    assert [b.name for b in blocks] == sd1_block_names()
    weights = tiny_host.cross_attention_weights()
    assert list(weights) == matrix_names(sd1_block_names())
    for b in blocks:
        assert b.heads * b.dim_head == b.d_out and b.d_ctx == 768
        assert weights[f"{b.name}.to_k"].shape == (b.d_out, b.d_ctx)
    # copies: writing into them leaves the model alone
    name = f"{blocks[0].name}.to_k"
    weights[name].zero_()
    assert tiny_host.cross_attention_weights()[name].abs().sum() > 0


def test_token_ids_and_encode(tiny_host, tiny_sd):
    ids = tiny_host.token_ids(["a photo of the cat"])
    assert len(ids[0]) == 77 and ids[0][0] == 49406 and ids[0][-1] == 49407
    e = tiny_host.encode(["a photo of the cat", ""])
    assert e.shape == (2, 77, 768) and e.dtype == torch.float32 and not e.requires_grad
    # independent: the last encoder layer's output passed through the final layer norm
    with torch.no_grad():
        out = tiny_sd.text_encoder(input_ids=torch.tensor(ids), output_hidden_states=True)
        te = getattr(tiny_sd.text_encoder, "text_model", tiny_sd.text_encoder)  # transformers 4 vs 5
        expect = te.final_layer_norm(out.hidden_states[-1])
    torch.testing.assert_close(e[:1], expect)


def test_fingerprints_are_stable(tiny_host):
    a, b = tiny_host.model_fingerprint(), tiny_host.text_encoder_fingerprint()
    other = DiffusersHost.from_tiny(1)
    assert other.model_fingerprint() != a and other.text_encoder_fingerprint() != b
    again = DiffusersHost.from_tiny(0)
    assert again.model_fingerprint() == a and again.text_encoder_fingerprint() == b
    assert len(a) == 64


def test_alphas_cumprod_match_diffusers_scheduler(tiny_host):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    got = tiny_host.alphas_cumprod()
    assert got.dtype == torch.float64 and got.shape == (1000,)
    torch.testing.assert_close(got, ref.double(), rtol=1e-6, atol=1e-7)


def test_vae_encode_is_scaled_posterior_mean(tiny_host, tiny_sd):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    lat = tiny_host.vae_encode(images)
    assert lat.shape == (2, 4, 8, 8)
    with torch.no_grad():
        moments = tiny_sd.vae.quant_conv(tiny_sd.vae.encoder(images))
    torch.testing.assert_close(lat, moments[:, :4] * 0.18215)
    img = tiny_host.vae_decode(lat)
    assert img.shape == (2, 3, 64, 64) and img.min() >= -1 and img.max() <= 1


def test_instrument_default_is_the_plain_unet_and_restores(tiny_host, tiny_sd):
    unet = tiny_sd.unet
    before, procs = _state(unet), _processors(unet)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), tiny_host.encode(["a cat", "a dog"])
    t = torch.tensor([10, 700])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with tiny_host.instrument() as fn:
            assert all(
                type(m.processor).__name__ == "_MaceProcessor"
                for p, m in unet.named_modules()
                if p.endswith("attn2")
            )
            got = fn(x, t, ctx)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    assert _processors(unet) == procs
    _assert_same_state(before, unet)


def test_with_weights_equals_a_model_with_those_weights(tiny_host, tiny_sd):
    g = torch.Generator().manual_seed(1)
    base = tiny_host.cross_attention_weights()
    new = {n: w + 0.05 * torch.randn(w.shape, generator=g) for n, w in base.items()}
    other = tiny_host.with_weights(new)
    assert other.unet is tiny_host.unet
    # independent: a deep copy of the UNet with the weights written into it
    ref = copy.deepcopy(tiny_sd.unet)
    paths = {v: k for k, v in ldm_cross_attention_names(ref).items()}
    with torch.no_grad():
        for n, w in new.items():
            block, which = n.rsplit(".", 1)
            getattr(ref.get_submodule(paths[block]), which).weight.copy_(w)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), tiny_host.encode(["a cat"]), torch.tensor([300])
    before = _state(tiny_sd.unet)
    with torch.no_grad(), other.instrument() as fn:
        got = fn(x, t, ctx)
    expect = ref(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), tiny_host.instrument() as fn:
        assert not torch.allclose(fn(x, t, ctx), expect)
    _assert_same_state(before, tiny_sd.unet)
    w = other.cross_attention_weights()
    assert all(torch.equal(w[n], new[n]) for n in new)
    assert torch.equal(tiny_host.cross_attention_weights()[n], base[n])
    assert other.model_fingerprint() == tiny_host.model_fingerprint()
    with pytest.raises(MaceError, match="shape"):
        tiny_host.with_weights({n: torch.zeros(3, 768)})
    with pytest.raises(MaceError, match="unknown"):
        tiny_host.with_weights({"nope.to_k": torch.zeros(3, 768)})


def test_gradients_reach_the_linears_not_the_host(tiny_host, tiny_sd):
    name = sd1_block_names()[3] + ".to_v"
    w = tiny_host.cross_attention_weights()[name].requires_grad_(True)
    x, ctx, t = torch.randn(1, 4, 8, 8), tiny_host.encode(["a cat"]), torch.tensor([300])
    with tiny_host.instrument(linears={name: lambda c: F.linear(c, w)}) as fn:
        fn(x, t, ctx).square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_sd.unet.parameters())


def test_processors_restored_after_an_exception(tiny_host, tiny_sd):
    procs = _processors(tiny_sd.unet)
    with pytest.raises(RuntimeError, match="boom"), tiny_host.instrument() as fn:
        fn(torch.randn(1, 4, 8, 8), torch.tensor([1]), tiny_host.encode(["x"]))
        raise RuntimeError("boom")
    assert _processors(tiny_sd.unet) == procs


def test_generate_is_seeded_per_prompt(tiny_host):
    kw = {"steps": 2, "height": 64, "width": 64}
    calls = []
    a = tiny_host.generate(["a cat", "a dog"], seed=5, progress=lambda s, n: calls.append((s, n)), **kw)
    assert a.shape == (2, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert calls == [(1, 2), (2, 2)]
    b = tiny_host.generate(["a cat", "a dog"], seed=5, **kw)
    assert torch.equal(a, b)
    # prompt i uses seed + i, whatever the batch
    c = tiny_host.generate(["a dog"], seed=6, **kw)
    torch.testing.assert_close(a[1:], c, rtol=1e-4, atol=1e-4)
    d = tiny_host.generate(["a cat", "a dog"], seed=6, **kw)
    assert not torch.allclose(a, d)


def test_generate_probe_gets_the_conditional_branch(tiny_host):
    from diffusers import DDIMScheduler

    from mace_ops.attention import AttentionRecorder
    from mace_ops.hosts.diffusers import SD1_SCHEDULER_CONFIG

    seen = []
    tiny_host.generate(
        ["a photo of the cat", "a red car"], seed=3, steps=2, height=64, width=64,
        attention_probe=lambda block, p: seen.append((block, p)),
    )
    assert len(seen) == 2 * 16
    assert [b for b, _ in seen[:16]] == sd1_block_names()
    assert seen[0][1].shape == (2, 2, 64, 77)
    # independent: the first sampler step on the conditional context alone
    sched = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    sched.set_timesteps(2)
    x = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    rec = AttentionRecorder()
    with torch.no_grad(), tiny_host.instrument(attention=rec.attention) as fn:
        fn(x, sched.timesteps[0].expand(2), tiny_host.encode(["a photo of the cat", "a red car"]))
    for block, probs in seen[:16]:
        torch.testing.assert_close(probs, rec.records[block][0], rtol=1e-4, atol=1e-6)


def test_from_pretrained_reads_a_local_diffusers_folder(tiny_sd, tiny_host, tmp_path):
    tiny_sd.unet.save_pretrained(tmp_path / "unet")
    tiny_sd.text_encoder.save_pretrained(tmp_path / "text_encoder")
    tiny_sd.vae.save_pretrained(tmp_path / "vae")
    assert not list(tmp_path.rglob("*.bin"))  # safetensors only
    host = DiffusersHost.from_pretrained(tmp_path)
    assert host.model_fingerprint() == tiny_host.model_fingerprint()
    assert host.text_encoder_fingerprint() == tiny_host.text_encoder_fingerprint()
    torch.testing.assert_close(host.encode(["a cat"]), tiny_host.encode(["a cat"]))
    with pytest.raises(MaceError, match="no unet/"):
        DiffusersHost.from_pretrained(tmp_path / "unet")
