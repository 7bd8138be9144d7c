"""A bank of rank-r LoRAs, one per concept, on the cross-attention ``to_k`` / ``to_v`` matrices.

For a matrix ``W`` (d_out, d_ctx) and concept ``c`` the adapted projection is

    y = W x + up_c (down_c x),     up_c (d_out, r),  down_c (r, d_ctx),  scale 1,

stored batched over concepts: ``down`` (C, r, d_ctx) and ``up`` (C, d_out, r) per matrix, so one
forward can carry many concepts, each sample using its own concept's factors.

Init (DESIGN 2.3): ``down ~ N(0, 1/r²)`` -- variance 1/r², i.e. standard deviation 1/r, which is what
the reference (``std=1/r``) and peft's ``init_lora_weights="gaussian"`` both do -- and ``up = 0``,
so the bank starts as the identity edit. Each concept's init is drawn from its own generator seeded
by ``(seed, phrase, matrix)``, so it does not depend on which other concepts share the bank.

Why not peft: peft's per-sample "mixed adapter batch" (``adapter_names=``) refuses to run in training
mode, loops over adapters (C sub-batches per layer), and works by wrapping the host's ``nn.Linear``
modules in place. We need gradients, one batched matmul for all concepts, and a host model that is
never mutated (the host calls our ``linears`` through ``Host.instrument``), so the bank is its own
small module: two ``bmm`` per matrix, no dense ΔW.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MaceError
from .hosts.base import LinearFn
from .io import atomic_save_safetensors, read_safetensors

BANK_FORMAT = "mace-lora-bank/1"


def seed_from(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (sha256 of their json)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _SharedDown:
    """``down_c · ctx`` of every matrix at once: the host projects the same context through all 32
    to_k/to_v, so one (B, L, d_ctx) × (B, d_ctx, Σr) product replaces 32 rank-r ones (forward and
    backward). Kept for the last context seen; a different context is projected again."""

    def __init__(self, downs: Sequence[Tensor], idx: Tensor) -> None:
        self.downs, self.idx = downs, idx
        self.ranks = [d.shape[1] for d in downs]
        self.starts = [sum(self.ranks[:i]) for i in range(len(downs))]
        self._ctx: Tensor | None = None
        self._low: Tensor | None = None

    def low(self, ctx: Tensor, i: int) -> Tensor:  # -> (B, L, r_i)
        if self._ctx is not ctx:
            idx = self.idx.to(ctx.device)
            d = torch.cat([down.index_select(0, idx) for down in self.downs], dim=1)  # (B, Σr, d_ctx)
            dtype = torch.promote_types(ctx.dtype, d.dtype)  # float32 factors stay float32 on an fp16 host
            self._ctx, self._low = ctx, torch.bmm(ctx.to(dtype), d.to(dtype).transpose(1, 2))  # (B, L, Σr)
        return self._low[..., self.starts[i] : self.starts[i] + self.ranks[i]]


class LoRABank(nn.Module):
    """Rank-r LoRA factors for ``C`` concepts on each named matrix, stored batched."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        concepts: Sequence[str],
        rank: int = 1,
        *,
        seed: int = 0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise MaceError(f"LoRA rank {rank}: give a rank of at least 1")
        if len(set(concepts)) != len(concepts):
            raise MaceError(f"LoRA bank concepts {list(concepts)!r}: each phrase must appear once")
        self.names: list[str] = list(shapes)
        self.shapes: dict[str, tuple[int, int]] = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
        self.concepts: list[str] = list(concepts)
        self.rank = int(rank)
        self.seed = int(seed)
        self.scale = float(scale)
        # ParameterList, not ParameterDict: our names contain dots.
        self.downs = nn.ParameterList()  # per matrix (C, r, d_ctx)
        self.ups = nn.ParameterList()  # per matrix (C, d_out, r)
        for name in self.names:
            d_out, d_ctx = self.shapes[name]
            down = torch.empty(len(self.concepts), self.rank, d_ctx)
            for c, phrase in enumerate(self.concepts):
                g = torch.Generator().manual_seed(seed_from(self.seed, phrase, name))
                down[c] = torch.randn(self.rank, d_ctx, generator=g) / self.rank
            self.downs.append(nn.Parameter(down))
            self.ups.append(nn.Parameter(torch.zeros(len(self.concepts), d_out, self.rank)))

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def index(self, phrase: str) -> int:
        """Row of ``phrase`` in the bank."""
        try:
            return self.concepts.index(phrase)
        except ValueError:
            raise MaceError(f"concept {phrase!r} is not in this LoRA bank ({self.concepts!r})") from None

    def down(self, name: str) -> nn.Parameter:
        return self.downs[self.names.index(name)]

    def up(self, name: str) -> nn.Parameter:
        return self.ups[self.names.index(name)]

    def banked_linears(
        self,
        base_weights: Mapping[str, Tensor],
        sample_concepts: Tensor,
        base_outputs: Mapping[str, Tensor] | None = None,
    ) -> dict[str, LinearFn]:
        """``{name: ctx (B,L,d_ctx) -> W ctx + scale·up_c(down_c ctx)}`` with ``c = sample_concepts[b]``.

        Computed in the factors' dtype (float32) or the context's when wider: on an fp16/bf16 host the
        small LoRA term ``up_c(down_c ctx)`` is not rounded to 8-11 bits against ``W ctx``; the result
        is float32 and the attention that reads it decides its own precision.

        ``sample_concepts`` (B,) long: the bank row used by each sample of the batch.
        ``base_outputs``: ``{name: W ctx}`` (B, L, d_out) already computed for the very contexts the
        host will pass (training reuses each concept's fixed prompt every step); skips that product.
        """
        idx = torch.as_tensor(sample_concepts, dtype=torch.long)
        if idx.ndim != 1:
            raise MaceError(f"sample_concepts of shape {tuple(idx.shape)}: give a 1-d index per sample")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_concepts):
            raise MaceError(
                f"sample_concepts {idx.tolist()}: indices must lie in [0, {self.num_concepts})"
            )
        missing = [n for n in self.names if n not in base_weights]
        if missing:
            raise MaceError(f"base weights lack the matrices {missing[:3]}...: pass all {len(self.names)}")
        shared = _SharedDown(self.downs, idx)  # every matrix's down_c·ctx in one product per context
        fns: dict[str, LinearFn] = {}
        for i, name in enumerate(self.names):
            fixed = None if base_outputs is None else base_outputs[name]
            fns[name] = self._linear(base_weights[name], shared, i, self.ups[i], idx, name, fixed)
        return fns

    def _linear(
        self, weight: Tensor, shared: _SharedDown, i: int, up: Tensor, idx: Tensor, name: str, fixed: Tensor | None
    ) -> LinearFn:
        scale = self.scale

        def linear(ctx: Tensor) -> Tensor:  # ctx (B, L, d_ctx) -> (B, L, d_out)
            if ctx.shape[0] != idx.shape[0]:
                raise MaceError(
                    f"{name}: batch of {ctx.shape[0]} contexts but {idx.shape[0]} sample concepts"
                )
            low = shared.low(ctx, i)  # (B, L, r)
            u = up.index_select(0, idx.to(up.device)).to(low.dtype)  # (B, d_out, r)
            delta = torch.bmm(low, u.transpose(1, 2))  # (B, L, d_out), at least float32
            if fixed is None:
                return F.linear(ctx.to(delta.dtype), weight.to(ctx.device, delta.dtype)) + scale * delta
            if fixed.shape != delta.shape:
                raise MaceError(f"{name}: base outputs of shape {tuple(fixed.shape)} for a batch of {tuple(delta.shape)}")
            return fixed + scale * delta

        return linear

    def factors(self, concept_index: int) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (up (d_out,r), down (r,d_ctx))}`` of one concept, detached copies (scale folded in)."""
        c = int(concept_index)
        if not 0 <= c < self.num_concepts:
            raise MaceError(f"concept index {c}: the bank holds {self.num_concepts} concepts")
        return {
            name: ((self.ups[i][c] * self.scale).detach().clone(), self.downs[i][c].detach().clone())
            for i, name in enumerate(self.names)
        }

    @torch.no_grad()
    def set_factors(self, concept_index: int, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Write one concept's ``(up, down)`` per matrix (inverse of :meth:`factors`)."""
        c = int(concept_index)
        for i, name in enumerate(self.names):
            up, down = factors[name]
            self.ups[i][c].copy_(up / self.scale)
            self.downs[i][c].copy_(down)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def save_bank(
    bank: LoRABank,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``bank`` as safetensors, atomically (temp file + ``os.replace``).

    Tensors: ``<name>.down`` (C,r,d_ctx), ``<name>.up`` (C,d_out,r). Metadata (each value a json
    string): ``format``, ``concepts``, ``rank``, ``scale``, ``seed``, ``shapes``, ``names`` from the
    bank, plus the caller's ``metadata`` (e.g. ``anchors``, ``kinds``, ``hyper_parameters``,
    ``fingerprint``). Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise MaceError(f"LoRA bank file {str(path)!r} exists: choose another name or pass overwrite=True")
    meta: dict[str, str] = {k: _json(v) for k, v in (metadata or {}).items()}
    meta.update(
        format=_json(BANK_FORMAT),
        concepts=_json(bank.concepts),
        rank=_json(bank.rank),
        scale=_json(bank.scale),
        seed=_json(bank.seed),
        names=_json(bank.names),
        shapes=_json({n: list(s) for n, s in bank.shapes.items()}),
    )
    tensors: dict[str, Tensor] = {}
    for i, name in enumerate(bank.names):
        tensors[f"{name}.down"] = bank.downs[i].detach().cpu().contiguous()
        tensors[f"{name}.up"] = bank.ups[i].detach().cpu().contiguous()
    return atomic_save_safetensors(tensors, path, meta, overwrite=overwrite)


