"""Closed-form weighted least squares on d×d embedding statistics: CFR (DESIGN 2.2) and fusion (2.4).

Both stages edit every named matrix ``W`` of shape (d_out, d) (SD1.x: the 32 ``attn2.to_k`` /
``attn2.to_v`` weights, d = 768) by a ridge-regularised least-squares problem whose data enter only
through d×d second moments of text-encoder token embeddings, so the solves never see a token.

Scale-free preservation. A preservation group ``k`` (e.g. generic captions, or retained celebrities)
enters as ``w_k · mean_{e∈k} ||W e − W0 e||²``, i.e. through its *mean* second moment
``P_k = S_k / n_k`` (``SecondMoment.mean()``). Its weight ``w_k`` therefore does not depend on how many
prompts the group has: duplicating every preservation prompt leaves the result unchanged. A weight of
the reference code (which multiplies a raw sum over ``N`` tokens by ``λ_ref``) is ``w = λ_ref · N``.
The concept terms and the ridge ``λ`` stay raw sums, as in the reference.

Solves are done in float64 with a Cholesky factorisation of the shared d×d system (Jacobi-scaled), never
an explicit inverse; a singular or not positive definite system raises ``MaceError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import MaceError
from .statistics import SecondMoment

__all__ = [
    "Preservation",
    "add_recovered_pairs",
    "cfr_right_factor",
    "refine_cross_attention",
    "FusionProblem",
    "fuse_loras",
]

#: A concept's Gram matrix ``G_i = Σ_{e∈E_i} e eᵀ``: a SecondMoment (its ``.sum``) or a (d, d) tensor.
Gram = SecondMoment | Tensor
#: LoRA factors of one concept: ``{matrix name: (up (d_out, r), down (r, d))}``, ``ΔW = up @ down``.
Factors = Mapping[str, tuple[Tensor, Tensor]]

_F64 = torch.float64
# A Cholesky pivot of the Jacobi-scaled system (unit diagonal) below this many rounding errors
# means the system is numerically singular (its rank is less than d).
_PIVOT_ULPS = 10.0
# Right-hand-side rows solved per cholesky_solve call (bounds its scratch memory).
_SOLVE_ROWS = 2048


@dataclass(frozen=True)
class Preservation:
    """One preservation group: it adds ``weight · mean_{e} ||W e − W0 e||²`` to the objective.

    ``moments`` holds ``S = Σ e eᵀ`` over the group's tokens (all 77 positions of each prompt) and the
    token count ``n``; the group's Gram matrix is the mean ``P = S / n``, so ``weight`` is scale-free.
    """

    moments: SecondMoment
    weight: float


# --------------------------------------------------------------------------------------------------
# validation and shared pieces


def _check_ridge(ridge: float) -> float:
    ridge = float(ridge)
    if not math.isfinite(ridge) or ridge < 0:
        raise MaceError(f"ridge must be a finite number >= 0, got {ridge}; use 0 for none")
    return ridge


def effective_ridge(system: Tensor, ridge: float, relative_ridge: float) -> float:
    """``λ + ε · tr(K) / d`` for the data part ``K`` (d, d) of a system: a ridge relative to the mean
    eigenvalue of ``K``. A tiny ε (1e-6) selects, among the equally good solutions of a rank-deficient
    system, the one that changes the weights least, instead of one driven by rounding noise in the
    directions no token reaches; it is what ``λ → 0⁺`` means."""
    eps = _check_ridge(relative_ridge)
    return _check_ridge(ridge) + eps * float(system.diagonal().sum()) / system.shape[0]


def _check_preserve(preserve: Sequence[Preservation], dim: int) -> list[Preservation]:
    """Validate the groups; return those with a positive weight."""
    active = []
    for k, group in enumerate(preserve):
        if not isinstance(group, Preservation):
            raise MaceError(f"preservation group {k}: expected a Preservation, got {type(group).__name__}")
        w = float(group.weight)
        if not math.isfinite(w) or w < 0:
            raise MaceError(f"preservation group {k}: weight must be a finite number >= 0, got {w}")
        if group.moments.dim != dim:
            raise MaceError(
                f"preservation group {k}: statistics are {group.moments.dim}-d but the embeddings are "
                f"{dim}-d; compute them with the same text encoder"
            )
        if w > 0:
            if group.moments.count <= 0:
                raise MaceError(
                    f"preservation group {k} has weight {w} but no tokens; give it prompts or weight 0"
                )
            active.append(group)
    return active


def _preservation_gram(preserve: Sequence[Preservation], dim: int, device: torch.device) -> Tensor:
    """``Σ_k w_k P_k`` with ``P_k = S_k / n_k`` (mean second moment): (d, d) float64."""
    out = torch.zeros(dim, dim, dtype=_F64, device=device)
    for group in preserve:
        out.add_(group.moments.mean().to(device=device, dtype=_F64), alpha=float(group.weight))
    return out


def _factor_system(system: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Jacobi-scaled Cholesky of a symmetric positive definite ``K`` (d, d) float64.

    ``K = D Ks D`` with ``D = diag(K)^½`` and ``Ks = L Lᵀ``; returns ``(L (d, d), diag(D)⁻¹ (d,))``.
    ``what`` describes the system in the error message (singular, not positive definite, not finite).
    """
    d = system.shape[0]
    system = 0.5 * (system + system.T)  # (d, d)
    diag = system.diagonal()
    if not bool(torch.isfinite(system).all()):
        raise MaceError(f"{what} contains NaN or infinite values; check the statistics and weights")
    if bool((diag <= 0).any()):
        raise MaceError(f"{what} is singular: some embedding directions have no data at all")
    scale = diag.rsqrt()  # (d,)
    scaled = system * scale[:, None] * scale[None, :]  # (d, d), unit diagonal
    factor, info = torch.linalg.cholesky_ex(scaled)
    pivots = factor.diagonal()
    tol = _PIVOT_ULPS * d * torch.finfo(_F64).eps
    if int(info) > 0 or float(pivots.min()) ** 2 < tol:
        raise MaceError(f"{what} is singular or not positive definite")
    return factor, scale


