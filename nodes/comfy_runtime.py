"""What the nodes take from ComfyUI at run time (imported lazily: nothing here runs on import)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


class RunProgressBar:
    """One ComfyUI progress bar over a whole run made of stages with known sizes."""

    def __init__(self, stages: dict[str, int]) -> None:
        import comfy.utils

        self.offsets: dict[str, int] = {}
        total = 0
        for name, size in stages.items():
            self.offsets[name] = total
            total += max(int(size), 0)
        self.total = max(total, 1)
        self.bar = comfy.utils.ProgressBar(self.total)

    def stage(self, name: str) -> Callable[..., None]:
        """``progress(done, total, ...)`` for one stage, mapped into the whole bar."""
        offset = self.offsets[name]

        def update(done: int, total: int, *_: Any) -> None:
            self.bar.update_absolute(min(offset + int(done), self.total), self.total)

        return update

    def pipeline(self, stage: str, done: int, total: int, info: Any = None) -> None:
        """A ``mace_ops.progress.ProgressCallback``; ``<stage>:<info["group"]>`` when that stage exists."""
        group = info.get("group") if isinstance(info, dict) else None
        key = f"{stage}:{group}" if group is not None and f"{stage}:{group}" in self.offsets else stage
        if key in self.offsets:
            self.stage(key)(done, total)


def cache_dir(*parts: str) -> str:
    """``<ComfyUI user directory>/mace_cache/<parts>``: preservation statistics, training data, LoRAs."""
    import folder_paths

    path = os.path.join(folder_paths.get_user_directory(), "mace_cache", *parts)
    os.makedirs(path, exist_ok=True)
    return path


def output_dir() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def new_output_path(filename_prefix: str, extension: str) -> str:
    """A fresh file name in ComfyUI's output folder (``<prefix>_00001_.<ext>``; never an existing one)."""
    import folder_paths

    from mace_ops.errors import MaceError

    if not filename_prefix.strip():
        raise MaceError("filename_prefix input: empty; give a name such as 'mace/erasure'")
    root = output_dir()
    folder, name, counter, _sub, _prefix = folder_paths.get_save_image_path(filename_prefix, root)
    if os.path.commonpath((os.path.abspath(folder), os.path.abspath(root))) != os.path.abspath(root):
        raise MaceError(f"filename_prefix input {filename_prefix!r} points outside the output folder; use a relative name")
    os.makedirs(folder, exist_ok=True)
    while True:
        path = os.path.join(folder, f"{name}_{counter:05}_.{extension}")
        if not os.path.exists(path):
            return path
        counter += 1


def erasure_files() -> list[str]:
    """Erasure files the Load Erasure node offers: ``output/...`` (under output/mace) and ``loras/...``."""
    try:
        import folder_paths
    except ImportError:
        return []
    out = []
    root = os.path.join(folder_paths.get_output_directory(), "mace")
    if os.path.isdir(root):
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                if f.endswith(".safetensors"):
                    rel = os.path.relpath(os.path.join(dirpath, f), folder_paths.get_output_directory())
                    out.append("output/" + rel.replace(os.sep, "/"))
    try:
        out += ["loras/" + n for n in folder_paths.get_filename_list("loras") if n.endswith(".safetensors")]
    except Exception:  # noqa: BLE001 - no loras folder configured
        pass
    return sorted(out)


def resolve_erasure_file(choice: str) -> str:
    """``output/<rel>`` or ``loras/<name>`` -> an absolute path (inside those folders only)."""
    import folder_paths

    from mace_ops.errors import MaceError

    if choice.startswith("output/"):
        root = folder_paths.get_output_directory()
        path = os.path.abspath(os.path.join(root, choice[len("output/"):]))
        if os.path.commonpath((path, os.path.abspath(root))) != os.path.abspath(root):
            raise MaceError(f"erasure input {choice!r} points outside the output folder")
    elif choice.startswith("loras/"):
        path = folder_paths.get_full_path("loras", choice[len("loras/"):])
    else:
        path = None
    if not path or not os.path.isfile(path):
        raise MaceError(f"erasure input {choice!r}: no such file; save an erasure first or refresh the node list")
    return path


def resolve_lora_file(name: str) -> str:
    """A file name of ComfyUI's loras folder (as its LoRA loader lists them) -> its absolute path."""
    import folder_paths

    from mace_ops.errors import MaceError

    path = folder_paths.get_full_path("loras", name.strip())
    if not path or not os.path.isfile(path):
        raise MaceError(f"lora_files input: {name.strip()!r} is not in the loras folder; put the file there and "
                        "write its name as the LoRA loader lists it")
    return path
