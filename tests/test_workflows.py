"""The bundled workflows (example_workflows/*.json, built by workflows/build_workflows.py, with their .jpg
thumbnails) against the builder and the node declarations, without ComfyUI.

Node types must be ours (the pack's node table, NODES) or one of the ComfyUI core types named in
CORE_TYPES; links must type-check; widget values must be in range and among the combo options. With
COMFYUI_PATH set (and ComfyUI's environment), each workflow runs on ComfyUI's server with a tiny SD1.5
checkpoint and every size and step count set to the minimum.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
EXPECTED = ["mace_erase_artists_100", "mace_erase_celebrities_100", "mace_erase_explicit", "mace_erase_objects",
            "mace_erase_sdxl_quick", "mace_quick_demo"]
#: the model family each workflow targets (named in its title line)
FAMILY = {name: "SDXL" if "sdxl" in name else "SD1.x" for name in EXPECTED}
#: the ComfyUI core node types the workflows may use (besides the pack's own)
CORE_TYPES = {"CheckpointLoaderSimple", "CheckpointSave", "PreviewImage", "Note"}
CHAIN = ["CheckpointLoaderSimple", "MaceConceptList", "MacePreservationSet", "MaceRefineCrossAttention",
         "MaceTrainConceptLoRA", "MaceFuseLoRAs", "MaceApplyErasure", "MaceErasurePreview", "CheckpointSave",
         "MaceSaveErasure"]


def _builder():
    if "mace_build_workflows" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mace_build_workflows", ROOT / "workflows" / "build_workflows.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["mace_build_workflows"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["mace_build_workflows"]


bw = _builder()
DECLS: dict = {}  # filled when this module's first test runs, not at collection: see _load_pack_declarations
PACK = None


@pytest.fixture(autouse=True, scope="module")
def _load_pack_declarations():
    """Import the pack at test time. Imported at collection, it would be cached before the real-host tests
    (tests/comfy) put ComfyUI on sys.path, and those would then get the pack's no-ComfyUI node classes."""
    global PACK
    DECLS.update(bw.declarations())
    PACK = bw.load_pack()


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_task_is_bundled_and_up_to_date():
    assert [p.stem for p in WORKFLOWS] == EXPECTED
    built = bw.build_all()
    for path in WORKFLOWS:
        assert bw.dumps(built[path.name]) == path.read_text(encoding="utf-8"), (
            f"{path.name} differs from the build: run python workflows/build_workflows.py")


def test_one_source_of_truth_and_a_small_thumbnail_per_workflow():
    """workflows/ keeps only the builder (ComfyUI would list its JSON files as templates too); each template
    has a same-name JPEG thumbnail under 30 KB that is the drawing of its own graph."""
    from PIL import Image

    assert sorted(p.name for p in (ROOT / "workflows").glob("*.json")) == []
    thumbs = bw._thumbnails()
    assert sorted(p.stem for p in (ROOT / "example_workflows").iterdir()) == sorted(EXPECTED * 2)
    for path in WORKFLOWS:
        jpg = path.with_suffix(".jpg")
        assert jpg.stat().st_size < 30_000, jpg.name
        with Image.open(jpg) as img:
            assert img.format == "JPEG" and img.size == thumbs.SIZE
            assert thumbs.same_picture(img, thumbs.render(_load(path))), f"{jpg.name}: run the builder"
    # the drawing depends on the graph: another workflow's thumbnail is not a match
    a, b = WORKFLOWS[0], WORKFLOWS[-1]
    with Image.open(a.with_suffix(".jpg")) as img:
        assert not thumbs.same_picture(img, thumbs.render(_load(b)))


