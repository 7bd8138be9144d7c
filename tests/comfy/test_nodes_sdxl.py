"""The nine MACE nodes on an SDXL MODEL/CLIP built in process (``comfy.supported_models.SDXL``, tiny
channels, the real 70-block layout, 3-layer CLIP-L and bigG), under inference mode as ComfyUI runs nodes;
stock CheckpointSave -> CheckpointLoaderSimple on an SDXL model that stock detection recognises; the
SDXL workflow's graph on the tiny SDXL; the erasure chain on a tiny SD2.x."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mace_ops.family import SDXL

ROOT = Path(__file__).resolve().parents[2]
UNET = "diffusion_model."


@pytest.fixture(scope="module")
def nodes(comfy_lib, tmp_path_factory):
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_dirs_sdxl")
    for sub in ("output", "user", "temp"):
        (base / sub).mkdir()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.set_temp_directory(str(base / "temp"))
    from _v3_nodes import v3_nodes

    return v3_nodes(ROOT)


def _state(patcher):
    """The module's weights as ``patcher`` itself gives them. It is loaded first: clones share one module, which
    ComfyUI patches in place for whichever clone it loaded last (an earlier test's erased MODEL, say)."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def _stock_nodes(comfy_path: str):
    """ComfyUI's own nodes.py (loaded by path: this pack also has a package named ``nodes``)."""
    if "comfy_stock_nodes" not in sys.modules:
        path = Path(comfy_path) / "nodes.py"
        spec = importlib.util.spec_from_file_location("comfy_stock_nodes", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["comfy_stock_nodes"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["comfy_stock_nodes"]


@pytest.fixture(scope="module")
def run(nodes, sdxl_parts):
    """Concept List -> Preservation Set -> Refine -> Train -> Fuse -> Save -> Load -> Apply -> Preview."""
    model, clip, vae = sdxl_parts
    before = _state(model)
    with torch.inference_mode():
        pres, refined, bank = _train(nodes, sdxl_parts, "cat -> a dog\nEiffel Tower -> a tower", steps=2)
        erased, erasure = nodes["MaceFuseLoRAs"](refined, clip, bank, pres, -1.0, -1.0, 0.1)
        rel = nodes["MaceSaveErasure"](erasure, "mace/sdxl").ui["text"][0]
        (loaded,) = nodes["MaceLoadErasure"]("output/" + rel.replace("\\", "/"))
        (applied,) = nodes["MaceApplyErasure"](model, loaded, 1.0)
        preview = nodes["MaceErasurePreview"](model, erased, clip, vae, loaded, "a photo of a house", 1, 0, 2,
                                              5.0, 64)
    return dict(model=model, before=before, refined=refined, bank=bank, erased=erased, erasure=erasure,
                applied=applied, preview=preview)


def test_sdxl_passes_all_nine_nodes_and_the_input_model_stays_bit_identical(run):
    import comfy.model_management

    from mace_ops.hosts.comfy import ComfyHost

    host = ComfyHost(run["model"])
    # the preview sampled the erased clone, whose patches ComfyUI keeps in the shared module until it loads
    # another model: the MODEL's own weights (the patcher's backup) are unchanged meanwhile ...
    w_model = host.cross_attention_weights()
    assert all(torch.equal(w, run["before"][f"{UNET}{n}.weight"]) for n, w in w_model.items())
    with torch.inference_mode():  # ... and loading the MODEL again gives back the module bit for bit
        comfy.model_management.load_models_gpu([run["model"]])
    after = _state(run["model"])
    assert after.keys() == run["before"].keys()
    assert all(torch.equal(run["before"][k], after[k]) for k in after)  # label_emb included
    assert host.family is SDXL and len(host.cross_attention_blocks()) == 70
    w0 = host.cross_attention_weights()
    w_erased = ComfyHost(run["erased"]).cross_attention_weights()
    w_applied = ComfyHost(run["applied"]).cross_attention_weights()
    assert set(run["erasure"].erasure.weights) == set(w0) and len(w0) == 140
    assert all(w.shape[1] == 2048 for w in w0.values())
    assert sum(not torch.equal(w_erased[n], w0[n]) for n in w0) == 140
    for n, w in w_erased.items():
        torch.testing.assert_close(w_applied[n], w, rtol=0, atol=1e-6)
    assert set(run["bank"].losses) == {"cat", "Eiffel Tower"}
    assert all(len(v) == 2 and all(x == x for x in v) for v in run["bank"].losses.values())
    rows, text = run["preview"].args
    assert rows.shape == (2, 64, 128, 3) and "cat -> a dog" in text


def test_stock_checkpoint_save_and_load_carry_the_erased_weights(nodes, comfy_lib, tmp_path):
    """Stock CheckpointSave -> CheckpointLoaderSimple on the smallest SDXL that stock detection accepts:
    detection reads model_channels 320, linear transformers, depths 0/0/2/2/10/10, 2048-d context and 2816
    label_emb inputs, not the channel multipliers, so channel_mult 1/1/1 (265 M UNet parameters; the file
    is 0.94 GB in float16 with 3-layer CLIP-L/bigG and a TAESD VAE; ~80 s and ~6 GB peak memory on a CPU, as
    the stock loader allocates the full 12-layer CLIP-L and 32-layer bigG). The erasure here is Refine's (closed form,
    140 matrices) to keep the test short; the loaded MODEL is detected as SDXL and carries the patched
    to_k/to_v, every other UNet tensor as it was."""
    import comfy.supported_models
    import folder_paths
    from _tiny_comfy import build_family_parts
    from comfy_extras.nodes_model_merging import CheckpointSave

    from mace_ops.hosts.comfy import ComfyHost

    model, clip, vae = build_family_parts("sdxl", seed=2, model_channels=320, channel_mult=(1, 1, 1),
                                          head_channels=64, text_config={"num_hidden_layers": 3},
                                          dtype=torch.float16)
    with torch.inference_mode():
        (concepts,) = nodes["MaceConceptList"]("cat -> a dog", "object", "a thing", "none")
        (pres,) = nodes["MacePreservationSet"](clip, "none", "a photo of a house", "", "object")
        (erased,) = nodes["MaceRefineCrossAttention"](model, clip, concepts, pres, -1.0, -1.0, 0.1)
    want = ComfyHost(erased).cross_attention_weights()
    w0 = ComfyHost(model).cross_attention_weights()
    assert all(not torch.equal(want[n], w0[n]) for n in w0)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    saver = CheckpointSave()
    saver.output_dir = str(ckpt_dir)
    with torch.inference_mode():
        saver.save(erased, clip, vae, "mace_sdxl")
    (path,) = list(ckpt_dir.glob("mace_sdxl*.safetensors"))
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir))
    with torch.inference_mode():
        loaded, _clip, _vae = _stock_nodes(comfy_lib).CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
    assert isinstance(loaded.model.model_config, comfy.supported_models.SDXL)
    host = ComfyHost(loaded)
    assert host.family is SDXL
    got = host.cross_attention_weights()
    assert got.keys() == want.keys()
    for n, w in want.items():  # the file stores the model's float16: one float16 rounding of the patched weight
        torch.testing.assert_close(got[n], w, rtol=2**-10, atol=1e-7)
        assert not torch.equal(got[n], w0[n])
    original = model.model.diffusion_model.state_dict()
    for k, v in loaded.model.diffusion_model.state_dict().items():
        if not (k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight")):
            assert torch.equal(v.float(), original[k].float()), k


#: the workflow tests' minimal sizes (tests/test_workflows.py MINIMAL), so that the graph runs on a CPU
MINIMAL = {
    "MaceTrainConceptLoRA": {"steps": 1, "images_per_concept": 1, "sample_steps": 1, "image_size": 64},
    "MaceErasurePreview": {"max_concepts": 1, "steps": 1, "image_size": 64, "preserved_prompts": "a dog"},
    "MacePreservationSet": {"corpus": "none", "prompts": "a photo of a dog\na red car"},
}


def _run_api_graph(api: dict, loader_outputs: tuple, nodes: dict) -> dict[str, tuple]:
    """Execute an API-format graph in process, in dependency order, as ComfyUI's executor calls nodes:
    the checkpoint loader yields ``loader_outputs``; CheckpointSave and PreviewImage only record their inputs."""
    done: dict[str, tuple] = {}
    while len(done) < len(api):
        ready = [k for k, n in api.items() if k not in done and all(
            not isinstance(v, list) or v[0] in done for v in n["inputs"].values())]
        assert ready, "the graph has a cycle or a dangling link"
        for key in ready:
            node = api[key]
            inputs = {k: done[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            kind = node["class_type"]
            if kind == "CheckpointLoaderSimple":
                done[key] = loader_outputs
            elif kind in ("CheckpointSave", "PreviewImage"):
                done[key] = (inputs,)
            else:  # our V3 nodes
                done[key] = tuple(nodes[kind](**inputs).args)
    return done


def test_the_sdxl_workflow_graph_runs_on_an_sdxl_model(nodes, sdxl_parts):
    """example_workflows/mace_erase_sdxl_quick.json as an API graph (two of its concepts, the workflow tests'
    minimal sizes), every node executed in process on the tiny SDXL: the saved MODEL is the erased one."""
    import json

    from mace_ops.hosts.comfy import ComfyHost

    if "mace_build_workflows" not in sys.modules:  # as tests/test_workflows.py loads it
        spec = importlib.util.spec_from_file_location("mace_build_workflows", ROOT / "workflows" / "build_workflows.py")
        sys.modules["mace_build_workflows"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mace_build_workflows"])
    bw = sys.modules["mace_build_workflows"]
    api = bw.to_api(json.loads((ROOT / "example_workflows" / "mace_erase_sdxl_quick.json").read_text()))
    for node in api.values():
        node["inputs"].update(MINIMAL.get(node["class_type"], {}))
        if node["class_type"] == "MaceConceptList":
            node["inputs"]["concepts"] = "\n".join(node["inputs"]["concepts"].splitlines()[:2])
    with torch.inference_mode():
        done = _run_api_graph(api, sdxl_parts, nodes)
    kinds = {n["class_type"]: k for k, n in api.items()}
    (saved,) = done[kinds["CheckpointSave"]]
    (shown,) = done[kinds["PreviewImage"]]
    erasure = done[kinds["MaceFuseLoRAs"]][1]
    assert len(erasure.erasure.weights) == 140 and shown["images"].shape == (2, 64, 128, 3)
    got = ComfyHost(saved["model"]).cross_attention_weights()
    for n, w in erasure.erasure.weights.items():
        torch.testing.assert_close(got[n], w.float(), rtol=0, atol=1e-6)


def test_an_sd2_model_passes_the_erasure_nodes_unchanged(nodes, sd2_parts):
    """SD2.x through the same nodes (Concept List -> Preservation -> Refine -> Train -> Fuse -> Apply): 32
    matrices of 1024 columns change; the input MODEL is bit-identical."""
    import comfy.model_management

    from mace_ops.family import SD2
    from mace_ops.hosts.comfy import ComfyHost

    model, clip, vae = sd2_parts
    before = _state(model)
    with torch.inference_mode():
        (concepts,) = nodes["MaceConceptList"]("cat -> a dog", "object", "a thing", "none")
        (pres,) = nodes["MacePreservationSet"](clip, "none", "a photo of a house\na red car", "", "object")
        (refined,) = nodes["MaceRefineCrossAttention"](model, clip, concepts, pres, -1.0, -1.0, 0.1)
        (bank,) = nodes["MaceTrainConceptLoRA"](
            original_model=model, refined_model=refined, clip=clip, vae=vae, concepts=concepts, steps=1,
            learning_rate=1e-3, rank=1, seed=0, batch_size=1, images_per_concept=1, sample_steps=1, cfg=7.5,
            image_size=64)
        erased, erasure = nodes["MaceFuseLoRAs"](refined, clip, bank, pres, -1.0, -1.0, 0.1)
        (applied,) = nodes["MaceApplyErasure"](model, erasure, 1.0)
        comfy.model_management.load_models_gpu([model])
    host = ComfyHost(model)
    assert host.family is SD2
    w0, w1 = host.cross_attention_weights(), ComfyHost(applied).cross_attention_weights()
    assert len(w0) == 32 and all(w.shape[1] == 1024 for w in w0.values())
    assert all(not torch.equal(w0[n], w1[n]) for n in w0)
    for n, w in ComfyHost(erased).cross_attention_weights().items():
        torch.testing.assert_close(w1[n], w, rtol=0, atol=1e-6)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in after)


LABEL_KEY = "diffusion_model.label_emb.0.0.weight"


@pytest.fixture(scope="module")
def pooled_erasure(nodes, sdxl_parts):
    """(Erasure, the MODEL's to_k/to_v, refined MODEL) of an erasure that also edits SDXL's pooled channel:
    Refine's to_k/to_v and ``pooled_channel_edit`` of label_emb (what ``mace-erase run --pooled-channel`` makes)."""
    from mace_ops.erasure import Erasure
    from mace_ops.hosts.comfy import ComfyHost
    from mace_ops.pooled import pooled_channel_edit

    model, clip, _vae = sdxl_parts
    with torch.inference_mode():
        (concepts,) = nodes["MaceConceptList"]("cat -> a dog", "object", "a thing", "none")
        (pres,) = nodes["MacePreservationSet"](clip, "none", "a photo of a house\na red car", "", "object")
        (refined,) = nodes["MaceRefineCrossAttention"](model, clip, concepts, pres, -1.0, -1.0, 0.1)
    host = ComfyHost(model, clip)
    erasure = Erasure.build(ComfyHost(refined).cross_attention_weights(), base_fingerprint=host.model_fingerprint(),
                            concepts=concepts.concepts, source="run_erasure", settings={"pooled_channel": True})
    erasure.label_emb_diff = pooled_channel_edit(host, concepts.concepts, ["a photo of a house", "a red car"]) \
        - host.label_emb_weight()
    return erasure, host.original_weights(), refined


def test_apply_erasure_applies_an_sdxl_erasure_files_label_emb_difference(nodes, sdxl_parts, tiny_parts,
                                                                         pooled_erasure):
    """An erasure that also edits SDXL's pooled channel (``pooled_erasure``): Load Erasure -> Apply Erasure at
    strength 0.75 gives label_emb.0.0.weight = W0 + 0.75 · (the file's label_emb tensor, read with safetensors),
    as ComfyUI loads the patched clone; the input MODEL stays bit-identical; Save Erasure writes the difference
    back; the preview reports the share of it a MODEL carries; an SD1.x MODEL is refused naming the input."""
    import comfy.model_management
    import folder_paths
    from safetensors.torch import load_file

    from mace_ops.erasure import save_erasure
    from mace_ops.errors import MaceError

    model, clip, vae = sdxl_parts
    erasure, original, refined = pooled_erasure
    before = _state(model)
    out = Path(folder_paths.get_output_directory())
    save_erasure(erasure, original, out / "mace" / "pooled.safetensors")
    file = load_file(str(out / "mace" / "pooled.safetensors"))
    diff = file["diffusion_model.label_emb.0.0.diff"]
    assert diff.shape == (before[LABEL_KEY].shape[0], 2816) and float(diff[:, :1280].abs().max()) > 0
    assert torch.equal(diff[:, 1280:], torch.zeros_like(diff[:, 1280:]))  # only the pooled columns move
    with torch.inference_mode():
        (loaded,) = nodes["MaceLoadErasure"]("output/mace/pooled.safetensors")
        (applied,) = nodes["MaceApplyErasure"](model, loaded, 0.75)
        rel = nodes["MaceSaveErasure"](loaded, "mace/resaved").ui["text"][0]
        applied_text, refined_text = (nodes["MaceErasurePreview"](model, m, clip, vae, loaded, "", 0, 0, 1, 5.0,
                                                                  64).args[1] for m in (applied, refined))
    resaved = load_file(str(out / rel))
    assert torch.equal(resaved["diffusion_model.label_emb.0.0.diff"], diff)
    with torch.inference_mode():  # what ComfyUI computes when it loads the patched clone
        comfy.model_management.load_models_gpu([applied])
        got = {k: v.detach().float().clone() for k, v in applied.model.diffusion_model.state_dict().items()}
        comfy.model_management.load_models_gpu([model])
    torch.testing.assert_close(got["label_emb.0.0.weight"], before[LABEL_KEY].float() + 0.75 * diff,
                               rtol=0, atol=1e-6)
    k = next(n for n in file if n.endswith("to_k.diff")).removesuffix(".diff") + ".weight"
    torch.testing.assert_close(got[k.removeprefix(UNET)], before[k].float() + 0.75 * file[k[:-7] + ".diff"],
                               rtol=0, atol=1e-6)
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in after)
    assert "erased_model carries 0.750 of that edit" in applied_text
    assert "carries 0.000 of that edit" in refined_text and "connect the MODEL of Apply Erasure" in refined_text
    with pytest.raises(MaceError, match=r"model input: .*pooled channel.*label_emb.*this sd1 model has no label_emb; connect the SDXL"):
        nodes["MaceApplyErasure"](tiny_parts[0], loaded, 1.0)


def test_stock_lora_loader_applies_a_compact_sdxl_erasure_file(nodes, sdxl_parts, pooled_erasure, comfy_lib, tmp_path):
    """A compact erasure file (``save_erasure(..., compact=0.3)``: float16 truncated-SVD factors under LoRA keys,
    plus the label_emb difference) through stock ``LoraLoaderModelOnly``: as ComfyUI loads the result, each of
    the 140 to_k/to_v is W0 + up·down of the file's factors and label_emb.0.0.weight is W0 + its difference, so
    every key of the file was recognised."""
    import comfy.model_management
    import folder_paths
    from safetensors.torch import load_file

    from mace_ops.erasure import save_erasure

    model = sdxl_parts[0]
    erasure, original, _refined = pooled_erasure
    before = _state(model)
    path = save_erasure(erasure, original, tmp_path / "compact.safetensors", compact=0.3)
    file = load_file(str(path))
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    with torch.inference_mode():
        (lora_model,) = _stock_nodes(comfy_lib).LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)
        comfy.model_management.load_models_gpu([lora_model])
        got = {k: v.detach().float().clone() for k, v in lora_model.model.diffusion_model.state_dict().items()}
        comfy.model_management.load_models_gpu([model])
    stems = {k.removesuffix(".lora_up.weight") for k in file if k.endswith(".lora_up.weight")}
    assert len(stems) == 140  # all factored at this tolerance on the tiny SDXL
    for stem in stems:
        w = stem.removeprefix(UNET) + ".weight"
        want = before[UNET + w].float() + file[stem + ".lora_up.weight"].float() @ file[stem + ".lora_down.weight"].float()
        torch.testing.assert_close(got[w], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["label_emb.0.0.weight"],
                               before[LABEL_KEY].float() + file["diffusion_model.label_emb.0.0.diff"], rtol=0, atol=1e-6)
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in after)


def _train(nodes, parts, concept_list: str, steps: int):
    """Concept List -> Preservation Set -> Refine -> Train (``steps`` LoRA and sampler steps, minimal sizes):
    (preservation, refined MODEL, LoRA bank). Call under ``torch.inference_mode()``."""
    model, clip, vae = parts
    (concepts,) = nodes["MaceConceptList"](concept_list, "object", "a thing", "none")
    (pres,) = nodes["MacePreservationSet"](clip, "none", "a photo of a house\na red car", "", "object")
    (refined,) = nodes["MaceRefineCrossAttention"](model, clip, concepts, pres, -1.0, -1.0, 0.1)
    (bank,) = nodes["MaceTrainConceptLoRA"](
        original_model=model, refined_model=refined, clip=clip, vae=vae, concepts=concepts, steps=steps,
        learning_rate=1e-3, rank=1, seed=0, batch_size=1, images_per_concept=1, sample_steps=steps, cfg=7.5,
        image_size=64)
    return pres, refined, bank


def _train_fuse(nodes, parts, **fuse):
    """``_train`` (1 step, one concept) -> Fuse LoRAs once per entry of ``fuse`` (its options)."""
    _, clip, _ = parts
    with torch.inference_mode():
        pres, refined, bank = _train(nodes, parts, "cat -> a dog", steps=1)
        return [tuple(nodes["MaceFuseLoRAs"](refined, clip, bank, pres, -1.0, -1.0, 0.1, **f)) for f in fuse.values()]


def test_fuse_loras_pooled_channel_closes_sdxl_pooled_channel(nodes, sdxl_parts, tiny_parts, caplog):
    """Fuse LoRAs with ``pooled_channel`` on the tiny SDXL: the to_k/to_v equal those of the option off, the
    erasure carries a label_emb difference that the erased MODEL (as ComfyUI loads it) has, only the pooled
    columns move, and through them the concept's pooled embeddings now act as its anchor's (checked from the
    CLIP's pooled outputs and the weights before/after, not from our solver); the input MODEL is untouched.
    Off (the default): no label_emb change. On an SD1.x model the option is ignored with a logged warning."""
    import logging

    import comfy.model_management

    from mace_ops.concepts import Concept, concept_prompt_pairs
    from mace_ops.hosts.comfy import ComfyHost

    model, clip, _vae = sdxl_parts
    before = _state(model)
    (erased, erasure), (erased_off, erasure_off) = _train_fuse(nodes, sdxl_parts, on={"pooled_channel": True},
                                                               off={})
    assert erasure_off.erasure.label_emb_diff is None and erasure.erasure.label_emb_diff is not None
    assert erasure.erasure.metadata["settings"]["pooled_channel"] is True
    for n, w in erasure_off.erasure.weights.items():
        torch.testing.assert_close(erasure.erasure.weights[n], w, rtol=0, atol=0)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([erased])
        w1 = erased.model.diffusion_model.state_dict()["label_emb.0.0.weight"].detach().float().clone()
        comfy.model_management.load_models_gpu([erased_off])
        w_off = erased_off.model.diffusion_model.state_dict()["label_emb.0.0.weight"].detach().float().clone()
        comfy.model_management.load_models_gpu([model])
    w0 = before[LABEL_KEY].float()
    assert torch.equal(w_off, w0) and torch.equal(w1[:, 1280:], w0[:, 1280:])
    torch.testing.assert_close(w1, w0 + erasure.erasure.label_emb_diff, rtol=0, atol=1e-6)
    pairs = concept_prompt_pairs(Concept("cat", "a dog"))
    y_c = ComfyHost(model, clip).encode_pooled([f for f, _ in pairs]).double()
    y_a = ComfyHost(model, clip).encode_pooled([g for _, g in pairs]).double()
    p0, p1 = w0[:, :1280].double(), w1[:, :1280].double()
    assert float((y_c @ p1.T - y_a @ p0.T).norm() / (y_c @ p0.T - y_a @ p0.T).norm()) < 0.05
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in after)
    with caplog.at_level(logging.WARNING):
        ((sd1_erased, sd1_erasure),) = _train_fuse(nodes, tiny_parts, on={"pooled_channel": True})
    assert sd1_erasure.erasure.label_emb_diff is None
    assert sd1_erasure.erasure.metadata["settings"]["pooled_channel"] is False
    assert "pooled_channel ignored: this sd1 model has no pooled text channel" in caplog.text
