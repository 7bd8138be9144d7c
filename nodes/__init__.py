"""ComfyUI nodes of the MACE pack, on ComfyUI's V3 schema (nothing heavy is imported here).

``table.NODES`` declares every node once (id, display name, inputs, outputs, the function that runs
it); ``v3`` builds the ``comfy_api.latest`` classes from it and needs ComfyUI, so it is imported only by
the pack's ``comfy_entrypoint``. ``mace_nodes`` holds the functions, ``values`` the custom socket types,
``comfy_runtime`` what the functions take from ComfyUI at run time, ``web_api`` the web extension's
server side.
"""

from .table import BY_ID, NODES
from .values import CUSTOM_TYPES

__all__ = ["BY_ID", "CUSTOM_TYPES", "NODES"]
