"""mace_ops.cli: exit codes, run end to end on a tiny checkpoint file, resume after Ctrl-C, demo, eval."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mace_ops import cli, evaluation, run_inputs
from mace_ops.checkpoint import write_tiny_sd1_checkpoint
from mace_ops.erasure import load_erasure
from mace_ops.hosts.base import matrix_names, sd1_block_names
from mace_ops.tokens import sd1_token_ids

FAST = ["--images", "1", "--size", "64", "--sample-steps", "2", "--steps", "2", "--report-images", "0", "--quiet"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_tiny_sd1_checkpoint(tmp_path_factory.mktemp("cli") / "tiny.safetensors", seed=0)


@pytest.fixture
def inputs(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("Taylor Swift -> a person\nairplane -> sky\n", encoding="utf-8")
    preserve = tmp_path / "preserve.txt"
    preserve.write_text("a red house\na dog on a beach\na bowl of fruit\n", encoding="utf-8")
    return concepts, preserve


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------- bad input -> exit 2, nothing written


def test_bad_inputs_exit_2(tmp_path, inputs, tiny_file, capsys):
    concepts, preserve = inputs
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(pickle.dumps({"state_dict": 1}))
    existing = tmp_path / "exists"
    existing.mkdir()
    out = str(tmp_path / "o")
    cases = [
        (["run", "--checkpoint", str(tmp_path / "nope.safetensors"), "--concepts", str(concepts), "--out", out],
         "does not exist"),
        (["run", "--checkpoint", str(tiny_file), "--concepts", str(concepts), "--out", str(existing)], "exists"),
        (["run", "--checkpoint", str(pickled), "--concepts", str(concepts), "--out", out], "pickle"),
        (["run", "--checkpoint", str(tiny_file), "--concepts", str(empty), "--out", out, "--preserve", str(preserve)],
         "empty"),
        (["run", "--checkpoint", str(tiny_file), "--preset", "no_such_preset", "--out", out], "unknown preset"),
        (["run", "--checkpoint", str(tiny_file), "--concepts", str(concepts), "--out", out, "--size", "30"],
         "multiple of 8"),
        (["eval", "--suite", "explicit", "--checkpoint", str(tiny_file), "--out", out], "--prompts"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "o").exists()
    assert cli.main(["run", "--checkpoint", "x"]) == 2  # argparse usage error


def test_python_m_mace_ops_help():
    r = subprocess.run([sys.executable, "-m", "mace_ops", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "run" in r.stdout and "demo" in r.stdout and "eval" in r.stdout


# ---------------------------------------------------------------- run end to end


def test_run_end_to_end_and_resume(tmp_path, inputs, tiny_file, monkeypatch):
    concepts, preserve = inputs
    before = _sha(tiny_file)
    out = tmp_path / "erased"
    argv = ["run", "--checkpoint", str(tiny_file), "--concepts", str(concepts), "--preserve", str(preserve),
            "--out", str(out), *FAST]

    # 1) Ctrl-C during fusion: exit 130, the trained concepts stay in OUT.partial/cache, no OUT
    import mace_ops.pipeline as pipeline

    real_fuse = pipeline.fuse_weights

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fuse_weights", interrupted)
    assert cli.main(argv) == 130
    assert not out.exists() and (tmp_path / "erased.partial" / "cache").is_dir()

    # 2) the same command resumes: no optimiser step is taken again
    monkeypatch.setattr(pipeline, "fuse_weights", real_fuse)

    def no_training(*a, **k):
        raise AssertionError("a finished concept was trained again")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_training)
    assert cli.main(argv) == 0
    monkeypatch.undo()

    assert _sha(tiny_file) == before  # the input is never modified
    assert not (tmp_path / "erased.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == ["command.json", "concepts.txt", "erasure.safetensors", "report",
                                                    "tiny_mace.safetensors"]
    # the sanitized checkpoint differs from the input only in the 32 cross-attention matrices
    names = matrix_names(sd1_block_names())
    with safe_open(str(tiny_file), framework="pt") as a, safe_open(str(out / "tiny_mace.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        changed = {k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))}
        assert json.loads(b.metadata()["mace.concepts"])[0]["phrase"] == "Taylor Swift"
    assert changed and changed <= {f"model.diffusion_model.{n}.weight" for n in names}
    # the erasure file reproduces the sanitized matrices from the original ones (W = W0 + diff)
    _, diffs = load_erasure(out / "erasure.safetensors")
    assert {f"model.diffusion_model.{n}.weight" for n in diffs} == changed
    with safe_open(str(tiny_file), framework="pt") as a, safe_open(str(out / "tiny_mace.safetensors"), framework="pt") as b:
        for n, d in diffs.items():
            key = f"model.diffusion_model.{n}.weight"
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key) + d)
    report = json.loads((out / "report" / "report.json").read_text())
    assert [c["phrase"] for c in report["concepts"]] and report["summary"]["concepts"] == 2
    assert cli.main(argv) == 2  # the finished OUT is never overwritten


# ---------------------------------------------------------------- demo


def test_demo_completes(tmp_path, monkeypatch):
    """The demo's code path with fewer steps (its full-size timing is a benchmark, not a test)."""
    full = cli.demo_settings

    def quick(seed=0):
        s = full(seed)
        return dataclasses.replace(s, n_images=1, sample_steps=1, train=dataclasses.replace(s.train, steps=2))

    monkeypatch.setattr(cli, "demo_settings", quick)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", "tiny", "--out", str(out), "--preserve-prompts", "5", "--quiet"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert {c["phrase"] for c in report["concepts"]} == {"Taylor Swift", "airplane", "Van Gogh"}
    assert {c["kind"] for c in report["concepts"]} == {"object", "style"}
    for c in report["concepts"]:
        assert c["losses"] and c["images"] and c["attention_mass_after"] is not None
    assert (out / "report" / "report.html").is_file() and (out / "erasure.safetensors").is_file()
    assert cli.main(["demo", "--model", "tiny", "--out", str(out), "--quiet"]) == 2


