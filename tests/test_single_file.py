"""SD2.x and SDXL single-file checkpoints: family detection, offline loading, ``mace-erase run`` end to end.

The tiny SD2- and SDXL-shaped models (``mace_ops.tiny``, real block layouts) are written in the
original single-file layout (``model.diffusion_model.*``, ``cond_stage_model.model.*`` for SD2,
``conditioner.embedders.0/1.*`` for SDXL) by ``write_tiny_checkpoint``, which checks its names against
diffusers' own conversions; loading goes through diffusers' conversions and the shipped configs.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mace_ops import cli
from mace_ops.errors import MaceError
from mace_ops.family import SD1, SD2, SDXL
from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.single_file import (
    check_source,
    detect_family,
    family_configs,
    load_host,
    prediction_type,
    write_tiny_checkpoint,
)

FAST = ["--images", "1", "--size", "64", "--sample-steps", "2", "--steps", "2", "--report-images", "1", "--quiet"]
PROMPTS = ["a photo of Taylor Swift", "a cat on a sofa", ""]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{family: tiny single file}: SDXL stored as float16 (as published SDXL files), SD2 as float32."""
    root = tmp_path_factory.mktemp("single")
    return {"sdxl": write_tiny_checkpoint(root / "xl.safetensors", "sdxl", 0, dtype=torch.float16),
            "sd2": write_tiny_checkpoint(root / "sd2.safetensors", "sd2", 0)}


def test_family_is_read_from_the_tensors_not_the_name(files, tmp_path):
    for family, want in (("sdxl", SDXL), ("sd2", SD2)):
        misnamed = tmp_path / f"sd15_{family}.safetensors"
        misnamed.symlink_to(files[family])
        assert check_source(misnamed) == misnamed
        with safe_open(str(misnamed), framework="pt") as f:
            assert detect_family(list(f.keys()), lambda k: f.get_slice(k).get_shape()) is want
    shapes = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
    assert detect_family(list(shapes), shapes.__getitem__) is SD1


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_loaded_file_matches_the_model_it_was_written_from(files, family):
    host = load_host(files[family])
    ref = DiffusersHost.from_tiny(0, family=family)
    assert host.family is ref.family and len(host.text_encoders) == len(ref.text_encoders)
    context, pooled = host.encode_with_pooled(PROMPTS)
    ref_context, ref_pooled = ref.encode_with_pooled(PROMPTS)
    tol = 2e-2 if family == "sdxl" else 0.0  # SDXL's file is float16: weights rounded to 11 bits
    torch.testing.assert_close(context, ref_context, atol=tol, rtol=tol)
    assert (pooled is None) == (ref_pooled is None) == (family == "sd2")
    ours, theirs = host.cross_attention_weights(), ref.cross_attention_weights()
    assert set(ours) == set(theirs) and len(ours) == (140 if family == "sdxl" else 32)
    for name, w in theirs.items():
        want = w.half().float() if family == "sdxl" else w
        assert torch.equal(ours[name], want), name


def test_shipped_configs_build_the_published_architectures():
    from diffusers import UNet2DConditionModel

    from mace_ops.tiny import ldm_cross_attention_names

    for family, blocks, width in ((SDXL, 70, 2048), (SD2, 16, 1024)):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(family_configs(family)["unet"])
        assert len(ldm_cross_attention_names(unet)) == blocks and unet.config.cross_attention_dim == width
    xl = family_configs(SDXL)
    assert (xl["text_encoder"]["hidden_size"], xl["text_encoder_2"]["hidden_size"]) == (768, 1280)
    assert xl["vae"]["scaling_factor"] == SDXL.vae_scale and family_configs(SD2)["text_encoder"]["hidden_size"] == 1024


def test_sd2_prediction_type_rule():
    probe = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    flat, spread = torch.zeros(320), torch.linspace(-1, 1, 320)  # std 0 vs 0.58 (threshold 0.09)
    assert prediction_type(SD2, "auto", {probe: flat}) == "epsilon"
    assert prediction_type(SD2, "auto", {probe: spread}) == "v_prediction"
    assert prediction_type(SDXL, "auto", {probe: spread}) == "epsilon"
    assert prediction_type(SD2, "v_prediction", {}) == "v_prediction"
    with pytest.raises(MaceError, match="--prediction-type"):
        prediction_type(SD2, "sample")


