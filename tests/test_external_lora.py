"""LoRAs trained elsewhere: files of each key style (kohya, diffusers, peft) built here from known
factors, read back onto the host's to_k/to_v, refused when they touch other modules, and fused; the
fusion is checked against ``torch.linalg.lstsq`` on the explicitly stacked token rows."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mace_ops.concepts import Concept, concept_prompts
from mace_ops.errors import MaceError
from mace_ops.external_lora import fuse_external_loras, read_external_lora
from mace_ops.tiny import ldm_cross_attention_names

F64 = torch.float64


@pytest.fixture(scope="module")
def names(tiny_sd) -> dict[str, str]:
    """``{LDM matrix name: diffusers module path}`` read from the model itself (not from our mapping)."""
    return {f"{ldm}.{p}": f"{d}.{p}" for d, ldm in ldm_cross_attention_names(tiny_sd.unet).items()
            for p in ("to_k", "to_v")}


@pytest.fixture(scope="module")
def shapes(tiny_host) -> dict[str, tuple[int, int]]:
    return {k: tuple(w.shape) for k, w in tiny_host.cross_attention_weights().items()}


def _factors(shapes, seed: int, rank: int, every: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (up (d_out, r), down (r, d)) on every ``every``-th matrix."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(o, rank, generator=g) * 0.1, torch.randn(rank, d, generator=g) * 0.1)
            for i, (m, (o, d)) in enumerate(shapes.items()) if i % every == 0}


def _write(path, style: str, factors, names, alpha: float | None = None, extra: dict | None = None):
    """A LoRA file in one key style; ``alpha`` stored as kohya/diffusers ``.alpha`` keys."""
    t = {}
    for m, (up, down) in factors.items():
        d = names[m]
        if style == "kohya":
            base = "lora_unet_" + d.replace(".", "_")
            t[f"{base}.lora_down.weight"], t[f"{base}.lora_up.weight"] = down, up
        elif style == "kohya_ldm":
            base = "lora_unet_" + m.replace(".", "_")
            t[f"{base}.lora_down.weight"], t[f"{base}.lora_up.weight"] = down, up
        elif style == "diffusers":
            base = f"unet.{d}"
            t[f"{base}.lora_A.weight"], t[f"{base}.lora_B.weight"] = down, up
        elif style == "diffusers_processor":
            attn, proj = d.rsplit(".", 1)
            t[f"unet.{attn}.processor.{proj}_lora.down.weight"] = down
            t[f"unet.{attn}.processor.{proj}_lora.up.weight"] = up
        elif style == "peft":
            base = f"base_model.model.{d}"
            t[f"{base}.lora_A.weight"], t[f"{base}.lora_B.weight"] = down, up
        else:
            raise ValueError(style)
        if alpha is not None:
            t[f"{base}.alpha"] = torch.tensor(alpha)
    t.update(extra or {})
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    return path


def _delta(up, down, scale=1.0):
    return scale * up.to(F64) @ down.to(F64)


@pytest.mark.parametrize("style", ["kohya", "kohya_ldm", "diffusers", "diffusers_processor", "peft"])
def test_each_key_style_reads_back_the_same_delta(style, tmp_path, names, shapes):
    rank = 2
    factors = _factors(shapes, seed=1, rank=rank, every=3)
    alpha = 3.0 if style.startswith("kohya") else None
    path = _write(tmp_path / "l.safetensors", style, factors, names, alpha=alpha)
    scale = alpha / rank if alpha is not None else 1.0
    if style == "peft":  # peft keeps alpha in adapter_config.json beside the weights
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8}), encoding="utf-8")
        scale = 8 / rank
    lora = read_external_lora(path, shapes)
    assert lora.used == list(factors) and lora.ignored == []
    for m in shapes:
        up, down = lora.factors[m]
        want = _delta(*factors[m], scale) if m in factors else torch.zeros(shapes[m], dtype=F64)
        torch.testing.assert_close(_delta(up, down), want, rtol=1e-5, atol=1e-7)  # up · scale in float32


def test_other_modules_are_refused_with_their_list_or_listed_when_allowed(tmp_path, names, shapes):
    factors = _factors(shapes, seed=2, rank=1, every=4)
    attn2 = next(iter(names.values())).rsplit(".", 1)[0]
    attn1 = attn2.replace("attn2", "attn1")
    extra = {
        f"lora_unet_{attn1.replace('.', '_')}_to_q.lora_down.weight": torch.zeros(1, 8),
        f"lora_unet_{attn1.replace('.', '_')}_to_q.lora_up.weight": torch.zeros(8, 1),
        f"lora_unet_{attn2.replace('.', '_')}_to_out_0.lora_down.weight": torch.zeros(1, 8),
        f"lora_unet_{attn2.replace('.', '_')}_to_out_0.lora_up.weight": torch.zeros(8, 1),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": torch.zeros(1, 8),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": torch.zeros(8, 1),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha": torch.tensor(1.0),
    }
    path = _write(tmp_path / "mixed.safetensors", "kohya", factors, names, extra=extra)
    with pytest.raises(MaceError) as info:
        read_external_lora(path, shapes)
    message = str(info.value)
    assert "3 module(s) are not a cross-attention to_k/to_v" in message
    for module in ("attn1_to_q", "attn2_to_out_0", "lora_te_text_model_encoder_layers_0_self_attn_k_proj"):
        assert module in message
    lora = read_external_lora(path, shapes, allow_other_modules=True)
    assert len(lora.ignored) == 3 and lora.used == list(factors)


def test_bad_files_are_refused_by_name(tmp_path, names, shapes):
    only_other = tmp_path / "te.safetensors"
    save_file({"lora_te_x.lora_down.weight": torch.zeros(1, 4), "lora_te_x.lora_up.weight": torch.zeros(4, 1)},
              str(only_other))
    with pytest.raises(MaceError, match="none of its 1 module"):
        read_external_lora(only_other, shapes, allow_other_modules=True)
    strange = tmp_path / "strange.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(strange))
    with pytest.raises(MaceError, match="no LoRA factor of a known style"):
        read_external_lora(strange, shapes)
    m = next(iter(shapes))
    o, d = shapes[m]
    wrong = _write(tmp_path / "wrong.safetensors", "kohya", {m: (torch.zeros(o, 1), torch.zeros(1, d + 1))}, names)
    with pytest.raises(MaceError, match="model family"):
        read_external_lora(wrong, shapes)
    half = tmp_path / "half.safetensors"
    save_file({f"unet.{names[m]}.lora_A.weight": torch.zeros(1, d)}, str(half))
    with pytest.raises(MaceError, match="no up factor"):
        read_external_lora(half, shapes)


def test_fusion_of_external_loras_matches_lstsq(tiny_host, tmp_path, names, shapes):
    """min_W Σ_i Σ_{e∈E_i} ||W e − (W1 + ΔW_i) e||² + λ||W − W1||², solved by lstsq on the stacked rows
    [E_1; E_2; √λ I] for all matrices at once (W1 = W0 = the host's weights, no preservation)."""
    concepts = [Concept("Taylor Swift", "a person"), Concept("Van Gogh", "art", "style")]
    f1, f2 = _factors(shapes, seed=3, rank=2, every=2), _factors(shapes, seed=4, rank=3)
    loras = [
        read_external_lora(_write(tmp_path / "a.safetensors", "kohya", f1, names, alpha=1.0), shapes),
        read_external_lora(_write(tmp_path / "b.safetensors", "diffusers", f2, names), shapes),
    ]
    lam = 0.05
    fused = fuse_external_loras(tiny_host, concepts, loras, ridge=lam, relative_ridge=0.0)

    W1 = {k: w.to(F64) for k, w in tiny_host.cross_attention_weights().items()}
    names_in_order = list(W1)
    rows, targets = [], []
    for c, (f, scale) in zip(concepts, ((f1, 1.0 / 2), (f2, 1.0)), strict=True):
        e = tiny_host.encode(concept_prompts(c)).to(F64).reshape(-1, 768)  # (n·77, d)
        rows.append(e)
        targets.append(torch.cat([e @ (W1[k] + (_delta(*f[k], scale) if k in f else 0)).T
                                  for k in names_in_order], dim=1))
    rows.append(lam**0.5 * torch.eye(768, dtype=F64))
    targets.append(lam**0.5 * torch.cat([W1[k].T for k in names_in_order], dim=1))
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution  # (d, Σ d_out)
    start = 0
    for k in names_in_order:
        want = solution[:, start : start + W1[k].shape[0]].T
        start += W1[k].shape[0]
        err = (fused[k].to(F64) - want).abs().max() / want.abs().max()
        assert err < 1e-5, (k, float(err))
    assert any(not torch.allclose(fused[k], W1[k].float()) for k in W1)


def test_one_lora_per_concept(tiny_host, tmp_path, names, shapes):
    lora = read_external_lora(_write(tmp_path / "a.safetensors", "peft", _factors(shapes, 5, 1), names), shapes)
    with pytest.raises(MaceError, match="one LoRA per concept"):
        fuse_external_loras(tiny_host, [Concept("a", "b"), Concept("c", "d")], [lora])


def test_cli_fuse_writes_the_erasure_of_the_closed_form_and_refuses_bad_inputs(tmp_path, names, shapes, capsys):
    from mace_ops.checkpoint import load_sd1_host, write_tiny_sd1_checkpoint
    from mace_ops.cli import main
    from mace_ops.erasure import load_erasure
    from mace_ops.pipeline import preservation_statistics

    ckpt = write_tiny_sd1_checkpoint(tmp_path / "tiny.safetensors", seed=0)
    (tmp_path / "concepts.txt").write_text("Taylor Swift -> a person\nVan Gogh -> art :: style\n", encoding="utf-8")
    (tmp_path / "keep.txt").write_text("a red house\na dog on a beach\n", encoding="utf-8")
    a = _write(tmp_path / "a.safetensors", "kohya", _factors(shapes, 6, 2), names, alpha=2.0)
    b = _write(tmp_path / "b.safetensors", "peft", _factors(shapes, 7, 1, every=2), names)
    out = tmp_path / "erasure.safetensors"
    common = ["fuse", "--checkpoint", str(ckpt), "--concepts", str(tmp_path / "concepts.txt"),
              "--preserve", str(tmp_path / "keep.txt"), "--preserve-weight", "3", "--ridge", "0.1", "--quiet"]
    assert main([*common, "--lora", str(a), "--lora", str(b), "--out", str(out)]) == 0

    host = load_sd1_host(ckpt)
    erasure, _ = load_erasure(out, original_weights=host.cross_attention_weights())
    assert [c.kind for c in erasure.concepts] == ["object", "style"]
    assert [e["style"] for e in erasure.metadata["external_loras"]] == ["kohya", "peft"]
    concepts = erasure.concepts
    loras = [read_external_lora(p, shapes) for p in (a, b)]
    stats = preservation_statistics(host, ["a red house", "a dog on a beach"])
    want = fuse_external_loras(host, concepts, loras, stats.groups(3.0), 0.1)
    for k, w in want.items():
        torch.testing.assert_close(erasure.weights[k], w, rtol=1e-5, atol=1e-6)

    # one file for two concepts, an existing --out: both named, nothing loaded or written
    assert main([*common, "--lora", str(a), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 file(s) for 2 concept(s)" in err and "never overwrites" in err
    other = _write(tmp_path / "other.safetensors", "kohya", _factors(shapes, 8, 1), names, extra={
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 1)})
    out2 = tmp_path / "e2.safetensors"
    assert main([*common, "--lora", str(a), "--lora", str(other), "--out", str(out2)]) == 2
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in capsys.readouterr().err and not out2.exists()
    assert main([*common[:-1], "--lora", str(a), "--lora", str(other), "--out", str(out2),
                 "--allow-other-modules"]) == 0
    assert "ignored 1 other module(s)" in capsys.readouterr().out and out2.exists()


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_ldm_to_diffusers_block_names_agree_with_diffusers_own_layout(layers):
    """diffusers_block_name inverts the block layout of a real diffusers UNet with 1, 2 or 3 layers per block
    (layers_per_block inferred from the LDM names alone)."""
    from diffusers import UNet2DConditionModel

    from mace_ops.external_lora import diffusers_block_name, layers_per_block

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=layers, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=2)
    truth = ldm_cross_attention_names(unet)  # {diffusers path: LDM block}
    assert layers_per_block(list(truth.values())) == layers
    for path, ldm in truth.items():
        assert diffusers_block_name(ldm, layers) == path
