"""mace_ops.checkpoint: single-file SD1.x checkpoints, offline; sanitized copies change only to_k/to_v."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mace_ops.checkpoint import (
    CONFIG_METADATA_KEY,
    load_sd1_host,
    save_sanitized_checkpoint,
    sd1_configs,
    unet_ldm_names,
    vae_ldm_names,
    write_tiny_sd1_checkpoint,
)
from mace_ops.errors import MaceError
from mace_ops.hosts.base import matrix_names, sd1_block_names


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_tiny_sd1_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=0)


def test_tiny_file_round_trip(tiny_file, tiny_sd, tiny_host):
    with safe_open(str(tiny_file), framework="pt") as f:
        keys = set(f.keys())
        assert CONFIG_METADATA_KEY in f.metadata()
    assert {f"model.diffusion_model.{n}.weight" for n in matrix_names(sd1_block_names())} <= keys
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    host = load_sd1_host(tiny_file)
    for loaded, built in ((host.unet, tiny_sd.unet), (host.text_encoder, tiny_sd.text_encoder), (host.vae, tiny_sd.vae)):
        a, b = loaded.state_dict(), built.state_dict()
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert host.model_fingerprint() == tiny_host.model_fingerprint()
    assert [b.name for b in host.cross_attention_blocks()] == sd1_block_names()


def test_sanitized_checkpoint_changes_only_cross_attention(tiny_file, tmp_path):
    before = _sha(tiny_file)
    g = torch.Generator().manual_seed(0)
    names = matrix_names(sd1_block_names())
    with safe_open(str(tiny_file), framework="pt") as f:
        src = {k: f.get_tensor(k) for k in f.keys()}
        src_meta = f.metadata()
    new = {n: src[f"model.diffusion_model.{n}.weight"] + torch.randn(src[f"model.diffusion_model.{n}.weight"].shape,
                                                                      generator=g) for n in names}
    out = save_sanitized_checkpoint(tiny_file, new, tmp_path / "clean.safetensors", metadata={"mace.concepts": "[]"})
    assert _sha(tiny_file) == before
    with safe_open(str(out), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert set(got) == set(src)
    changed = {k for k in src if not torch.equal(src[k], got[k])}
    assert changed == {f"model.diffusion_model.{n}.weight" for n in names}
    for n in names:
        k = f"model.diffusion_model.{n}.weight"
        assert got[k].dtype == src[k].dtype
        torch.testing.assert_close(got[k], new[n])
    assert meta == {**src_meta, "mace.concepts": "[]"}
    host = load_sd1_host(out)
    for n, w in host.cross_attention_weights().items():
        torch.testing.assert_close(w, new[n])
    with pytest.raises(MaceError, match="exists"):
        save_sanitized_checkpoint(tiny_file, new, out)
    with pytest.raises(MaceError, match="exists"):
        save_sanitized_checkpoint(tiny_file, new, tiny_file)
    assert _sha(tiny_file) == before


def test_sanitized_checkpoint_keeps_half_precision(tmp_path):
    src = tmp_path / "half.safetensors"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(4, 768, dtype=torch.float16), "other": torch.ones(2, dtype=torch.float16)}, str(src))
    out = save_sanitized_checkpoint(src, {"input_blocks.1.1.transformer_blocks.0.attn2.to_k": torch.ones(4, 768)},
                                    tmp_path / "o.safetensors")
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor(key).dtype == torch.float16 and bool((f.get_tensor(key) == 1).all())


@pytest.mark.parametrize("name,shape,match", [
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_q", (4, 768), "not a cross-attention to_k/to_v"),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", (5, 768), "made for another model"),
    ("output_blocks.99.1.transformer_blocks.0.attn2.to_v", (4, 768), "has no tensor"),
])
def test_sanitized_checkpoint_refuses_foreign_weights(tmp_path, name, shape, match):
    src = tmp_path / "s.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 768)},
              str(src))
    with pytest.raises(MaceError, match=match):
        save_sanitized_checkpoint(src, {name: torch.zeros(shape)}, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_sanitized_checkpoint_refuses_nan(tmp_path):
    src = tmp_path / "s.safetensors"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(4, 768)}, str(src))
    with pytest.raises(MaceError, match="NaN"):
        save_sanitized_checkpoint(src, {"input_blocks.1.1.transformer_blocks.0.attn2.to_k": torch.full((4, 768), float("nan"))},
                                  tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("keys,match", [
    ({"lora_unet_down.lora_up.weight": (2, 2)}, "LoRA or erasure file"),
    ({"some.tensor": (2, 2)}, "not a Stable Diffusion"),
    ({"model.diffusion_model.x": (1,), "conditioner.embedders.0.transformer.x": (1,)}, "SDXL"),
    ({"model.diffusion_model.x": (1,), "cond_stage_model.model.x": (1,)}, "SD2"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "context width 1024"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "no text encoder"),
    ({"model.diffusion_model.middle_block.0.in_layers.0.weight": (320,)}, "no cross-attention"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (3, 2)}, "SD3/SD3.5 .*no cross-attention"),
    ({"double_blocks.0.img_attn.qkv.weight": (3, 2)}, "FLUX .*no cross-attention"),
    ({"model.diffusion_model.x": (1,), "conditioner.embedders.0.model.x": (1,)}, "SDXL refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting model"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}, "instruct-pix2pix"),
])
def test_not_sd1_is_refused(tmp_path, keys, match):
    p = tmp_path / "x.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(p))
    with pytest.raises(MaceError, match=match):
        load_sd1_host(p)


def test_missing_and_pickled_checkpoints(tmp_path):
    with pytest.raises(MaceError, match="does not exist"):
        load_sd1_host(tmp_path / "nope.safetensors")
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(MaceError, match="pickle"):
        load_sd1_host(p)


# Facts of the real SD1.5 single-file layout (also checked once against ComfyUI's own SD1.5 model:
# 686 UNet and 248 VAE tensors, identical key sets).
KNOWN_SD15_UNET = [
    "time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
    "input_blocks.11.0.out_layers.3.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
    "output_blocks.8.2.conv.weight", "output_blocks.11.1.proj_out.weight", "out.2.weight",
]
KNOWN_SD15_VAE = [
    "encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight",
    "encoder.mid.block_2.conv2.weight", "encoder.norm_out.weight", "decoder.up.3.upsample.conv.weight",
    "decoder.up.0.block.2.conv1.weight", "decoder.mid.attn_1.proj_out.weight", "quant_conv.weight", "post_quant_conv.bias",
]


def test_sd15_names_invert_diffusers_conversion():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    configs = sd1_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    ukeys = list(unet.state_dict())
    names = unet_ldm_names(ukeys, unet.config)
    assert len(names) == len(set(names.values())) == 686
    assert set(KNOWN_SD15_UNET) <= set(names.values())
    ldm = {"model.diffusion_model." + v: k for k, v in names.items()}  # the value carries its diffusers name
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back == {k: k for k in ukeys}

    vsd = vae.state_dict()
    vnames = vae_ldm_names(list(vsd), vae.config)
    assert len(vnames) == len(set(vnames.values())) == 248
    assert set(KNOWN_SD15_VAE) <= set(vnames.values())
    tagged = {"first_stage_model." + v: torch.full((1, 1, 1, 1) if ".attn_1." in v and v.endswith(".weight") else (1,),
                                                   float(i)) for i, (k, v) in enumerate(vnames.items())}
    back = convert_ldm_vae_checkpoint(tagged, dict(vae.config))
    assert set(back) == set(vsd)
    for i, k in enumerate(vnames):
        assert float(back[k].flatten()[0]) == float(i), k


def test_comfyui_loads_sanitized_checkpoint_and_erasure(tmp_path):
    """With ComfyUI importable ($COMFYUI_PATH, run in .venv-comfy): its own checkpoint loader reads our
    sanitized copy with the new matrices, and its stock LoRA loading of our erasure file gives W0 + diff.

    ``COMFYUI_PATH=$PWD/.comfy/ComfyUI .venv-comfy/bin/python -m pytest -q tests/test_checkpoint.py -k comfyui``
    """
    import os
    import sys

    root = os.environ.get("COMFYUI_PATH")
    if not root or not os.path.isdir(os.path.join(root, "comfy")):
        pytest.skip("COMFYUI_PATH not set to a ComfyUI checkout")
    here = os.path.join(os.path.dirname(__file__), "comfy")
    sys.path[:0] = [os.path.abspath(root), here]
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.sd
        import comfy.utils
        from make_tiny_checkpoint import write_tiny_checkpoint
    except Exception as e:  # ComfyUI needs its own environment (torchvision etc.)
        pytest.skip(f"ComfyUI not importable here: {e}")
    finally:
        for p in (os.path.abspath(root), here):
            sys.path.remove(p)
    from mace_ops.concepts import Concept
    from mace_ops.erasure import Erasure, save_erasure
    from mace_ops.io import read_safetensors

    src = write_tiny_checkpoint(str(tmp_path / "src.safetensors"), 0)
    before = _sha(tmp_path / "src.safetensors")
    tensors, _ = read_safetensors(src)
    names = [k[len("model.diffusion_model."):-len(".weight")] for k in tensors
             if k.startswith("model.diffusion_model.") and k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))]
    assert names
    g = torch.Generator().manual_seed(0)
    w0 = {n: tensors[f"model.diffusion_model.{n}.weight"].float() for n in names}
    new = {n: w + 0.01 * torch.randn(w.shape, generator=g) for n, w in w0.items()}
    out = save_sanitized_checkpoint(src, new, tmp_path / "clean.safetensors")
    model = comfy.sd.load_checkpoint_guess_config(str(out), output_vae=True, output_clip=True)[0]
    sd = model.model.state_dict()
    for n in names:
        assert torch.equal(sd[f"diffusion_model.{n}.weight"].float(), new[n]), n

    erasure_file = save_erasure(Erasure(weights=new, base_fingerprint="x", concepts=[Concept("a", "b")]), w0,
                                tmp_path / "erasure.safetensors")
    base = comfy.sd.load_checkpoint_guess_config(src, output_vae=False, output_clip=False)[0]
    patched, _ = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(str(erasure_file), safe_load=True),
                                               1.0, 0.0)
    for n in names:
        w = patched.patch_weight_to_device(f"diffusion_model.{n}.weight", return_weight=True)
        torch.testing.assert_close(w.float(), new[n])
    assert _sha(tmp_path / "src.safetensors") == before


def test_diffusers_folder_to_single_file_with_new_weights(tmp_path, tiny_sd):
    """A diffusers folder (what `run` accepts besides single files) written as an erased single file."""
    from mace_ops.checkpoint import write_sd1_checkpoint

    for name in ("unet", "text_encoder", "vae"):
        getattr(tiny_sd, name).save_pretrained(tmp_path / "model" / name, safe_serialization=True)
    host = load_sd1_host(tmp_path / "model")
    g = torch.Generator().manual_seed(1)
    new = {n: w + torch.randn(w.shape, generator=g) for n, w in host.cross_attention_weights().items()}
    out = write_sd1_checkpoint(host.unet, host.text_encoder, host.vae, tmp_path / "model_mace.safetensors",
                               cross_attention_weights=new, store_configs=True)
    again = load_sd1_host(out)
    for n, w in again.cross_attention_weights().items():
        torch.testing.assert_close(w, new[n])
    a, b = again.unet.state_dict(), tiny_sd.unet.state_dict()
    edited = {f"{m}.weight" for m in (p for p in dict(tiny_sd.unet.named_modules())
                                      if p.endswith((".attn2.to_k", ".attn2.to_v")))}
    assert len(edited) == 32
    assert {k for k in a if not torch.equal(a[k], b[k])} == edited
    with pytest.raises(MaceError, match="exists"):
        write_sd1_checkpoint(host.unet, host.text_encoder, host.vae, out)
