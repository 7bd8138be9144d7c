"""Write the shipped weights: float16 safetensors of the EMA UNet, the VAE (+ its scaling factor) and
the classifier into ``mace_ops/world/weights/``, with the training log as metadata.

    python -m mace_ops.world.export --unet runs/unet/unet.pt --vae runs/vae/vae_final.pt --classifier runs/classifier.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .model import WEIGHTS_DIR


def _half(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items() if v.is_floating_point()}


#: largest shard written: files in the repository stay under 5 MiB each
MAX_SHARD_BYTES = 4_500_000


def save_sharded(tensors: dict[str, torch.Tensor], out: Path, stem: str, metadata: dict[str, str]) -> list[Path]:
    """``tensors`` as ``{stem}-{i}-of-{n}.safetensors`` files of at most ``MAX_SHARD_BYTES`` of tensor data
    each (names in sorted order, filled greedily); every shard carries ``metadata``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    paths = [out / f"{stem}-{i}-of-{len(shards)}.safetensors" for i in range(1, len(shards) + 1)]
    for part, path in zip(shards, paths, strict=True):
        save_file(part, path, metadata=metadata)
    return paths


def export(unet_ckpt: Path, vae_file: Path | None, classifier_file: Path | None, out: Path = WEIGHTS_DIR) -> None:
    """Write the UNet shards, and the VAE and classifier unless their file is ``None`` (kept as shipped)."""
    out.mkdir(parents=True, exist_ok=True)
    u = torch.load(unet_ckpt, weights_only=True)
    meta = {"step": str(u["step"]), "log": json.dumps(u["log"])}
    for old in out.glob("unet-*-of-*.safetensors"):
        old.unlink()
    save_sharded(_half(u["ema"]), out, "unet", meta)
    if vae_file is None or classifier_file is None:
        return
    v = torch.load(vae_file, weights_only=True)
    vae = _half(v["vae"])
    vae["scaling_factor"] = torch.tensor([v["scaling_factor"]], dtype=torch.float32)
    save_file(vae, out / "vae.safetensors")
    cls = torch.load(classifier_file, weights_only=True)
    save_file({k: v.contiguous() for k, v in cls.items()}, out / "classifier.safetensors")  # float32, 0.5 MB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet", default="runs/unet/unet.pt")
    p.add_argument("--vae", default="runs/vae/vae_final.pt")
    p.add_argument("--classifier", default="runs/classifier.pt")
    p.add_argument("--unet-only", action="store_true", help="rewrite only the UNet shards (VAE and classifier kept)")
    a = p.parse_args()
    if a.unet_only:
        export(Path(a.unet), None, None)
    else:
        export(Path(a.unet), Path(a.vae), Path(a.classifier))


if __name__ == "__main__":
    main()
