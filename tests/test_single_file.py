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


def _run(src, tmp_path, *extra: str):
    """``mace-erase run`` of one concept on ``src`` with the FAST settings; returns the output folder."""
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("Taylor Swift -> a person\n", encoding="utf-8")
    preserve = tmp_path / "preserve.txt"
    preserve.write_text("a red house\na dog on a beach\na bowl of fruit\n", encoding="utf-8")
    out = tmp_path / f"erased_{len(list(tmp_path.glob('erased_*')))}"
    assert cli.main(["run", "--checkpoint", str(src), "--concepts", str(concepts), "--preserve", str(preserve),
                     "--out", str(out), *FAST, *extra]) == 0
    return out


def test_run_with_compact_erasure_on_sdxl_stays_within_the_tolerance(tmp_path):
    """``mace-erase run --compact-erasure 0.3`` on a float32 tiny SDXL file. The dense ΔW of the same run is
    read from the sanitized checkpoint (float32: W_new − W0 exactly); against it, independently of
    ``mace_ops.compact``: every key is in the stock-LoRA layout (``diffusion_model.<X>.lora_up.weight`` /
    ``.lora_down.weight`` / ``.diff`` with ``model.diffusion_model.<X>.weight`` a tensor of the checkpoint,
    factors of its shape), ``load_erasure`` reads it, each rank is the smallest whose SVD tail (singular
    values from ``torch.linalg.svdvals``) is within the tolerance, and ``||ΔW − up·down||_F ≤ (0.3 + 2e-3)
    ||ΔW||_F`` (2e-3: the float16 factors)."""
    from mace_ops.erasure import load_erasure

    tol = 0.3
    src = write_tiny_checkpoint(tmp_path / "xl32.safetensors", "sdxl", 0)
    out = _run(src, tmp_path, "--compact-erasure", str(tol))
    efile = out / "erasure.safetensors"
    with safe_open(str(src), framework="pt") as a, safe_open(str(out / "xl32_mace.safetensors"), framework="pt") as b:
        dense = {k[len("model.diffusion_model."):-len(".weight")]: b.get_tensor(k) - a.get_tensor(k)
                 for k in a.keys() if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
        shapes = {k: tuple(a.get_slice(k).get_shape()) for k in a.keys()}
    with safe_open(str(efile), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["mace.compact"])
    assert meta["tolerance"] == tol and len(dense) == 140 and set(meta["ranks"]) == set(dense)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():  # the stock LoRA loader's key layout for a UNet weight
        stem, kind = next((key[: -len(s)], s) for s in (".lora_up.weight", ".lora_down.weight", ".diff")
                          if key.endswith(s))
        assert stem.startswith("diffusion_model.") and f"model.{stem}.weight" in shapes, key
        factors.setdefault(stem[len("diffusion_model."):], {})[kind] = t
    assert set(factors) == set(dense)
    _, loaded = load_erasure(efile)
    for name, d in dense.items():
        f = factors[name]
        if ".diff" in f:  # stored dense (the factors would be no smaller)
            approx, r = f[".diff"].float(), 0
        else:
            up, down = f[".lora_up.weight"], f[".lora_down.weight"]
            assert up.shape[0] == d.shape[0] and down.shape[1] == d.shape[1] and up.shape[1] == down.shape[0]
            approx, r = up.float() @ down.float(), up.shape[1]
        assert meta["ranks"][name] == r
        torch.testing.assert_close(loaded[name], approx, rtol=0, atol=1e-6)
        s = torch.linalg.svdvals(d.double())
        budget = tol * float(s.norm())
        if r:
            assert float(s[r:].norm()) <= budget * (1 + 1e-6) and float(s[r - 1 :].norm()) > budget * (1 - 1e-6), name
        err = torch.linalg.matrix_norm(d.double() - approx.double()) / torch.linalg.matrix_norm(d.double())
        assert float(err) <= tol + 2e-3, name


def _v_shaped(src, path):
    """A copy of the SD2 file whose ``output_blocks.11.1...norm1.bias`` has the spread of a 768-v model (std
    0.58 > ComfyUI's 0.09): what ``--prediction-type auto`` reads."""
    from mace_ops.single_file import SD2_V_PROBE

    with safe_open(str(src), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[SD2_V_PROBE] = torch.linspace(-1, 1, tensors[SD2_V_PROBE].numel()).to(tensors[SD2_V_PROBE].dtype)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(("choice", "v_file"), [("v_prediction", False), ("auto", True)])
def test_sd2_run_samples_with_v_prediction(files, tmp_path, monkeypatch, choice, v_file):
    """``mace-erase run`` on a tiny SD2 file with ``--prediction-type v_prediction``, and with ``auto`` on a file
    whose probe tensor is 768-v-shaped: every sampler step of the run (training data and report) reads the
    UNet output as v. Checked on each step from DDIM's definitions, not the scheduler's config: the predicted
    x0 is ``√ᾱ x − √(1−ᾱ) out`` for v, ``(x − √(1−ᾱ) out) / √ᾱ`` for epsilon (which must not match). The
    LoRA loss (attention maps) does not read the UNet output, so sampling is where the type acts."""
    from diffusers import DDIMScheduler

    seen = []
    step = DDIMScheduler.step

    def spy(self, out, t, x, *args, **kwargs):
        result = step(self, out, t, x, *args, **kwargs)
        a = self.alphas_cumprod[int(t)].double()
        x0 = {"v_prediction": a.sqrt() * x.double() - (1 - a).sqrt() * out.double(),
              "epsilon": (x.double() - (1 - a).sqrt() * out.double()) / a.sqrt()}
        got = result.pred_original_sample.double()
        seen.append([k for k, v in x0.items() if torch.allclose(got, v, rtol=1e-4, atol=1e-4)])
        return result

    monkeypatch.setattr(DDIMScheduler, "step", spy)
    src = _v_shaped(files["sd2"], tmp_path / "sd2_768v.safetensors") if v_file else files["sd2"]
    _run(src, tmp_path, "--prediction-type", choice)
    assert len(seen) >= 4 and all(s == ["v_prediction"] for s in seen)
