"""ComfyHost against the real ComfyUI library (tiny SD1.x model built in code, CPU).

Checks use ComfyUI's own paths as the independent reference: its tokenizer + encoder per prompt, its
UNet module loaded with the patches by ComfyUI's model management, its state dict.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mace_ops.hosts.base import Host, matrix_names
from mace_ops.hosts.diffusers import weights_fingerprint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def host(tiny_parts):
    from mace_ops.hosts.comfy import ComfyHost

    model, clip, vae = tiny_parts
    with torch.inference_mode():
        return ComfyHost(model, clip, vae)


def _state(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def _shared_eps(patcher, x, t, context):
    """eps from ComfyUI's own UNet module, loaded (with its patches) by ComfyUI's model management."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        dm = patcher.model.diffusion_model
        return dm(x, timesteps=t.float(), context=context, transformer_options={}).float().clone()


def test_is_a_host_with_sd1_names(host, tiny_parts):
    from mace_ops.hosts.comfy import comfy_block_key

    assert isinstance(host, Host)
    blocks = host.cross_attention_blocks()
    every_attn2 = [n for n, _ in tiny_parts[0].model.diffusion_model.named_modules() if n.endswith(".attn2")]
    assert [b.name for b in blocks] == every_attn2 and any(n.startswith("middle_block.") for n in every_attn2)
    assert comfy_block_key("input_blocks.4.1.transformer_blocks.0.attn2") == ("input", 4, 0)
    assert comfy_block_key("middle_block.1.transformer_blocks.0.attn2") == ("middle", 0, 0)
    assert comfy_block_key("output_blocks.11.1.transformer_blocks.2.attn2") == ("output", 11, 2)
    assert blocks and all(b.name.endswith(".attn2") and b.d_ctx == 768 for b in blocks)
    assert all(b.d_out == b.heads * b.dim_head for b in blocks)
    assert list(host.cross_attention_weights()) == matrix_names([b.name for b in blocks])


def test_encode_matches_comfy_per_prompt(host, tiny_parts):
    _, clip, _ = tiny_parts
    prompts = ["a photo of a cat", "an oil painting by somebody", ""]
    with torch.inference_mode():
        e = host.encode(prompts)
        ref = torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts]).float()
    assert e.shape == (3, 77, 768) and e.dtype == torch.float32
    assert not e.is_inference()
    torch.testing.assert_close(e, ref, rtol=0, atol=1e-5)


def test_token_ids_are_the_host_padding(host, tiny_parts):
    _, clip, _ = tiny_parts
    ids = host.token_ids(["a dog", "a photo of a cat"])
    assert [len(i) for i in ids] == [77, 77]
    assert ids[0][0] == 49406 and ids[0][3:] == [49407] * 74  # start, "a", "dog", end + end-padding
    assert ids[1] == [t[0] for t in clip.tokenize("a photo of a cat")["l"][0]]


