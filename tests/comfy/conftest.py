"""Real-host tests: run only when COMFYUI_PATH points to a ComfyUI checkout (see tests/comfy/README.md).

Without it every test here is skipped with that reason. ComfyUI is used as a library on the CPU
(``comfy.cli_args.args.cpu = True`` before ``comfy.model_management`` is imported); nothing of
ComfyUI is imported at collection time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
HERE = Path(__file__).resolve().parent


def _reason() -> str | None:
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the real-host tests"
    if not (Path(COMFYUI_PATH) / "comfy" / "model_patcher.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no comfy/model_patcher.py)"
    try:
        import torchvision  # noqa: F401  (ComfyUI imports it at start)
    except ImportError:
        return "ComfyUI needs torchvision, which this environment lacks: use the .venv-comfy environment"
    return None


SKIP_REASON = _reason()


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    marker = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def comfy_lib():
    """ComfyUI importable as a library, CPU only. Returns the checkout path."""
    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    path = str(Path(COMFYUI_PATH).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401

    return path


@pytest.fixture(scope="session")
def tiny_parts(comfy_lib):
    """(ModelPatcher, CLIP, VAE) of a tiny SD1.x-layout model built under inference mode (as in a node)."""
    from _tiny_comfy import build_tiny_parts

    return build_tiny_parts()


@pytest.fixture(scope="session")
def other_tiny_model(comfy_lib):
    """A factory of a second tiny model (another seed): another base model."""
    from _tiny_comfy import build_tiny_parts

    cache = {}

    def make():
        if "model" not in cache:
            cache["model"] = build_tiny_parts(seed=1)[0]
        return cache["model"]

    return make


@pytest.fixture(scope="session")
def sdxl_parts(comfy_lib):
    """(ModelPatcher, CLIP, VAE) of a tiny SDXL (real 70-block layout, 32/64/64 channels, 3-layer CLIP-L and
    bigG of the real widths) built in process with ``comfy.supported_models.SDXL``."""
    from _tiny_comfy import build_family_parts

    return build_family_parts("sdxl")


@pytest.fixture(scope="session")
def sd2_parts(comfy_lib):
    """(ModelPatcher, CLIP, VAE) of a tiny SD2.x (16 blocks, 1024-d OpenCLIP-H-shaped 3-layer CLIP)."""
    from _tiny_comfy import build_family_parts

    return build_family_parts("sd2")