# ---------------------------------------------------------------- eval


def _tiny_clip(folder):
    """A random tiny CLIP (transformers format) with the SD1 tokenizer: exercises the metric code only."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from mace_ops.tokens import load_sd1_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    load_sd1_tokenizer().save_pretrained(folder)


def test_eval_objects_reports_what_it_computed(tmp_path, tiny_file):
    erased = tmp_path / "erased.txt"
    erased.write_text("airplane\n", encoding="utf-8")
    common = ["eval", "--suite", "objects", "--checkpoint", str(tiny_file), "--limit", "2", "--steps", "1",
              "--size", "64", "--erased", str(erased), "--quiet"]
    assert cli.main([*common, "--out", str(tmp_path / "e1")]) == 0
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert m["prompts"] == 2 and m["computed"] == {} and set(m["not_computed"]) == {"acc_e", "acc_s", "harmonic"}
    assert "--clip" in m["not_computed"]["acc_e"]
    assert len(list((tmp_path / "e1" / "images").iterdir())) == 2

    _tiny_clip(tmp_path / "clip")
    assert cli.main([*common, "--out", str(tmp_path / "e2"), "--clip", str(tmp_path / "clip")]) == 0
    m = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    c = m["computed"]
    assert m["erased"] == ["airplane"] and set(c) >= {"acc_e", "acc_s", "harmonic"} and m["not_computed"] == {}
    assert c["acc_e"] in (0.0, 1.0) and c["acc_s"] in (0.0, 1.0)  # one erased image, one preserved
    assert c["harmonic"] == pytest.approx(evaluation._harmonic(1 - c["acc_e"], c["acc_s"]))


def test_eval_applies_an_erasure_file_and_refuses_another_base(tmp_path, tiny_file, tiny_host):
    from mace_ops.concepts import Concept
    from mace_ops.erasure import Erasure, save_erasure

    w0 = tiny_host.cross_attention_weights()
    new = {n: w * 1.01 for n, w in w0.items()}
    good = save_erasure(Erasure(new, tiny_host.model_fingerprint(), [Concept("cat", "animal")]), w0,
                        tmp_path / "good.safetensors")
    other = save_erasure(Erasure(new, "0" * 64, [Concept("cat", "animal")]), w0, tmp_path / "other.safetensors")
    common = ["eval", "--suite", "objects", "--checkpoint", str(tiny_file), "--limit", "1", "--steps", "1",
              "--size", "64", "--quiet"]
    assert cli.main([*common, "--erasure", str(good), "--out", str(tmp_path / "ok")]) == 0
    m = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert m["erased"] == ["cat"] and m["erasure"] == str(good)
    assert cli.main([*common, "--erasure", str(other), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_preset_and_overrides(tmp_path):
    args = cli.build_parser().parse_args(
        ["run", "--checkpoint", "x", "--preset", "celebrities_10", "--out", str(tmp_path / "o"), "--steps", "7",
         "--images", "3", "--seed", "5"])
    concepts, retained, settings = run_inputs.concepts_and_settings(args, token_ids=None)
    from mace_ops.concepts import load_preset
    from mace_ops.preservation import retained_prompts

    preset = load_preset("celebrities_10")
    assert concepts == preset.concepts
    assert retained == (retained_prompts(preset.retained, preset.kind) if preset.retained else [])
    assert settings.train.steps == 7 and settings.n_images == 3 and settings.seed == 5 and settings.train.seed == 5
    assert settings.fusion_preserve == preset.weights["fusion_preserve"]
    assert settings.train.lr == float(preset.train["lr"])
    assert not settings.closed_form_only
    fast = run_inputs.with_overrides(cli.build_parser().parse_args(
        ["run", "--checkpoint", "x", "--preset", "celebrities_10", "--out", str(tmp_path / "o"), "--fast"]), settings)
    assert fast.closed_form_only and fast.cfr_preserve == settings.cfr_preserve
    assert settings.harden_rounds == 0  # hardening is off unless asked for
    hard = run_inputs.with_overrides(cli.build_parser().parse_args(
        ["run", "--checkpoint", "x", "--preset", "celebrities_10", "--out", str(tmp_path / "o"), "--fast",
         "--harden", "2"]), settings)
    assert hard.harden_rounds == 2 and hard.closed_form_only and hard.harden().rounds == 2
    assert settings.train.concepts_per_batch == 8  # the pipeline's default unless asked otherwise
    small = run_inputs.with_overrides(cli.build_parser().parse_args(
        ["run", "--checkpoint", "x", "--preset", "celebrities_10", "--out", str(tmp_path / "o"),
         "--concepts-per-batch", "2"]), settings)
    assert small.train.concepts_per_batch == 2 and small.train.steps == settings.train.steps


# ---------------------------------------------------------------- cheap inputs before the model


class _Marker:
    """Unpickling this creates the folder ``path``: the proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture
