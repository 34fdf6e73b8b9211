"""Brand's online low-rank eigen-update of an exponentially averaged factor (B-KFAC), and its refreshes.

Pure functions on :class:`~rkfac.lowrank.Eigenpairs`; the preconditioner decides when to call
them. Reference: Puiu, *Brand New K-FACs* (arXiv 2210.08494), after Brand (2006), *Fast
low-rank modifications of the thin singular value decomposition*.

Conventions. A factor is the average F₁ = S₁, F_k = ρ F_{k−1} + (1 − ρ) S_k (as in the
preconditioner). Every batch statistic of a Linear layer has low rank: S = C Cᵀ with C the
d × m matrix of *unscaled* batch columns (:func:`batch_columns`; the √(1 − ρ) is applied inside
:func:`brand_update`, never by the caller). B-KFAC keeps only the top r eigenpairs
(U: d × r orthonormal, D ≥ 0) of its estimate X of F and folds each C in without forming a
d × d matrix:

    C' = √(1 − ρ) C,    P = Uᵀ C',    C' − U P = Q R          (Q: d × k orthonormal, Q ⊥ U)
    ρ U D Uᵀ + C' C'ᵀ = [U Q] K [U Q]ᵀ,   K = [[ρD + P Pᵀ, P Rᵀ], [R Pᵀ, R Rᵀ]]
    K = W Λ Wᵀ   ⇒   new U = [U Q] W,  new D = Λ   (descending, truncated to the top r).

Cost O(d (r + m)²) and memory O(d (r + m)): linear in d, against O(d² k) per product for the
randomized decompositions of the dense factor. Before truncation the update is exact.

Truncation error. Let T_k ≽ 0 be the part that step k drops (its largest eigenvalue
δ_k = λ_{r+1}(ρ X_{k−1} + (1 − ρ) S_k)). Then X_k = ρ X_{k−1} + (1 − ρ) S_k − T_k, so the
error E_k = F_k − X_k obeys E_k = ρ E_{k−1} + T_k, i.e.

    E_k = Σ_j ρ^{k−j} T_j ≽ 0,     ‖F_k − X_k‖₂ ≤ Σ_j ρ^{k−j} δ_j ≤ Σ_j δ_j:

the estimate never exceeds the true average (Loewner order), each step adds at most its
largest dropped eigenvalue in spectral norm, and old errors fade with ρ (so δ_j ≤ δ for all
j gives ‖E_k‖₂ ≤ δ / (1 − ρ)). ``Eigenpairs.trace`` is kept for the true average F_k (not
for X_k), so ``trace − values.sum()`` is tr E_k, the mass lost to truncation.

Refreshes (the same paper): B-R-KFAC overwrites (U, D) every so often by a randomized
decomposition of the dense factor (:func:`brand_refresh`); B-KFAC-c corrects a few random
eigenvectors by a Rayleigh–Ritz step on the dense factor (:func:`reproject_subset`). Both need
the dense factor, which the preconditioner keeps anyway (O(d² m) per factor update).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rkfac.decompositions import Decomposition
from rkfac.lowrank import Eigenpairs
from rkfac.schedules import check_choice, check_float, check_int

KINDS = ("A", "G")
LOSS_REDUCTIONS = ("mean", "sum")


def batch_columns(rows: Tensor, kind: str, samples: int, loss_reduction: str) -> Tensor:
    """The d × N matrix C with C Cᵀ equal to the batch statistic of :mod:`rkfac.kfac.statistics`.

    ``rows`` are the layer kind's ``input_rows`` (kind "A", bias ones included) or
    ``output_grad_rows`` (kind "G") of one step, all calls concatenated, and the
    scaling is that of ``rkfac.kfac.statistics.StatisticSums.averages``:

    - "A": C = aᵀ / √N with N the number of rows, so C Cᵀ = Σ a aᵀ / N. Every entry is
      scaled alike, the bias row included: it holds 1/√N per column, so the bias corner of
      S_A is exactly 1 and its last column the mean input. ``samples`` is not used.
    - "G", mean loss: C = √n gᵀ (C Cᵀ = n Σ g gᵀ); "G", sum loss: C = gᵀ / √n; n = ``samples``.
    """
    check_choice(kind, "kind", KINDS)
    check_choice(loss_reduction, "loss_reduction", LOSS_REDUCTIONS)
    check_int(samples, "samples", low=1)
    if rows.dim() != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty (N, d) matrix, got shape {tuple(rows.shape)}")
    if kind == "A":
        scale = 1.0 / math.sqrt(rows.shape[0])
    elif loss_reduction == "mean":
        scale = math.sqrt(samples)
    else:
        scale = 1.0 / math.sqrt(samples)
    return rows.T * scale


def brand_update(pairs: Eigenpairs | None, columns: Tensor, decay: float, rank: int) -> Eigenpairs:
    """Top ``rank`` eigenpairs of ρ U D Uᵀ + (1 − ρ) C Cᵀ, or of C Cᵀ when ``pairs`` is None.

    ``columns`` is the unscaled d × m matrix C of this step's statistic S = C Cᵀ
    (:func:`batch_columns`); ``decay`` is ρ. ``pairs`` None is the first statistic, F₁ = S₁:
    its eigenpairs come from the same computation with an empty U (thin QR of C and the m × m
    core R Rᵀ, O(d m²)), never from the d × d matrix.

    The result holds min(``rank``, r + k) pairs, where k ≤ m is the numerical rank of the part
    of C outside span U: fewer than ``rank`` while the average itself has lower rank (early
    steps, or C with repeated or zero columns). Values are descending and clamped at 0.
    ``trace`` is that of the untruncated average, ρ·trace + (1 − ρ)‖C‖²_F (‖C‖²_F on the
    first statistic); ``top`` the largest value. See the module docstring for the error
    bound of the truncation.

    The columns of U stay orthonormal to rounding at each step; the drift accumulates by
    about one rounding error per update, which a periodic :func:`brand_refresh` resets.
    """
    check_float(decay, "decay", low=0.0, high=1.0, high_inclusive=False)
    check_int(rank, "rank", low=1)
    if columns.dim() != 2:
        raise ValueError(f"columns must be a (d, m) matrix, got shape {tuple(columns.shape)}")
    squared_norm = float(columns.square().sum())
    if pairs is None:
        vectors = columns.new_zeros(columns.shape[0], 0)
        kept_values = columns.new_zeros(0)
        trace = squared_norm
    else:
        if pairs.dim != columns.shape[0]:
            raise ValueError(f"columns have {columns.shape[0]} rows but the eigenpairs have dimension {pairs.dim}")
        vectors, kept_values = pairs.vectors, decay * pairs.values
        columns = columns * math.sqrt(1.0 - decay)
        trace = decay * pairs.trace + (1.0 - decay) * squared_norm
    values, new_vectors = _fold(vectors, kept_values, columns, rank)
    top = float(values[0]) if values.numel() else 0.0
    return Eigenpairs(new_vectors.contiguous(), values.contiguous(), trace, top)


def _fold(vectors: Tensor, values: Tensor, columns: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(values, vectors) of the top ``rank`` eigenpairs of U diag(values) Uᵀ + C Cᵀ, U orthonormal.

    Two numerical choices:

    - the projection on U is done twice (classical Gram–Schmidt twice, "twice is enough"):
      one pass leaves a residual that is orthogonal to U only up to ε‖C‖, which is large
      relative to the residual when C lies almost in span U;
    - the residual's basis is rank-revealing: thin QR, then the SVD of the small R = L Σ Vᵀ,
      keeping the directions Q L_i with σ_i above ε·max(d, m)·‖C‖_F. For σ_i > 0,
      Q L_i = residual · v_i / σ_i lies in the range of the residual, so it is orthogonal to
      U, whereas unpivoted QR of a rank-deficient residual returns some columns of Q in
      arbitrary directions that are not. The dropped part changes the factor at rounding
      level only (≤ 2‖C‖₂ σ_i + σ_i²).
    """
    dim, count = columns.shape
    old_rank = vectors.shape[1]
    projection = vectors.T @ columns
    residual = columns - vectors @ projection
    correction = vectors.T @ residual
    residual -= vectors @ correction
    projection += correction

    basis, triangle = torch.linalg.qr(residual)
    left, singular, right_t = torch.linalg.svd(triangle, full_matrices=False)
    tolerance = torch.finfo(columns.dtype).eps * max(dim, count) * float(torch.linalg.norm(columns))
    kept = int((singular > tolerance).sum())
    residual_coordinates = singular[:kept, None] * right_t[:kept]  # R in the basis Q L[:, :kept]

    # K = diag(values, 0) + B Bᵀ with B = [P; R]: the factor in the orthonormal basis [U, Q L].
    stacked = torch.cat([projection, residual_coordinates])
    core = stacked @ stacked.T
    core.diagonal()[:old_rank] += values
    core_values, core_vectors = torch.linalg.eigh(core)
    keep = min(rank, old_rank + kept)
    core_values = core_values.flip(0)[:keep].clamp_min(0)
    core_vectors = core_vectors.flip(1)[:, :keep]
    new_vectors = vectors @ core_vectors[:old_rank] + basis @ (left[:, :kept] @ core_vectors[old_rank:])
    return core_values, new_vectors


