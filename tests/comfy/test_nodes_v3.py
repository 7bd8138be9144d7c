"""The nodes on ComfyUI's V3 schema, as ComfyUI 0.33 loads them: its own loader (``nodes.load_custom_node``)
takes the pack's ``comfy_entrypoint``; every class is a ``comfy_api.latest`` node whose schema shows exactly
the node table's row (what the workflow builder and the no-ComfyUI tests read); hidden inputs reach the
node's function; the V3 wrapper returns what the function returns."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classes(comfy_lib):
    from _v3_nodes import v3_classes

    return v3_classes(ROOT)


@pytest.fixture(scope="module")
def table(classes):
    return {spec.node_id: spec for spec in sys.modules["mace_pack"].NODES}


def _stock_nodes(comfy_path: str):
    """ComfyUI's own nodes.py, loaded by path (this pack also has a package named ``nodes``)."""
    if "comfy_stock_nodes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("comfy_stock_nodes", Path(comfy_path) / "nodes.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["comfy_stock_nodes"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["comfy_stock_nodes"]


def test_comfyui_loader_takes_the_entrypoint_and_registers_eleven_v3_nodes(comfy_lib, table):
    from comfy_api.latest import io

    stock = _stock_nodes(comfy_lib)
    before = set(stock.NODE_CLASS_MAPPINGS)
    assert asyncio.run(stock.load_custom_node(str(ROOT), module_parent="custom_nodes")) is True
    added = set(stock.NODE_CLASS_MAPPINGS) - before
    assert added == set(table)
    for node_id in added:
        cls = stock.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(cls, io.ComfyNode), node_id
        assert stock.NODE_DISPLAY_NAME_MAPPINGS[node_id] == table[node_id].display_name
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{ROOT.name}"


def _json(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as /object_info sends them


def test_every_schema_is_its_table_row(classes, table):
    """GET_NODE_INFO_V1 (what /object_info sends) of each V3 class against the table's own rendering and
    fields: inputs in order with every option, hidden inputs, outputs, names, tooltips, flags."""
    assert list(classes) == list(table)
    for node_id, cls in classes.items():
        spec, info = table[node_id], cls.GET_NODE_INFO_V1()
        assert _json(info["input"]) == _json(spec.v1_input()), node_id
        assert info["input_order"]["required"] == [i.name for i in spec.inputs if not i.optional]
        assert info["input_order"].get("optional", []) == [i.name for i in spec.inputs if i.optional]
        assert info["output"] == [o.type for o in spec.outputs]
        assert info["output_name"] == [o.name for o in spec.outputs]
        assert info["output_tooltips"] == [o.tooltip for o in spec.outputs]
        assert (info["display_name"], info["category"], info["description"], info["output_node"]) == (
            spec.display_name, "MACE", spec.description, spec.output_node)


def test_only_load_erasure_fingerprints_its_file(classes, tmp_path):
    from comfy_api.internal import first_real_override

    assert [k for k, c in classes.items() if first_real_override(c, "fingerprint_inputs") is not None] == [
        "MaceLoadErasure"]
    # an unknown file: the choice itself (load() reports the error)
    assert classes["MaceLoadErasure"].fingerprint_inputs(erasure_file="output/nothing.safetensors") == (
        "output/nothing.safetensors")


def test_hidden_unique_id_reaches_the_function_and_outputs_pass_through(classes, table):
    """Train Concept LoRA declares the hidden UNIQUE_ID; on the class clone ComfyUI's executor makes
    (PREPARE_CLASS_CLONE with the hidden values), execute hands it to the function as ``unique_id``."""
    from comfy_api.latest import io

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return ("bank",)

    spec = dataclasses.replace(table["MaceTrainConceptLoRA"], run=record)
    probe = type("Probe", (classes["MaceTrainConceptLoRA"],), {"SPEC": spec})
    clone = probe.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: "42"}})
    out = clone.execute(concepts="c", steps=1)
    assert seen == {"concepts": "c", "steps": 1, "unique_id": "42"} and out.args == ("bank",)
    assert classes["MaceTrainConceptLoRA"].GET_NODE_INFO_V1()["input"]["hidden"] == {"unique_id": ("UNIQUE_ID",)}
    # a node that shows text: ui goes to the NodeOutput, the outputs to its args
    text_spec = dataclasses.replace(table["MaceErasurePreview"], run=lambda **_: {"ui": {"text": ["t"]},
                                                                                   "result": ("img", "t")})
    shown = type("Probe2", (classes["MaceErasurePreview"],), {"SPEC": text_spec}).execute()
    assert shown.ui == {"text": ["t"]} and shown.args == ("img", "t")
