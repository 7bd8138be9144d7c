"""The pack imported the way ComfyUI imports a custom-node folder: ``__init__.py`` as the package ``mace_pack``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_pack(root: Path = ROOT) -> ModuleType:
    """``mace_pack`` (the repository folder as a package), imported once per process."""
    if "mace_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mace_pack", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["mace_pack"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["mace_pack"]
