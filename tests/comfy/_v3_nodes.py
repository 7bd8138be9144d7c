"""The pack's nodes as ComfyUI 0.33 gets them: ``comfy_entrypoint()`` -> ``ComfyExtension`` -> V3 classes.

``v3_nodes(root)`` imports the pack the way ComfyUI does (a package from its folder) and returns
``{node id: caller}``; a caller takes the node's inputs positionally (table order) or by name and returns
the ``io.NodeOutput`` of the class's ``execute`` (unpacks like a tuple; ``.ui`` holds the node's text).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from _pack import load_pack  # tests/ is on sys.path: pytest puts tests/conftest.py's folder there


def v3_classes(root: Path) -> dict[str, type]:
    """{node id: V3 class}, from the pack's comfy_entrypoint as ComfyUI's loader calls it."""

    async def nodes() -> list[type]:
        extension = await load_pack(root).comfy_entrypoint()
        await extension.on_load()
        return await extension.get_node_list()

    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(nodes())}


class Caller:
    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.names = [i.name for i in cls.SPEC.inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.cls.execute(**dict(zip(self.names, args, strict=False)), **kwargs)


def v3_nodes(root: Path) -> dict[str, Caller]:
    return {k: Caller(cls) for k, cls in v3_classes(root).items()}
