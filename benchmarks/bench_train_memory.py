"""Memory of one MACE training step at full SD1.5 size, counted without a GPU.

The UNet (SD1.5's config, 859.5M parameters) is built on the ``meta`` device (shapes and dtypes, no data)
in the chosen dtype, and one training step runs as ``train.LoRATrainer`` runs it: banked rank-1 LoRA on
the 32 to_k/to_v, the attention-loss sink (probabilities in float32), on latents of 64×64 (512 px).
Every tensor autograd saves for the backward is counted once (``torch.autograd.graph.saved_tensors_hooks``,
deduplicated by storage): that is the activation memory the backward keeps alive at the peak.

What the count leaves out, and how the README's estimate adds it: the weights, the LoRA factors, their
gradients and AdamW moments (all counted exactly from the parameter numbers below); cuDNN/cuBLAS
workspaces and allocator slack (not counted). Self-attention: ``sdpa_attention`` is saved as the flash /
memory-efficient kernels save it on a GPU (q, k, v, out, logsumexp); the count marks tensors of
(B·heads, N, N) shape, which only the math fallback saves, separately.

    PYTHONPATH=. python benchmarks/bench_train_memory.py [--dtype float16] [--batch 1] [--latent 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def saved_bytes_of_step(dtype: torch.dtype, batch: int, latent: int) -> dict[str, float]:
    """Bytes saved for backward by one training step (see the module docstring), by dtype, plus counts."""
    from bench_train import SD15_UNET_CONFIG
    from diffusers import UNet2DConditionModel

    from mace_ops.hosts.diffusers import DiffusersHost
    from mace_ops.lora import LoRABank
    from mace_ops.tiny import build_tiny_sd
    from mace_ops.train import AttentionLossSink

    meta = torch.device("meta")
    with torch.device(meta):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    sd = build_tiny_sd(0)  # its text encoder and VAE are not used by a training step
    host = DiffusersHost(unet, sd.text_encoder, sd.vae, alphas_cumprod=sd.alphas_cumprod, device=meta, dtype=dtype)
    base = host.cross_attention_weights()
    bank = LoRABank({n: tuple(w.shape) for n, w in base.items()}, [f"c{i}" for i in range(batch)], rank=1).to(meta)
    ctx = torch.zeros(batch, 77, 768, device=meta)
    masks = torch.ones(batch, latent, latent, dtype=torch.bool, device=meta)
    positions = torch.ones(batch, 77, dtype=torch.bool, device=meta)
    seen: dict[int, tuple[int, torch.dtype, tuple[int, ...]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage._cdata, (storage.nbytes(), t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sink = AttentionLossSink(masks, positions)
        with host.instrument(linears=bank.banked_linears(base, torch.arange(batch)), attention=sink.attention) as f:
            f(torch.zeros(batch, 4, latent, latent, device=meta), torch.full((batch,), 300, device=meta), ctx)
        sink.total().sum()
    n = latent * latent
    out: dict[str, float] = {"total": 0.0, "square_attention": 0.0}
    for nbytes, dt, shape in seen.values():
        out["total"] += nbytes
        out[str(dt).removeprefix("torch.")] = out.get(str(dt).removeprefix("torch."), 0.0) + nbytes
        if len(shape) >= 2 and shape[-1] == shape[-2] and shape[-1] in (n, n // 4, n // 16, n // 64):
            out["square_attention"] += nbytes
    out["unet_parameters"] = float(sum(p.numel() for p in unet.parameters()))
    out["lora_parameters"] = float(sum(p.numel() for p in bank.parameters()))
    out["tensors"] = float(len(seen))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--batch", type=int, default=1, help="samples in the step (concepts × batch_size)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    args = ap.parse_args(argv)
    r = saved_bytes_of_step(DTYPES[args.dtype], args.batch, args.latent)
    gib = 2.0**30
    print(f"SD1.5 UNet {r['unet_parameters'] / 1e6:.1f}M parameters ({args.dtype}), batch {args.batch}, "
          f"latent {args.latent}x{args.latent}: {r['tensors']:.0f} saved tensors")
    print(f"saved for backward: {r['total'] / gib:.3f} GiB  by dtype: "
          + ", ".join(f"{k} {v / gib:.3f}" for k, v in r.items() if k in ("float32", "float16", "bfloat16", "int64", "bool")))
    print(f"of which (N, N) self-attention matrices (math fallback only): {r['square_attention'] / gib:.3f} GiB")
    print(f"LoRA parameters: {r['lora_parameters']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
