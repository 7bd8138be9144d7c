"""A model's fingerprint does not depend on the precision it was loaded in (``weights_fingerprint``)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mace_ops.hosts.base import FINGERPRINT_FORMAT, weights_fingerprint
from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.tiny import build_tiny_sd

NAMES = ["a.to_k", "a.to_v", "b.to_k"]


def _weights(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with SD-like entries (std 0.03), tiny ones (fp16 subnormals) and an exact zero."""
    g = torch.Generator().manual_seed(0)
    out = {n: torch.randn(6, 8, generator=g) * 0.03 for n in NAMES}
    out["a.to_k"][0, :4] = torch.tensor([1e-6, -3e-7, 2.5e-5, 0.0])  # below fp16's normal range (6.1e-5)
    return {n: w.to(dtype) for n, w in out.items()}


def _numpy_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """The documented hash computed independently: numpy's own IEEE fp16 rounding of the float32 values."""
    h = hashlib.sha256(f"{FINGERPRINT_FORMAT}\n".encode())
    for n in NAMES:
        a = weights[n].float().numpy()
        h.update(f"{n}:{tuple(a.shape)}\n".encode())
        h.update(a.astype("<f2").tobytes())
    return h.hexdigest()


def fp(weights: dict[str, torch.Tensor]) -> str:
    return weights_fingerprint(weights, NAMES)


def test_the_hash_is_sha256_of_the_fp16_rounding():
    w = _weights()
    assert fp(w) == _numpy_fingerprint(w) == fp(w)  # documented form, deterministic


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_file_loaded_in_fp32_or_its_own_precision_or_fp16_has_one_fingerprint(file_dtype):
    stored = _weights(file_dtype)  # what the file holds
    loads = {torch.float32, torch.float16, file_dtype}  # a bf16 file: all three precisions
    prints = {fp({n: w.to(load) for n, w in stored.items()}) for load in loads}
    assert len(prints) == 1


def test_a_bf16_load_of_an_fp32_file_is_a_different_model():
    """The documented limit: bf16 dropped bits that the fp32 and fp16 copies keep."""
    w = _weights()
    assert fp({n: t.bfloat16() for n, t in w.items()}) != fp(w)


def test_a_changed_weight_or_name_or_shape_changes_the_fingerprint():
    w = _weights()
    base = fp(w)
    changed = {n: t.clone() for n, t in w.items()}
    changed["b.to_k"][3, 5] += 1e-3  # 1/30 of a typical entry: far above fp16's resolution there
    assert fp(changed) != base
    assert weights_fingerprint(w, ["a.to_k", "b.to_k", "a.to_v"]) != base
    reshaped = dict(w, **{"a.to_v": w["a.to_v"].reshape(8, 6)})
    assert fp(reshaped) != base
    # the one thing it does not see: a change below fp16's resolution (here 2^-24 absolute, near 1e-6)
    below = {n: t.clone() for n, t in w.items()}
    below["a.to_k"][0, 0] += 1e-9
    assert np.float16(below["a.to_k"][0, 0].item()) == np.float16(w["a.to_k"][0, 0].item())
    assert fp(below) == base


def test_hosts_over_fp32_and_fp16_copies_of_one_model_agree():
    hosts = {}
    for dtype in (torch.float32, torch.float16):
        sd = build_tiny_sd(0)
        for m in (sd.unet, sd.text_encoder):
            m.to(dtype)
        hosts[dtype] = DiffusersHost(sd.unet, sd.text_encoder, sd.vae, alphas_cumprod=sd.alphas_cumprod)
    a, b = hosts[torch.float32], hosts[torch.float16]
    assert a.model_fingerprint() == b.model_fingerprint()
    assert a.text_encoder_fingerprint() == b.text_encoder_fingerprint()
    other = build_tiny_sd(1)
    assert DiffusersHost(other.unet, other.text_encoder, other.vae).model_fingerprint() != a.model_fingerprint()
