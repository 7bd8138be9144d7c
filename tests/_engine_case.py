"""The case the engine tests share: three concepts (two objects, one style) on the tiny host, the
one-process run as the reference, and the comparison with its tolerance.

Tolerance: in a worker each concept's LoRA is trained alone instead of batched in one forward, and on
another thread count, so the factors agree to float32 rounding (``mace_ops.train``); the closed-form
fusion carries that into the weights: ``max |ΔW| <= ERASURE_TOL · max |W|`` per matrix (measured
1.3e-5 on this case, 1 vs 2 local workers and on Ray), losses within LOSS_TOL (relative).
"""

from __future__ import annotations

import pytest

from mace_ops.concepts import Concept
from mace_ops.pipeline import Erasure, ErasureSettings, run_erasure
from mace_ops.preservation import default_corpus
from mace_ops.train import TrainConfig

ERASURE_TOL = 1e-4
LOSS_TOL = 1e-4

CONCEPTS = [Concept("Taylor Swift", "a person"), Concept("airplane", "sky"), Concept("Van Gogh", "art", "style")]
SETTINGS = ErasureSettings(cfr_preserve=0.5, fusion_preserve=5.0, ridge=0.1, n_images=1, sample_steps=2,
                           image_size=32, train=TrainConfig(steps=3, lr=1e-3))
_REFERENCE: dict[int, Erasure] = {}


def erase(host, **kw) -> Erasure:
    return run_erasure(host, CONCEPTS, preservation_prompts=default_corpus()[:16], settings=SETTINGS, **kw)


def one_worker_erasure(host) -> Erasure:
    """The reference: the whole run in this process (concepts batched in one forward), computed once."""
    if id(host) not in _REFERENCE:
        _REFERENCE[id(host)] = erase(host)
    return _REFERENCE[id(host)]


def assert_same_erasure(got: Erasure, want: Erasure) -> None:
    """Weights within ERASURE_TOL of the matrix's largest entry, losses within LOSS_TOL (relative)."""
    assert set(got.weights) == set(want.weights)
    worst = max(float((got.weights[k] - w).abs().max() / w.abs().max()) for k, w in want.weights.items())
    print(f"erasure: max |dW| / max |W| = {worst:.2e}")
    assert worst <= ERASURE_TOL
    for phrase, losses in want.metadata["losses"].items():
        assert got.metadata["losses"][phrase] == pytest.approx(losses, rel=LOSS_TOL)
