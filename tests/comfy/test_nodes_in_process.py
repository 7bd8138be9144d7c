"""The MACE nodes called in-process on ComfyUI objects (tiny model, 1-layer CLIP): fast node-level checks
of what the server test covers end to end — save/load/apply round trip, refusal, interrupt and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nodes(comfy_lib, tmp_path_factory):
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_dirs")
    for sub in ("output", "user", "temp"):
        (base / sub).mkdir()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.set_temp_directory(str(base / "temp"))
    from _v3_nodes import v3_nodes

    return v3_nodes(ROOT)


def _apply(model, erasure, strength):
    """Apply Erasure as ComfyUI runs it (its V3 class's execute) -> (MODEL,)."""
    from _v3_nodes import v3_nodes

    return tuple(v3_nodes(ROOT)["MaceApplyErasure"](model, erasure, strength).args)


def _state(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


@pytest.fixture(scope="module")
def run(nodes, tiny_parts):
    """Concept List -> Preservation -> Refine -> Train -> Fuse, under inference mode as ComfyUI runs nodes."""
    model, clip, vae = tiny_parts
    before = _state(model)
    with torch.inference_mode():
        (concepts,) = nodes["MaceConceptList"]("cat -> a dog\nEiffel Tower -> a tower", "object", "a thing", "none")
        (pres,) = nodes["MacePreservationSet"](clip, "none", "a photo of a house\na red car", "", "object")
        (refined,) = nodes["MaceRefineCrossAttention"](model, clip, concepts, pres, -1.0, -1.0, 0.1)
        train_args = dict(original_model=model, refined_model=refined, clip=clip, vae=vae, concepts=concepts, steps=2,
                          learning_rate=0.0, rank=1, seed=0, batch_size=1, images_per_concept=1, sample_steps=2,
                          cfg=7.5, image_size=64)
        (bank,) = nodes["MaceTrainConceptLoRA"](**train_args)
        erased, erasure = nodes["MaceFuseLoRAs"](refined, clip, bank, pres, -1.0, -1.0, 0.1)
    return dict(model=model, clip=clip, vae=vae, concepts=concepts, pres=pres, refined=refined, bank=bank,
                erased=erased, erasure=erasure, before=before, train_args=train_args)


def test_input_model_untouched_and_outputs_are_clones(run):
    assert run["refined"] is not run["model"] and run["erased"] is not run["model"]
    after = _state(run["model"])
    assert all(torch.equal(run["before"][k], after[k]) for k in after)


def test_save_load_apply_round_trip(nodes, run):
    import folder_paths

    from mace_ops.hosts.comfy import ComfyHost

    with torch.inference_mode():
        ui = nodes["MaceSaveErasure"](run["erasure"], "mace/inproc")
        ui2 = nodes["MaceSaveErasure"](run["erasure"], "mace/inproc")
        rel = ui.ui["text"][0]
        assert rel != ui2.ui["text"][0]  # a second save never overwrites the first
        assert (Path(folder_paths.get_output_directory()) / rel).is_file()
        choice = "output/" + rel.replace("\\", "/")
        assert choice in nodes["MaceLoadErasure"].cls.INPUT_TYPES()["required"]["erasure_file"][1]["options"]
        (loaded,) = nodes["MaceLoadErasure"](choice)
        (applied,) = _apply(run["model"], loaded, 1.0)
        (half,) = _apply(run["model"], loaded, 0.5)
    w_erased = ComfyHost(run["erased"]).cross_attention_weights()
    w_applied = ComfyHost(applied).cross_attention_weights()
    w_half = ComfyHost(half).cross_attention_weights()
    w0 = ComfyHost(run["model"]).cross_attention_weights()
    for n, w in w_erased.items():
        torch.testing.assert_close(w_applied[n], w, rtol=0, atol=1e-6)
        torch.testing.assert_close(w_half[n], (w0[n] + w) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(w_erased[n], w0[n]) for n in w0)


def test_apply_refuses_another_base_model(nodes, run, other_tiny_model):
    from mace_ops.errors import MaceError
    from mace_ops.hosts.comfy import ComfyHost

    other = other_tiny_model()
    with torch.inference_mode():
        mine = ComfyHost(other).model_fingerprint()
        with pytest.raises(MaceError) as err:
            _apply(other, run["erasure"], 1.0)
    msg = str(err.value)
    assert msg.startswith("model input") and mine in msg and run["erasure"].erasure.base_fingerprint in msg


def test_wrong_sockets_and_other_models_are_named(nodes, run, other_tiny_model):
    from mace_ops.errors import MaceError

    with torch.inference_mode():
        with pytest.raises(MaceError, match="concepts input"):
            nodes["MaceRefineCrossAttention"](run["model"], run["clip"], "cat", run["pres"], -1.0, -1.0, 0.1)
        with pytest.raises(MaceError, match="refined_model input"):
            args = dict(run["train_args"], original_model=run["model"], refined_model=other_tiny_model())
            nodes["MaceTrainConceptLoRA"](**args)
        with pytest.raises(MaceError, match="refined_model input"):
            nodes["MaceFuseLoRAs"](other_tiny_model(), run["clip"], run["bank"], run["pres"], -1.0, -1.0, 0.1)


def test_apply_to_an_erased_model_does_not_erase_twice(nodes, run):
    from mace_ops.hosts.comfy import ComfyHost

    with torch.inference_mode():
        (again,) = _apply(run["erased"], run["erasure"], 1.0)
    w_erased = ComfyHost(run["erased"]).cross_attention_weights()
    for n, w in ComfyHost(again).cross_attention_weights().items():
        torch.testing.assert_close(w, w_erased[n], rtol=0, atol=1e-6)


def test_train_honours_interrupt_and_resumes_from_cache(nodes, run):
    import comfy.model_management

    args = dict(run["train_args"], seed=7)
    with torch.inference_mode():
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            nodes["MaceTrainConceptLoRA"](**args)
        comfy.model_management.interrupt_current_processing(False)
        (first,) = nodes["MaceTrainConceptLoRA"](**args)
        (again,) = nodes["MaceTrainConceptLoRA"](**args)  # a re-queue: every concept comes from the cache
    for name in first.bank.names:
        assert torch.equal(first.bank.up(name), again.bank.up(name))
        assert torch.equal(first.bank.down(name), again.bank.down(name))
    assert first.losses == again.losses


def test_train_with_user_images_and_masks(nodes, run):
    from mace_ops.errors import MaceError

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 66, 70, 3, generator=g)  # ComfyUI IMAGE, not a multiple of 8: cropped to 64x64
    masks = torch.zeros(2, 66, 70)
    masks[:, 8:40, 8:40] = 1.0
    args = dict(run["train_args"], seed=11, images=images, masks=masks, images_for="Eiffel Tower")
    with torch.inference_mode():
        (bank,) = nodes["MaceTrainConceptLoRA"](**args)
        with pytest.raises(MaceError, match="images_for input"):
            nodes["MaceTrainConceptLoRA"](**dict(args, images_for="not a concept"))
    assert set(bank.losses) == {"cat", "Eiffel Tower"}
    assert all(len(v) == 2 and all(x == x for x in v) for v in bank.losses.values())


def test_two_graphs_on_the_same_model_never_leak(nodes, run):
    """Two graphs in one queue share the input MODEL: one applies the erasure at strength 1, the other at
    0.5, a third uses the MODEL as is. ComfyUI loads each in turn, patching the shared UNet module in
    place: each sees exactly its own weights, MACE reading the plain MODEL meanwhile gets the original
    weights, and loading the plain MODEL again restores the module bit for bit."""
    import comfy.model_management

    from mace_ops.hosts.comfy import ComfyHost

    model = run["model"]
    with torch.inference_mode():
        (a,) = _apply(model, run["erasure"], 1.0)
        (b,) = _apply(model, run["erasure"], 0.5)
    w0 = ComfyHost(model).cross_attention_weights()
    expected = {"a": ComfyHost(a).cross_attention_weights(), "b": ComfyHost(b).cross_attention_weights(), "model": w0}
    patchers = {"a": a, "b": b, "model": model}
    assert any(not torch.equal(expected["a"][n], w0[n]) for n in w0)

    for key in ("a", "b", "model", "b", "a", "model"):
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([patchers[key]])
        module = patchers[key].model.diffusion_model
        for n, w in expected[key].items():  # what ComfyUI's sampler would compute with
            torch.testing.assert_close(module.get_submodule(n).weight.detach().float().cpu(), w, rtol=0, atol=1e-6)
        # the other graph, reading the same MODEL while this one is loaded, sees the original weights
        for n, w in ComfyHost(model).cross_attention_weights().items():
            assert torch.equal(w, w0[n])
    after = _state(model)
    assert all(torch.equal(run["before"][k], after[k]) for k in after)


def test_fuse_external_loras_node_fuses_files_from_the_loras_folder(nodes, tiny_parts, tmp_path):
    """Two LoRA files (kohya keys with LDM names; diffusers keys) in a loras folder, fused by the node as
    the core computes it; a file with a self-attention key is refused by name, or listed when allowed."""
    import folder_paths
    from safetensors.torch import save_file

    from mace_ops.errors import MaceError
    from mace_ops.external_lora import (
        diffusers_block_name,
        fuse_external_loras,
        layers_per_block,
        read_external_lora,
    )
    from mace_ops.hosts.comfy import ComfyHost

    model, clip, _ = tiny_parts
    host = ComfyHost(model, clip)
    shapes = {k: tuple(w.shape) for k, w in host.cross_attention_weights().items()}
    per = layers_per_block([n.rsplit(".", 1)[0] for n in shapes])  # this tiny layout: 1 res block per level
    g = torch.Generator().manual_seed(0)
    kohya, diffusers = {}, {}
    for name, (o, d) in shapes.items():
        block, proj = name.rsplit(".", 1)
        base = "lora_unet_" + name.replace(".", "_")
        kohya[f"{base}.lora_down.weight"], kohya[f"{base}.lora_up.weight"] = torch.randn(2, d, generator=g), torch.randn(o, 2, generator=g)
        kohya[f"{base}.alpha"] = torch.tensor(1.0)
        dn = f"unet.{diffusers_block_name(block, per)}.{proj}"
        diffusers[f"{dn}.lora_A.weight"], diffusers[f"{dn}.lora_B.weight"] = torch.randn(1, d, generator=g), torch.randn(o, 1, generator=g)
    attn1 = "lora_unet_" + next(iter(shapes)).replace("attn2", "attn1").replace(".", "_")
    with_other = dict(kohya, **{f"{attn1}.lora_down.weight": torch.zeros(1, 4), f"{attn1}.lora_up.weight": torch.zeros(4, 1)})
    folder = tmp_path / "loras"
    folder.mkdir()
    for fname, tensors in (("a.safetensors", kohya), ("b.safetensors", diffusers), ("c.safetensors", with_other)):
        save_file(tensors, str(folder / fname))
    folder_paths.add_model_folder_path("loras", str(folder))

    with torch.inference_mode():
        (concepts,) = nodes["MaceConceptList"]("cat -> a dog\nMonet -> art :: style", "object", "a thing", "none")
        (pres,) = nodes["MacePreservationSet"](clip, "none", "a photo of a house\na red car", "", "object")
        erased, erasure, report = nodes["MaceFuseExternalLoRAs"](
            model, clip, concepts, pres, "a.safetensors\nb.safetensors", False, 2.0, 0.0, 0.1)
        loras = [read_external_lora(folder / f, shapes) for f in ("a.safetensors", "b.safetensors")]
        want = fuse_external_loras(host, concepts.concepts, loras, pres.statistics.groups(2.0, 0.0), 0.1)
        for k, w in want.items():
            torch.testing.assert_close(erasure.erasure.weights[k], w)
        assert f"cat (object): a.safetensors, kohya keys, {len(shapes)} to_k/to_v" in report
        assert "Monet (style): b.safetensors, diffusers keys" in report
        assert ComfyHost(erased).cross_attention_weights().keys() == want.keys()
        with pytest.raises(MaceError, match="attn1"):
            nodes["MaceFuseExternalLoRAs"](model, clip, concepts, pres, "c.safetensors\nb.safetensors",
                                           False, 2.0, 0.0, 0.1)
        *_, report = nodes["MaceFuseExternalLoRAs"](model, clip, concepts, pres, "c.safetensors\nb.safetensors",
                                                    True, 2.0, 0.0, 0.1)
        assert "ignored 1: " + attn1[len("lora_unet_"):] in report
        with pytest.raises(MaceError, match="not in the loras folder"):
            nodes["MaceFuseExternalLoRAs"](model, clip, concepts, pres, "missing.safetensors\nb.safetensors",
                                           False, 2.0, 0.0, 0.1)


def test_robustness_probe_node_reports_every_attack_and_leaves_models_untouched(nodes, run, tmp_path):
    """Own prompts, paraphrases, a prompt file and relearning (gradients under inference mode), grids out."""
    prompt_file = tmp_path / "attack.csv"
    prompt_file.write_text("prompt,evaluation_seed\na cat on a sofa,3\n", encoding="utf-8")
    from mace_ops.hosts.comfy import ComfyHost

    # effective weights (ComfyUI keeps a sampled clone's patches in the shared module until it unloads it)
    before = {m: ComfyHost(run[m]).cross_attention_weights() for m in ("model", "erased")}
    with torch.inference_mode():
        out = nodes["MaceRobustnessProbe"](
            run["model"], run["erased"], run["clip"], run["vae"], run["erasure"], "cat: a small feline", "none",
            str(prompt_file), 5, "a photo of a house", 2, 2, 0, 2, 7.5, 64)
    grids, text = out.args
    assert grids.ndim == 4 and grids.shape[-1] == 3 and grids.shape[0] >= 4
    for attack in ("| own |", "| paraphrase |", "| file:attack |", "| relearning |"):
        assert attack in text
    assert "not judged (n=2)" in text and "safe" not in text.lower()
    for m, weights in before.items():
        after = ComfyHost(run[m]).cross_attention_weights()
        assert all(torch.equal(weights[k], after[k]) for k in after), m
