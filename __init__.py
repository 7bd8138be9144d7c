"""ComfyUI-MACE: mass concept erasure nodes (ComfyUI entry point).

ComfyUI imports this file as the pack's module and, as the pack defines no ``NODE_CLASS_MAPPINGS``,
calls ``comfy_entrypoint`` (the V3 way to load a pack; ComfyUI 0.33 reads one or the other, never both):
it returns the extension whose ``get_node_list`` gives the V3 node classes (``nodes/v3.py``) and whose
``on_load`` adds the web extension's routes. Importing this file imports nothing heavy and works without
ComfyUI: the node table (``NODES``) is plain data, and the nodes import ``mace_ops`` (the host-agnostic
core, shipped in this folder) and ComfyUI only when they run. When the core is not installed as a
package, this folder is appended to ``sys.path`` so that ``import mace_ops`` finds it (appended, so
ComfyUI's own top-level modules keep precedence).
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("mace_ops") is None:  # pragma: no cover - depends on how the pack is installed
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from .nodes import NODES  # noqa: E402

WEB_DIRECTORY = "web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the ``ComfyExtension`` of the MACE nodes (needs ComfyUI)."""
    from .nodes.v3 import MaceExtension

    return MaceExtension()


__all__ = ["NODES", "WEB_DIRECTORY", "comfy_entrypoint"]