def load_bank(
    path: str | os.PathLike[str],
    *,
    expected_fingerprint: str | None = None,
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
    expected_rank: int | None = None,
) -> tuple[LoRABank, dict[str, Any]]:
    """Read a bank written by :func:`save_bank`; returns ``(bank, metadata)`` (json values decoded).

    Refuses (``MaceError`` naming both values) a bank whose ``fingerprint``, matrix shapes or rank
    differ from the expected ones, and any file that is not safetensors.
    """
    tensors, raw = read_safetensors(path, "LoRA bank file")
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise MaceError(f"{str(path)!r}: metadata is not json ({e}); was it written by save_bank?") from e
    if meta.get("format") != BANK_FORMAT:
        raise MaceError(
            f"{str(path)!r}: format {meta.get('format')!r}, expected {BANK_FORMAT!r}: not a MACE LoRA bank"
        )
    try:
        names: list[str] = [str(n) for n in meta["names"]]
        shapes = {n: (int(meta["shapes"][n][0]), int(meta["shapes"][n][1])) for n in names}  # in names order
        rank = int(meta["rank"])
        concepts = [str(c) for c in meta["concepts"]]
        seed, scale = int(meta.get("seed", 0)), float(meta.get("scale", 1.0))
        if rank < 1 or min((min(s) for s in shapes.values()), default=1) < 1:
            raise ValueError(f"rank {rank} or a matrix shape is not positive")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise MaceError(f"LoRA bank {str(path)!r}: its metadata is incomplete or corrupt ({e!r}); re-save it") from e
    absent = [k for n in names for k in (f"{n}.down", f"{n}.up") if k not in tensors]
    if absent:
        raise MaceError(f"LoRA bank {str(path)!r} lacks the tensor {absent[0]!r} its metadata lists: the file is "
                        "corrupt; re-save it")
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise MaceError(
            f"LoRA bank {str(path)!r} was trained on base model {meta.get('fingerprint')!r} but this model is "
            f"{expected_fingerprint!r}: use the bank with the model it was trained on, or retrain"
        )
    if expected_rank is not None and rank != int(expected_rank):
        raise MaceError(f"LoRA bank {str(path)!r} has rank {rank} but rank {expected_rank} is expected")
    if expected_shapes is not None:
        want = {n: (int(s[0]), int(s[1])) for n, s in expected_shapes.items()}
        if want != shapes:
            diff = sorted(set(want) ^ set(shapes)) or [n for n in want if want[n] != shapes[n]]
            n0 = diff[0]
            raise MaceError(
                f"LoRA bank {str(path)!r} does not fit this model: matrix {n0!r} is {shapes.get(n0)} in the "
                f"bank but {want.get(n0)} in the model ({len(diff)} matrices differ); use a bank trained on "
                "this model"
            )
    bank = LoRABank(shapes, concepts, rank, seed=seed, scale=scale)
    with torch.no_grad():
        for i, name in enumerate(names):
            down, up = tensors[f"{name}.down"], tensors[f"{name}.up"]
            if tuple(down.shape) != tuple(bank.downs[i].shape) or tuple(up.shape) != tuple(bank.ups[i].shape):
                raise MaceError(
                    f"LoRA bank {str(path)!r}: {name} factors {tuple(up.shape)}·{tuple(down.shape)} contradict "
                    f"its metadata (rank {rank}, shape {shapes[name]}): the file is corrupt"
                )
            bank.downs[i].copy_(down)
            bank.ups[i].copy_(up)
    return bank, meta


__all__ = ["LoRABank", "load_bank", "save_bank", "seed_from"]
