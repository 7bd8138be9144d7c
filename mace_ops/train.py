"""Stage 2 of MACE (DESIGN 2.3): one rank-r LoRA per concept, trained to empty the concept's attention.

For concept ``c`` with training latents ``x0``, mask ``m`` and token positions ``S``:

    t ~ CFIS,  ε ~ N(0, I),  x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε
    loss_c = Σ_l ||A_l[:, m_l, S]||_F          (squared option: Σ_l ||·||²_F)

where ``A_l`` (heads, N_l, 77) are the softmax cross-attention probabilities of layer ``l`` computed
with the LoRA-adapted ``to_k``; ``m_l`` is the mask resized to the layer (nearest, > 0.5). The UNet's
noise prediction is not used. Several concepts share one forward: each sample uses its own
concept's LoRA (``LoRABank.banked_linears``), the per-concept losses are summed, and every
per-concept quantity (sampling RNG, gradient clipping, AdamW moments) is kept separate, so a concept
trains the same whether alone or batched (up to float rounding).

Resume and reproducibility. With ``cache_dir``, each finished concept is written to its own file and
an unfinished group is checkpointed every ``⌈steps / group size⌉`` steps, but at most every
``CHECKPOINT_MIN_SECONDS`` (bank, AdamW moments, each concept's generator state, losses), so a crash
loses at most about one concept's training or 10 s, whichever is more, and the rerun goes on from there. What is promised:
- a finished concept is read back from its file: bit-identical;
- a concept trained again, or a group resumed from its checkpoint, equals the uninterrupted run up
  to float32 rounding: factors within 1e-3 of the factor's largest entry, losses within 1e-5
  (relative). On CPU the results depend on the number of threads: ATen's softmax backward and
  MKL's small matrix products split their sums by thread, so 1, 2 and 3 threads differ in the last
  bits (measured up to 2.7e-4 of the largest entry after 4 steps); on one machine at a fixed thread
  count a rerun has come out bit-identical, but that is not promised.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import explicit_attention, layer_hw, resize_mask
from .concepts import Concept, training_prompt
from .errors import MaceError
from .hosts.base import Host
from .io import atomic_save_safetensors, read_safetensors
from .lora import LoRABank, seed_from
from .tokens import TokenIds, phrase_positions

# --------------------------------------------------------------------------------------------------
# CFIS: concept-focal importance sampling of timesteps


def cfis_probabilities(num_steps: int = 1000, t1: float = 200, t2: float = 400, gamma: float = 0.05) -> Tensor:
    """``p(t) ∝ σ(γ(t - t1)) - σ(γ(t - t2))`` for ``t = 0 .. num_steps-1``; (num_steps,) float64, sums to 1.

    Defaults: mode 300, about 86 % of the mass in [200, 400).
    """
    if not t1 < t2:
        raise MaceError(f"CFIS window t1={t1}, t2={t2}: t1 must be below t2")
    t = torch.arange(num_steps, dtype=torch.float64)
    p = torch.sigmoid(gamma * (t - t1)) - torch.sigmoid(gamma * (t - t2))  # (T,)
    return p / p.sum()


@functools.lru_cache(maxsize=4)
def _cfis_table(num_steps: int) -> Tensor:
    """The default CFIS probabilities, computed once per ``num_steps`` (read-only: never hand it out)."""
    return cfis_probabilities(num_steps)


def sample_timesteps(
    n: int, generator: torch.Generator | None = None, mode: str = "cfis", num_steps: int = 1000
) -> Tensor:
    """``n`` training timesteps, (n,) long: CFIS (default) or ``"uniform"`` over ``0 .. num_steps-1``."""
    if mode == "cfis":
        return torch.multinomial(_cfis_table(num_steps), n, replacement=True, generator=generator)
    if mode == "uniform":
        return torch.randint(0, num_steps, (n,), generator=generator)
    raise MaceError(f"timestep mode {mode!r}: use 'cfis' or 'uniform'")


# --------------------------------------------------------------------------------------------------
# Loss


def attention_map_loss(probs: Tensor, mask: Tensor, token_positions: Tensor, squared: bool = False) -> Tensor:
    """Per sample ``||probs[b][:, mask_b, S_b]||_F`` (Frobenius over heads × pixels × tokens), (B,).

    probs (B, heads, N, L) softmax probabilities; mask (B, N) bool pixels; token_positions (B, L) bool.
    ``squared=True`` gives ``||·||²_F``. The root has a zero (not NaN) gradient where the norm is 0.
    """
    sel = token_positions.to(probs.dtype)[:, None, None, :]  # (B, 1, 1, L)
    # Σ_{s∈S} p² as a product and a sum: half the time (forward + backward) of a (L, 1) matmul on CPU
    per_pixel = (probs.square() * sel).sum(-1)  # (B, heads, N)
    ss = (per_pixel * mask.to(probs.dtype)[:, None, :]).sum(dim=(1, 2))  # (B,)
    if squared:
        return ss
    return torch.where(ss > 0, ss.clamp_min(torch.finfo(ss.dtype).tiny).sqrt(), torch.zeros_like(ss))


def concept_token_positions(
    token_ids: TokenIds, prompt: str, phrase: str, *, include_end_tokens: bool = True
) -> Tensor:
    """Bool (L,) over the prompt's token positions: the phrase's tokens in ``prompt`` and, when
    ``include_end_tokens`` (the reference default), the end token and all padding after it (SD1.x pads
    with the end token). Start/end ids are read from the tokenizer's encoding of the empty prompt."""
    empty, ids, phrase_ids = token_ids(["", prompt, phrase])
    start_id, end_id = int(empty[0]), int(empty[1])
    pos = phrase_positions(ids, phrase_ids, start_id=start_id, end_id=end_id)
    if not pos:
        raise MaceError(f"concept {phrase!r}: its tokens do not occur in the training prompt {prompt!r}")
    sel = torch.zeros(len(ids), dtype=torch.bool)
    sel[pos] = True
    if include_end_tokens:
        ends = [i for i in range(1, len(ids)) if ids[i] == end_id]
        if ends:
            sel[ends[0] :] = True
    return sel


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Hyper-parameters of the LoRA stage (reference defaults for people/art; objects: lr 1e-5).

    batch_size: samples per concept per step. concepts_per_batch: how many concepts share one
    forward (None: all). include_end_tokens: S = phrase tokens + end token + padding (reference).
    squared_loss: paper's squared norm instead of the reference's plain norm.
    """

    steps: int = 50
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0
    rank: int = 1
    batch_size: int = 1
    seed: int = 0
    timesteps: str = "cfis"
    squared_loss: bool = False
    include_end_tokens: bool = True
    concepts_per_batch: int | None = None

    def check(self) -> TrainConfig:
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise MaceError(
                f"training steps={self.steps}, batch_size={self.batch_size}, rank={self.rank}: each must be >= 1"
            )
        if not self.lr > 0:
            raise MaceError(f"learning rate {self.lr}: give a positive learning rate")
        if self.timesteps not in ("cfis", "uniform"):
            raise MaceError(f"timesteps {self.timesteps!r}: use 'cfis' or 'uniform'")
        if self.concepts_per_batch is not None and self.concepts_per_batch < 1:
            raise MaceError(f"concepts_per_batch={self.concepts_per_batch}: give >= 1 or None for all")
        return self

    def result_dict(self) -> dict[str, Any]:
        """The fields that determine a concept's trained LoRA (not how concepts are grouped)."""
        d = dataclasses.asdict(self)
        d.pop("concepts_per_batch")
        d["betas"] = list(self.betas)
        return d