def _apply_inverse(rhs: Tensor, chol: tuple[Tensor, Tensor]) -> Tensor:
    """``rhs · K⁻¹`` in place for ``chol = _factor_system(K)``; ``rhs`` (m, d) float64, returned.

    ``rhs K⁻¹ = rhs D⁻¹ Ks⁻¹ D⁻¹``; ``cholesky_solve`` of the right-hand sides in blocks of rows (the
    row-major rows are the column-major ``rhsᵀ`` LAPACK wants; blocks bound the scratch memory).
    """
    factor, scale = chol
    rhs.mul_(scale)  # (m, d): rhs D⁻¹
    for start in range(0, rhs.shape[0], _SOLVE_ROWS):
        block = rhs[start : start + _SOLVE_ROWS]  # (b, d)
        block.copy_(torch.cholesky_solve(block.T, factor).T)  # (b, d) = block Ks⁻¹
    return rhs.mul_(scale)  # (m, d) = rhs K⁻¹


def _solve_right(rhs: Tensor, system: Tensor, what: str) -> Tensor:
    """``X = rhs · K⁻¹`` for a symmetric positive definite ``K`` (d, d); ``rhs`` (m, d) float64,
    overwritten with the result. One Jacobi-scaled Cholesky (``_factor_system``), never an inverse."""
    return _apply_inverse(rhs, _factor_system(system, what))


def _gram_tensor(gram: Gram, dim: int | None, where: str) -> tuple[Tensor, int | None]:
    """The (d, d) float64 Gram matrix of a SecondMoment or tensor, and its token count if known."""
    if isinstance(gram, SecondMoment):
        g, count = gram.sum, gram.count
    elif isinstance(gram, Tensor):
        g, count = gram, None
    else:
        raise MaceError(
            f"{where}: the Gram matrix must be a SecondMoment or a tensor, got {type(gram).__name__}"
        )
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise MaceError(f"{where}: the Gram matrix must be square (d, d), got shape {tuple(g.shape)}")
    if dim is not None and g.shape[0] != dim:
        raise MaceError(
            f"{where}: the Gram matrix is {g.shape[0]}×{g.shape[0]} but the weights have d = {dim}"
        )
    return g, count


def _check_weights(weights: Mapping[str, Tensor], dim: int | None, what: str) -> int | None:
    """Every weight is a 2-d (d_out, d) tensor with the same d; return d (None if no weights)."""
    for name, w in weights.items():
        if not isinstance(w, Tensor) or w.ndim != 2:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise MaceError(f"{what} '{name}' must be a 2-d (d_out, d) tensor, got {shape}")
        if dim is None:
            dim = w.shape[1]
        elif w.shape[1] != dim:
            raise MaceError(f"{what} '{name}' has {w.shape[1]} input features but the embeddings are {dim}-d")
    return dim


