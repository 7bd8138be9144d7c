"""The pack's node table (nodes/table.py), checked without ComfyUI (CI). That ComfyUI's V3 classes show the
same declarations is checked on a real ComfyUI (tests/comfy/test_nodes_v3.py)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from _pack import load_pack

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = ("MACE_CONCEPTS", "MACE_PRESERVATION", "MACE_LORA_BANK", "MACE_ERASURE")
DISPLAY = {
    "MACE Concept List",
    "MACE Preservation Set",
    "Refine Cross-Attention",
    "Train Concept LoRA",
    "Fuse LoRAs",
    "Fuse External LoRAs",
    "Apply Erasure",
    "Save Erasure",
    "Load Erasure",
    "MACE Erasure Preview",
    "MACE Robustness Probe",
}
LOAD_PACK = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('mace_pack', {str(ROOT / '__init__.py')!r}, "
    f"submodule_search_locations=[{str(ROOT)!r}])\n"
    "mod = importlib.util.module_from_spec(spec); sys.modules['mace_pack'] = mod; spec.loader.exec_module(mod)\n"
)


@pytest.fixture(scope="module")
def pack():
    return load_pack()


def test_import_is_light_and_needs_no_comfyui():
    """The pack imports without ComfyUI or torch, and offers ComfyUI only ``comfy_entrypoint`` (ComfyUI 0.33
    ignores the entry point of a pack that defines NODE_CLASS_MAPPINGS)."""
    code = LOAD_PACK + (
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
        "assert 'torch' not in sys.modules, 'importing the pack must not import torch'\n"
        "assert mod.WEB_DIRECTORY == 'web' and len(mod.NODES) == 11\n"
        "assert not hasattr(mod, 'NODE_CLASS_MAPPINGS') and callable(mod.comfy_entrypoint)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_display_names_ids_and_category(pack):
    ids = [spec.node_id for spec in pack.NODES]
    assert len(set(ids)) == len(ids) and all(i.startswith("Mace") for i in ids)
    assert {spec.display_name for spec in pack.NODES} == DISPLAY
    for spec in pack.NODES:
        assert spec.category == "MACE"
        assert isinstance(spec.description, str) and spec.description


def test_outputs_are_declared_consistently(pack):
    for spec in pack.NODES:
        names = [o.name for o in spec.outputs]
        assert len(set(names)) == len(names), spec.node_id
        assert all(o.type and o.tooltip for o in spec.outputs), spec.node_id
        if not spec.outputs:
            assert spec.output_node, f"{spec.node_id} returns nothing, so it must be an output node"


def test_every_custom_type_is_produced_and_consumed(pack):
    produced = {o.type for spec in pack.NODES for o in spec.outputs if o.type.startswith("MACE_")}
    consumed = {i.type for spec in pack.NODES for i in spec.inputs if i.type.startswith("MACE_")}
    assert produced == set(CUSTOM) == set(sys.modules["mace_pack.nodes"].CUSTOM_TYPES)
    assert consumed == set(CUSTOM)


def test_every_input_has_a_tooltip_and_sane_default(pack):
    for spec in pack.NODES:
        names = [i.name for i in spec.inputs]
        assert len(set(names)) == len(names), spec.node_id
        for i in spec.inputs:
            where = f"{spec.node_id}.{i.name}"
            assert i.tooltip, f"{where} has no tooltip"
            if i.type in ("INT", "FLOAT"):
                assert i.min <= i.default <= i.max, f"{where}: default outside [min, max]"
                assert isinstance(i.default, int if i.type == "INT" else (int, float)), where
                assert i.step is not None and i.step > 0, where
            if i.type == "COMBO":
                options = i.options()
                assert options or i.name == "erasure_file", f"{where}: empty choice list"  # files may be absent
                assert i.default is None or i.default in options, f"{where}: default not among the choices"
            if i.type in ("STRING", "BOOLEAN"):
                assert isinstance(i.default, str if i.type == "STRING" else bool), where
            if not i.is_widget:
                assert i.default is None and i.choices is None, f"{where}: a socket has no default"


def test_v1_view_has_every_input_in_order_with_its_section(pack):
    """What the builder and the tests read (``v1_input``, ComfyUI's /object_info shape): every input once, in
    table order, optional ones under "optional", combos with their options, hidden inputs by name."""
    for spec in pack.NODES:
        view = spec.v1_input()
        listed = [(sec, name, t) for sec in ("required", "optional") for name, (t, _) in view.get(sec, {}).items()]
        assert [(n, t) for _, n, t in listed] == [(i.name, i.type) for i in spec.inputs], spec.node_id
        assert all((sec == "optional") == spec.input(n).optional for sec, n, _ in listed), spec.node_id
        assert set(view.get("hidden", {})) == set(spec.hidden) | ({"prompt", "extra_pnginfo"} if spec.output_node else set())
        for i in spec.inputs:
            opts = view["optional" if i.optional else "required"][i.name][1]
            assert opts["tooltip"] == i.tooltip
            if i.type == "COMBO":
                assert opts["options"] == i.options()


def test_function_takes_exactly_the_inputs(pack):
    for spec in pack.NODES:
        params = inspect.signature(spec.run).parameters
        assert list(params) == [i.name for i in spec.inputs] + list(spec.hidden), spec.node_id
        for i in spec.inputs:
            if i.optional:
                assert params[i.name].default is not inspect.Parameter.empty, f"{spec.node_id}.{i.name}"
        for h in spec.hidden:
            assert params[h].default is None, f"{spec.node_id}.{h}: a hidden input is None outside ComfyUI"


def test_concept_list_node_without_comfyui(pack):
    from mace_ops.concepts import list_presets
    from mace_ops.errors import MaceError

    build = {spec.node_id: spec for spec in pack.NODES}["MaceConceptList"].run
    (value,) = build("Taylor Swift -> a woman\n# a comment\nBrad Pitt", "object", "a man", "none")
    assert [(c.phrase, c.anchor, c.kind) for c in value.concepts] == [
        ("Taylor Swift", "a woman", "object"), ("Brad Pitt", "a man", "object")]
    preset = list_presets()[0]
    (from_preset,) = build("", "object", "a person", preset)
    assert from_preset.preset == preset and len(from_preset.concepts) >= 1
    with pytest.raises(MaceError, match="concepts input"):
        build("  \n# only a comment\n", "object", "a person", "none")
    with pytest.raises(MaceError, match="line 1"):
        build("cat -> cat", "object", "a person", "none")
