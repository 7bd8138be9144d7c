"""Cost of the in-flight group checkpoint of LoRA training (``mace_ops.train``): size, save and load time.

A group of N concepts trained together is checkpointed every ⌈steps / N⌉ steps (bank, AdamW moments,
generator states, losses), i.e. about N times per group, as often as the per-concept files are
written. This prints, for the tiny model and for SD1.5's 32 ``to_k``/``to_v`` shapes, the checkpoint's
size and the median of 5 saves and one load (1 thread, CPU), so the overhead can be set against a
training step's time. Not a test.

    .venv/bin/python benchmarks/bench_checkpoint.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.lora import LoRABank
from mace_ops.tiny import build_tiny_sd
from mace_ops.train import _GroupProgress, _load_group_checkpoint, _save_group_checkpoint

#: SD1.5's 16 cross-attention blocks in forward order: rows of to_k / to_v (768 columns each)
SD15_ROWS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3


def _shapes() -> dict[str, dict[str, tuple[int, int]]]:
    sd = build_tiny_sd(0)
    tiny = DiffusersHost(sd.unet, sd.text_encoder, sd.vae, alphas_cumprod=sd.alphas_cumprod)
    sd15 = {f"block{i}.{kv}": (rows, 768) for i, rows in enumerate(SD15_ROWS) for kv in ("to_k", "to_v")}
    return {"tiny": {n: tuple(w.shape) for n, w in tiny.cross_attention_weights().items()}, "SD1.5": sd15}


def measure(shapes: dict[str, tuple[int, int]], n: int, folder: Path) -> tuple[float, float, float]:
    """(size MB, median save s, load s) of one group checkpoint of ``n`` concepts after one AdamW step."""
    bank = LoRABank(shapes, [f"c{i}" for i in range(n)], 1, seed=0)
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-4)
    for p in bank.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # AdamW's moments exist, as in a real checkpoint
    states = [SimpleNamespace(generator=torch.Generator().manual_seed(i), phrase=f"c{i}", key=str(i)) for i in range(n)]
    losses = {s.phrase: [0.5] * 25 for s in states}
    path = folder / f"group-{n}.safetensors"
    saves = []
    for _ in range(5):
        t = time.perf_counter()
        _save_group_checkpoint(path, "key", bank, opt, states, losses, _GroupProgress(25, list(range(n)), {}))
        saves.append(time.perf_counter() - t)
    t = time.perf_counter()
    assert _load_group_checkpoint(path, "key", bank, opt, states, {}) is not None
    return path.stat().st_size / 1e6, statistics.median(saves), time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f}\n")
    print("| shapes | N | checkpoint MB | save (median of 5) ms | load ms |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, shapes in _shapes().items():
            for n in (8, 16):
                size, save, load = measure(shapes, n, Path(tmp))
                print(f"| {label} | {n} | {size:.2f} | {save * 1000:.0f} | {load * 1000:.0f} |", flush=True)


if __name__ == "__main__":
    main()
