"""ComfyUI nodes of the MACE pack (classic node classes; nothing heavy is imported here)."""

from .mace_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .values import CUSTOM_TYPES

__all__ = ["CUSTOM_TYPES", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
