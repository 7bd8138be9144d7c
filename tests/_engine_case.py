"""The case the engine tests share: three concepts (two objects, one style) on the tiny host, trained in
batches of two (``concepts_per_batch=2``: a task of two concepts and a task of one), the one-process
run as the reference, and the comparison.

Same thread count: bit-identical. Every engine sends out the groups that the in-process trainer batches
together and a worker trains a group with the very same call (``mace_ops.engines``), so at the same
torch thread count per task the LoRAs, losses and fused weights equal the one-process run bit for bit
(``assert_same_erasure(..., exact=True)``).

Other thread count: ``THREADS_TOL``. On CPU, ATen's softmax backward and MKL's small matrix products
split their sums by thread, so a worker on 1 thread and the driver on 2 differ in the last bits, and
the closed-form fusion carries that into the weights: ``max |ΔW| <= THREADS_TOL · max |W|`` per matrix,
losses within ``LOSS_TOL`` (relative).
"""

from __future__ import annotations

import pytest
import torch

from mace_ops.concepts import Concept
from mace_ops.pipeline import Erasure, ErasureSettings, run_erasure
from mace_ops.preservation import default_corpus
from mace_ops.train import TrainConfig

THREADS_TOL = 1e-4
LOSS_TOL = 1e-4

CONCEPTS = [Concept("Taylor Swift", "a person"), Concept("airplane", "sky"), Concept("Van Gogh", "art", "style")]
SETTINGS = ErasureSettings(cfr_preserve=0.5, fusion_preserve=5.0, ridge=0.1, n_images=1, sample_steps=2,
                           image_size=32, train=TrainConfig(steps=3, lr=1e-3, concepts_per_batch=2))
_REFERENCE: dict[int, Erasure] = {}


def erase(host, settings: ErasureSettings = SETTINGS, **kw) -> Erasure:
    return run_erasure(host, CONCEPTS, preservation_prompts=default_corpus()[:16], settings=settings, **kw)


def one_worker_erasure(host) -> Erasure:
    """The reference: the whole run in this process at this process's thread count, computed once."""
    if id(host) not in _REFERENCE:
        _REFERENCE[id(host)] = erase(host)
    return _REFERENCE[id(host)]


def driver_threads() -> int:
    """This process's torch threads: give each worker as many to get the bit-identical result."""
    return torch.get_num_threads()


def assert_same_erasure(got: Erasure, want: Erasure, *, exact: bool) -> None:
    """``exact``: weights and losses bit-identical; else weights within THREADS_TOL of the matrix's
    largest entry and losses within LOSS_TOL (relative)."""
    assert set(got.weights) == set(want.weights)
    worst = max(float((got.weights[k] - w).abs().max() / w.abs().max()) for k, w in want.weights.items())
    print(f"erasure: max |dW| / max |W| = {worst:.2e}")
    if exact:
        assert all(torch.equal(got.weights[k], w) for k, w in want.weights.items()), f"not bit-identical: {worst:.2e}"
        assert got.metadata["losses"] == want.metadata["losses"]
        return
    assert worst <= THREADS_TOL
    for phrase, losses in want.metadata["losses"].items():
        assert got.metadata["losses"][phrase] == pytest.approx(losses, rel=LOSS_TOL)
