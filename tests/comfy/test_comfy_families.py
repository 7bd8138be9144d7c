"""ComfyHost on SDXL and SD2.x models built in process with ComfyUI's own model classes (tiny, CPU).

Independent references: the diffusers host's text path (transformers CLIP models carrying the same weights
as ComfyUI's CLIP), the UNet's state-dict keys, ComfyUI's own UNet module fed a ``label_emb`` input built
here from sinusoidal embeddings, and ComfyUI's stock KSampler fed the conditioning its CLIPTextEncode makes.
"""

from __future__ import annotations

import re

import pytest
import torch

from mace_ops.family import SD2, SDXL
from mace_ops.hosts.base import matrix_names

PROMPTS = ["a photo of a cat", "an oil painting by somebody", ""]


def _host(parts):
    from mace_ops.hosts.comfy import ComfyHost

    with torch.inference_mode():
        return ComfyHost(*parts)


def _hf_encoder(comfy_encoder, *, projection: bool):
    """A transformers CLIP text model with the config and weights of one of ComfyUI's CLIP encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = {k: v.detach().clone().float() for k, v in comfy_encoder.transformer.state_dict().items()}
    emb = sd["text_model.embeddings.token_embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    from comfy.clip_model import ACTIVATIONS

    act = comfy_encoder.transformer.text_model.encoder.layers[0].mlp.activation
    (act_name,) = [name for name, fn in ACTIVATIONS.items() if fn is act]
    config = CLIPTextConfig(
        vocab_size=emb.shape[0], hidden_size=emb.shape[1], num_hidden_layers=layers, max_position_embeddings=77,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=comfy_encoder.transformer.text_model.encoder.layers[0].self_attn.heads,
        hidden_act={"gelu_pytorch_tanh": "gelu_pytorch_tanh"}.get(act_name, act_name),
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=emb.shape[1],
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    own = model.state_dict()  # transformers 5 may drop the "text_model." prefix: match either spelling
    mapped = {k: sd[k] if k in sd else sd[f"text_model.{k}"] for k in own if "position_ids" not in k}
    model.load_state_dict(mapped, strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in mapped.items())
    return model.eval()


def _diffusers_text_path(family, encoders):
    """The diffusers host's own encoding code (``DiffusersHost.encode_with_pooled``) over these encoders.
    Its UNet half needs diffusers, which the ComfyUI environment lacks: only the text path is used."""
    from mace_ops.hosts.diffusers import DiffusersHost
    from mace_ops.tokens import load_sd1_tokenizer

    host = object.__new__(DiffusersHost)
    host.__dict__.update(family=family, text_encoders=encoders, text_encoder=encoders[0], device=torch.device("cpu"),
                         max_length=77, tokenizer=load_sd1_tokenizer())
    return host


def test_family_and_blocks_come_from_the_model(sdxl_parts, sd2_parts):
    from mace_ops.hosts.comfy import comfy_block_key

    for parts, family, count in ((sdxl_parts, SDXL, 70), (sd2_parts, SD2, 16)):
        host = _host(parts)
        assert host.family is family
        keys = [k for k in parts[0].model.diffusion_model.state_dict() if k.endswith("attn2.to_k.weight")]
        blocks = host.cross_attention_blocks()
        assert [b.name for b in blocks] == [k[: -len(".to_k.weight")] for k in keys] and len(blocks) == count
        assert all(b.d_ctx == family.context_dim and b.d_out == b.heads * b.dim_head for b in blocks)
        assert list(host.cross_attention_weights()) == matrix_names([b.name for b in blocks])
    names = [b.name for b in _host(sdxl_parts).cross_attention_blocks()]
    per_layer = {}
    for n in names:
        layer = n.split(".transformer_blocks")[0]
        per_layer[layer] = per_layer.get(layer, 0) + 1
    assert per_layer == {"input_blocks.4.1": 2, "input_blocks.5.1": 2, "input_blocks.7.1": 10, "input_blocks.8.1": 10,
                         "middle_block.1": 10, **{f"output_blocks.{i}.1": 10 for i in range(3)},
                         **{f"output_blocks.{i}.1": 2 for i in range(3, 6)}}
    assert comfy_block_key("middle_block.1.transformer_blocks.9.attn2") == ("middle", 0, 9)
    assert comfy_block_key("input_blocks.8.1.transformer_blocks.7.attn2") == ("input", 8, 7)


def test_a_text_only_host_reads_the_family_from_the_clip(sdxl_parts, sd2_parts, tiny_parts):
    from mace_ops.errors import MaceError
    from mace_ops.hosts.comfy import ComfyHost

    with torch.inference_mode():
        assert ComfyHost(None, sdxl_parts[1]).family is SDXL and ComfyHost(None, sd2_parts[1]).family is SD2
        with pytest.raises(MaceError, match="CLIP input: text encoders \\['l'\\], but the MODEL is sdxl"):
            ComfyHost(sdxl_parts[0], tiny_parts[1]).encode(["a cat"])


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_encode_matches_the_diffusers_host_on_the_same_weights(family, sdxl_parts, sd2_parts):
    """Same prompts, same encoder weights: ComfyUI's CLIP through ComfyHost and transformers' CLIP through the
    diffusers host's encoding give the same context (SDXL: L ⊕ bigG penultimate, no LN; SD2: penultimate +
    LN) and the same pooled bigG; tolerance 2e-5 (float32, different kernels)."""
    parts = sdxl_parts if family == "sdxl" else sd2_parts
    host = _host(parts)
    cond = parts[1].cond_stage_model
    if family == "sdxl":
        encoders = [_hf_encoder(cond.clip_l, projection=False), _hf_encoder(cond.clip_g, projection=True)]
    else:
        encoders = [_hf_encoder(cond.clip_h, projection=False)]
    reference = _diffusers_text_path(host.family, encoders)
    with torch.inference_mode():
        states, pooled = host.encode(PROMPTS), host.encode_pooled(PROMPTS)
        ids = host.token_ids(PROMPTS)
    ref_states, ref_pooled = reference.encode_with_pooled(PROMPTS)
    assert states.shape == (3, 77, host.family.context_dim) and not states.is_inference()
    torch.testing.assert_close(states, ref_states, rtol=0, atol=2e-5)
    assert ids == reference.token_ids(PROMPTS)
    if family == "sdxl":
        assert pooled.shape == (3, 1280) and not pooled.is_inference()
        torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=2e-5)
        assert ids[0][6:] == [49407] * 71  # CLIP-L's padding; bigG's (0) is positional, never read from ids
    else:
        assert pooled is None and ref_pooled is None and ids[0][6] == 49407 and ids[0][7:] == [0] * 70


def _size_input(pooled, height, width):
    """SDXL's label_emb input built here: pooled ⊕ sinusoidal embeddings (256, cos half first) of
    (h, w, 0, 0, h, w), as ComfyUI's Timestep(256) defines them."""
    import math

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    args = sizes[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(1, -1)  # (1, 6·256)
    return torch.cat([pooled, emb.expand(pooled.shape[0], -1)], dim=-1)


def test_sdxl_instrumented_unet_matches_comfy_module_and_captures_70_blocks(sdxl_parts):
    import comfy.model_management

    from mace_ops.attention import explicit_attention

    host = _host(sdxl_parts)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.inference_mode():
        context, pooled = host.encode(["a cat", "a dog"]), host.encode_pooled(["a cat", "a dog"])
    seen = {}

    def attention(block, q, k, v, heads):
        return explicit_attention(q, k, v, heads, sink=lambda p: seen.setdefault(block, p.shape))

    with host.instrument(attention=attention) as unet:
        eps = unet(x, t, context, pooled)
    assert len(seen) == 70 and all(s[0] == 2 and s[-1] == 77 for s in seen.values())
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([sdxl_parts[0]])
        dm = sdxl_parts[0].model.diffusion_model
        y = _size_input(pooled, 64, 64)
        reference = dm(x, timesteps=t.float(), context=context, y=y, transformer_options={}).float().clone()
        other_size = dm(x, timesteps=t.float(), context=context, y=_size_input(pooled, 96, 64),
                        transformer_options={}).float().clone()
    torch.testing.assert_close(eps, reference, rtol=1e-4, atol=1e-5)
    assert (eps - other_size).abs().max() > 1e-4  # the size ids reach the UNet
    with pytest.raises(Exception, match="pooled text embedding"):
        with host.instrument() as unet:
            unet(x, t, context)


def test_sdxl_lora_gradients_flow_through_to_k(sdxl_parts):
    host = _host(sdxl_parts)
    block = host.cross_attention_blocks()[-1]
    w = host.cross_attention_weights()[f"{block.name}.to_k"]
    down = torch.zeros(1, w.shape[1], requires_grad=True)
    up = torch.full((w.shape[0], 1), 0.1)
    with torch.inference_mode():
        context, pooled = host.encode(["a cat"]), host.encode_pooled(["a cat"])
    with host.instrument(linears={f"{block.name}.to_k": lambda c: c @ (w + up @ down).T}) as unet:
        eps = unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300]),
                   context, pooled)
        eps.square().sum().backward()
    assert down.grad is not None and down.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_generate_is_stock_ksampler_with_clip_text_encode_conditioning(family, sdxl_parts, sd2_parts):
    """ComfyHost.generate equals ComfyUI's KSampler fed what its CLIPTextEncode node gives (cond + pooled;
    the sampler fills in the image size for SDXL's size ids), same seed and settings."""
    import comfy.sample

    parts = sdxl_parts if family == "sdxl" else sd2_parts
    host = _host(parts)
    model, clip, _ = parts
    with torch.inference_mode():
        images = host.generate(["a red cube"], seed=5, steps=2, cfg=5.0, height=64, width=64)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red cube"))  # what CLIPTextEncode returns
        uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        noise = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 5)
        samples = comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", cond, uncond, torch.zeros(1, 4, 8, 8),
                                      seed=5, disable_pbar=True)
        reference = host.vae_decode(model.get_model_object("latent_format").process_in(samples.float()))
    assert images.shape == (1, 3, 64, 64)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-5)
