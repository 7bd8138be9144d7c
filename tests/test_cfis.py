"""CFIS timestep distribution and sampler."""

from __future__ import annotations

import math

import pytest
import torch

from mace_ops.errors import MaceError
from mace_ops.train import cfis_probabilities, sample_timesteps


def test_cfis_matches_formula_sums_to_one_mode_300():
    p = cfis_probabilities()
    assert p.shape == (1000,) and p.dtype == torch.float64
    assert abs(p.sum().item() - 1) < 1e-12
    assert int(p.argmax()) == 300

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    raw = [sig(0.05 * (t - 200)) - sig(0.05 * (t - 400)) for t in range(1000)]  # independent, per element
    z = sum(raw)
    for t in (0, 150, 200, 300, 399, 650, 999):
        assert abs(p[t].item() - raw[t] / z) < 1e-12


def test_cfis_mass_in_window():
    # 0.8614 computed from the formula; DESIGN quotes 86 %. Tolerance 0.005.
    p = cfis_probabilities()
    assert abs(p[200:400].sum().item() - 0.86) < 0.005


def test_sample_timesteps_seeded_and_distributed():
    a = sample_timesteps(20000, torch.Generator().manual_seed(3))
    b = sample_timesteps(20000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < 1000
    frac = ((a >= 200) & (a < 400)).double().mean().item()
    assert abs(frac - 0.8614) < 0.015  # 20k draws: sd ≈ 0.0024
    u = sample_timesteps(20000, torch.Generator().manual_seed(3), mode="uniform")
    assert abs(((u >= 200) & (u < 400)).double().mean().item() - 0.2) < 0.015


def test_sample_timesteps_rejects_unknown_mode():
    with pytest.raises(MaceError, match="cfis"):
        sample_timesteps(1, None, mode="karras")