def test_refused_models_are_named(tmp_path):
    cases = {"refiner": ({"model.diffusion_model.x": (1,), "conditioner.embedders.0.model.x": (1,)}, "SDXL refiner"),
             "sd3": ({"model.diffusion_model.joint_blocks.0.x": (2,)}, "SD3"),
             "flux": ({"double_blocks.0.img_attn.qkv.weight": (3, 2)}, "FLUX"),
             "inpaint": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting")}
    for name, (keys, match) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file({k: torch.zeros(s) for k, s in keys.items()}, str(p))
        with pytest.raises(MaceError, match=match):
            check_source(p)


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_run_writes_checkpoint_erasure_and_report_changing_only_to_k_to_v(files, family, tmp_path):
    src = files[family]
    before = _sha(src)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("Taylor Swift -> a person\n", encoding="utf-8")
    preserve = tmp_path / "preserve.txt"
    preserve.write_text("a red house\na dog on a beach\na bowl of fruit\n", encoding="utf-8")
    out = tmp_path / "erased"
    argv = ["run", "--checkpoint", str(src), "--concepts", str(concepts), "--preserve", str(preserve),
            "--out", str(out), *FAST]
    assert cli.main(argv) == 0
    assert _sha(src) == before  # the input is never modified
    sanitized = out / f"{src.stem}_mace.safetensors"
    assert sanitized.is_file() and (out / "erasure.safetensors").is_file() and (out / "report" / "report.html").is_file()
    with safe_open(str(src), framework="pt") as a, safe_open(str(sanitized), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        changed = set()
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            if x.numpy().tobytes() != y.numpy().tobytes():
                changed.add(k)
        assert json.loads(b.metadata()["mace.concepts"])[0]["phrase"] == "Taylor Swift"
    n = 140 if family == "sdxl" else 32
    assert len(changed) == n and all(k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in changed)
    with safe_open(str(out / "erasure.safetensors"), framework="pt") as e:
        assert len(list(e.keys())) == n


def test_pooled_channel_is_written_to_the_checkpoint_and_the_erasure_file(files, tmp_path):
    from mace_ops.concepts import Concept, concept_prompt_pairs
    from mace_ops.erasure import load_erasure

    src = files["sdxl"]
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("Taylor Swift -> a person\n", encoding="utf-8")
    preserve = tmp_path / "preserve.txt"
    preserve.write_text("a red house\na dog on a beach\na bowl of fruit\n", encoding="utf-8")
    out = tmp_path / "erased"
    assert cli.main(["run", "--checkpoint", str(src), "--concepts", str(concepts), "--preserve", str(preserve),
                     "--out", str(out), "--fast", "--pooled-channel", *FAST]) == 0
    key = "model.diffusion_model.label_emb.0.0.weight"
    with safe_open(str(src), framework="pt") as a, safe_open(str(out / "xl_mace.safetensors"), framework="pt") as b:
        w0, w1 = a.get_tensor(key), b.get_tensor(key)
    assert w1.dtype == w0.dtype == torch.float16
    assert torch.equal(w1[:, 1280:], w0[:, 1280:]) and not torch.equal(w1[:, :1280], w0[:, :1280])
    # independent check of what the edit is for: the concept's pooled embeddings now act as the anchor's
    host = load_host(src)
    pairs = concept_prompt_pairs(Concept("Taylor Swift", "a person"))
    y_c = host.encode_pooled([f for f, _ in pairs]).double()
    y_a = host.encode_pooled([g for _, g in pairs]).double()
    p0, p1 = w0[:, :1280].double(), w1[:, :1280].double()
    before = (y_c @ p0.T - y_a @ p0.T).norm()
    assert float((y_c @ p1.T - y_a @ p0.T).norm() / before) < 0.02  # float16 storage of P1 limits it
    erasure, diffs = load_erasure(out / "erasure.safetensors")
    assert len(diffs) == 140 and erasure.label_emb_diff is not None
    torch.testing.assert_close(w0.float() + erasure.label_emb_diff, w1.float(), atol=1e-3, rtol=1e-3)


def test_pooled_channel_is_refused_without_a_pooled_channel(files, tmp_path, capsys):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("Taylor Swift -> a person\n", encoding="utf-8")
    assert cli.main(["run", "--checkpoint", str(files["sd2"]), "--concepts", str(concepts), "--out",
                     str(tmp_path / "o"), "--fast", "--pooled-channel", *FAST]) == 2
    assert "needs an SDXL base model" in capsys.readouterr().err