def test_core_declarations_are_stated():
    assert set(bw.CORE_NODES) == CORE_TYPES


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_node_types_exist(path):
    ours = {spec.node_id for spec in PACK.NODES}
    for node in _load(path)["nodes"]:
        assert node["type"] in ours or node["type"] in CORE_TYPES, node["type"]
    types = [n["type"] for n in _load(path)["nodes"]]
    for t in CHAIN + ["Note"]:
        assert t in types, t


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_type_check_and_agree_with_the_nodes(path):
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max(lk[0] for lk in wf["links"])
    seen_targets = set()
    for link_id, src, out_slot, dst, in_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][out_slot]
        inp = nodes[dst]["inputs"][in_slot]
        declared_out = dict(DECLS[nodes[src]["type"]].outputs)[out["name"]]
        declared_in = {n: t for n, t, _ in DECLS[nodes[dst]["type"]].sockets}[inp["name"]]
        assert kind == out["type"] == declared_out == inp["type"] == declared_in, (link_id, kind, declared_in)
        assert link_id in out["links"] and inp["link"] == link_id
        assert (dst, in_slot) not in seen_targets  # one link per input
        seen_targets.add((dst, in_slot))
    link_ids = {lk[0] for lk in wf["links"]}
    for n in wf["nodes"]:
        assert {s["link"] for s in n["inputs"]} - {None} <= link_ids
        assert {i for o in n["outputs"] for i in o["links"]} <= link_ids


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_sockets_match_declarations_and_required_ones_are_connected(path):
    for node in _load(path)["nodes"]:
        d = DECLS[node["type"]]
        assert [(s["name"], s["type"]) for s in node["inputs"]] == [(n, t) for n, t, _ in d.sockets]
        assert [(o["name"], o["type"]) for o in node["outputs"]] == d.outputs
        for slot, (name, _, required) in zip(node["inputs"], d.sockets, strict=True):
            if required:
                assert slot["link"] is not None, f"{node['type']}.{name} is not connected"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_are_valid(path):
    for node in _load(path)["nodes"]:
        d = DECLS[node["type"]]
        values = list(node["widgets_values"])
        for name, kind, opts, choices in d.widgets:
            v = values.pop(0)
            where = f"{node['type']}.{name}={v!r}"
            if kind == "COMBO":
                if choices:  # empty: options come from the user's files (checkpoint names)
                    assert v in choices, where
                else:
                    assert isinstance(v, str) and v, where
            elif kind == "INT":
                assert isinstance(v, int) and not isinstance(v, bool), where
            elif kind == "FLOAT":
                assert isinstance(v, int | float) and not isinstance(v, bool), where
            elif kind == "STRING":
                assert isinstance(v, str), where
            elif kind == "BOOLEAN":
                assert isinstance(v, bool), where
            if kind in ("INT", "FLOAT"):
                assert opts.get("min", -float("inf")) <= v <= opts.get("max", float("inf")), where
            if bw.has_control_widget(name, kind, opts):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), where
        assert values == [], f"{node['type']}: {len(values)} widget values too many"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_concept_lists_parse_and_presets_apply(path):
    from mace_ops.concepts import load_preset, parse_concept_list

    wf = _load(path)
    node = next(n for n in wf["nodes"] if n["type"] == "MaceConceptList")
    text, kind, anchor, preset = node["widgets_values"]
    concepts = parse_concept_list(text, default_anchor=anchor, kind=kind)
    if path.stem in ("mace_quick_demo", "mace_erase_sdxl_quick"):
        assert preset == "none" and [c.kind for c in concepts] == ["object", "object", "style"]
    else:
        p = load_preset(preset)
        assert concepts == p.concepts and kind == p.kind
        keep = next(n for n in wf["nodes"] if n["type"] == "MacePreservationSet")
        assert [s for s in keep["widgets_values"][2].splitlines() if s] == p.retained
    for n in wf["nodes"]:
        if n["type"] in ("MaceRefineCrossAttention", "MaceFuseLoRAs"):
            assert n["widgets_values"][:3] == [-1.0, -1.0, -1.0]  # the preset's weights
        if n["type"] == "MaceFuseLoRAs":
            assert n["widgets_values"][3:] == [False]  # pooled_channel: off by default


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_layout_runs_left_to_right_in_titled_groups_with_a_note(path):
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for _, src, _, dst, _, _ in wf["links"]:
        assert nodes[src]["pos"][0] < nodes[dst]["pos"][0], (nodes[src]["type"], nodes[dst]["type"])
    assert len(wf["groups"]) == 4
    for n in wf["nodes"]:
        inside = [g for g in wf["groups"]
                  if g["bounding"][0] <= n["pos"][0] and n["pos"][0] + n["size"][0] <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] <= n["pos"][1] and n["pos"][1] + n["size"][1] <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, n["type"]
        assert inside[0]["title"]
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    assert "on a GPU" in notes[0]["widgets_values"][0] and "on a CPU" in notes[0]["widgets_values"][0]
    orders = sorted(n["order"] for n in wf["nodes"])
    assert orders == list(range(len(wf["nodes"])))
    for _, src, _, dst, _, _ in wf["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_api_format_names_every_input(path):
    api = bw.to_api(_load(path), DECLS)
    assert "Note" not in {v["class_type"] for v in api.values()}
    for node in api.values():
        spec = {s.node_id: s for s in PACK.NODES}.get(node["class_type"])
        required = (spec.v1_input() if spec else bw.CORE_NODES[node["class_type"]]["input"])["required"]
        assert set(required) <= set(node["inputs"]), node["class_type"]
        for v in node["inputs"].values():
            if isinstance(v, list):
                assert v[0] in api and isinstance(v[1], int)


# ---------------------------------------------------------------- on a real ComfyUI (COMFYUI_PATH)

MINIMAL = {
    "MaceTrainConceptLoRA": {"steps": 1, "images_per_concept": 1, "sample_steps": 1, "image_size": 64},
    "MaceErasurePreview": {"max_concepts": 1, "steps": 1, "image_size": 64, "preserved_prompts": "a dog"},
    "MacePreservationSet": {"corpus": "none", "prompts": "a photo of a dog\na red car"},
}


def _real_host_reason() -> str | None:
    comfy = os.environ.get("COMFYUI_PATH", "")
    if not comfy:
        return "COMFYUI_PATH is not set"
    if not (ROOT / "tests" / "comfy" / "test_server_end_to_end.py").is_file():
        return "the real-host harness tests/comfy/ is absent"
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "ComfyUI needs torchvision: run in .venv-comfy"
    return None


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    reason = _real_host_reason()
    if reason:
        pytest.skip(reason)
    import subprocess

    sys.path.insert(0, str(ROOT / "tests" / "comfy"))
    from test_server_end_to_end import CKPT, Server

    comfy = str(Path(os.environ["COMFYUI_PATH"]).resolve())
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "models/checkpoints", "output", "input", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "mace").symlink_to(ROOT, target_is_directory=True)
    subprocess.run([sys.executable, str(ROOT / "tests" / "comfy" / "make_tiny_checkpoint.py"),
                    str(base / "models" / "checkpoints" / CKPT)],
                   check=True, env=dict(os.environ, COMFYUI_PATH=comfy), capture_output=True, timeout=600)
    server = Server(base, comfy)
    try:
        yield server, CKPT
    finally:
        server.stop()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_on_comfyui(path, comfy_server):
    server, ckpt = comfy_server
    api = bw.to_api(_load(path), DECLS)
    for node in api.values():
        for key, value in MINIMAL.get(node["class_type"], {}).items():
            node["inputs"][key] = value
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt
        if node["class_type"] == "MacePreservationSet" and node["inputs"]["retained"]:
            node["inputs"]["retained"] = "\n".join(node["inputs"]["retained"].splitlines()[:2])
        if node["class_type"] == "MaceConceptList":
            node["inputs"]["concepts"] = "\n".join(node["inputs"]["concepts"].splitlines()[:2])
    entry = server.run(api)
    status = entry.get("status", {})
    assert status.get("status_str") == "success", json.dumps(status)[-3000:] + "\n" + server.tail()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_names_the_family_it_targets(path):
    """The Note's first line (the title, also drawn on the thumbnail) ends with the family; the loader's
    default file and the image sizes are that family's (SDXL: 1024 px)."""
    wf = _load(path)
    (note,) = [n for n in wf["nodes"] if n["type"] == "Note"]
    title, family_line = note["widgets_values"][0].split("\n\n")[:2]
    family = FAMILY[path.stem]
    assert title.endswith(f"[{family}]") and family_line.startswith(f"Targets {family}")
    (loader,) = [n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    sizes = {n["type"]: bw.declarations()[n["type"]].named_values(n["widgets_values"])["image_size"]
             for n in wf["nodes"] if n["type"] in ("MaceTrainConceptLoRA", "MaceErasurePreview")}
    if family == "SDXL":
        assert loader["widgets_values"] == [bw.SDXL_CHECKPOINT] and set(sizes.values()) == {1024}
    else:
        assert loader["widgets_values"] == [bw.DEFAULT_CHECKPOINT] and set(sizes.values()) == {512}
