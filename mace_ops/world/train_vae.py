"""Train the world's AutoencoderKL on renders (seeded, resumable, tqdm).

Trained on random 32×32 crops (aligned to the 8-px latent grid) of 64×64 renders, 4× cheaper
than whole images; the model is convolutional, so it is used on whole images.

loss = mean|x̂ − x| + mean(x̂ − x)² + β·KL(q(z|x) ‖ N(0, I)),  β = 1e-6, z ~ q(z|x) (reparameterised).
After training, ``scaling_factor`` = 1 / std of the posterior means over 512 renders (SD1.x's
convention: scaled latents have unit variance).

    python -m mace_ops.world.train_vae --work runs/vae --steps 1500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .model import build_vae
from .sampling import random_look, render_batch


def _checkpoint(path: Path, vae: torch.nn.Module, opt: torch.optim.Optimizer, step: int, log: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, tmp)
    tmp.replace(path)


def _crops(x: torch.Tensor, rng: np.random.Generator, size: int = 32) -> torch.Tensor:
    """One random crop per image, aligned to the 8-px latent grid: (B, 3, H, W) -> (B, 3, size, size)."""
    n = (x.shape[-1] - size) // 8 + 1
    ij = rng.integers(0, n, (x.shape[0], 2)) * 8
    return torch.stack([im[:, i:i + size, j:j + size] for im, (i, j) in zip(x, ij, strict=True)])


def train_vae(work: Path, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0) -> torch.nn.Module:
    """Train (or resume) and return the VAE; ``work/vae.pt`` is the checkpoint, ``log`` (step, loss) pairs."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "vae.pt"
    torch.manual_seed(seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start, log = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start, log = state["step"], state["log"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae")
    t0 = time.time()
    for step in bar:
        rng = np.random.default_rng([seed, step])  # step-keyed: a resumed run sees the same batches
        x = _crops(render_batch([random_look(rng) for _ in range(batch)], rng), rng)  # (B, 3, 32, 32)
        lr_now = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / steps))
        for g in opt.param_groups:
            g["lr"] = lr_now
        post = vae.encode(x).latent_dist
        x_hat = vae.decode(post.sample()).sample
        rec = (x_hat - x).abs().mean() + (x_hat - x).pow(2).mean()
        loss = rec + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(rec=f"{rec.item():.4f}")
        if step % 25 == 0 or step == steps - 1:
            log.append((step, float(rec.item()), time.time() - t0))
        if (step + 1) % 50 == 0 or step == steps - 1:
            _checkpoint(ckpt, vae, opt, step + 1, log)
    return vae.eval()


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, n: int = 512, seed: int = 99) -> float:
    """1 / std of posterior means over ``n`` seeded renders."""
    rng = np.random.default_rng(seed)
    x = render_batch([random_look(rng) for _ in range(n)], rng)
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/vae")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    vae = train_vae(Path(a.work), a.steps, seed=a.seed)
    scale = latent_scale(vae)
    torch.save({"vae": vae.state_dict(), "scaling_factor": scale}, Path(a.work) / "vae_final.pt")
    print(f"scaling_factor {scale:.4f}")


if __name__ == "__main__":
    main()
