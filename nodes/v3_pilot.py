"""Pilot of ComfyUI's V3 node schema (``comfy_api.latest``) on one node: Apply Erasure.

The schema declares in one place what the classic class spreads over ``INPUT_TYPES``, ``RETURN_TYPES``,
``RETURN_NAMES``, ``OUTPUT_TOOLTIPS``, ``DESCRIPTION``, ``CATEGORY``, ``FUNCTION`` and the display-name
table. The work is the classic node's (``MaceApplyErasure.apply``), so both declare one behaviour.

Importing this module needs ComfyUI (``comfy_api``); ``nodes/__init__.py`` uses the V3 class only when
``comfy_api.latest`` is importable and keeps the classic class otherwise (tests without ComfyUI, older
ComfyUI). ComfyUI 0.33 loads a pack EITHER by ``NODE_CLASS_MAPPINGS`` OR by ``comfy_entrypoint``
(``nodes.load_custom_node``: the second is not read when the first exists), so while the other nodes are
classic, the V3 class goes into ``NODE_CLASS_MAPPINGS`` under the same node id: ComfyUI's executor and
``/object_info`` treat a V3 class there as V3 (``_ComfyNodeInternal``), which the tests check.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from .mace_nodes import CATEGORY, NODE_DISPLAY_NAME_MAPPINGS, MaceApplyErasure
from .values import ERASURE

NODE_ID = "MaceApplyErasure"


class MaceApplyErasureV3(io.ComfyNode):
    """Apply Erasure on the V3 schema (same node id, inputs, output and behaviour as the classic one)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        classic = MaceApplyErasure.INPUT_TYPES()["required"]
        return io.Schema(
            node_id=NODE_ID,
            display_name=NODE_DISPLAY_NAME_MAPPINGS[NODE_ID],
            category=CATEGORY,
            description=MaceApplyErasure.DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip=classic["model"][1]["tooltip"]),
                io.Custom(ERASURE).Input("erasure", tooltip=classic["erasure"][1]["tooltip"]),
                io.Float.Input("strength", **{k: classic["strength"][1][k]
                                              for k in ("default", "min", "max", "step", "tooltip")}),
            ],
            outputs=[io.Model.Output(display_name=MaceApplyErasure.RETURN_NAMES[0],
                                     tooltip=MaceApplyErasure.OUTPUT_TOOLTIPS[0])],
        )

    @classmethod
    def execute(cls, model: Any, erasure: Any, strength: float) -> io.NodeOutput:
        (patched,) = MaceApplyErasure().apply(model, erasure, strength)
        return io.NodeOutput(patched)


V3_NODES: dict[str, type] = {NODE_ID: MaceApplyErasureV3}