def no_model_load(monkeypatch):
    """Every way ``run`` could load a model fails the test."""
    from mace_ops import checkpoint
    from mace_ops.hosts.diffusers import DiffusersHost

    def loader(*args, **kwargs):
        pytest.fail("the model was loaded although a cheap input is bad")

    monkeypatch.setattr(checkpoint, "load_sd1_host", loader)
    monkeypatch.setattr(checkpoint, "load_sd1_modules", loader)
    monkeypatch.setattr(DiffusersHost, "from_pretrained", classmethod(loader))


def _terabyte_header(path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    return path


def _bad_input_cases(tmp_path, tiny_file):
    """(argv without --out or with a bad one, expected message) for each cheap input gone wrong."""
    d = tmp_path / "in"
    d.mkdir()
    good = d / "good.txt"
    good.write_text("Taylor Swift -> a person\nairplane -> sky\n", encoding="utf-8")
    typo = d / "typo.txt"
    typo.write_text("Taylor Swift -> a person\nairplane -> sky\nVan Gogh -> -> art\n", encoding="utf-8")
    long = d / "long.txt"
    long.write_text("cat -> a dog\n" + " ".join(["word"] * 80) + "\n", encoding="utf-8")
    empty = d / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    latin1 = d / "latin1.txt"
    latin1.write_bytes("caf\xe9 -> a cup\n".encode("latin-1"))
    zero = d / "zero.safetensors"
    zero.write_bytes(b"")
    pickled = d / "model.ckpt"
    pickled.write_bytes(pickle.dumps({"state_dict": _Marker(str(tmp_path / "UNPICKLED"))}))
    lora = d / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(lora))
    not_model = d / "folder"
    not_model.mkdir()
    a_file = d / "a_file"
    a_file.write_text("x", encoding="utf-8")
    exists = tmp_path / "exists"
    exists.mkdir()
    ck, out = ["--checkpoint", str(tiny_file)], ["--out", str(tmp_path / "o")]
    c = ["--concepts", str(good)]
    return [
        ([*ck, "--concepts", str(typo), *out], "--concepts: concept list line 3"),
        ([*ck, "--concepts", str(long), *out], "concept list line 2: phrase"),
        ([*ck, "--concepts", str(empty), *out], "concept list is empty"),
        ([*ck, "--concepts", str(d / "missing.txt"), *out], "does not exist"),
        ([*ck, "--concepts", str(latin1), *out], "not UTF-8"),
        ([*ck, *c, *out, "--max-concepts", "1"], "more than the limit of 1"),
        ([*ck, "--preset", "celebrities_1OO", *out], "unknown preset"),
        ([*ck, *c, "--out", str(exists)], "exists; MACE never overwrites"),
        ([*ck, *c, "--out", str(tmp_path / "no" / "o")], "does not exist; create it first"),
        ([*ck, *c, *out, "--size", "30"], "--size 30: give a positive multiple of 8"),
        ([*ck, *c, *out, "--images", "0"], "--images 0"),
        ([*ck, *c, *out, "--steps", "0"], "--steps 0"),
        ([*ck, *c, *out, "--sample-steps", "0"], "--sample-steps 0"),
        ([*ck, *c, *out, "--report-images", "-1"], "--report-images -1"),
        ([*ck, *c, *out, "--harden", "-1"], "--harden -1: give a whole number >= 0"),
        ([*ck, *c, *out, "--concepts-per-batch", "0"], "--concepts-per-batch 0: give a whole number >= 1"),
        ([*ck, *c, *out, "--lr", "-1"], "--lr -1.0: give a positive learning rate"),
        ([*ck, *c, *out, "--device", "gpu"], "--device 'gpu' is not a torch device"),
        ([*ck, *c, *out, "--cache", str(a_file)], "--cache"),
        ([*ck, *c, *out, "--preserve", str(empty)], "--preserve: prompt file"),
        ([*ck, *c, *out, "--retained", str(d / "missing.txt")], "--retained: prompt file"),
        (["--checkpoint", str(d / "nope.safetensors"), *c, *out], "--checkpoint: checkpoint"),
        (["--checkpoint", str(zero), *c, *out], "is truncated (0 bytes)"),
        (["--checkpoint", str(not_model), *c, *out], "has no unet/ subfolder: it is not a model"),
        (["--checkpoint", str(pickled), *c, *out], "never unpickled"),
        (["--checkpoint", str(_terabyte_header(d / "tb.safetensors")), *c, *out], "is truncated: 1099511"),
        (["--checkpoint", str(lora), *c, *out], "looks like a LoRA"),
    ]


