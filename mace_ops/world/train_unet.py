"""Train the world UNet (seeded, resumable, tqdm): SD1.x epsilon prediction on VAE latents of renders.

    x0 = scale · E(render(look)) (B,4,8,8),  t ~ U{0..999},  ε ~ N(0, I)
    x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε,   loss = mean ‖ε − UNet(x_t, t, text(caption))‖²
ᾱ from ``sd1_alphas_cumprod``. Captions come from ``captions.caption_bank`` by kind (object 45 %,
identity 25 %, partial 20 %, empty 10 %: the empty caption is the classifier-free-guidance dropout);
the image is drawn from the caption's ``Spec``. Latents of every (shape, colour, style, face) look ×
3 jitters are encoded once (``latent_pool``); caption embeddings are encoded on first use and kept.
An EMA of the weights (decay 0.995) is what ships.

    python -m mace_ops.world.train_unet --vae runs/vae/vae_final.pt --work runs/unet --steps 3000
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..tiny import sd1_alphas_cumprod
from ..tokens import load_sd1_tokenizer, sd1_token_ids
from .captions import Spec, caption_bank
from .model import build_text_encoder, build_unet, build_vae
from .render import render
from .sampling import to_tensor
from .vocab import COLOURS, SHAPES, STYLES, Look

KIND_WEIGHTS = {"object": 0.45, "identity": 0.25, "partial": 0.2, "empty": 0.1}
N_JITTER = 3


def look_index(look: Look) -> int:
    """Row of ``look`` in the latent pool: ((shape · 10 + colour) · 20 + style) · 2 + face."""
    s, c, st = SHAPES.index(look.shape), list(COLOURS).index(look.colour), list(STYLES).index(look.style)
    return ((s * len(COLOURS) + c) * len(STYLES) + st) * 2 + int(look.face)


@torch.no_grad()
def latent_pool(vae: torch.nn.Module, scale: float, seed: int = 0) -> Tensor:
    """Scaled posterior means of every look × N_JITTER jitters: (n_looks, N_JITTER, 4, 8, 8)."""
    rng = np.random.default_rng(seed)
    looks = [Look(s, c, st, f) for s in SHAPES for c in COLOURS for st in STYLES for f in (False, True)]
    out = []
    for i in tqdm(range(0, len(looks), 100), desc="latents"):
        imgs = [render(look, rng) for look in looks[i:i + 100] for _ in range(N_JITTER)]
        z = vae.encode(to_tensor(imgs)).latent_dist.mean * scale  # (100·J, 4, 8, 8)
        out.append(z.reshape(-1, N_JITTER, *z.shape[1:]))
    return torch.cat(out)


class TextCache:
    """Caption -> frozen text-encoder output (77, 768), float16, encoded on first use."""

    def __init__(self) -> None:
        self.encoder, self.tokenizer, self.store = build_text_encoder(), load_sd1_tokenizer(), {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> Tensor:
        new = sorted({c for c in captions if c not in self.store})
        if new:
            ids = torch.tensor(sd1_token_ids(new, self.tokenizer))
            for c, e in zip(new, self.encoder(input_ids=ids).last_hidden_state.half(), strict=True):
                self.store[c] = e
        return torch.stack([self.store[c] for c in captions]).float()  # (B, 77, 768)


def draw_batch(bank: dict, rng: np.random.Generator, batch: int) -> tuple[list[str], list[Look]]:
    kinds = list(KIND_WEIGHTS)
    picks = rng.choice(len(kinds), size=batch, p=list(KIND_WEIGHTS.values()))
    captions, looks = [], []
    for k in picks:
        entries = bank[kinds[k]]
        caption, spec = entries[rng.integers(len(entries))]
        captions.append(caption)
        looks.append(Spec.draw(spec, rng))
    return captions, looks


def _save(path: Path, **state: object) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_unet(vae_file: Path, work: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0,
               minutes: float | None = None) -> None:
    """Train or resume (``work/unet.pt``); stops early and checkpoints after ``minutes`` of wall time."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "unet.pt"
    vstate = torch.load(vae_file, weights_only=True)
    vae = build_vae()
    vae.load_state_dict(vstate["vae"])
    pool_file = work / "latents.pt"
    if not pool_file.exists():
        torch.save(latent_pool(vae.eval(), vstate["scaling_factor"]), pool_file)
    pool = torch.load(pool_file, weights_only=True)
    torch.manual_seed(seed)
    unet = build_unet().train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    start, log = 0, []
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        start, log = st["step"], st["log"]
    alphas = sd1_alphas_cumprod().float()
    bank, text = caption_bank(), TextCache()
    t0, run_loss = time.time(), []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="unet")
    for step in bar:
        rng = np.random.default_rng([seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        captions, looks = draw_batch(bank, rng, batch)
        ctx = text(captions)  # (B, 77, 768)
        rows = torch.tensor([look_index(look) for look in looks])
        x0 = pool[rows, torch.from_numpy(rng.integers(0, N_JITTER, batch))]  # (B, 4, 8, 8)
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.2 + 0.8 * (1 - step / steps))
        loss = (unet(x_t, t, encoder_hidden_states=ctx).sample - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 0.005)
        run_loss.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(run_loss[-50:]):.4f}")
        done = step + 1 == steps or (minutes is not None and time.time() - t0 > 60 * minutes)
        if (step + 1) % 50 == 0 or done:
            log.append((step + 1, float(np.mean(run_loss[-50:])), time.time() - t0))
        if (step + 1) % 100 == 0 or done:
            _save(ckpt, unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step + 1, log=log)
        if done:
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", default="runs/vae/vae_final.pt")
    p.add_argument("--work", default="runs/unet")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this much wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    train_unet(Path(a.vae), Path(a.work), a.steps, batch=a.batch, seed=a.seed, minutes=a.minutes)


if __name__ == "__main__":
    main()
