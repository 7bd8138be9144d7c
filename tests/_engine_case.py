"""The case the engine tests share: three concepts (two objects, one style) on the tiny host, trained in
batches of two (``concepts_per_batch=2``: a task of two concepts and a task of one), the one-process
run as the reference, and the comparison.

One thread per task: bit-identical. Every engine sends out the groups that the in-process trainer
batches together and a worker trains a group with the very same call (``mace_ops.engines``), so at one
torch thread, where every CPU kernel sums in one fixed order, the LoRAs, losses and fused weights equal
the one-process run bit for bit (``assert_same_erasure(..., exact=True)`` against
``one_worker_erasure(host, threads=1)``).

More threads: ``THREADS_TOL``. On CPU, ATen's softmax backward and MKL's small matrix products split
their sums by thread, so a worker on 1 thread and the driver on 2 differ in the last bits, and the
closed-form fusion carries that into the weights: ``max |ΔW| <= THREADS_TOL · max |W|`` per matrix,
losses within ``LOSS_TOL`` (relative). Two threads on both sides are not bit-identical either on a
loaded machine: on 2 cores with two benchmarks running beside the tests (2026-12-07), 2 workers at 2
threads each (local pool and Ray) differed from the 2-thread driver by 1.6e-7 to 3.6e-6 of the largest
weight in each of 6 comparisons, where they had matched bit for bit on earlier days.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
_REFERENCE: dict[tuple[int, int], Erasure] = {}


def erase(host, settings: ErasureSettings = SETTINGS, **kw) -> Erasure:
    return run_erasure(host, CONCEPTS, preservation_prompts=default_corpus()[:16], settings=settings, **kw)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """This process's torch threads set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_worker_erasure(host, threads: int | None = None) -> Erasure:
    """The reference: the whole run in this process at ``threads`` torch threads (default: this
    process's), computed once per host and thread count."""
    threads = threads or driver_threads()
    if (id(host), threads) not in _REFERENCE:
        with torch_threads(threads):
            _REFERENCE[(id(host), threads)] = erase(host)
    return _REFERENCE[(id(host), threads)]


def driver_threads() -> int:
    """This process's torch threads."""
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