def test_run_checks_every_cheap_input_before_loading_the_model(tmp_path, tiny_file, no_model_load, capsys):
    """Each bad cheap input: exit 2, its message, no model load, nothing written, nothing unpickled."""
    cases = _bad_input_cases(tmp_path, tiny_file)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(["run", *argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.count("\n") <= 3, err  # only this input is named (a 1-3 line message)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no out, out.partial, cache or marker
    # the patched loader is really on run's path: good inputs reach it
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
        cli.main(["run", "--checkpoint", str(tiny_file), "--concepts", str(tmp_path / "in" / "good.txt"),
                  "--out", str(tmp_path / "o"), "--quiet"])


def test_run_reports_all_bad_cheap_inputs_at_once(tmp_path, tiny_file, no_model_load, capsys):
    concepts = tmp_path / "c.txt"
    concepts.write_text("cat -> a dog\nbad -> -> line\ncat -> a dog\n", encoding="utf-8")
    (tmp_path / "o").mkdir()
    argv = ["run", "--checkpoint", str(tmp_path / "nope"), "--concepts", str(concepts), "--out", str(tmp_path / "o"),
            "--preserve", str(tmp_path / "none.txt"), "--size", "30"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for message in ("--out", "--checkpoint: checkpoint", "--preserve: prompt file", "line 2", "line 3", "--size 30"):
        assert message in err, (message, err)


def test_run_inputs_are_read_once_with_the_shipped_tokenizer(tmp_path, tiny_file, monkeypatch):
    """Good inputs: the concepts come parsed (the shipped tokenizer checked their length) before the load."""
    from mace_ops.concepts import Concept

    concepts = tmp_path / "c.txt"
    concepts.write_text("# people\nTaylor Swift\nairplane -> sky\n", encoding="utf-8")
    args = cli.build_parser().parse_args(["run", "--checkpoint", str(tiny_file), "--concepts", str(concepts),
                                          "--out", str(tmp_path / "o"), "--steps", "3", "--size", "64"])
    seen = []
    inputs = run_inputs.check_run_inputs(args, token_ids=lambda p: seen.extend(p) or sd1_token_ids(p))
    assert inputs.concepts == [Concept("Taylor Swift", "a person", "object"), Concept("airplane", "sky", "object")]
    assert inputs.checkpoint == tiny_file and inputs.preserve is None
    assert inputs.settings.train.steps == 3 and inputs.settings.image_size == 64
    assert any("Taylor Swift" in p for p in seen) and any("a person" in p for p in seen)  # length-checked
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- --dtype


def test_dtype_option_is_checked_with_the_other_inputs(tmp_path, monkeypatch):
    assert run_inputs.check_dtype("auto", "cpu") == torch.float32
    assert run_inputs.check_dtype(None, None) == torch.float32
    assert run_inputs.check_dtype("auto", "cuda") == torch.float16  # the default on a GPU (not checked here)
    assert run_inputs.check_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(run_inputs.MaceError, match="--dtype 'half': use one of auto, float32, float16, bfloat16"):
        run_inputs.check_dtype("half", "cpu")
    monkeypatch.setattr(run_inputs, "cpu_runs", lambda dtype: False)  # a torch without CPU fp16 kernels
    with pytest.raises(run_inputs.MaceError, match="cannot run a UNet in float16 on the CPU; use --dtype float32"):
        run_inputs.check_dtype("float16", "cpu")


def test_bad_dtype_exits_2_before_the_model_loads(tmp_path, inputs, tiny_file, no_model_load, capsys):
    concepts, _ = inputs
    argv = ["run", "--checkpoint", str(tiny_file), "--concepts", str(concepts), "--out", str(tmp_path / "o"),
            "--dtype", "fp8", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--dtype 'fp8': use one of" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_source_dtype_reads_the_unet_of_a_file_or_folder(tmp_path):
    from mace_ops.single_file import source_dtype

    save_file({"cond_stage_model.w": torch.zeros(2, dtype=torch.float32),
               "model.diffusion_model.w": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "a.safetensors"))
    assert source_dtype(tmp_path / "a.safetensors") == torch.float16
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    save_file({"conv_in.weight": torch.zeros(2, dtype=torch.bfloat16)},
              str(tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert source_dtype(tmp_path / "folder") == torch.bfloat16


def test_run_in_bfloat16_keeps_fp32_loras_and_the_files_dtype(tmp_path, inputs, tiny_file, monkeypatch):
    """--dtype bfloat16 on an fp16 file: UNet and text encoder in bf16, VAE float32, LoRA factors and AdamW
    moments float32; the sanitized checkpoint is fp16 like its source and differs only in to_k/to_v."""
    from safetensors.torch import load_file

    concepts, preserve = inputs
    with safe_open(str(tiny_file), framework="pt") as f:
        meta = f.metadata()
    half = tmp_path / "half.safetensors"
    source = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(tiny_file)).items()}
    save_file(source, str(half), metadata=meta)
    seen: dict[str, set] = {}
    real_run, real_step = cli._run_pipeline, torch.optim.AdamW.step

    def run_spy(host, *a, **k):
        for part, module in (("unet", host.unet), ("text", host.text_encoder), ("vae", host.vae)):
            seen[part] = {p.dtype for p in module.parameters()}
        return real_run(host, *a, **k)

    def step_spy(self, *a, **k):
        out = real_step(self, *a, **k)
        seen.setdefault("lora", set()).update(p.dtype for g in self.param_groups for p in g["params"])
        seen.setdefault("moments", set()).update(v.dtype for s in self.state.values() for key, v in s.items()
                                                 if key in ("exp_avg", "exp_avg_sq"))
        return out

    monkeypatch.setattr(cli, "_run_pipeline", run_spy)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_spy)
    out = tmp_path / "erased"
    assert cli.main(["run", "--checkpoint", str(half), "--concepts", str(concepts), "--preserve", str(preserve),
                     "--out", str(out), "--dtype", "bfloat16", *FAST]) == 0
    assert seen["unet"] == {torch.bfloat16} and seen["text"] == {torch.bfloat16} and seen["vae"] == {torch.float32}
    assert seen["lora"] == {torch.float32} and seen["moments"] == {torch.float32}
    result = load_file(str(out / "half_mace.safetensors"))
    assert result.keys() == source.keys() and all(result[k].dtype == source[k].dtype for k in source)
    changed = {k for k in source if not torch.equal(result[k], source[k])}
    names = matrix_names(sd1_block_names())
    assert changed and changed <= {f"model.diffusion_model.{n}.weight" for n in names}
