"""ComfyUI-MACE: mass concept erasure nodes (ComfyUI entry point).

ComfyUI imports this file as the pack's module. It imports nothing heavy and works without ComfyUI:
the nodes import ``mace_ops`` (the host-agnostic core, shipped in this folder) and ComfyUI only when
they run. When the core is not installed as a package, this folder is appended to ``sys.path`` so that
``import mace_ops`` finds it (appended, so ComfyUI's own top-level modules keep precedence).
"""

import importlib.util
import os
import sys

if importlib.util.find_spec("mace_ops") is None:  # pragma: no cover - depends on how the pack is installed
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from .nodes import web_api as _web_api  # noqa: E402

_web_api.register_routes()  # the web extension's routes; does nothing without ComfyUI's server

WEB_DIRECTORY = "web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
