"""Train the world UNet (seeded, resumable, tqdm): SD1.x epsilon prediction on VAE latents of renders.

    x0 = scale · E(render(look)) (B,4,8,8),  t ~ U{0..999},  ε ~ N(0, I)
    x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε,   loss = mean ‖ε − UNet(x_t, t, text(caption))‖²
ᾱ from ``sd1_alphas_cumprod``. Captions come from ``captions.caption_bank`` by kind (object 45 %,
identity 25 %, partial 20 %, empty 10 %: the empty caption is the classifier-free-guidance dropout);
the image is drawn from the caption's ``Spec``. Latents of every (shape, colour, style, face) look ×
3 jitters are encoded once (``latent_pool``); caption embeddings are encoded on first use and kept.
An EMA of the weights (decay 0.995) is what ships.

Cost: at 8×8 latents the step is dominated by the cross-attention projections of the 77×768 context
(K = ctx·W_kᵀ, V = ctx·W_vᵀ in 16 blocks). A batch therefore holds ``batch / repeats`` captions, each
with ``repeats`` images (own look drawn from the spec, jitter, t, ε), and ``share_context_projections``
computes K and V once per distinct caption: the same loss and gradients as projecting every row.

    python -m mace_ops.world.train_unet --vae runs/vae/vae_final.pt --work runs/unet --steps 3000
    python -m mace_ops.world.train_unet --vae shipped --init shipped --work runs/unet2 --steps 6000  # continue
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


def draw_batch(bank: dict, rng: np.random.Generator, batch: int, repeats: int = 1) -> tuple[list[str], list[Look]]:
    """``batch // repeats`` captions, each repeated ``repeats`` times (adjacent), with a look drawn per row."""
    kinds = list(KIND_WEIGHTS)
    picks = rng.choice(len(kinds), size=batch // repeats, p=list(KIND_WEIGHTS.values()))
    captions, looks = [], []
    for k in picks:
        entries = bank[kinds[k]]
        caption, spec = entries[rng.integers(len(entries))]
        captions += [caption] * repeats
        looks += [Spec.draw(spec, rng) for _ in range(repeats)]
    return captions, looks


class ContextRows:
    """Which rows of the batch's context are distinct: ``first`` (U,) row of each distinct caption,
    ``inverse`` (B,) the distinct caption of each row; set per step with ``set``."""

    def __init__(self) -> None:
        self.first: Tensor | None = None
        self.inverse: Tensor | None = None

    def set(self, captions: list[str]) -> None:
        index: dict[str, int] = {}
        inverse = [index.setdefault(c, len(index)) for c in captions]
        first = {u: i for i, u in reversed(list(enumerate(inverse)))}
        self.first = torch.tensor([first[u] for u in range(len(index))])
        self.inverse = torch.tensor(inverse)


def share_context_projections(unet: torch.nn.Module, rows: ContextRows) -> int:
    """Make every cross-attention ``to_k``/``to_v`` project only the distinct context rows:
    y = Linear(ctx[first])[inverse], (B, 77, C). Exact (same values and gradients); parameters and
    ``state_dict`` unchanged. Returns the number of projections patched."""
    import functools

    def dedup_linear(linear: torch.nn.Linear, ctx: Tensor) -> Tensor:
        if rows.first is None or rows.inverse is None or len(rows.inverse) != ctx.shape[0]:
            return torch.nn.functional.linear(ctx, linear.weight, linear.bias)
        return torch.nn.functional.linear(ctx[rows.first], linear.weight, linear.bias)[rows.inverse]

    patched = 0
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            module.forward = functools.partial(dedup_linear, module)
            patched += 1
    return patched


def _save(path: Path, **state: object) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_vae(vae_file: str | Path) -> tuple[torch.nn.Module, float]:
    """The VAE and its scaling factor from ``train_vae``'s final file, or ``"shipped"`` for the packaged one."""
    if str(vae_file) == "shipped":
        from .model import load_world_model

        vae = load_world_model().vae
        return vae, float(vae.config.scaling_factor)
    vstate = torch.load(vae_file, weights_only=True)
    vae = build_vae()
    vae.load_state_dict(vstate["vae"])
    return vae.eval(), float(vstate["scaling_factor"])


def _start(work: Path, init: str | None, lr: float) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, int, list]:
    """UNet, EMA, optimiser, first step and log: resumed from ``work/unet.pt`` if it exists, else from
    ``init`` (``"shipped"``: the packaged weights, as both UNet and EMA; fresh optimiser), else random."""
    unet = build_unet().train()
    if init is not None and not (work / "unet.pt").exists():
        from .model import load_world_model

        src = load_world_model().unet if init == "shipped" else None
        state = src.state_dict() if src is not None else torch.load(init, weights_only=True)["ema"]
        unet.load_state_dict(state)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    if not (work / "unet.pt").exists():
        return unet, ema, opt, 0, []
    st = torch.load(work / "unet.pt", weights_only=True)
    unet.load_state_dict(st["unet"])
    ema.load_state_dict(st["ema"])
    opt.load_state_dict(st["opt"])
    return unet, ema, opt, st["step"], st["log"]


def train_unet(vae_file: Path | str, work: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0,
               minutes: float | None = None, repeats: int = 1, init: str | None = None) -> None:
    """Train or resume (``work/unet.pt``); stops early and checkpoints after ``minutes`` of wall time."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "unet.pt"
    pool_file = work / "latents.pt"
    if not pool_file.exists():
        vae, scale = load_vae(vae_file)
        torch.save(latent_pool(vae.eval(), scale), pool_file)
    pool = torch.load(pool_file, weights_only=True)
    torch.manual_seed(seed)
    unet, ema, opt, start, log = _start(work, init, lr)
    rows = ContextRows()
    share_context_projections(unet, rows)
    alphas = sd1_alphas_cumprod().float()
    bank, text = caption_bank(), TextCache()
    t0, run_loss = time.time(), []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="unet")
    for step in bar:
        rng = np.random.default_rng([seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        captions, looks = draw_batch(bank, rng, batch, repeats)
        rows.set(captions)
        ctx = text(captions)  # (B, 77, 768)
        rows_idx = torch.tensor([look_index(look) for look in looks])
        x0 = pool[rows_idx, torch.from_numpy(rng.integers(0, N_JITTER, batch))]  # (B, 4, 8, 8)
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
    p.add_argument("--vae", default="runs/vae/vae_final.pt", help="train_vae's final file, or 'shipped'")
    p.add_argument("--init", default=None, help="start from 'shipped' weights or a unet.pt's EMA (fresh optimiser)")
    p.add_argument("--repeats", type=int, default=1, help="images per caption in a batch (K/V computed once)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--work", default="runs/unet")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--minutes", type=float, default=None, help="stop (and checkpoint) after this much wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    train_unet(a.vae, Path(a.work), a.steps, batch=a.batch, lr=a.lr, seed=a.seed, minutes=a.minutes,
               repeats=a.repeats, init=a.init)


if __name__ == "__main__":
    main()
