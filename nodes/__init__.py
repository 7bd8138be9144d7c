"""ComfyUI nodes of the MACE pack (classic node classes; nothing heavy is imported here).

Apply Erasure is also written on ComfyUI's V3 schema (``nodes/v3_pilot.py``, a pilot): when ComfyUI's
``comfy_api.latest`` is importable (the pack loaded by ComfyUI) that class serves the node id; without
ComfyUI (tests, the workflow builder) the classic class does.
"""

import importlib.util

from .mace_nodes import NODE_CLASS_MAPPINGS as _CLASSIC
from .mace_nodes import NODE_DISPLAY_NAME_MAPPINGS
from .values import CUSTOM_TYPES


def _comfy_api_latest() -> bool:
    try:
        return importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("comfy_api.latest") is not None
    except (ImportError, ValueError):
        return False


NODE_CLASS_MAPPINGS = dict(_CLASSIC)
if _comfy_api_latest():
    from .v3_pilot import V3_NODES

    NODE_CLASS_MAPPINGS.update(V3_NODES)

__all__ = ["CUSTOM_TYPES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
