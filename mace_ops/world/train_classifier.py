"""Train the world classifier on seeded renders (cross-entropy summed over the four heads).

    python -m mace_ops.world.train_classifier --out runs/classifier.pt --steps 1500
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


def train_classifier(steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 1) -> WorldClassifier:
    torch.manual_seed(seed)
    model = WorldClassifier().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    bar = tqdm(range(steps), desc="classifier")
    for step in bar:
        rng = np.random.default_rng([seed, step])
        looks = [random_look(rng, p_face=0.5) for _ in range(batch)]
        x = degrade(render_batch(looks, rng), rng)
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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.save(train_classifier(a.steps).state_dict(), a.out)


if __name__ == "__main__":
    main()