def test_instrument_attention_probs_and_output(host, tiny_parts):
    model, _, _ = tiny_parts
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.inference_mode():
        context = host.encode(["a cat", "a dog"])
    weights = host.cross_attention_weights()
    heads = {b.name: b.heads for b in host.cross_attention_blocks()}
    seen = {}

    def attention(block, q, k, v, n_heads):
        b, n, inner = q.shape
        d = inner // n_heads
        qh = q.reshape(b, n, n_heads, d).permute(0, 2, 1, 3)
        kh = k.reshape(b, -1, n_heads, d).permute(0, 2, 1, 3)
        vh = v.reshape(b, -1, n_heads, d).permute(0, 2, 1, 3)
        logits = torch.einsum("bhnd,bhld->bhnl", qh, kh) / math.sqrt(d)
        probs = logits.exp() / logits.exp().sum(-1, keepdim=True)  # manual softmax
        seen[block] = (n_heads, k.detach(), probs.detach())
        return torch.einsum("bhnl,bhld->bhnd", probs, vh).permute(0, 2, 1, 3).reshape(b, n, inner)

    with host.instrument(attention=attention) as unet:
        eps = unet(x, t, context)
    assert set(seen) == set(heads)
    for block, (n_heads, k, probs) in seen.items():
        assert n_heads == heads[block]
        torch.testing.assert_close(k, context @ weights[f"{block}.to_k"].T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    reference = _shared_eps(model, x, t, context)
    torch.testing.assert_close(eps, reference, rtol=1e-4, atol=1e-5)


def test_with_weights_patches_a_clone_only(host, tiny_parts):
    model, _, _ = tiny_parts
    before = _state(model)
    w0 = host.cross_attention_weights()
    g = torch.Generator().manual_seed(1)
    new = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in list(w0.items())[:4]}
    with torch.inference_mode():
        h2 = host.with_weights(new)
    got = h2.cross_attention_weights()
    for k in w0:
        torch.testing.assert_close(got[k], new.get(k, w0[k]), rtol=0, atol=1e-6)
    assert h2.model is not model and h2.model_fingerprint() == host.model_fingerprint()
    # ComfyUI itself applies the patches: its loaded module computes what our private copy computes
    torch.manual_seed(2)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.inference_mode():
        context = host.encode(["a cat"])
    with h2.instrument() as unet:
        eps = unet(x, t, context)
    torch.testing.assert_close(eps, _shared_eps(h2.model, x, t, context), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # load the original again: ComfyUI unpatches the shared module
        _shared_eps(model, x, t, context)
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, host.cross_attention_weights()[k]) for k, v in w0.items())


def test_fingerprint_is_the_checkpoints_to_k_to_v_hash(host, tiny_parts, other_tiny_model):
    model, _, _ = tiny_parts
    sd = model.model.diffusion_model.state_dict()
    names = list(host.cross_attention_weights())
    expected = weights_fingerprint({n: sd[f"{n}.weight"] for n in names}, names)
    assert host.model_fingerprint() == expected
    from mace_ops.hosts.comfy import ComfyHost

    patched = model.clone()  # a patch (a LoRA, a MACE edit) keeps the checkpoint's fingerprint
    with torch.inference_mode():
        key = f"diffusion_model.{names[0]}.weight"
        patched.add_patches({key: (torch.ones_like(sd[f"{names[0]}.weight"]),)}, 1.0, 1.0)
        assert ComfyHost(patched, tiny_parts[1]).model_fingerprint() == expected
        assert not torch.equal(ComfyHost(patched).cross_attention_weights()[names[0]], sd[f"{names[0]}.weight"])
    other = other_tiny_model()  # another checkpoint
    assert ComfyHost(other).model_fingerprint() != expected
    fp = host.text_encoder_fingerprint()
    assert len(fp) == 64 and fp == host.text_encoder_fingerprint()


