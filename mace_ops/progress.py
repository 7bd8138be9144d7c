"""Progress of a run: the callback type of every stage-level reporter, and its terminal form
(one tqdm bar per pipeline stage, the concept and loss shown as postfix)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

#: ``progress(stage, done, total, info)``: ``done`` of ``total`` units of ``stage`` ("preservation",
#: "refine", "data", "train", "fuse", "probe", ...) are finished; ``info`` may carry "concept", "loss".
ProgressCallback = Callable[[str, int, int, Mapping[str, Any]], None]


class StageProgress:
    """A ``ProgressCallback`` drawing one tqdm bar per stage (the concept and loss shown as postfix)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int, info: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{stage:>12}", unit="step", dynamic_ncols=True, file=sys.stderr)
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        post = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)[:30]) for k, v in info.items()}
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None


__all__ = ["ProgressCallback", "StageProgress"]