def brand_refresh(
    factor: Tensor, decomposition: Decomposition, generator: torch.Generator | None = None, step: int = 0
) -> Eigenpairs:
    """B-R-KFAC: replace the B-KFAC pairs by ``decomposition.decompose(factor, generator, step)``.

    Between refreshes, :func:`brand_update` keeps (U, D) current at every factor update for
    O(d (r + m)²); every so often (the paper: when a randomized method would recompute its
    inverse) the pairs are rebuilt from the dense factor, which B-R-KFAC keeps alongside.
    This resets the truncation error E_k (module docstring), which only fades at rate ρ,
    and the slow loss of orthogonality of U. It is a thin wrapper so that both variants read
    alike at the call site.
    """
    return decomposition.decompose(factor, generator, step)


def reproject_subset(pairs: Eigenpairs, factor: Tensor, count: int, generator: torch.Generator) -> Eigenpairs:
    """B-KFAC-c: Rayleigh–Ritz correction of ``count`` random eigenvectors on the dense ``factor``.

    The columns U_s are drawn uniformly without replacement (``torch.randperm`` with
    ``generator``); ``count`` is capped at the number of pairs. With U_sᵀ F U_s = V Λ Vᵀ
    (F symmetrized), U_s becomes U_s V and its values Λ; the other pairs are kept, and all
    are re-sorted descending. Cost O(d² count) for F U_s; span U is unchanged.

    Why it helps: write X = U D Uᵀ and Π_s = U_s U_sᵀ. X is block diagonal in the columns of
    U, and the correction changes only its (Π_s, Π_s) block, to Π_s F Π_s, which zeroes that
    block of F − X. Hence for any orthonormal U (not only an invariant subspace)

        ‖F − X_new‖²_F = ‖F − X‖²_F − ‖U_sᵀ (F − X) U_s‖²_F ≤ ‖F − X‖²_F,

    and when span U_s is an invariant subspace of F (all columns of an exact-span U, say)
    the new pairs are exact eigenpairs of F. ``trace`` becomes that of ``factor``.
    """
    check_int(count, "count", low=0)
    if factor.dim() != 2 or factor.shape != (pairs.dim, pairs.dim):
        raise ValueError(f"factor must be {pairs.dim} × {pairs.dim} like the eigenpairs, got shape {tuple(factor.shape)}")
    count = min(count, pairs.rank)
    chosen = torch.randperm(pairs.rank, generator=generator, device=generator.device)[:count].to(pairs.vectors.device)
    subset = pairs.vectors[:, chosen]
    core = subset.T @ (factor @ subset)
    core_values, core_vectors = torch.linalg.eigh((core + core.T) / 2)
    vectors, values = pairs.vectors.clone(), pairs.values.clone()
    vectors[:, chosen] = subset @ core_vectors
    values[chosen] = core_values.clamp_min(0)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    top = float(values[0]) if values.numel() else 0.0
    return Eigenpairs(vectors.contiguous(), values.contiguous(), float(factor.diagonal().sum()), top)
