"""Train the world classifier on seeded renders (cross-entropy summed over the four heads).

Stage 1 (``--steps``): clean renders with generic degradations. Stage 2 (``--vae`` with
``--vae-steps``): fine-tune on a 50/50 mix of renders and their VAE reconstructions D(E(x)), so that the
judge reads the decoder's rendering (its slight hue shifts and soft eyes) as what was drawn. It never
sees a UNet sample.

    python -m mace_ops.world.train_classifier --out runs/classifier.pt --steps 2000
    python -m mace_ops.world.train_classifier --resume runs/classifier.pt --vae runs/vae/vae_final.pt \
        --vae-steps 400 --out runs/classifier_vae.pt
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .classifier import HEADS, WorldClassifier, degrade
from .sampling import random_look, render_batch


def _targets(looks: list) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor([HEADS["shape"].index(x.shape) for x in looks]),
        "colour": torch.tensor([HEADS["colour"].index(x.colour) for x in looks]),
        "style": torch.tensor([HEADS["style"].index(x.style) for x in looks]),
        "face": torch.tensor([int(x.face) for x in looks]),
    }


def train_classifier(steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 1, model: WorldClassifier | None = None,
                     vae: torch.nn.Module | None = None) -> WorldClassifier:
    """Train ``model`` (default: a fresh one); with ``vae``, half of every batch is reconstructed by it."""
    torch.manual_seed(seed)
    model = (model or WorldClassifier()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    bar = tqdm(range(steps), desc="classifier")
    for step in bar:
        rng = np.random.default_rng([seed, step])
        looks = [random_look(rng, p_face=0.5) for _ in range(batch)]
        x = render_batch(looks, rng)
        if vae is not None:
            with torch.no_grad():
                half = batch // 2
                x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.mean).sample.clamp(-1, 1)
        x = degrade(x, rng)
        for g in opt.param_groups:
            g["lr"] = lr * (1 - step / steps)
        logits, target = model(x), _targets(looks)
        loss = sum(F.cross_entropy(logits[k], target[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", s=f"{time.time() - t0:.0f}")
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/classifier.pt")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", help="start from this state dict")
    p.add_argument("--vae", help="VAE file of train_vae (vae_final.pt): fine-tune on its reconstructions")
    p.add_argument("--vae-steps", type=int, default=400)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = WorldClassifier()
    if a.resume:
        model.load_state_dict(torch.load(a.resume, weights_only=True))
    if a.vae:
        from .model import build_vae

        vae = build_vae()
        vae.load_state_dict(torch.load(a.vae, weights_only=True)["vae"])
        model = train_classifier(a.vae_steps, lr=5e-4, seed=2, model=model, vae=vae.eval().requires_grad_(False))
    else:
        model = train_classifier(a.steps, model=model)
    torch.save(model.state_dict(), a.out)


if __name__ == "__main__":
    main()
