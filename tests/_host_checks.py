"""Checks that a diffusers host was left as it was (imported by tests; not a test module)."""

from __future__ import annotations

import torch

from mace_ops.hosts.diffusers import DiffusersHost


def host_state(host: DiffusersHost) -> dict[str, torch.Tensor]:
    """Copies of every tensor of the host's UNet, text encoder and VAE (to prove they never change)."""
    out = {}
    for prefix, m in (("unet", host.unet), ("text", host.text_encoder), ("vae", host.vae)):
        out.update({f"{prefix}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return out


def attention_processors(host: DiffusersHost) -> dict[str, int]:
    """Identity of each attention processor of the UNet (to prove hooks were removed)."""
    return {k: id(v) for k, v in host.unet.attn_processors.items()}


def assert_same_training(bank_a, losses_a, bank_b, losses_b) -> None:
    """Two trainings of the same concepts agree as ``mace_ops.train`` promises for a concept trained
    again: each factor within 1e-3 of its largest entry, each loss within 1e-5 (relative).

    Measured: 1, 2 and 3 CPU threads differ by at most 2.7e-4 (factors) and 1.2e-7 (losses) on the
    tiny model after 2-8 steps, so the bounds leave a margin of about 4x and 100x.
    """
    assert bank_a.concepts == bank_b.concepts and losses_a.keys() == losses_b.keys()
    for i in range(bank_a.num_concepts):
        for name, pair in bank_a.factors(i).items():
            for a, b in zip(pair, bank_b.factors(i)[name], strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * float(a.abs().max()) + 1e-12)
    for phrase, curve in losses_a.items():
        assert len(curve) == len(losses_b[phrase])
        torch.testing.assert_close(torch.tensor(losses_b[phrase], dtype=torch.float64),
                                   torch.tensor(curve, dtype=torch.float64), rtol=1e-5, atol=0)


def assert_same_bank(bank_a, bank_b) -> None:
    """Bit-identical factors: what a concept read back from its cache file must give."""
    assert bank_a.concepts == bank_b.concepts
    for i in range(bank_a.num_concepts):
        for name, (up, down) in bank_a.factors(i).items():
            assert torch.equal(bank_b.factors(i)[name][0], up) and torch.equal(bank_b.factors(i)[name][1], down)
