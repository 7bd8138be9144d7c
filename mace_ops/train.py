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
    concepts = [_concept_of(d) for d in data]
    phrases = [c.phrase for c in concepts]
    if len(set(phrases)) != len(phrases):
        raise MaceError(f"concepts {phrases!r}: each concept may appear once in a training run")

    with torch.inference_mode(False), torch.enable_grad():
        trainer = LoRATrainer(host, config, base_weights=base_weights, progress=progress,
                              check_interrupt=check_interrupt, cache_dir=cache_dir)
        trainer.add_concepts(concepts, data, token_ids or host.token_ids)
        todo = trainer.reuse_cached(concepts)
        per_batch = config.concepts_per_batch or max(len(todo), 1)
        for start in range(0, len(todo), per_batch):
            trainer.train_group(todo[start : start + per_batch])
        trainer.raise_failures()
    return trainer.bank, trainer.losses


def _concept_state(host: Host, concept: Concept, item: Any, token_ids: TokenIds, config: TrainConfig) -> _ConceptState:
    """The fixed inputs of one concept: its prompt's context, latents, masks (> 0.5), token positions, RNG."""
    prompt = training_prompt(concept)
    context = host.encode([prompt]).detach().clone().float()  # (1, 77, d_ctx)
    pooled = _pooled(host, prompt)
    latents = item.latents.detach().clone().float().to(context.device)  # (n, 4, h, w)
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise MaceError(f"concept {concept.phrase!r}: latents of shape {tuple(latents.shape)}; need (n, 4, h, w)")
    n, _, h, w = latents.shape
    if item.masks is None:
        masks = torch.ones(n, h, w, dtype=torch.bool, device=context.device)
    else:
        masks = item.masks.detach().clone().to(context.device)
        if tuple(masks.shape) != (n, h, w):
            raise MaceError(
                f"concept {concept.phrase!r}: masks of shape {tuple(masks.shape)} do not match its latents "
                f"(need {(n, h, w)}); resize the masks to the latent size"
            )
        masks = masks.float() > 0.5
    positions = concept_token_positions(
        token_ids, prompt, concept.phrase, include_end_tokens=config.include_end_tokens
    ).to(context.device)
    gen = torch.Generator().manual_seed(seed_from(config.seed, concept.phrase, "train"))
    return _ConceptState(concept.phrase, latents, masks, context, positions, gen, pooled=pooled)


@dataclass
class _Group:
    """The concepts trained together in one bank: rows ``rows`` of the run's bank, its optimiser, where
    it stands (``active`` concepts, indices into ``states``) and its in-flight checkpoint."""

    rows: list[int]
    states: list[_ConceptState]
    bank: LoRABank
    opt: torch.optim.Optimizer
    start: int  # the first step still to run
    active: list[int]
    checkpoint: tuple[Path, str] | None
    every: int  # checkpoint every this many steps (about one concept's training) ...
    last_saved: float  # ... and at most every CHECKPOINT_MIN_SECONDS after this time
    fixed: _FixedBatch | None = None


