"""Concept inversion: learn one new token embedding that makes a (frozen) model draw a concept.

The attack of Pham et al. ("Circumventing concept erasure methods", ICLR 2024) on an erasure: given
images ``x`` of the concept (drawn by the *original* model), learn one input-embedding vector ``v``
(d_emb; 768 for CLIP-L) for a placeholder token ``*``, with every model weight frozen (the *erased*
model's), by the usual denoising loss (textual inversion):

    v* = argmin_v  E_{x, t, ε} || ε_θ(√ᾱ_t z + √(1-ᾱ_t) ε, t, T(prompt(*; v))) - ε ||²,   z = VAE(x)

``T`` is the text encoder with the placeholder's input embedding replaced by ``v``; ``prompt`` is a
template such as ``"a photo of *"``. Then the erased model is sampled with ``*`` in prompts: if the
concept comes back, the erasure only cut the words, not the ability to draw it.

The replacement is a forward hook on the text encoder's token-embedding table, held only inside
``placeholder_embedding`` (no weight is ever written; the hook is removed on exit, also on error).
It needs a host that exposes its transformers text encoder (``DiffusersHost``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MaceError

#: a rare word that is one token in CLIP's BPE ("sks", as DreamBooth uses); it stands for ``v``
PLACEHOLDER = "sks"


def _embedding_table(host: Any) -> nn.Embedding:
    encoder = getattr(host, "text_encoder", None)
    if encoder is None or not hasattr(encoder, "get_input_embeddings"):
        raise MaceError("concept inversion needs a host with a transformers text encoder (the diffusers host: "
                        "mace-erase probe, or the world model); this host has none")
    return encoder.get_input_embeddings()


def placeholder_id(host: Any, word: str = PLACEHOLDER) -> int:
    """The single token id of ``word`` (refused when it is several tokens)."""
    eos = host.token_ids([""])[0][1]  # [bos, eos, pad...]
    ids = host.token_ids([word])[0]  # [bos, tok..., eos, pad...]
    body = ids[1:ids.index(eos, 1)]
    if len(body) != 1:
        raise MaceError(f"placeholder word {word!r} is {len(body)} tokens for this tokenizer; give a one-token word")
    return int(body[0])


@contextmanager
def placeholder_embedding(host: Any, vector: Tensor, word: str = PLACEHOLDER) -> Iterator[int]:
    """While open, the text encoder reads ``vector`` (d_emb,) wherever the token of ``word`` appears.

    Yields the placeholder's token id. Gradients flow into ``vector`` when it requires them."""
    table = _embedding_table(host)
    token = placeholder_id(host, word)
    if vector.shape != table.weight.shape[1:]:
        raise MaceError(f"inverted embedding has shape {tuple(vector.shape)}, the text encoder's token width is "
                        f"{table.weight.shape[1]}: it was learnt on another model")

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        hit = (inputs[0] == token).unsqueeze(-1)  # (B, L, 1)
        return torch.where(hit, vector.to(output.device, output.dtype), output)  # (B, L, d_emb)

    handle = table.register_forward_hook(hook)
    try:
        yield token
    finally:
        handle.remove()


def invert_concept(
    host: Any,
    images: Tensor,
    templates: Sequence[str],
    *,
    steps: int = 200,
    lr: float = 5e-3,
    batch: int = 4,
    init_word: str = "shape",
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[Tensor, list[float]]:
    """Learn ``v`` (d_emb,) on ``images`` (N, 3, H, W) in [-1, 1] with ``host`` frozen; returns ``(v, losses)``.

    ``templates`` contain ``{}`` (filled with the placeholder word); ``v`` starts at ``init_word``'s
    embedding (one token); AdamW (no weight decay), ``batch`` images per step, seeded (images,
    templates, timesteps uniform in [0, T), noise)."""
    if not templates or any("{}" not in t for t in templates):
        raise MaceError("inversion templates: give at least one, each with '{}' for the learnt token")
    if steps < 1 or batch < 1 or len(images) == 0:
        raise MaceError("concept inversion needs steps >= 1, batch >= 1 and at least one image of the concept")
    table = _embedding_table(host)
    init = table.weight[placeholder_id(host, init_word)].detach().float().clone()
    vector = init.requires_grad_(True)  # (d_emb,)
    latents = host.vae_encode(images)  # (N, 4, h, w)
    ids = torch.tensor(host.token_ids([t.format(PLACEHOLDER) for t in templates]), device=latents.device)
    alphas = host.alphas_cumprod().to(torch.float32)  # (T,)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([vector], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    with placeholder_embedding(host, vector), host.instrument() as unet, torch.enable_grad():
        for step in range(steps):
            pick = torch.randint(len(latents), (batch,), generator=gen)
            z = latents[pick]  # (b, 4, h, w)
            context = host.text_encoder(input_ids=ids[torch.randint(len(ids), (batch,), generator=gen)])
            t = torch.randint(len(alphas), (batch,), generator=gen)
            noise = torch.randn(z.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * z + (1 - a).sqrt() * noise
            loss = F.mse_loss(unet(x_t, t, context.last_hidden_state.float()).float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
    return vector.detach(), losses


__all__ = ["PLACEHOLDER", "invert_concept", "placeholder_embedding", "placeholder_id"]