def test_lora_gradient_inside_inference_mode(host):
    """As in a node: everything under torch.inference_mode(); the trainable part opts out of it."""
    w = host.cross_attention_weights()
    names = list(w)
    with torch.inference_mode():
        context = host.encode(["a photo of a cat"])
        torch.manual_seed(3)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([250])
        with torch.inference_mode(False), torch.enable_grad():
            g = torch.Generator().manual_seed(4)
            downs = {n: torch.randn(1, 768, generator=g).requires_grad_() for n in names}
            ups = {n: (0.1 * torch.randn(w[n].shape[0], 1, generator=g)).requires_grad_() for n in names}

            def linears(scale=1.0):
                return {n: (lambda c, n=n: c @ (w[n] + scale * ups[n] @ downs[n]).T) for n in names}

            def loss_of(scale=1.0):
                probs = []

                def attention(block, q, k, v, heads):
                    from mace_ops.attention import explicit_attention

                    return explicit_attention(q, k, v, heads, sink=probs.append)

                with host.instrument(linears=linears(scale), attention=attention) as unet:
                    eps = unet(x, t, context)
                return 1e-3 * eps.square().mean() + sum(p[..., 1:4].sum() for p in probs)

            loss = loss_of()
            loss.backward()
            assert all(ups[n].grad is not None and ups[n].grad.abs().sum() > 0 for n in names)
            # directional derivative along the LoRA scale vs a central finite difference
            analytic = sum((ups[n].grad * ups[n]).sum() for n in names).item()
            with torch.no_grad():
                h = 5e-2
                numeric = (loss_of(1 + h).item() - loss_of(1 - h).item()) / (2 * h)
    assert abs(numeric) > 1e-3  # a real signal, not rounding noise
    assert analytic == pytest.approx(numeric, rel=0.05)
    # the private modules are back: a plain forward ignores the LoRA again
    with host.instrument() as unet:
        plain = unet(x, t, context)
    with host.instrument(linears={n: (lambda c, n=n: c @ w[n].T) for n in names}) as unet:
        torch.testing.assert_close(unet(x, t, context), plain, rtol=1e-5, atol=1e-6)


def test_instrument_restores_on_error(host):
    sentinel = RuntimeError("boom")
    name = matrix_names([host.cross_attention_blocks()[0].name])[0]
    unet_module = host._private_unet()
    block, which = name.rsplit(".", 1)
    original = getattr(unet_module.get_submodule(block), which)
    with pytest.raises(RuntimeError, match="boom"):
        with host.instrument(linears={name: lambda c: c}):
            raise sentinel
    assert getattr(unet_module.get_submodule(block), which) is original


def test_generate_seeds_and_conditional_probe(host):
    got_cfg, got_cond = [], []
    with torch.inference_mode():
        imgs = host.generate(["a cat", "a dog"], seed=5, steps=2, cfg=7.5, height=64, width=64,
                             attention_probe=lambda b, p: got_cfg.append((b, p.clone())))
        single = host.generate(["a dog"], seed=6, steps=2, cfg=7.5, height=64, width=64)
        host.generate(["a cat", "a dog"], seed=5, steps=1, cfg=1.0, height=64, width=64,
                      attention_probe=lambda b, p: got_cond.append((b, p.clone())))
    assert imgs.shape == (2, 3, 64, 64) and imgs.min() >= -1 and imgs.max() <= 1
    torch.testing.assert_close(imgs[1:], single, rtol=0, atol=1e-4)  # prompt i uses seed + i
    n_blocks = len(host.cross_attention_blocks())
    assert len(got_cfg) == 2 * n_blocks and len(got_cond) == n_blocks
    for (b1, p1), (b2, p2) in zip(got_cfg[:n_blocks], got_cond, strict=True):
        assert b1 == b2 and p1.shape[0] == 2  # the conditional branch only, one row per prompt
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6)  # step 1: same input as cond-only


def test_vae_and_schedule(host):
    from mace_ops.tiny import sd1_alphas_cumprod

    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        lat = host.vae_encode(images)
        back = host.vae_decode(lat)
    assert lat.shape == (2, 4, 8, 8) and not lat.is_inference()
    assert back.shape == images.shape and back.min() >= -1 and back.max() <= 1
    torch.testing.assert_close(host.alphas_cumprod(), sd1_alphas_cumprod(), rtol=1e-5, atol=1e-7)


def test_comfyui_reads_the_registry_metadata(comfy_lib):
    """ComfyUI's own pyproject reader (comfy_config, used by the registry tooling) on this pack."""
    from comfy_config.config_parser import extract_node_configuration

    config = extract_node_configuration(str(ROOT))
    assert config.project.name == "mass-concept-erasure"
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.project.supported_comfyui_version.startswith(">=")
    assert config.project.license.file == "LICENSE" and config.project.urls.repository.startswith("https://")
    assert config.tool_comfy.publisher_id and config.tool_comfy.icon.endswith("docs/icon.png")