# --------------------------------------------------------------------------------------------------
# Stage 1: closed-form cross-attention refinement


def cfr_right_factor(
    cross: SecondMoment,
    gram: SecondMoment,
    preserve: Sequence[Preservation] = (),
    ridge: float = 0.0,
    relative_ridge: float = 0.0,
) -> Tensor:
    """The shared right factor ``M`` (d, d) float64 of CFR: every matrix becomes ``W = W0 · M``.

    Objective for each ``W0`` (d_out, d), over aligned token pairs ``(e_f, e_g)``::

        min_W Σ_pairs ||W e_f − W0 e_g||² + Σ_k w_k mean_{e∈k} ||W e − W0 e||² + λ ||W − W0||²_F
        M = (C + A)(G + A)⁻¹ = I + (C − G)(G + A)⁻¹,   A = Σ_k w_k P_k + λ I

    with ``cross.sum = C = Σ e_g e_fᵀ`` (``cross.add(e_g, e_f)``), ``gram.sum = G = Σ e_f e_fᵀ`` and
    ``P_k`` the mean second moment of preservation group ``k``. ``relative_ridge`` ε adds
    ``ε · tr(G + Σ w_k P_k) / d`` to ``λ`` (see ``effective_ridge``).
    """
    if not isinstance(cross, SecondMoment) or not isinstance(gram, SecondMoment):
        raise MaceError("CFR: cross and gram must be SecondMoment statistics")
    dim = gram.dim
    if cross.dim != dim:
        raise MaceError(f"CFR: cross statistics are {cross.dim}-d but gram statistics are {dim}-d")
    if cross.count != gram.count:
        raise MaceError(
            f"CFR: cross statistics count {cross.count} pairs but gram statistics {gram.count} tokens; "
            "accumulate both from the same aligned pairs (cross.add(e_g, e_f), gram.add(e_f))"
        )
    ridge = _check_ridge(ridge)
    active = _check_preserve(preserve, dim)
    device = gram.sum.device
    g = gram.sum.to(_F64)  # (d, d)
    c = cross.sum.to(device=device, dtype=_F64)  # (d, d)
    system = g + _preservation_gram(active, dim, device)  # (d, d): G + Σ w_k P_k
    ridge = effective_ridge(system, ridge, relative_ridge)
    system.diagonal().add_(ridge)  # + λ I
    what = (
        f"the CFR system G + Σ w·P + λI ({dim}×{dim}; {gram.count} aligned token pairs, "
        f"{len(active)} weighted preservation group(s), ridge {ridge:g})"
    )
    if gram.count < dim and not active and ridge == 0:
        what += f" has fewer data vectors than its {dim} dimensions, so it"
    try:
        correction = _solve_right(c - g, system, what)  # (d, d) = (C − G) K⁻¹
    except MaceError as err:
        raise MaceError(
            f"{err}: add preservation prompts with a weight > 0, or a ridge > 0, or more concept prompts"
        ) from None
    correction.diagonal().add_(1.0)
    return correction


def add_recovered_pairs(
    cross: SecondMoment,
    gram: SecondMoment,
    recovered: Sequence[tuple[SecondMoment, SecondMoment]],
    weight: float = 1.0,
) -> tuple[SecondMoment, SecondMoment]:
    """CFR statistics with extra weighted pairs (hardening against concept inversion, RECE-style).

    Each ``(cross_r, gram_r)`` holds aligned pairs ``(e_r, e_g)`` of a recovered token's prompts and
    their anchor twins (``cross_r.sum = Σ e_g e_rᵀ``, ``gram_r.sum = Σ e_r e_rᵀ``). With them CFR solves::

        min_W Σ_pairs ||W e_f − W0 e_g||² + w Σ_r Σ_pairs ||W e_r − W0 e_g||² + (preservation, ridge)
        C' = C + w Σ_r C_r,   G' = G + w Σ_r G_r      (then ``cfr_right_factor(C', G', ...)``)

    Returns new statistics (the inputs are not changed); counts add up unweighted."""
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise MaceError(f"hardening weight must be a finite number >= 0, got {weight}")
    c, g = SecondMoment(cross.dim, cross.sum.clone(), cross.count), SecondMoment(gram.dim, gram.sum.clone(), gram.count)
    for k, (cross_r, gram_r) in enumerate(recovered):
        if cross_r.dim != c.dim or gram_r.dim != g.dim or cross_r.count != gram_r.count:
            raise MaceError(f"recovered pairs {k}: statistics of {cross_r.dim}/{gram_r.dim}-d with {cross_r.count}/"
                            f"{gram_r.count} pairs; accumulate both from the same pairs of the same text encoder")
        c.sum.add_(cross_r.sum.to(c.sum), alpha=weight)
        g.sum.add_(gram_r.sum.to(g.sum), alpha=weight)
        c.count += cross_r.count
        g.count += gram_r.count
    return c, g


