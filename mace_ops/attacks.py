"""Attacks on an erasure other than inversion: adversarial prompt files and relearning.

* **Prompt files.** Adversarial prompt sets (I2P, Ring-A-Bell, P4D, UnlearnDiffAtk ...) come as CSV
  files with a prompt column and often a seed column; ``read_attack_prompts`` reads them (or a text
  file, one prompt per line) into ``AttackPrompt`` rows. A row's own seed is used when the file has one.
* **Relearning.** A few steps of ordinary fine-tuning of the erased model on *unrelated* images (no
  image of an erased concept), then the concept's prompts again. Only the cross-attention ``to_k`` /
  ``to_v`` matrices are tuned (the ones the erasure changed), with the denoising loss:

      min_{ΔW}  E_{x, t, ε} || ε_{W_e + ΔW}(√ᾱ_t z + √(1-ᾱ_t) ε, t, T(prompt)) - ε ||²,  ΔW_0 = 0

  This is a weaker attacker than full fine-tuning of the UNet (say so in reports).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MaceError

#: CSV column names read as the prompt / the seed (first match, case-insensitive)
PROMPT_COLUMNS = ("prompt", "prompts", "text", "caption")
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")


@dataclass(frozen=True)
class AttackPrompt:
    """One adversarial prompt and the seed it was made for (``None``: the probe's own seeds)."""

    prompt: str
    seed: int | None = None


def _column(fields: Sequence[str], wanted: Sequence[str]) -> str | None:
    lower = {f.strip().lower(): f for f in fields}
    return next((lower[w] for w in wanted if w in lower), None)


def _seed(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def read_attack_prompts(path: str | os.PathLike[str], *, limit: int | None = None) -> list[AttackPrompt]:
    """Prompts of a ``.csv`` (a column named prompt/prompts/text/caption; seeds from evaluation_seed,
    sd_seed or seed when present) or of a text file (one per line, ``#`` lines skipped); the first
    ``limit`` rows when given."""
    p = Path(path)
    if not p.is_file():
        raise MaceError(f"prompt file {p} does not exist; give a CSV with a 'prompt' column or a text file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise MaceError(f"prompt file {p} is not UTF-8 text ({e}); save it as UTF-8") from e
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        fields = list(reader.fieldnames or [])
        col = _column(fields, PROMPT_COLUMNS)
        if col is None:
            raise MaceError(f"prompt file {p} has no prompt column (columns: {', '.join(fields) or 'none'}); "
                            f"name one of them {' / '.join(PROMPT_COLUMNS)}")
        seed_col = _column(fields, SEED_COLUMNS)
        rows = [AttackPrompt(" ".join((r.get(col) or "").split()), _seed(r.get(seed_col) if seed_col else None))
                for r in reader]
    else:
        rows = [AttackPrompt(" ".join(line.split())) for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    rows = [r for r in rows if r.prompt][:limit]
    if not rows:
        raise MaceError(f"prompt file {p} has no prompts")
    return rows


def relearn(
    host,
    images: Tensor,
    prompts: Sequence[str],
    *,
    steps: int = 20,
    lr: float = 1e-4,
    batch: int = 4,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Tensor]:
    """Fine-tune ``host``'s to_k/to_v on ``images`` (N, 3, H, W) in [-1, 1] captioned by ``prompts``
    (N); returns the tuned weights ``{name: W_e + ΔW}`` (the host is never changed). AdamW, seeded."""
    if len(images) != len(prompts) or len(images) == 0:
        raise MaceError(f"relearning: {len(images)} images and {len(prompts)} prompts; give one prompt per image")
    with torch.inference_mode(False), torch.enable_grad():  # a ComfyUI node runs under inference mode
        base = {n: w.detach().clone() for n, w in host.cross_attention_weights().items()}  # {name: (d_out, d_ctx)}
        deltas = {n: torch.zeros_like(w, dtype=torch.float32, requires_grad=True) for n, w in base.items()}
        linears = {n: _tuned_linear(base[n], d) for n, d in deltas.items()}
        latents = host.vae_encode(images).detach().clone()  # (N, 4, h, w)
        context = host.encode(list(prompts)).detach().clone()  # (N, L, d_ctx)
        alphas = host.alphas_cumprod().detach().clone().to(torch.float32)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(list(deltas.values()), lr=lr)
        with host.instrument(linears=linears) as unet:
            for step in range(steps):
                pick = torch.randint(len(latents), (min(batch, len(latents)),), generator=gen)
                z = latents[pick]
                t = torch.randint(len(alphas), (len(pick),), generator=gen)
                noise = torch.randn(z.shape, generator=gen)
                a = alphas[t].view(-1, 1, 1, 1)
                loss = F.mse_loss(unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, context[pick]).float(), noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if progress is not None:
                    progress(step + 1, steps, float(loss.detach()))
    return {n: (base[n].float() + d.detach()).to(base[n].dtype) for n, d in deltas.items()}


def _tuned_linear(weight: Tensor, delta: Tensor) -> Callable[[Tensor], Tensor]:
    def linear(ctx: Tensor) -> Tensor:  # (B, L, d_ctx) -> (B, L, d_out)
        return ctx @ (weight.to(ctx.dtype) + delta.to(ctx.dtype)).T

    return linear


def unrelated_prompts(prompts: Sequence[str], phrases: Sequence[str]) -> list[str]:
    """``prompts`` without any that names one of the erased ``phrases`` (case-insensitive)."""
    words = [" ".join(p.lower().split()) for p in phrases if p.strip()]
    return [p for p in prompts if not any(w in " ".join(p.lower().split()) for w in words)]


__all__ = ["AttackPrompt", "PROMPT_COLUMNS", "SEED_COLUMNS", "read_attack_prompts", "relearn", "unrelated_prompts"]
