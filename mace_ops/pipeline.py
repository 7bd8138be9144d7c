"""The MACE pipeline on any host: refine (CFR) -> training data -> LoRAs -> fusion -> Erasure.

Stages (DESIGN 2.2-2.4); each is usable alone (the ComfyUI nodes call them one by one):

    preserve  = preservation_groups(host, prompts=..., retained=..., settings=...)
    W1        = refine_weights(host, concepts, preserve, settings)             # CFR
    data      = generate_training_data(original_host, concepts, ...)           # mace_ops.data
    bank, L   = train_loras(host.with_weights(W1), data, settings, ...)        # mace_ops.train
    erasure   = fuse_erasure(host, W1, bank, concepts, preserve, settings)     # closed-form fusion
    erasure   = run_erasure(host, concepts, ...)                               # all of it

STATUS: signatures fixed; bodies are being filled in (lead).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

#: progress(stage, done, total, info) — stage in {"preservation", "refine", "data", "train", "fuse"}
Progress = Callable[[str, int, int, Mapping[str, Any]], None]


@dataclass
class ErasureSettings:
    """Every knob of a run. Weights are scale-free (see mace_ops.concepts presets / closed_form)."""

    cfr_preserve: float = 0.4749
    cfr_retained: float = 0.0
    fusion_preserve: float = 4749.0
    fusion_retained: float = 0.0
    ridge: float = 0.0
    n_images: int = 8
    sample_steps: int = 30
    cfg: float = 7.5
    image_size: int = 512
    seed: int = 0
    train: Any = None  # mace_ops.train.TrainConfig; None -> defaults


@dataclass
class Erasure:
    """The product of a run: the new to_k/to_v matrices and their provenance (MACE_ERASURE)."""

    weights: dict[str, Tensor]  # "<block>.to_k" -> (d_out, d_ctx), float32, CPU
    base_fingerprint: str  # Host.model_fingerprint() of the ORIGINAL model
    concepts: list  # list[mace_ops.concepts.Concept]
    metadata: dict[str, Any] = field(default_factory=dict)  # settings, losses, versions

    def diffs(self, original: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``W_new - W0`` per matrix (what the erasure file stores)."""
        return {k: (w.float() - original[k].float().cpu()) for k, w in self.weights.items()}


def run_erasure(
    host,
    concepts: Sequence,
    *,
    preservation_prompts: Sequence[str] | None = None,
    retained: Sequence[str] = (),
    settings: ErasureSettings | None = None,
    user_images: Mapping[str, Tensor] | None = None,
    user_masks: Mapping[str, Tensor] | None = None,
    cache_dir: str | None = None,
    progress: Progress | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> Erasure:
    """Run the whole MACE pipeline on ``host`` (never mutated) and return the Erasure."""
    raise NotImplementedError("pipeline under construction")
