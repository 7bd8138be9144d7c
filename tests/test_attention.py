"""Explicit attention and probability capture on the tiny UNet, checked against manual softmax(QKᵀ/√d)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mace_ops.attention import AttentionRecorder, explicit_attention, layer_hw, resize_mask
from mace_ops.errors import MaceError
from mace_ops.hosts.base import sd1_block_names
from mace_ops.tiny import ldm_cross_attention_names


def test_explicit_attention_matches_a_per_head_loop_and_sdpa():
    g = torch.Generator().manual_seed(0)
    b, n, L, heads, d = 2, 5, 7, 3, 4
    q = torch.randn(b, n, heads * d, generator=g, dtype=torch.float64)
    k = torch.randn(b, L, heads * d, generator=g, dtype=torch.float64)
    v = torch.randn(b, L, heads * d, generator=g, dtype=torch.float64)
    got_probs = []
    out = explicit_attention(q, k, v, heads, sink=got_probs.append)
    probs = got_probs[0]
    assert probs.shape == (b, heads, n, L)
    for i in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            scores = q[i, :, sl] @ k[i, :, sl].T / math.sqrt(d)  # (n, L)
            p = torch.exp(scores - scores.max(1, keepdim=True).values)
            p = p / p.sum(1, keepdim=True)
            torch.testing.assert_close(probs[i, h], p)
            torch.testing.assert_close(out[i, :, sl], p @ v[i, :, sl])
    split = lambda x: x.view(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    sdpa = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, -1)
    torch.testing.assert_close(out, sdpa)
    seen = []
    explicit_attention(q, k, v, heads, sink=lambda blk, p: seen.append(blk), block="blk")
    assert seen == ["blk"]


def _attn2_inputs(unet, x, t, ctx):
    """The hidden states entering every attn2 (forward pre-hooks, removed afterwards)."""
    inputs, handles = {}, []
    for path, name in ldm_cross_attention_names(unet).items():
        def hook(module, args, kwargs, name=name):
            inputs[name] = args[0] if args else kwargs["hidden_states"]

        handles.append(unet.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        for h in handles:
            h.remove()
    return inputs, out


def test_captured_probabilities_equal_manual_softmax_and_output_is_unchanged(tiny_host, tiny_sd):
    unet = tiny_sd.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    procs = {p: m.processor for p, m in unet.named_modules() if hasattr(m, "set_processor")}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])
    ctx = tiny_host.encode(["a photo of the cat", "a watercolor of a ship"])
    inputs, plain = _attn2_inputs(unet, x, t, ctx)

    rec = AttentionRecorder()
    with torch.no_grad(), tiny_host.instrument(attention=rec.attention) as fn:
        captured = fn(x, t, ctx)
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    assert list(rec.records) == sd1_block_names()
    paths = {v: k for k, v in ldm_cross_attention_names(unet).items()}
    for block in sd1_block_names():
        m = unet.get_submodule(paths[block])
        h = inputs[block].double()  # (B, N, C)
        q = h @ m.to_q.weight.double().T
        k = ctx.double() @ m.to_k.weight.double().T
        d = q.shape[-1] // m.heads
        probs = rec.records[block][0]
        assert probs.shape == (2, m.heads, h.shape[1], 77)
        for head in range(m.heads):
            sl = slice(head * d, (head + 1) * d)
            manual = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
            torch.testing.assert_close(probs[:, head].double(), manual, rtol=1e-4, atol=1e-6)
    assert {p: m.processor for p, m in unet.named_modules() if hasattr(m, "set_processor")} == procs
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recorder_keeps_conditional_half_and_selected_tokens(tiny_host):
    ctx = tiny_host.encode(["", "", "a cat", "a dog"])  # uncond first, as in guidance
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([400] * 4)
    full = AttentionRecorder()
    part = AttentionRecorder(tokens=[2, 3], conditional_half=True, blocks=sd1_block_names()[:2])
    both = lambda blk, q, k, v, heads: explicit_attention(  # noqa: E731
        q, k, v, heads, sink=lambda b, p: (full(b, p), part(b, p)), block=blk
    )
    with torch.no_grad(), tiny_host.instrument(attention=both) as fn:
        fn(x, t, ctx)
    assert list(part.records) == sd1_block_names()[:2]
    for block, ps in part.records.items():
        torch.testing.assert_close(ps[0], full.records[block][0][2:, :, :, 2:4])
    with pytest.raises(MaceError, match="conditional half"):
        AttentionRecorder(conditional_half=True)("b", torch.ones(3, 1, 1, 1))


def test_processors_restored_after_an_exception_in_the_attention(tiny_host, tiny_sd):
    procs = {p: m.processor for p, m in tiny_sd.unet.named_modules() if hasattr(m, "set_processor")}

    def failing(block, q, k, v, heads):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), tiny_host.instrument(attention=failing) as fn:
        fn(torch.randn(1, 4, 8, 8), torch.tensor([3]), tiny_host.encode(["x"]))
    assert {p: m.processor for p, m in tiny_sd.unet.named_modules() if hasattr(m, "set_processor")} == procs


@pytest.mark.parametrize("hw", [(8, 8), (8, 16), (12, 12)])
def test_layer_hw_matches_the_unet_layers(tiny_host, hw):
    h, w = hw
    rec = AttentionRecorder()
    with torch.no_grad(), tiny_host.instrument(attention=rec.attention) as fn:
        fn(torch.randn(1, 4, h, w), torch.tensor([10]), tiny_host.encode(["x"]))
    sizes = {int(ps[0].shape[2]) for ps in rec.records.values()}
    # independent: halve with ceil (stride-2 conv, padding 1) down to the deepest level
    expect, (a, b) = {}, (h, w)
    for _ in range(4):
        expect[a * b] = (a, b)
        a, b = -(-a // 2), -(-b // 2)
    assert sizes <= set(expect)
    for n in sizes:
        assert layer_hw(n, h, w) == expect[n]
    with pytest.raises(MaceError):
        layer_hw(7, 8, 8)


def _nearest_brute_force(mask, h, w):
    H, W = mask.shape[-2:]
    out = torch.zeros(mask.shape[0], h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = mask[:, (i * H) // h, (j * W) // w] > 0.5
    return out.reshape(mask.shape[0], h * w)


def test_resize_mask_is_nearest_then_threshold():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 16, 16, generator=g)
    for h, w in [(8, 8), (4, 2), (16, 16), (5, 3)]:
        got = resize_mask(mask, h, w)
        assert got.dtype == torch.bool and got.shape == (3, h * w)
        assert torch.equal(got, _nearest_brute_force(mask, h, w))
    assert torch.equal(resize_mask(mask, (4, 4)), resize_mask(mask, 4, 4))
    assert torch.equal(resize_mask(mask[0], 4, 4), resize_mask(mask, 4, 4)[:1])
    with pytest.raises(MaceError):
        resize_mask(mask, 4)