# --------------------------------------------------------------------------------------------------
# Resume cache: one safetensors file per finished concept


def _digest_tensors(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cache_path(cache_dir: str | os.PathLike[str], phrase: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", phrase).strip("_")[:40] or "concept"
    return Path(cache_dir) / f"lora-{slug}-{key[:20]}.safetensors"


def _save_cached(path: Path, factors: Mapping[str, tuple[Tensor, Tensor]], meta: Mapping[str, Any]) -> None:
    tensors: dict[str, Tensor] = {}
    for name, (up, down) in factors.items():
        tensors[f"{name}.up"] = up.detach().cpu().contiguous()
        tensors[f"{name}.down"] = down.detach().cpu().contiguous()
    atomic_save_safetensors(tensors, path, {k: json.dumps(v) for k, v in meta.items()}, overwrite=True)


def _load_cached(path: Path, key: str, names: Sequence[str]) -> tuple[dict[str, tuple[Tensor, Tensor]], list[float]] | None:
    """A finished concept's factors and losses, or None when absent / written for another key."""
    if not path.is_file():
        return None
    try:  # a damaged or foreign file (never unpickled) is a miss: the concept is trained again, file replaced
        tensors, raw = read_safetensors(path, "LoRA cache file")
        meta = {k: json.loads(v) for k, v in raw.items()}
        if meta.get("key") != key:
            return None
        factors = {n: (tensors[f"{n}.up"], tensors[f"{n}.down"]) for n in names}
        return factors, [float(x) for x in meta.get("losses", [])]
    except (MaceError, KeyError, TypeError, ValueError):
        return None


#: A group checkpoint is written at most this often (seconds), so that its cost (~70 ms for 16
#: concepts, ``benchmarks/bench_checkpoint.py``) stays under 1 % of the training time.
CHECKPOINT_MIN_SECONDS = 10.0


@dataclass
class _GroupProgress:
    """Where a group's training stands: the next step, the concepts still training, the failed ones."""

    step: int
    active: list[int]
    failed: dict[str, str]


def _group_checkpoint_path(cache_dir: str | os.PathLike[str], states: Sequence[Any]) -> tuple[Path, str]:
    """``(path, key)`` of the in-flight checkpoint of a group: keyed by its concepts' keys, in order."""
    key = hashlib.sha256(json.dumps([s.key for s in states]).encode()).hexdigest()
    return Path(cache_dir) / f"group-{key[:20]}.safetensors", key


def _save_group_checkpoint(
    path: Path, key: str, bank: LoRABank, opt: torch.optim.Optimizer, states: Sequence[Any],
    losses: Mapping[str, list[float]], at: _GroupProgress,
) -> None:
    """Everything a group needs to go on from step ``at.step`` as if never stopped: the bank's
    parameters, AdamW's moments and step counts, each concept's generator state and its losses."""
    tensors: dict[str, Tensor] = {}
    for i, p in enumerate(bank.parameters()):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous()
        for name, value in opt.state.get(p, {}).items():  # absent: a matrix the loss never reached
            tensors[f"{name}.{i}"] = value.detach().cpu().contiguous()
    for c, s in enumerate(states):
        tensors[f"generator.{c}"] = s.generator.get_state()
    meta = {"key": key, "step": at.step, "active": at.active, "failed": at.failed,
            "losses": [losses[s.phrase] for s in states]}
    atomic_save_safetensors(tensors, path, {k: json.dumps(v) for k, v in meta.items()}, overwrite=True)


def _load_group_checkpoint(
    path: Path, key: str, bank: LoRABank, opt: torch.optim.Optimizer, states: Sequence[Any],
    losses: dict[str, list[float]],
) -> _GroupProgress | None:
    """Restore a group written by ``_save_group_checkpoint``; None (nothing changed) when absent,
    damaged or written for another group, so the group starts from step 0."""
    if not path.is_file():
        return None
    try:
        tensors, raw = read_safetensors(path, "LoRA group checkpoint")
        meta = {k: json.loads(v) for k, v in raw.items()}
        params = list(bank.parameters())
        if meta.get("key") != key or any(tensors[f"param.{i}"].shape != p.shape for i, p in enumerate(params)):
            return None
        at = _GroupProgress(int(meta["step"]), [int(c) for c in meta["active"]], dict(meta["failed"]))
        saved_losses = [[float(x) for x in row] for row in meta["losses"]]
        generators = [tensors[f"generator.{c}"] for c in range(len(states))]
    except (MaceError, KeyError, TypeError, ValueError):
        return None
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
            if f"step.{i}" in tensors:  # AdamW keeps ``step`` on the CPU, the moments beside the parameter
                opt.state[p] = {n: tensors[f"{n}.{i}"].to("cpu" if n == "step" else p.device)
                                for n in ("step", "exp_avg", "exp_avg_sq")}
    for s, g, row in zip(states, generators, saved_losses, strict=True):
        s.generator.set_state(g)
        losses[s.phrase] = row
    return at


# --------------------------------------------------------------------------------------------------
# Training loop


class AttentionLossSink:
    """Computes ``attention_map_loss`` on the fly for every cross-attention layer of one forward.

    masks (B, h, w) bool at latent size, resized per layer (nearest, > 0.5); positions (B, 77) bool.
    Use ``attention`` as the host's ``AttentionFn``; ``total()`` is ``Σ_l loss_l``, (B,).
    """

    def __init__(self, masks: Tensor, positions: Tensor, *, squared: bool = False) -> None:
        self.masks = masks
        self.positions = positions
        self.squared = squared
        self.layer_losses: list[Tensor] = []
        self._resized: dict[int, Tensor] = {}  # pixels -> (B, pixels) bool

    def __call__(self, probs: Tensor) -> None:  # probs (B, heads, N, 77)
        n_pix = probs.shape[2]
        if n_pix not in self._resized:
            lh, lw = layer_hw(n_pix, self.masks.shape[-2], self.masks.shape[-1])
            self._resized[n_pix] = resize_mask(self.masks, (lh, lw)).to(probs.device)
        self.layer_losses.append(attention_map_loss(probs, self._resized[n_pix], self.positions, self.squared))

    def attention(self, block: str, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
        return explicit_attention(q, k, v, heads, sink=self)

    def total(self) -> Tensor:
        if not self.layer_losses:
            raise MaceError("the host ran no cross-attention through the loss: is it an SD1.x-style UNet?")
        return torch.stack(self.layer_losses).sum(0)


@dataclass
class _ConceptState:
    """Everything fixed about one concept during training (all on the training device)."""

    phrase: str
    latents: Tensor  # (n, 4, h, w)
    masks: Tensor  # (n, h, w) bool; all True when the concept has no mask
    context: Tensor  # (1, 77, d_ctx)
    positions: Tensor  # (77,) bool
    generator: torch.Generator  # CPU; sample index, t and ε come from it, in that order
    key: str = ""
    base_kv: dict[str, Tensor] | None = None  # name -> W·context (1, 77, d_out): fixed, computed once
    pooled: Tensor | None = None  # (1, d_pooled): SDXL's pooled text embedding for label_emb


def _base_kv(state: _ConceptState, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``W · context`` of every matrix for the concept's fixed prompt, computed once and kept."""
    if state.base_kv is None:
        with torch.no_grad():
            state.base_kv = {n: F.linear(state.context, w.to(state.context)) for n, w in base.items()}
    return state.base_kv


@dataclass
class _FixedBatch:
    """The per-step inputs that depend only on which concepts are active: built once, reused every step
    until a concept drops out. B = active concepts × batch_size, samples grouped by concept."""

    active: list[int]
    context: Tensor  # (B, 77, d_ctx)
    positions: Tensor  # (B, 77) bool
    base_kv: dict[str, Tensor]  # name -> (B, 77, d_out): the frozen W·context of each sample's prompt
    rows: Tensor  # (B,) long: the bank row of each sample
    pooled: Tensor | None = None  # (B, d_pooled) for families with a pooled channel (SDXL)


def _fixed_batch(
    states: Sequence[_ConceptState], active: list[int], bs: int, base: Mapping[str, Tensor], device: torch.device
) -> _FixedBatch:
    def stack(parts: list[Tensor]) -> Tensor:  # each (1, ...) -> (B, ...)
        return torch.cat([p.expand(bs, *p.shape[1:]) for p in parts])

    return _FixedBatch(
        active=list(active),
        context=stack([states[c].context for c in active]),
        positions=stack([states[c].positions[None] for c in active]),
        base_kv={name: stack([_base_kv(states[c], base)[name] for c in active]) for name in base},
        rows=torch.tensor([c for c in active for _ in range(bs)], dtype=torch.long, device=device),
        pooled=stack([states[c].pooled for c in active]) if states[active[0]].pooled is not None else None,
    )


def _pooled(host: Host, prompt: str) -> Tensor | None:
    """The prompt's pooled text embedding (1, d_pooled) when the host's family has one (SDXL), else None."""
    encode_pooled = getattr(host, "encode_pooled", None)
    pooled = encode_pooled([prompt]) if encode_pooled is not None else None
    return None if pooled is None else pooled.detach().clone().float()


def _concept_of(item: Any) -> Concept:
    c = item.concept
    return c if isinstance(c, Concept) else Concept(str(c), "", "object")


def train_concept_loras(
    host: Host,
    data: Sequence[Any],
    config: TrainConfig | None = None,
    *,
    token_ids: TokenIds | None = None,
    base_weights: Mapping[str, Tensor] | None = None,
    progress: Callable[[int, int, str, float], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[LoRABank, dict[str, list[float]]]:
    """Train one LoRA per concept of ``data`` (``mace_ops.data.ConceptData``) on ``host``.

    Returns the bank (rows in the order of ``data``) and the per-step losses of each concept.
    ``token_ids``: the host's tokenizer as ``prompts -> ids`` (default ``host.token_ids``).
    ``base_weights``: the to_k/to_v the LoRAs sit on (default ``host.cross_attention_weights()``, e.g.
    the CFR weights via ``host.with_weights``). ``progress(step, total, phrase, loss)``: after each
    concept's optimiser step; ``step`` counts concept-steps over the whole run (resumed concepts count
    as done), ``total = steps × number of concepts``. ``check_interrupt()``: called after each
    optimiser step (after a batch's last step only once its concepts are saved); whatever it raises
    propagates (as does KeyboardInterrupt), leaving the finished concepts' files in ``cache_dir``.
    With ``cache_dir``, each finished concept is saved there (keyed by concept, config, base weights,
    model fingerprint and training data) and a rerun trains only the missing ones.
    A concept whose loss or gradient becomes NaN/Inf stops; the others go on, are cached, and at the
    end a ``MaceError`` names the failed concepts (fix: lower ``lr`` or check their data).
    """
    config = (config or TrainConfig()).check()
    if not data:
        raise MaceError("no training data: give at least one concept")
    token_ids = token_ids or host.token_ids
    concepts = [_concept_of(d) for d in data]
    phrases = [c.phrase for c in concepts]
    if len(set(phrases)) != len(phrases):
        raise MaceError(f"concepts {phrases!r}: each concept may appear once in a training run")

    with torch.inference_mode(False), torch.enable_grad():
        base = {k: v.detach().clone() for k, v in (base_weights or host.cross_attention_weights()).items()}
        names = list(base)
        shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in base.items()}
        alphas = host.alphas_cumprod().detach().clone().to(torch.float64)  # (T,)

        states: list[_ConceptState] = []
        for c, item in zip(concepts, data, strict=True):
            prompt = training_prompt(c)
            context = host.encode([prompt]).detach().clone().float()  # (1, 77, d_ctx)
            pooled = _pooled(host, prompt)
            latents = item.latents.detach().clone().float().to(context.device)  # (n, 4, h, w)
            if latents.ndim != 4 or latents.shape[0] < 1:
                raise MaceError(f"concept {c.phrase!r}: latents of shape {tuple(latents.shape)}; need (n, 4, h, w)")
            n, _, h, w = latents.shape
            if item.masks is None:
                masks = torch.ones(n, h, w, dtype=torch.bool, device=context.device)
            else:
                masks = item.masks.detach().clone().to(context.device)
                if tuple(masks.shape) != (n, h, w):
                    raise MaceError(
                        f"concept {c.phrase!r}: masks of shape {tuple(masks.shape)} do not match its latents "
                        f"(need {(n, h, w)}); resize the masks to the latent size"
                    )
                masks = masks.float() > 0.5
            positions = concept_token_positions(
                token_ids, prompt, c.phrase, include_end_tokens=config.include_end_tokens
            ).to(context.device)
            gen = torch.Generator().manual_seed(seed_from(config.seed, c.phrase, "train"))
            states.append(_ConceptState(c.phrase, latents, masks, context, positions, gen, pooled=pooled))

        losses: dict[str, list[float]] = {p: [] for p in phrases}
        bank = LoRABank(shapes, phrases, config.rank, seed=config.seed).to(states[0].context.device)
        todo = list(range(len(states)))
        total = config.steps * len(states)
        done_steps = 0
        if cache_dir is not None:
            common = {
                "config": config.result_dict(),
                "base": _digest_tensors(base),
                "model": host.model_fingerprint(),
                "format": "mace-lora-cache/1",
            }
            for c, s in zip(concepts, states, strict=True):
                s.key = hashlib.sha256(
                    json.dumps(
                        {
                            **common,
                            "concept": [c.phrase, c.anchor, c.kind],
                            "data": _digest_tensors({"latents": s.latents, "masks": s.masks}),
                            "positions": s.positions.nonzero().flatten().tolist(),
                            "context": _digest_tensors({"context": s.context}),
                        },
                        sort_keys=True,
                    ).encode()
                ).hexdigest()
            remaining = []
            for i in todo:
                hit = _load_cached(_cache_path(cache_dir, phrases[i], states[i].key), states[i].key, names)
                if hit is None:
                    remaining.append(i)
                    continue
                factors, cached_losses = hit
                bank.set_factors(i, factors)
                losses[phrases[i]] = cached_losses
                done_steps += config.steps
            todo = remaining

        failed: dict[str, str] = {}
        per_batch = config.concepts_per_batch or max(len(todo), 1)
        for start in range(0, len(todo), per_batch):
            group = todo[start : start + per_batch]
            done_steps = _train_group(
                host, base, [states[i] for i in group], config, alphas, losses, failed,
                progress, check_interrupt, done_steps, total, bank, group, cache_dir,
            )
        if failed:
            detail = "; ".join(f"{p!r}: {why}" for p, why in failed.items())
            raise MaceError(
                f"LoRA training diverged for {len(failed)} concept(s): {detail}. Lower the learning rate "
                "or check these concepts' images and masks"
                + (" (the other concepts are cached in cache_dir; rerun to train only these)" if cache_dir else "")
            )
    return bank, losses


def _train_group(
    host: Host,
    base: Mapping[str, Tensor],
    states: Sequence[_ConceptState],
    config: TrainConfig,
    alphas: Tensor,
    losses: dict[str, list[float]],
    failed: dict[str, str],
    progress: Callable[[int, int, str, float], None] | None,
    check_interrupt: Callable[[], None] | None,
    done_steps: int,
    total: int,
    result: LoRABank,
    rows: Sequence[int],
    cache_dir: str | os.PathLike[str] | None,
) -> int:
    """Train the concepts of ``states`` together in one bank; copy finished ones into ``result``."""
    shapes = result.shapes
    hw = {tuple(s.latents.shape[-2:]) for s in states}
    if len(hw) != 1:
        raise MaceError(
            f"concepts {[s.phrase for s in states]!r} have latents of different sizes {sorted(hw)}: "
            "train them in separate batches (concepts_per_batch=1) or use one image size"
        )
    device = states[0].context.device
    bank = LoRABank(shapes, [s.phrase for s in states], config.rank, seed=config.seed).to(device)
    opt = torch.optim.AdamW(
        bank.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    params = list(bank.parameters())
    at = _GroupProgress(0, list(range(len(states))), {})
    checkpoint = _group_checkpoint_path(cache_dir, states) if cache_dir is not None else None
    if checkpoint is not None:  # a crash costs at most ``every`` group steps: about one concept's training
        at = _load_group_checkpoint(*checkpoint, bank, opt, states, losses) or at
        failed.update(at.failed)
        done_steps += sum(len(losses[s.phrase]) for s in states)
    every = -(-config.steps // len(states))
    last_saved = time.monotonic()
    active = at.active
    bs = config.batch_size
    n_t = alphas.shape[0]
    fixed: _FixedBatch | None = None

    for step in range(at.step, config.steps):
        if not active:
            break
        x0s, ms, ts, eps_s = [], [], [], []
        for c in active:
            s = states[c]
            pick = torch.randint(0, s.latents.shape[0], (bs,), generator=s.generator)  # (bs,)
            t = sample_timesteps(bs, s.generator, config.timesteps, n_t)  # (bs,)
            eps = torch.randn((bs, *s.latents.shape[1:]), generator=s.generator)  # (bs, 4, h, w)
            pick = pick.to(device)
            x0s.append(s.latents[pick])
            ms.append(s.masks[pick])
            ts.append(t)
            eps_s.append(eps)
        x0 = torch.cat(x0s)  # (B, 4, h, w)
        t = torch.cat(ts)  # (B,)
        eps = torch.cat(eps_s).to(device)
        a = alphas[t].to(device=device, dtype=x0.dtype)[:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        masks = torch.cat(ms)  # (B, h, w) bool
        if fixed is None or fixed.active != active:
            fixed = _fixed_batch(states, active, bs, base, device)

        loss_sink = AttentionLossSink(masks, fixed.positions, squared=config.squared_loss)
        linears = bank.banked_linears(base, fixed.rows, fixed.base_kv)  # fresh per step: it caches down·ctx
        with host.instrument(linears=linears, attention=loss_sink.attention) as unet:
            if fixed.pooled is None:
                unet(x_t, t.to(device), fixed.context)
            else:
                unet(x_t, t.to(device), fixed.context, pooled=fixed.pooled)
        per_sample = loss_sink.total()  # (B,)
        per_concept = per_sample.view(len(active), bs).mean(1)  # (A,)
        opt.zero_grad(set_to_none=False)
        per_concept.sum().backward()

        # per-concept finiteness and clipping: concept c's gradient lives only in rows c of each parameter.
        # None: a matrix the loss does not reach (the last block's to_v); AdamW skips it, as in the reference.
        grads = [p.grad for p in params if p.grad is not None]  # each (C, ...)
        norms = torch.stack([g.double().flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()  # (C,)
        coef = (config.grad_clip / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule, per concept
        values = per_concept.detach().cpu().tolist()
        norm_values = norms.cpu().tolist()
        still = []
        for j, c in enumerate(active):
            if not math.isfinite(values[j]):
                failed[states[c].phrase] = f"loss became {values[j]} at step {len(losses[states[c].phrase]) + 1}"
            elif not math.isfinite(norm_values[c]):
                failed[states[c].phrase] = (
                    f"gradient norm became {norm_values[c]} at step {len(losses[states[c].phrase]) + 1}"
                )
            else:
                still.append((j, c))
        kept = [c for _, c in still]
        scale = torch.zeros_like(coef)  # failed (and already finished) concepts: zero gradient
        scale[kept] = coef[kept]
        for g in grads:
            g.mul_(scale.to(g.dtype).view(-1, *([1] * (g.ndim - 1))))
            if len(still) < len(active):
                g.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        for j, c in still:
            losses[states[c].phrase].append(values[j])
            done_steps += 1
            if progress is not None:
                progress(done_steps, total, states[c].phrase, values[j])
        active = [c for _, c in still]
        if (checkpoint is not None and (step + 1) % every == 0 and step < config.steps - 1
                and time.monotonic() - last_saved >= CHECKPOINT_MIN_SECONDS):
            group_failed = {s.phrase: failed[s.phrase] for s in states if s.phrase in failed}
            _save_group_checkpoint(*checkpoint, bank, opt, states, losses, _GroupProgress(step + 1, active, group_failed))
            last_saved = time.monotonic()
        if check_interrupt is not None and step < config.steps - 1:  # after the last step: save first
            check_interrupt()

    for c in active:
        row = rows[c]
        factors = bank.factors(c)
        result.set_factors(row, factors)
        if cache_dir is not None:
            s = states[c]
            _save_cached(
                _cache_path(cache_dir, s.phrase, s.key),
                factors,
                {"key": s.key, "concept": s.phrase, "losses": losses[s.phrase]},
            )
    if checkpoint is not None:
        checkpoint[0].unlink(missing_ok=True)  # every concept of the group is in its own file now
    if check_interrupt is not None:
        check_interrupt()
    return done_steps


__all__ = [
    "AttentionLossSink",
    "TrainConfig",
    "attention_map_loss",
    "cfis_probabilities",
    "concept_token_positions",
    "sample_timesteps",
    "train_concept_loras",
]