def refine_cross_attention(
    weights: Mapping[str, Tensor],
    cross: SecondMoment,
    gram: SecondMoment,
    preserve: Sequence[Preservation] = (),
    ridge: float = 0.0,
    relative_ridge: float = 0.0,
) -> dict[str, Tensor]:
    """CFR of every named matrix: ``{name: W0 @ M}`` with ``M = cfr_right_factor(...)`` (d, d).

    ``weights``: ``{name: W0 (d_out, d)}``, any dtype/device; each result has its input's dtype and
    device (the product is formed in float64). The inputs are never modified.
    """
    _check_weights(weights, gram.dim if isinstance(gram, SecondMoment) else None, "CFR: weight")
    factor = cfr_right_factor(cross, gram, preserve, ridge, relative_ridge)  # (d, d) float64
    out = {}
    for name, w0 in weights.items():
        w = w0.detach().to(device=factor.device, dtype=_F64)  # (d_out, d)
        out[name] = (w @ factor).to(device=w0.device, dtype=w0.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Stage 3: closed-form fusion of per-concept LoRAs


class FusionProblem:
    """Streaming closed-form fusion of per-concept LoRAs into every named matrix (DESIGN 2.4).

    For each matrix, with ``W1`` the refined weights, ``W0`` the originals, ``ΔW_i = up_i down_i``::

        min_W Σ_i Σ_{e∈E_i} ||W e − (W1 + ΔW_i) e||² + Σ_k w_k mean_k ||W e − W0 e||² + λ ||W − W1||²
        W* = (W1 (ΣG_i + λI) + Σ_i up_i (down_i G_i) + W0 Σ_k w_k P_k)(ΣG_i + Σ_k w_k P_k + λI)⁻¹
           = W1 + (Σ_i up_i (down_i G_i) + (W0 − W1) Σ_k w_k P_k) K⁻¹,   K = ΣG_i + Σ_k w_k P_k + λI

    ``K`` does not depend on the matrix, so ``solve`` factors it once and, with ``Q = (Σ_k w_k P_k) K⁻¹``
    (d, d) formed once, streams the matrices one at a time::

        W* = W1 + (W0 − W1) Q + [up_1 | up_2 | ...] ([down_1 G_1; down_2 G_2; ...] K⁻¹)

    The concept terms stay low rank: per matrix, ``add_concept`` keeps ``up_i`` (d_out, r) and
    ``down_i G_i`` (r, d) in float64, and the solve applies ``K⁻¹`` to those Σr rows only. Once a
    matrix's factors would take more memory than a dense (d_out, d) ``U = Σ_i up_i down_i G_i``, they
    are folded into that ``U`` (then solved densely), so memory does not grow with the number of
    concepts (at most about twice a dense ``U`` per matrix). The only dense (d_out, d)·(d, d) product per matrix is ``(W0 − W1) Q`` (none without
    preservation); peak memory is the weights, the factors and one matrix's float64 buffers.

    The LoRA scale must be folded into ``up`` (``ΔW = up @ down`` exactly). All work is done on
    ``device`` (default CPU) in float64; results come back in each ``W1``'s dtype and device.
    """

    def __init__(
        self,
        W1: Mapping[str, Tensor],
        W0: Mapping[str, Tensor],
        preserve: Sequence[Preservation] = (),
        ridge: float = 0.0,
        *,
        relative_ridge: float = 0.0,
        device: torch.device | str = "cpu",
        buffer_concepts: int = 64,
    ) -> None:
        if set(W1) != set(W0):
            only1, only0 = sorted(set(W1) - set(W0)), sorted(set(W0) - set(W1))
            raise MaceError(
                f"fusion: refined weights W1 and original weights W0 name different matrices "
                f"(only in W1: {only1}; only in W0: {only0}); give both for the same matrices"
            )
        if not W1:
            raise MaceError("fusion: no weight matrices given")
        dim = _check_weights(W1, None, "fusion: refined weight")
        _check_weights(W0, dim, "fusion: original weight")
        for name in W1:
            if W1[name].shape != W0[name].shape:
                raise MaceError(
                    f"fusion: matrix '{name}' has shape {tuple(W1[name].shape)} in W1 but "
                    f"{tuple(W0[name].shape)} in W0"
                )
        if buffer_concepts < 1:
            raise MaceError(f"fusion: buffer_concepts must be >= 1, got {buffer_concepts}")
        self._W1, self._W0 = W1, W0
        self._names = list(W1)
        self._dim = dim
        self._ridge = _check_ridge(ridge)
        self._relative_ridge = _check_ridge(relative_ridge)
        self._preserve = _check_preserve(preserve, dim)
        self._device = torch.device(device)
        # per matrix: low-rank concept terms [up_i] (d_out, R) and [down_i G_i] (R, d), and the dense
        # U (d_out, d) they are folded into once R is large (None until then)
        self._low: list[tuple[Tensor, Tensor]] = [
            (torch.zeros(W1[n].shape[0], 0, dtype=_F64, device=self._device),
             torch.zeros(0, dim, dtype=_F64, device=self._device)) for n in self._names
        ]
        self._dense: list[Tensor | None] = [None] * len(self._names)
        self._gram_sum = torch.zeros(dim, dim, dtype=_F64, device=self._device)  # ΣG_i
        self._buffer_concepts = buffer_concepts
        # pending concepts: (ups per matrix [(d_out, r_j)], down_i G_i (Σ_j r_j, d), row offsets)
        self._pending: list[tuple[list[Tensor], Tensor, list[int]]] = []
        self._concepts = 0
        self._tokens: int | None = 0

    @property
    def num_concepts(self) -> int:
        return self._concepts

    def add_concept(self, gram: Gram, factors: Factors) -> FusionProblem:
        """Add concept ``i``: its Gram ``G_i = Σ_{e∈E_i} e eᵀ`` (d, d) and LoRA ``{name: (up, down)}``.

        ``up`` (d_out, r), ``down`` (r, d); the rank may differ between matrices. Every matrix needs
        factors (give zeros for a matrix the LoRA does not touch).
        """
        where = f"fusion concept {self._concepts}"
        g, count = _gram_tensor(gram, self._dim, where)
        g = g.to(device=self._device, dtype=_F64)  # (d, d)
        if not isinstance(factors, Mapping):
            raise MaceError(f"{where}: LoRA factors must be a mapping {{matrix name: (up, down)}}")
        missing = [n for n in self._names if n not in factors]
        if missing:
            raise MaceError(f"{where}: no LoRA factors for matrix '{missing[0]}' ({len(missing)} missing)")
        unknown = sorted(set(factors) - set(self._names))
        if unknown:
            raise MaceError(
                f"{where}: LoRA factors for unknown matrix '{unknown[0]}' (not among the weights)"
            )
        ups, downs, offsets = [], [], [0]
        for name in self._names:
            pair = factors[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise MaceError(f"{where}: factors for '{name}' must be a pair (up, down)")
            up, down = pair
            d_out = self._W1[name].shape[0]
            if not isinstance(up, Tensor) or not isinstance(down, Tensor):
                raise MaceError(f"{where}: factors for '{name}' must be tensors (up, down)")
            if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
                raise MaceError(
                    f"{where}: factors for '{name}' must be up (d_out, r) and down (r, d); got "
                    f"{tuple(up.shape)} and {tuple(down.shape)}"
                )
            if up.shape[0] != d_out:
                raise MaceError(
                    f"{where}: factor for '{name}' has d_out {up.shape[0]} but the weight has {d_out}"
                )
            if down.shape[1] != self._dim:
                raise MaceError(
                    f"{where}: factor for '{name}' has {down.shape[1]} input features but the weight has {self._dim}"
                )
            ups.append(up.detach().to(device=self._device, dtype=_F64))  # (d_out, r)
            downs.append(down.detach().to(device=self._device, dtype=_F64))  # (r, d)
            offsets.append(offsets[-1] + down.shape[0])
        down_gram = torch.cat(downs) @ g  # (Σ r, d): every matrix's down_i G_i in one product
        self._gram_sum += g
        self._pending.append((ups, down_gram, offsets))
        self._concepts += 1
        self._tokens = None if (count is None or self._tokens is None) else self._tokens + count
        if len(self._pending) >= self._buffer_concepts:
            self._flush()
        return self

    def _flush(self) -> None:
        """Append the buffered concepts' factors to each matrix's low-rank terms; fold a matrix's terms
        into its dense ``U += [up_a | ...] @ [down_a G_a; ...]`` once they outgrow a dense (d_out, d)."""
        if not self._pending:
            return
        for j in range(len(self._names)):
            ups = torch.cat([self._low[j][0]] + [p[0][j] for p in self._pending], dim=1)  # (d_out, R)
            rows = torch.cat([self._low[j][1]] + [p[1][p[2][j] : p[2][j + 1]] for p in self._pending])  # (R, d)
            d_out, rank = ups.shape
            if rank * (d_out + self._dim) > d_out * self._dim:
                dense = self._dense[j]
                self._dense[j] = ups @ rows if dense is None else dense.addmm_(ups, rows)  # (d_out, d)
                ups, rows = ups[:, :0].contiguous(), rows[:0].contiguous()
            self._low[j] = (ups, rows)
        self._pending.clear()

    def solve(self) -> dict[str, Tensor]:
        """The fused weights ``{name: W*}``; each in its ``W1``'s dtype and device. Can be called again."""
        self._flush()
        dim = self._dim
        pres = _preservation_gram(self._preserve, dim, self._device)  # (d, d): Σ w_k P_k
        system = self._gram_sum + pres  # (d, d)
        ridge = effective_ridge(system, self._ridge, self._relative_ridge)
        system.diagonal().add_(ridge)
        tokens = "unknown number of" if self._tokens is None else str(self._tokens)
        what = (
            f"the fusion system ΣG + Σ w·P + λI ({dim}×{dim}; {self._concepts} concept(s) with {tokens} "
            f"token(s), {len(self._preserve)} weighted preservation group(s), ridge {ridge:g})"
        )
        try:
            chol = _factor_system(system, what)
        except MaceError as err:
            raise MaceError(f"{err}: add preservation prompts with a weight > 0, or a ridge > 0") from None
        q = _apply_inverse(pres, chol) if self._preserve else None  # (d, d) = Σ w_k P_k K⁻¹
        return {name: self._solve_matrix(j, chol, q) for j, name in enumerate(self._names)}

    def _solve_matrix(self, j: int, chol: tuple[Tensor, Tensor], q: Tensor | None) -> Tensor:
        """``W* = W1 + (W0 − W1) Q + ups (rows K⁻¹) + U K⁻¹`` for matrix ``j``, in float64, returned in
        ``W1``'s dtype and device."""
        name = self._names[j]
        ref = self._W1[name]
        out = ref.detach().to(device=self._device, dtype=_F64, copy=True)  # (d_out, d): W1
        if q is not None:
            w0 = self._W0[name].detach().to(device=self._device, dtype=_F64)  # (d_out, d)
            out.addmm_(w0 - out, q)  # + (W0 − W1) Q  (the product reads W0 − W1 before the update)
        ups, rows = self._low[j]  # (d_out, R), (R, d)
        if rows.shape[0]:
            out.addmm_(ups, _apply_inverse(rows.clone(), chol))  # + ups (rows K⁻¹)
        if self._dense[j] is not None:
            out += _apply_inverse(self._dense[j].clone(), chol)  # + U K⁻¹
        return out.to(device=ref.device, dtype=ref.dtype)


def fuse_loras(
    W1: Mapping[str, Tensor],
    W0: Mapping[str, Tensor],
    concepts: Iterable[tuple[Gram, Factors]],
    preserve: Sequence[Preservation] = (),
    ridge: float = 0.0,
    relative_ridge: float = 0.0,
) -> dict[str, Tensor]:
    """Fuse all concepts' LoRAs in closed form: ``FusionProblem(W1, W0, preserve, ridge, ...)``, one
    ``add_concept(gram, factors)`` per item of ``concepts`` (consumed lazily), then ``solve()``."""
    problem = FusionProblem(W1, W0, preserve, ridge, relative_ridge=relative_ridge)
    for gram, factors in concepts:
        problem.add_concept(gram, factors)
    return problem.solve()
