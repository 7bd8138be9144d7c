"""mace_ops.cli: exit codes, run end to end on a tiny checkpoint file, resume after Ctrl-C, demo, eval."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mace_ops import cli
from mace_ops.checkpoint import write_tiny_sd1_checkpoint
from mace_ops.hosts.base import matrix_names, sd1_block_names
from mace_ops.io import load_erasure

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
    assert c["harmonic"] == pytest.approx(cli._harmonic(1 - c["acc_e"], c["acc_s"]))


def test_eval_applies_an_erasure_file_and_refuses_another_base(tmp_path, tiny_file, tiny_host):
    from mace_ops.concepts import Concept
    from mace_ops.io import save_erasure
    from mace_ops.pipeline import Erasure

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
    concepts, retained, settings = cli._concepts_and_settings(args, token_ids=None)
    from mace_ops.concepts import load_preset
    from mace_ops.preservation import retained_prompts

    preset = load_preset("celebrities_10")
    assert concepts == preset.concepts
    assert retained == (retained_prompts(preset.retained, preset.kind) if preset.retained else [])
    assert settings.train.steps == 7 and settings.n_images == 3 and settings.seed == 5 and settings.train.seed == 5
    assert settings.fusion_preserve == preset.weights["fusion_preserve"]
    assert settings.train.lr == float(preset.train["lr"])
