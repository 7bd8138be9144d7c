"""SD2.x and SDXL: the family description, tiny models with the real block layouts, the diffusers host
checked against diffusers' own pipelines' prompt encoding, positional token handling, every pipeline
stage on each family, and the closed forms against lstsq at SDXL's 2048-d context."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mace_ops.closed_form import Preservation, fuse_loras, refine_cross_attention
from mace_ops.concepts import Concept
from mace_ops.errors import MaceError
from mace_ops.family import SD1, SD2, SDXL, family_by_name, family_from_unet_dims
from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.pipeline import ErasureSettings, run_erasure
from mace_ops.statistics import SecondMoment
from mace_ops.tokens import align_prompt_pair, load_sd1_tokenizer, padded_token_ids, sd1_token_ids
from mace_ops.train import TrainConfig, concept_token_positions

F64 = torch.float64


@pytest.fixture(scope="module")
def sdxl_host() -> DiffusersHost:
    return DiffusersHost.from_tiny(0, family="sdxl")


@pytest.fixture(scope="module")
def sd2_host() -> DiffusersHost:
    return DiffusersHost.from_tiny(0, family="sd2")


# --------------------------------------------------------------------------------------------------
# The family description


def test_family_numbers():
    assert (SD1.context_dim, SD2.context_dim, SDXL.context_dim) == (768, 1024, 2048)
    assert [e.width for e in SDXL.encoders] == [768, 1280]  # CLIP-L first, then bigG (comfy/sdxl_clip.py)
    assert [e.pad_id for e in SDXL.encoders] == [49407, 0] and SD2.encoders[0].pad_id == 0
    assert (SDXL.pooled_dim, SDXL.adm_dim, SD1.adm_dim, SD2.adm_dim) == (1280, 2816, 0, 0)
    assert (SD1.vae_scale, SD2.vae_scale, SDXL.vae_scale) == (0.18215, 0.18215, 0.13025)
    assert SDXL.size_ids(1024, 768) == (1024, 768, 0, 0, 1024, 768)
    assert family_from_unet_dims(2048, 2816) is SDXL and family_from_unet_dims(1024, 0) is SD2
    assert family_by_name("SD1.x") is SD1 and family_by_name(SDXL) is SDXL
    with pytest.raises(MaceError, match="SDXL base"):
        family_from_unet_dims(1280, 2560)  # the SDXL refiner
    with pytest.raises(MaceError, match="supported are"):
        family_by_name("flux")


# --------------------------------------------------------------------------------------------------
# Tiny models: the real block layouts


def test_tiny_sdxl_has_the_70_block_layout(sdxl_host):
    blocks = sdxl_host.cross_attention_blocks()
    assert len(blocks) == 70 and len(sdxl_host.cross_attention_weights()) == 140
    per_block = Counter(b.name.split(".transformer_blocks")[0] for b in blocks)
    assert per_block == {
        "input_blocks.4.1": 2, "input_blocks.5.1": 2, "input_blocks.7.1": 10, "input_blocks.8.1": 10,
        "middle_block.1": 10, "output_blocks.0.1": 10, "output_blocks.1.1": 10, "output_blocks.2.1": 10,
        "output_blocks.3.1": 2, "output_blocks.4.1": 2, "output_blocks.5.1": 2,
    }
    # inside a transformer the blocks are numbered 0.. as set_model_attn2_replace does
    assert [b.name for b in blocks if b.name.startswith("middle_block")][-1].endswith("transformer_blocks.9.attn2")
    assert {b.d_ctx for b in blocks} == {2048}
    assert sum(b.d_out == 32 for b in blocks) == 10 and sum(b.d_out == 64 for b in blocks) == 60  # 640/1280 at scale
    assert sdxl_host.unet.add_embedding.linear_1.in_features == 2816
    assert sdxl_host.family is SDXL


def test_tiny_sd2_has_the_16_block_layout(sd2_host):
    blocks = sd2_host.cross_attention_blocks()
    assert len(blocks) == 16 and {b.d_ctx for b in blocks} == {1024}
    assert sd2_host.family is SD2 and sd2_host.scheduler_config["prediction_type"] == "v_prediction"


# --------------------------------------------------------------------------------------------------
# Tokens: padding ids never matter (alignment and S are positional)


PAIRS = [("a photo of Taylor Swift on stage", "a photo of a person on stage"),
         ("Taylor Swift", "a woman"), ("a photo of a cat", "a photo of a a cat")]


def test_alignment_and_loss_tokens_do_not_depend_on_the_padding_id():
    tok = load_sd1_tokenizer()
    for f, g in PAIRS:
        end_pad = sd1_token_ids([f, g], tok)
        zero_pad = padded_token_ids([f, g], tok, pad_id=0)
        assert zero_pad != end_pad and padded_token_ids([f, g], tok, pad_id=49407) == end_pad
        for a, b in zip(align_prompt_pair(*end_pad), align_prompt_pair(*zero_pad), strict=True):
            assert torch.equal(a, b)
    prompt = "a portrait of Taylor Swift"
    s_end = concept_token_positions(lambda p: sd1_token_ids(p, tok), prompt, "Taylor Swift")
    s_zero = concept_token_positions(lambda p: padded_token_ids(p, tok, 0), prompt, "Taylor Swift")
    assert torch.equal(s_end, s_zero)
    ids = sd1_token_ids([prompt], tok)[0]
    end = ids.index(49407)
    assert s_end[end:].all() and s_end.sum() == (77 - end) + 2  # 2 name tokens + EOT and every later one


def test_long_concept_lists_stay_refused_by_each_tokenizer(sdxl_host, sd2_host):
    long = "a photo of " + "very " * 80 + "Taylor Swift"
    for host in (sdxl_host, sd2_host):
        ids = host.token_ids([long])[0]
        assert len(ids) == 77 and ids[-1] == 49407  # truncated: end token in the last position = too long


# --------------------------------------------------------------------------------------------------
# Encoding: against diffusers' own pipelines


def _tokenizer_padding_with(pad: str, tmp_path):
    import transformers

    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    load_sd1_tokenizer().save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path, pad_token=pad, local_files_only=True)


def test_sdxl_encoding_matches_diffusers_pipeline(sdxl_host, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=sdxl_host.vae, text_encoder=sdxl_host.text_encoders[0], text_encoder_2=sdxl_host.text_encoders[1],
        tokenizer=sdxl_host.tokenizer, tokenizer_2=_tokenizer_padding_with("!", tmp_path),  # bigG pads with "!" = 0
        unet=sdxl_host.unet, scheduler=DDIMScheduler.from_config(sdxl_host.scheduler_config),
    )
    prompts = ["a photo of Taylor Swift", "an oil painting of a river at dusk"]
    ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    context, pooled = sdxl_host.encode_with_pooled(prompts)
    assert context.shape == (2, 77, 2048) and pooled.shape == (2, 1280)
    torch.testing.assert_close(context, ref.float(), rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled.float(), rtol=0, atol=0)
    assert torch.equal(sdxl_host.encode_pooled(prompts), pooled)


def test_sd2_encoding_is_the_encoder_without_its_last_layer(sd2_host, tmp_path):
    """Diffusers ships SD2's OpenCLIP-H without its last layer (23 of 24) and reads its output after the
    final LN; ComfyUI reads the penultimate layer of the full encoder through the final LN: the same states.
    Reference: a copy of the tiny encoder with its last layer removed, fed the ids of a tokenizer padding
    with "!" (id 0, as SD2's tokenizer and ComfyUI do)."""
    import copy

    prompts = ["a photo of Taylor Swift", "a river"]
    truncated = copy.deepcopy(sd2_host.text_encoder)
    model = getattr(truncated, "text_model", truncated)
    model.encoder.layers = model.encoder.layers[:-1]
    tok = _tokenizer_padding_with("!", tmp_path)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = truncated(input_ids=ids).last_hidden_state
    assert ids[0, -1] == 0 and ids.tolist() == sd2_host.token_ids(prompts)
    torch.testing.assert_close(sd2_host.encode(prompts), ref, rtol=0, atol=0)
    assert sd2_host.encode_pooled(prompts) is None


def test_host_unet_matches_diffusers_forward_with_size_conditioning(sdxl_host):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    context, pooled = sdxl_host.encode_with_pooled(["a cat", "a dog"])
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    with torch.no_grad():
        ref = sdxl_host.unet(x, t, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        with sdxl_host.instrument() as unet:
            ours = unet(x, t, context, pooled=pooled)
            with pytest.raises(MaceError, match="pooled"):
                unet(x, t, context)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Every stage on each family


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_every_stage_runs_and_leaves_the_host_untouched(family, sdxl_host, sd2_host):
    host = sdxl_host if family == "sdxl" else sd2_host
    concepts = [Concept("Taylor Swift", "a person"), Concept("Van Gogh", "art", "style")]
    settings = ErasureSettings(n_images=1, sample_steps=2, image_size=64, train=TrainConfig(steps=2))
    before = {k: v.clone() for k, v in host.unet.state_dict().items()}
    events: list[tuple] = []
    corpus = ["a photo of a dog", "a red car on a street", "a bowl of fruit", "a house by a lake"] * 2
    erasure = run_erasure(host, concepts, preservation_prompts=corpus, settings=settings,
                          progress=lambda *e: events.append(e))
    w0 = host.cross_attention_weights()
    assert set(erasure.weights) == set(w0) and len(w0) == {"sdxl": 140, "sd2": 32}[family]
    assert all(torch.isfinite(w).all() for w in erasure.weights.values())
    assert any(not torch.allclose(erasure.weights[k], w0[k]) for k in w0)
    assert {e[0] for e in events} == {"preservation", "refine", "data", "train", "fuse"}
    assert all(len(v) == 2 for v in erasure.metadata["losses"].values())
    after = host.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sdxl_attention_capture_covers_all_70_blocks(sdxl_host):
    seen: dict[str, tuple] = {}
    sdxl_host.generate(["a cat"], seed=0, steps=1, height=64, width=64,
                       attention_probe=lambda block, p: seen.setdefault(block, tuple(p.shape)))
    assert len(seen) == 70 and all(s[0] == 1 and s[-1] == 77 for s in seen.values())


# --------------------------------------------------------------------------------------------------
# Closed forms at 2048-d against lstsq

D = 2048
SHAPES = {"a.to_k": 64, "a.to_v": 32}


def _lstsq(rows, targets):
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution.T


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_cfr_and_fusion_match_lstsq_at_2048_d():
    g = torch.Generator().manual_seed(0)
    w0 = {n: torch.randn(r, D, generator=g, dtype=F64) / D**0.5 for n, r in SHAPES.items()}
    e_f, e_g = torch.randn(300, D, generator=g, dtype=F64), torch.randn(300, D, generator=g, dtype=F64)
    keep = torch.randn(500, D, generator=g, dtype=F64)
    ridge, w_keep = 0.3, 2.0
    pres = [Preservation(SecondMoment(D).add(keep), w_keep)]
    cfr = refine_cross_attention(w0, SecondMoment(D).add(e_g, e_f), SecondMoment(D).add(e_f), pres, ridge)
    c = (w_keep / len(keep)) ** 0.5
    eye = torch.eye(D, dtype=F64)
    for n, w in w0.items():
        ref = _lstsq([e_f, c * keep, ridge**0.5 * eye], [e_g @ w.T, c * keep @ w.T, ridge**0.5 * w.T])
        assert _rel(cfr[n].to(F64), ref) < 1e-8, n

    concepts = [torch.randn(150, D, generator=g, dtype=F64) for _ in range(3)]
    loras = [{n: (torch.randn(r, 1, generator=g, dtype=F64), torch.randn(1, D, generator=g, dtype=F64) / D**0.5)
              for n, r in SHAPES.items()} for _ in concepts]
    w1 = {n: cfr[n].to(F64) for n in SHAPES}
    fused = fuse_loras(w1, w0, ((SecondMoment(D).add(e), lo) for e, lo in zip(concepts, loras, strict=True)),
                       pres, ridge)
    for n in SHAPES:
        rows = [*concepts, c * keep, ridge**0.5 * eye]
        targets = [e @ (w1[n] + lo[n][0] @ lo[n][1]).T for e, lo in zip(concepts, loras, strict=True)]
        targets += [c * keep @ w0[n].T, ridge**0.5 * w1[n].T]
        assert _rel(fused[n].to(F64), _lstsq(rows, targets)) < 1e-8, n


# --------------------------------------------------------------------------------------------------
# SD1.x unchanged


def test_sd1_host_reads_its_family_and_encodes_as_before(tiny_host, tiny_sd):
    """SD1.x goes through the same code as before the families (bit for bit): ids from ``sd1_token_ids``
    (padding with the end token), states = last hidden state after the final LN, no pooled channel.
    (A whole tiny ``run_erasure`` was also compared by sha256 against the parent commit: equal.)"""
    prompts = ["a photo of Taylor Swift", ""]
    assert tiny_host.family is SD1 and tiny_host.max_length == 77
    assert tiny_host.token_ids(prompts) == sd1_token_ids(prompts)
    ids = torch.tensor(sd1_token_ids(prompts))
    with torch.no_grad():
        ref = tiny_sd.text_encoder(input_ids=ids).last_hidden_state
    assert torch.equal(tiny_host.encode(prompts), ref)
    assert tiny_host.encode_pooled(prompts) is None


# --------------------------------------------------------------------------------------------------
# SDXL's pooled channel


def test_pooled_column_edit_matches_lstsq_and_keeps_the_size_columns():
    from mace_ops.pooled import edit_pooled_columns

    g = torch.Generator().manual_seed(3)
    d, d_size = 1280, 1536
    w = torch.randn(16, d + d_size, generator=g, dtype=F64) / d**0.5
    y_f, y_g = torch.randn(40, d, generator=g, dtype=F64), torch.randn(40, d, generator=g, dtype=F64)
    keep = torch.randn(200, d, generator=g, dtype=F64)
    ridge, wk = 0.2, 3.0
    out = edit_pooled_columns(w, SecondMoment(d).add(y_g, y_f), SecondMoment(d).add(y_f),
                              [Preservation(SecondMoment(d).add(keep), wk)], ridge, relative_ridge=0.0)
    p0, c = w[:, :d], (wk / len(keep)) ** 0.5
    ref = _lstsq([y_f, c * keep, ridge**0.5 * torch.eye(d, dtype=F64)],
                 [y_g @ p0.T, c * keep @ p0.T, ridge**0.5 * p0.T])
    assert _rel(out[:, :d], ref) < 1e-8
    assert torch.equal(out[:, d:], w[:, d:]) and out.data_ptr() != w.data_ptr()


def test_pooled_channel_edit_on_tiny_sdxl_moves_only_label_emb(sdxl_host, sd2_host):
    from mace_ops.pooled import pooled_channel_edit

    concepts = [Concept("Taylor Swift", "a person")]
    keep = ["a photo of a dog", "a red car", "a bowl of fruit", "a house by a lake", "a mountain at dawn"]
    before = {k: v.clone() for k, v in sdxl_host.unet.state_dict().items()}
    w = pooled_channel_edit(sdxl_host, concepts, keep, preserve_weight=1.0)
    w0 = sdxl_host.label_emb_weight()
    f, a = "a portrait of Taylor Swift", "a portrait of a person"
    y_f, y_a = sdxl_host.encode_pooled([f])[0].double(), sdxl_host.encode_pooled([a])[0].double()
    p, p0 = w[:, :1280].double(), w0[:, :1280].double()
    assert (p @ y_f - p0 @ y_a).norm() < 0.2 * (p0 @ y_f - p0 @ y_a).norm()  # the concept's pooled → anchor's
    edited = sdxl_host.with_label_emb(w)
    assert torch.equal(edited.label_emb_weight(), w) and torch.equal(sdxl_host.label_emb_weight(), w0)
    # the edited host's forward = a copy of the UNet with that weight written in
    import copy

    unet = copy.deepcopy(sdxl_host.unet)
    unet.add_embedding.linear_1.weight.data.copy_(w)
    ctx, y = sdxl_host.encode_with_pooled([f])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300])
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)
    with torch.no_grad(), edited.instrument() as run:
        ours = run(x, t, ctx, pooled=y)
        ref = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": y, "time_ids": time_ids}).sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in sdxl_host.unet.state_dict().items())
    with pytest.raises(MaceError, match="no pooled text channel"):
        pooled_channel_edit(sd2_host, concepts, keep)


def test_sdxl_diffusers_folder_loads_with_both_encoders(sdxl_host, tmp_path):
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = sdxl_host.unet if name == "unet" else sdxl_host.vae if name == "vae" else (
            sdxl_host.text_encoders[0 if name == "text_encoder" else 1])
        module.save_pretrained(tmp_path / name, safe_serialization=True)
    host = DiffusersHost.from_pretrained(tmp_path)
    assert host.family is SDXL and len(host.cross_attention_blocks()) == 70
    prompts = ["a photo of Taylor Swift"]
    a, b = host.encode_with_pooled(prompts), sdxl_host.encode_with_pooled(prompts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