class LoRATrainer:
    """One run of ``train_concept_loras``: the concepts' fixed inputs, the result bank, the losses,
    the failed concepts and the progress count, trained group by group (``train_group``), each step
    in four parts: noisy batch, attention loss, per-concept finiteness and clipping, bookkeeping."""

    def __init__(self, host: Host, config: TrainConfig, *, base_weights: Mapping[str, Tensor] | None = None,
                 progress: Callable[[int, int, str, float], None] | None = None,
                 check_interrupt: Callable[[], None] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.host, self.config = host, config
        self.progress, self.check_interrupt, self.cache_dir = progress, check_interrupt, cache_dir
        self.base = {k: v.detach().clone() for k, v in (base_weights or host.cross_attention_weights()).items()}
        self.names = list(self.base)
        self.shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in self.base.items()}
        self.alphas = host.alphas_cumprod().detach().clone().to(torch.float64)  # (T,)
        self.states: list[_ConceptState] = []
        self.losses: dict[str, list[float]] = {}
        self.failed: dict[str, str] = {}
        self.done_steps = 0
        self.total = 0
        self.bank: LoRABank | None = None

    def add_concepts(self, concepts: Sequence[Concept], data: Sequence[Any], token_ids: TokenIds) -> None:
        """Fixed inputs of every concept, the empty losses and the result bank (rows in ``concepts`` order)."""
        self.states = [_concept_state(self.host, c, item, token_ids, self.config)
                       for c, item in zip(concepts, data, strict=True)]
        phrases = [c.phrase for c in concepts]
        self.losses = {p: [] for p in phrases}
        self.bank = LoRABank(self.shapes, phrases, self.config.rank, seed=self.config.seed).to(
            self.states[0].context.device)
        self.total = self.config.steps * len(self.states)

    def reuse_cached(self, concepts: Sequence[Concept]) -> list[int]:
        """Key every concept and load the finished ones from ``cache_dir``; the indices still to train."""
        if self.cache_dir is None:
            return list(range(len(self.states)))
        common = {"config": self.config.result_dict(), "base": _digest_tensors(self.base),
                  "model": self.host.model_fingerprint(), "format": "mace-lora-cache/1"}
        todo = []
        for i, (c, s) in enumerate(zip(concepts, self.states, strict=True)):
            s.key = hashlib.sha256(json.dumps({
                **common,
                "concept": [c.phrase, c.anchor, c.kind],
                "data": _digest_tensors({"latents": s.latents, "masks": s.masks}),
                "positions": s.positions.nonzero().flatten().tolist(),
                "context": _digest_tensors({"context": s.context}),
            }, sort_keys=True).encode()).hexdigest()
            hit = _load_cached(_cache_path(self.cache_dir, s.phrase, s.key), s.key, self.names)
            if hit is None:
                todo.append(i)
                continue
            self.bank.set_factors(i, hit[0])
            self.losses[s.phrase] = hit[1]
            self.done_steps += self.config.steps
        return todo

    def raise_failures(self) -> None:
        """``MaceError`` naming every concept whose training diverged (none: nothing)."""
        if not self.failed:
            return
        detail = "; ".join(f"{p!r}: {why}" for p, why in self.failed.items())
        raise MaceError(
            f"LoRA training diverged for {len(self.failed)} concept(s): {detail}. Lower the learning rate "
            "or check these concepts' images and masks"
            + (" (the other concepts are cached in cache_dir; rerun to train only these)" if self.cache_dir else "")
        )

    # ---------------------------------------------------------------- one group

    def train_group(self, rows: Sequence[int]) -> None:
        """Train the concepts ``rows`` together in one bank; copy the finished ones into ``self.bank``."""
        group = self._start_group(list(rows))
        for step in range(group.start, self.config.steps):
            if not group.active:
                break
            self._step(group, step)
        self._finish_group(group)

    def _start_group(self, rows: list[int]) -> _Group:
        """A fresh bank and AdamW for the group, or the state of its checkpoint when one is found."""
        config, states = self.config, [self.states[i] for i in rows]
        hw = {tuple(s.latents.shape[-2:]) for s in states}
        if len(hw) != 1:
            raise MaceError(
                f"concepts {[s.phrase for s in states]!r} have latents of different sizes {sorted(hw)}: "
                "train them in separate batches (concepts_per_batch=1) or use one image size"
            )
        bank = LoRABank(self.shapes, [s.phrase for s in states], config.rank, seed=config.seed).to(
            states[0].context.device)
        opt = torch.optim.AdamW(
            bank.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        at = _GroupProgress(0, list(range(len(states))), {})
        checkpoint = _group_checkpoint_path(self.cache_dir, states) if self.cache_dir is not None else None
        if checkpoint is not None:  # a crash costs at most ``every`` group steps: about one concept's training
            at = _load_group_checkpoint(*checkpoint, bank, opt, states, self.losses) or at
            self.failed.update(at.failed)
            self.done_steps += sum(len(self.losses[s.phrase]) for s in states)
        return _Group(rows, states, bank, opt, at.step, at.active, checkpoint, every=-(-config.steps // len(states)),
                      last_saved=time.monotonic())

    def _step(self, group: _Group, step: int) -> None:
        """One optimiser step of the group's active concepts, then checkpoint and interrupt check."""
        x_t, t, masks = self._noisy_batch(group)
        per_concept = self._attention_loss(group, x_t, t, masks)  # (A,)
        group.opt.zero_grad(set_to_none=False)
        per_concept.sum().backward()
        values = per_concept.detach().cpu().tolist()
        still = self._clip_finite(group, values)
        group.opt.step()
        for j, c in still:
            phrase = group.states[c].phrase
            self.losses[phrase].append(values[j])
            self.done_steps += 1
            if self.progress is not None:
                self.progress(self.done_steps, self.total, phrase, values[j])
        group.active = [c for _, c in still]
        if (group.checkpoint is not None and (step + 1) % group.every == 0 and step < self.config.steps - 1
                and time.monotonic() - group.last_saved >= CHECKPOINT_MIN_SECONDS):
            group_failed = {s.phrase: self.failed[s.phrase] for s in group.states if s.phrase in self.failed}
            _save_group_checkpoint(*group.checkpoint, group.bank, group.opt, group.states, self.losses,
                                   _GroupProgress(step + 1, group.active, group_failed))
            group.last_saved = time.monotonic()
        if self.check_interrupt is not None and step < self.config.steps - 1:  # after the last step: save first
            self.check_interrupt()

    def _noisy_batch(self, group: _Group) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, t, masks)`` for the active concepts, ``batch_size`` samples each, grouped by concept:
        ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` with sample index, t and ε drawn from the concept's RNG."""
        bs, device = self.config.batch_size, group.states[0].context.device
        x0s, ms, ts, eps_s = [], [], [], []
        for c in group.active:
            s = group.states[c]
            pick = torch.randint(0, s.latents.shape[0], (bs,), generator=s.generator)  # (bs,)
            t = sample_timesteps(bs, s.generator, self.config.timesteps, self.alphas.shape[0])  # (bs,)
            eps = torch.randn((bs, *s.latents.shape[1:]), generator=s.generator)  # (bs, 4, h, w)
            pick = pick.to(device)
            x0s.append(s.latents[pick])
            ms.append(s.masks[pick])
            ts.append(t)
            eps_s.append(eps)
        x0 = torch.cat(x0s)  # (B, 4, h, w)
        t = torch.cat(ts)  # (B,)
        eps = torch.cat(eps_s).to(device)
        a = self.alphas[t].to(device=device, dtype=x0.dtype)[:, None, None, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, torch.cat(ms)  # masks (B, h, w) bool

    def _attention_loss(self, group: _Group, x_t: Tensor, t: Tensor, masks: Tensor) -> Tensor:
        """Each active concept's loss, the mean over its samples of ``Σ_l ||A_l[:, m_l, S]||``; (A,)."""
        device = group.states[0].context.device
        if group.fixed is None or group.fixed.active != group.active:
            group.fixed = _fixed_batch(group.states, group.active, self.config.batch_size, self.base, device)
        fixed = group.fixed
        loss_sink = AttentionLossSink(masks, fixed.positions, squared=self.config.squared_loss)
        linears = group.bank.banked_linears(self.base, fixed.rows, fixed.base_kv)  # fresh per step: it caches down·ctx
        with self.host.instrument(linears=linears, attention=loss_sink.attention) as unet:
            if fixed.pooled is None:
                unet(x_t, t.to(device), fixed.context)
            else:
                unet(x_t, t.to(device), fixed.context, pooled=fixed.pooled)
        return loss_sink.total().view(len(group.active), self.config.batch_size).mean(1)

    def _clip_finite(self, group: _Group, values: list[float]) -> list[tuple[int, int]]:
        """Per-concept finiteness check and gradient clipping (torch's clip_grad_norm_ rule, per concept:
        concept c's gradient lives only in rows c of each parameter); a concept with a NaN/Inf loss or
        gradient joins ``failed`` and gets a zero gradient. ``(j, c)`` of the concepts that go on."""
        # None: a matrix the loss does not reach (the last block's to_v); AdamW skips it, as in the reference.
        grads = [p.grad for p in group.bank.parameters() if p.grad is not None]  # each (C, ...)
        norms = torch.stack([g.double().flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()  # (C,)
        coef = (self.config.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        norm_values = norms.cpu().tolist()
        still = []
        for j, c in enumerate(group.active):
            phrase = group.states[c].phrase
            if not math.isfinite(values[j]):
                self.failed[phrase] = f"loss became {values[j]} at step {len(self.losses[phrase]) + 1}"
            elif not math.isfinite(norm_values[c]):
                self.failed[phrase] = f"gradient norm became {norm_values[c]} at step {len(self.losses[phrase]) + 1}"
            else:
                still.append((j, c))
        kept = [c for _, c in still]
        scale = torch.zeros_like(coef)  # failed (and already finished) concepts: zero gradient
        scale[kept] = coef[kept]
        for g in grads:
            g.mul_(scale.to(g.dtype).view(-1, *([1] * (g.ndim - 1))))
            if len(still) < len(group.active):
                g.nan_to_num_(0.0, 0.0, 0.0)
        return still

    def _finish_group(self, group: _Group) -> None:
        """Copy the finished concepts into the result bank and their own cache files; drop the checkpoint."""
        for c in group.active:
            factors = group.bank.factors(c)
            self.bank.set_factors(group.rows[c], factors)
            if self.cache_dir is not None:
                s = group.states[c]
                _save_cached(_cache_path(self.cache_dir, s.phrase, s.key), factors,
                             {"key": s.key, "concept": s.phrase, "losses": self.losses[s.phrase]})
        if group.checkpoint is not None:
            group.checkpoint[0].unlink(missing_ok=True)  # every concept of the group is in its own file now
        if self.check_interrupt is not None:
            self.check_interrupt()


__all__ = [
    "AttentionLossSink",
    "LoRATrainer",
    "TrainConfig",
    "attention_map_loss",
    "cfis_probabilities",
    "concept_token_positions",
    "sample_timesteps",
    "train_concept_loras",
]
