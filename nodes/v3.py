"""The MACE nodes on ComfyUI's V3 schema (``comfy_api.latest``), built from the node table.

One ``io.ComfyNode`` subclass per row of ``nodes/table.NODES``: ``define_schema`` turns the row into an
``io.Schema`` (display name, category, description, inputs with tooltips/defaults/ranges, outputs, hidden
inputs), ``execute`` calls the row's function and wraps its result in an ``io.NodeOutput`` (text for the
node goes into ``ui``), ``fingerprint_inputs`` is the row's fingerprint (V1 ``IS_CHANGED``) where it has one.
ComfyUI runs the class as V3: it sets ``cls.hidden`` (``unique_id`` for Train Concept LoRA) on a clone of
the class per execution, keeps its progress bar and interrupt checks (``nodes/comfy_runtime.py``) as for
any node, and lists the node in ``/object_info`` from the schema.

The pack hands these classes to ComfyUI through ``comfy_entrypoint`` (``MaceExtension``), not through
``NODE_CLASS_MAPPINGS``: see the pack's ``__init__.py``. Importing this module needs ComfyUI.
"""

from __future__ import annotations

from typing import Any, ClassVar

from comfy_api.latest import ComfyExtension, io

from .table import NODES, NodeSpec
from .table import In as _In

#: ComfyUI's own socket types for the core types we use; any other type is an ``io.Custom`` type
_SOCKETS = {"MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "IMAGE": io.Image, "MASK": io.Mask,
            "STRING": io.String}


def v3_input(i: _In) -> io.Input:
    """One table input as a V3 input."""
    common: dict[str, Any] = {"optional": i.optional, "tooltip": i.tooltip}
    if i.type == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, round=False, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=i.options(), default=i.default, **common)
    return _SOCKETS.get(i.type, io.Custom(i.type)).Input(i.name, **common)


def v3_schema(spec: NodeSpec) -> io.Schema:
    """One table row as a V3 schema."""
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=spec.category,
        description=spec.description,
        inputs=[v3_input(i) for i in spec.inputs],
        outputs=[(_SOCKETS.get(o.type) or io.Custom(o.type)).Output(display_name=o.name, tooltip=o.tooltip)
                 for o in spec.outputs],
        hidden=[io.Hidden[h] for h in spec.hidden],
        is_output_node=spec.output_node,
    )


def node_output(result: Any) -> io.NodeOutput:
    """A table function's result (a tuple, or ``{"ui": ..., "result": ...}``) as an ``io.NodeOutput``."""
    if isinstance(result, dict):
        return io.NodeOutput(*result.get("result", ()), ui=result.get("ui"))
    return io.NodeOutput(*result)


class MaceNode(io.ComfyNode):
    """A node of the table (``SPEC``); the subclasses below differ only in their row."""

    SPEC: ClassVar[NodeSpec]

    @classmethod
    def define_schema(cls) -> io.Schema:
        return v3_schema(cls.SPEC)

    @classmethod
    def execute(cls, **inputs: Any) -> io.NodeOutput:
        if "unique_id" in cls.SPEC.hidden:  # None when called outside ComfyUI's executor
            inputs["unique_id"] = cls.hidden.unique_id if cls.hidden is not None else None
        return node_output(cls.SPEC.run(**inputs))


def _node_class(spec: NodeSpec) -> type[MaceNode]:
    attrs: dict[str, Any] = {"SPEC": spec, "__doc__": f"{spec.display_name}: {spec.description}",
                             "__module__": __name__}
    if spec.fingerprint is not None:
        fingerprint = spec.fingerprint
        attrs["fingerprint_inputs"] = classmethod(lambda cls, **inputs: fingerprint(**inputs))
    return type(spec.node_id, (MaceNode,), attrs)


#: node id -> V3 class, in table order
V3_NODES: dict[str, type[MaceNode]] = {spec.node_id: _node_class(spec) for spec in NODES}


class MaceExtension(ComfyExtension):
    """What ``comfy_entrypoint`` returns: the V3 classes, and the web extension's routes on load."""

    async def on_load(self) -> None:
        from .web_api import register_routes

        register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(V3_NODES.values())
