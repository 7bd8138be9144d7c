"""The pack's node declarations, checked without ComfyUI (CI)."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

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


def _load_pack():
    """Import the pack's top-level __init__.py the way ComfyUI does (a package from a file location)."""
    if "mace_pack" in sys.modules:
        return sys.modules["mace_pack"]
    spec = importlib.util.spec_from_file_location("mace_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mace_pack"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pack():
    return _load_pack()


def _inputs(cls) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        out.update(spec.get(section, {}))
    return out


def test_import_is_light_and_needs_no_comfyui():
    code = LOAD_PACK + (
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules\n"
        "assert 'torch' not in sys.modules, 'importing the pack must not import torch'\n"
        "assert mod.WEB_DIRECTORY == 'web' and len(mod.NODE_CLASS_MAPPINGS) == 11\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_display_names_and_category(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS.values()) == DISPLAY
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "MACE"
        assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION


def test_outputs_are_declared_consistently(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert isinstance(cls.RETURN_TYPES, tuple), name
        if getattr(cls, "RETURN_NAMES", None) is not None:
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), name
        if cls.RETURN_TYPES:
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        else:
            assert cls.OUTPUT_NODE, f"{name} returns nothing, so it must be an output node"


def test_every_custom_type_is_produced_and_consumed(pack):
    produced, consumed = set(), set()
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        produced.update(t for t in cls.RETURN_TYPES if t.startswith("MACE_"))
        consumed.update(spec[0] for spec in _inputs(cls).values() if isinstance(spec[0], str) and spec[0].startswith("MACE_"))
    assert produced == set(CUSTOM)
    assert consumed == set(CUSTOM)


def test_every_input_has_a_tooltip_and_sane_default(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        for inp, spec in _inputs(cls).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"
            if kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], f"{name}.{inp}: default outside [min, max]"
                assert isinstance(opts["default"], int if kind == "INT" else (int, float))
            if isinstance(kind, list):
                assert kind or inp == "erasure_file", f"{name}.{inp}: empty choice list"  # files may be absent
                if "default" in opts:
                    assert opts["default"] in kind, f"{name}.{inp}: default not among the choices"


def test_function_takes_exactly_the_inputs(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        fn = getattr(cls, cls.FUNCTION)
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        spec = cls.INPUT_TYPES()
        assert set(params) == set(spec["required"]) | set(spec.get("optional", {})), name
        for opt in spec.get("optional", {}):
            assert inspect.signature(fn).parameters[opt].default is not inspect.Parameter.empty, f"{name}.{opt}"


def test_concept_list_node_without_comfyui(pack):
    from mace_ops.concepts import list_presets
    from mace_ops.errors import MaceError

    node = pack.NODE_CLASS_MAPPINGS["MaceConceptList"]()
    (value,) = node.build("Taylor Swift -> a woman\n# a comment\nBrad Pitt", "object", "a man", "none")
    assert [(c.phrase, c.anchor, c.kind) for c in value.concepts] == [
        ("Taylor Swift", "a woman", "object"), ("Brad Pitt", "a man", "object")]
    preset = list_presets()[0]
    (from_preset,) = node.build("", "object", "a person", preset)
    assert from_preset.preset == preset and len(from_preset.concepts) >= 1
    with pytest.raises(MaceError, match="concepts input"):
        node.build("  \n# only a comment\n", "object", "a person", "none")
    with pytest.raises(MaceError, match="line 1"):
        node.build("cat -> cat", "object", "a person", "none")
