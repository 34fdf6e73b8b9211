"""Adam in the low-rank Kronecker eigenbasis: randomized SOAP (issue 21).

SOAP (Vyas et al. 2024) runs Adam in the eigenbasis of Kronecker factors; EKFAC (George et al.
2018) keeps K-FAC's eigenbasis and re-estimates each mode's scale from the gradients. Here the
basis is K-FAC's own: the kept eigenvectors U_G (d_G × r_G) and U_A (d_A × r_A) of G and A, from
any decomposition (exact, SRE, RSVD, Brand), on the usual ``inverse_every`` schedule. The
eigenvalues are not used: each mode's scale is learned from the gradients, as in Adam.

Per layer, with ∇W the gradient matrix (d_G × d_A, bias last), the bases completed in thought
by their orthogonal complements U_G⊥, U_A⊥ (never formed), the rotated gradient has four blocks:

    [U_G, U_G⊥]ᵀ ∇W [U_A, U_A⊥] = [[ C   X ]      C = U_Gᵀ ∇W U_A      r_G × r_A   kept × kept
                                   [ Y   Z ]]     X: kept G modes × the A complement, r_G × (d_A − r_A)
                                                  Y: the G complement × kept A modes, (d_G − r_G) × r_A
                                                  Z: complement × complement

Each block gets Adam second moments as fine as the basis allows: one per entry of C (as in
SOAP), one per row of X (per kept G mode, the mean over the A complement), one per column of Y,
one for Z. All four come from the two half rotations L = U_Gᵀ ∇W and R = ∇W U_A, without U⊥:
‖X_i‖² = ‖L_i‖² − ‖C_i‖², ‖Y_j‖² = ‖R_j‖² − ‖C_j‖², ‖Z‖² = ‖∇W‖² − ‖L‖² − ‖R‖² + ‖C‖² (the bases
are orthonormal), each floored at the float resolution of its difference, so that a block the
gradient does not reach is not divided by ≈ 0. Per step, t counting the steps::

    m ← β₁ m + (1 − β₁) ∇W,   likewise U_Gᵀ m and m U_A (kept averaged: the basis is fixed between
                              decompositions, and the rotations are linear)
    v ← β₂ v + (1 − β₂) (C², mean_row X², mean_col Y², mean Z²)
    s_• = 1 / (√(v_• / (1 − β₂ᵗ)) + ε) / (1 − β₁ᵗ)          per block, turns m into m̂ / (√v̂ + ε)
    direction = s_Z m + U_G [(s_X − s_Z) ⊙ U_Gᵀm] + [(s_Y − s_Z) ⊙ m U_A] U_Aᵀ
                + U_G [M ⊙ (s_C − s_X − s_Y + s_Z)] U_Aᵀ,   M = U_Gᵀ m U_A

which is m̂ scaled block by block in the completed basis and rotated back. Cost per step: two
products with the bases (L, R) and two back (grouped as U_G[·] and [·]U_Aᵀ, accumulated in place
into the output), O(d_G d_A (r_G + r_A)) as the damped Kronecker solve, plus one r_G × r_A core
product; no d × d matrix. Memory: m, U_Gᵀm, m U_A, U_Gᵀ m U_A, v and the basis they were
measured in. (Averaging M with the half rotations instead of recomputing it, and the in-place
accumulation, took the direction on the autoencoder's layers at r = 220 from 114 to 71 ms per
step, medians of 4 interleaved pairs on 2 cores.) One scalar for all of X, Y and Z was measured first and lost: on
fashion-autoencoder at r = 220 it ended epoch 1 at a loss of 18.0 against 9.6 with the blocks
(9.4 at full rank). Measured there after 100 steps (r = 220 of widths 250–1001), the blocks
hold 78–99% (C), 0.1–3% (X), 0.7–22% (Y) and at most 0.4% (Z) of each layer's gradient energy:
Z has most of the entries and almost none of the energy, so one mean over all three is far
too small for Y, and Y's steps far too large.

With r = d on both sides (the exact decomposition, or any rank ≥ d) X, Y and Z are empty and
this is dense SOAP with K-FAC's factors as the Kronecker factors: direction = U_G [M̂ / (√v̂_C +
ε)] U_Aᵀ. A diagonal factor (an embedding's A) is its own eigenbasis: that side is the identity,
every mode kept; before a layer's first decomposition both sides are, and the step is Adam.
Grouped convolutions' block factors rotate block by block (the products broadcast over the
leading block dimension).

When a decomposition replaces the basis, ``carry`` says what the second moments become:

- ``"keep"`` (default): left as they are (SOAP's choice: it only re-sorts, the modes being
  sorted by eigenvalue in both bases), padded with v_Z or cut where a rank changed. With
  warm-started bases the new modes are close to the old ones, column by column; on
  fashion-autoencoder (one epoch, seed 0) it reached 8.98 against 9.27 with "rotate".
- ``"rotate"``: read as the diagonal of a covariance that is diagonal in the old
  basis, rotated into the new one (:meth:`SecondMoments.rotated`): with O = U_newᵀ U_old per
  side and W = O ⊙ O, the new C entries take W_G v_C W_Aᵀ, plus, for the part of each new mode
  the old kept modes did not hold (1 − rowsum W), the complement blocks' moments. O(d r²) per
  side, on decomposition steps only.
- ``"reset"``: restarted from zero with their own bias-correction count (EKFAC re-estimates its
  scales after each new basis). It diverged on fashion-autoencoder (loss 7·10⁵ after one epoch):
  the restarted v̂ is one step's square, while m̂ keeps its history, so the modes the step's
  gradient barely touches get steps of m̂/|g|.

m lives in the original coordinates and needs no carrying; its half rotations are recomputed
in the new basis. Weight decay is not here: :class:`rkfac.LowRankSOAP` decays decoupled from
this direction, as AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rkfac.lowrank import BlockEigenpairs, DiagonalFactor, FactorInverse
from rkfac.options import SOAPOptions


def basis_of(pairs: FactorInverse | None) -> Tensor | None:
    """The orthonormal basis of a factor's kept modes, (d, r) or (B, d, r); None is the identity
    (a diagonal factor, whose eigenvectors are the unit vectors, every mode kept)."""
    if pairs is None or isinstance(pairs, DiagonalFactor):
        return None
    return pairs.vectors


def _left(u: Tensor | None, matrix: Tensor) -> Tensor:
    """Uᵀ matrix (the identity for None)."""
    return matrix if u is None else u.mT @ matrix


def _right(matrix: Tensor, u: Tensor | None) -> Tensor:
    """matrix U (the identity for None)."""
    return matrix if u is None else matrix @ u


def _overlap(new: Tensor | None, old: Tensor | None) -> Tensor | None:
    """(O ⊙ O) with O = U_newᵀ U_old: how much of old mode j each new mode i holds; None if
    both are the identity."""
    if new is None and old is None:
        return None
    if new is None or old is None:
        raise ValueError("a factor's basis switched between the identity and eigenvectors")
    return (new.mT @ old).square()


@dataclass
class SecondMoments:
    """The second moments of one layer's gradient in its basis, one per block of the rotated
    gradient [U_G, U_G⊥]ᵀ ∇W [U_A, U_A⊥] (module docstring): ``core`` (..., r_G, r_A) per kept
    mode pair, ``rows`` (..., r_G) per kept G mode over the A complement, ``cols`` (..., r_A) per
    kept A mode over the G complement, ``rest`` (...) for complement × complement."""

    core: Tensor
    rows: Tensor
    cols: Tensor
    rest: Tensor

    @classmethod
    def zeros(cls, like: Tensor, ranks: tuple[int, int]) -> SecondMoments:
        batch = like.shape[:-2]
        rows, cols = ranks
        zeros = like.new_zeros
        return cls(zeros(*batch, rows, cols), zeros(*batch, rows), zeros(*batch, cols), zeros(batch))

    def lerp_(self, other: SecondMoments, weight: float) -> None:
        for name in ("core", "rows", "cols", "rest"):
            getattr(self, name).lerp_(getattr(other, name), weight)

    def rotated(self, old: tuple[Tensor | None, Tensor | None], new: tuple[Tensor | None, Tensor | None]) -> SecondMoments:
        """``carry="rotate"``: the moments read as the diagonal of a covariance that is diagonal in
        the old basis, in the new one. With W = O ⊙ O per side and p = rowsum(W) (how much of each
        new mode the old kept modes held), a new core entry takes W_G core W_Aᵀ from the old core,
        and the part of it the old basis did not hold from the old complements:
        rows (1 − p_A)ᵀ, cols (1 − p_G), rest (1 − p_G)(1 − p_A)ᵀ. The complement moments follow
        their kept side: rows ← W_G rows + (1 − p_G) rest, cols likewise (each complement itself
        is taken as unchanged: it is not represented)."""
        w_g, w_a = _overlap(new[0], old[0]), _overlap(new[1], old[1])
        core, rows, cols, rest = self.core, self.rows, self.cols, self.rest.unsqueeze(-1)
        lost_g = None if w_g is None else (1 - w_g.sum(-1)).clamp_(min=0)
        lost_a = None if w_a is None else (1 - w_a.sum(-1)).clamp_(min=0)
        if w_g is not None:
            core, rows = w_g @ core, (w_g @ rows.unsqueeze(-1)).squeeze(-1)
        if w_a is not None:
            core, cols = core @ w_a.mT, (w_a @ cols.unsqueeze(-1)).squeeze(-1)
        carried = core
        if lost_a is not None:
            carried = carried + rows.unsqueeze(-1) * lost_a.unsqueeze(-2)
        if lost_g is not None:
            carried = carried + lost_g.unsqueeze(-1) * cols.unsqueeze(-2)
        if lost_g is not None and lost_a is not None:
            carried = carried + lost_g.unsqueeze(-1) * lost_a.unsqueeze(-2) * rest.unsqueeze(-1)
        rows = rows if lost_g is None else rows + lost_g * rest
        cols = cols if lost_a is None else cols + lost_a * rest
        return SecondMoments(carried, rows, cols, self.rest)

    def resized(self, ranks: tuple[int, int]) -> SecondMoments:
        """``carry="keep"``: cut or padded (with ``rest``) to the new ranks."""

        def fit(moment: Tensor, shape: tuple[int, ...]) -> Tensor:
            out = self.rest.reshape(*self.rest.shape, *([1] * len(shape))).expand(*self.rest.shape, *shape).clone()
            kept = [slice(0, min(a, b)) for a, b in zip(shape, moment.shape[-len(shape) :], strict=True)]
            index: tuple[Any, ...] = (Ellipsis, *kept)
            out[index] = moment[index]
            return out

        return SecondMoments(fit(self.core, ranks), fit(self.rows, ranks[:1]), fit(self.cols, ranks[1:]), self.rest)

    def filled(self, counts: tuple[int, int, int]) -> SecondMoments:
        """Per-block scales with the empty blocks made harmless: ``counts`` are the entries per
        row of X, per column of Y and in Z (zero where a side keeps every mode); an empty X or Y
        takes Z's scale and an empty Z zero, so that their terms in :func:`scaled_in_blocks`
        cancel exactly."""
        rest = self.rest if counts[2] else torch.zeros_like(self.rest)
        rows = self.rows if counts[0] else rest.unsqueeze(-1).expand_as(self.rows)
        cols = self.cols if counts[1] else rest.unsqueeze(-1).expand_as(self.cols)
        return SecondMoments(self.core, rows, cols, rest)

    def as_dict(self) -> dict[str, Tensor]:
        return {"core": self.core, "rows": self.rows, "cols": self.cols, "rest": self.rest}


@dataclass
class LayerMoments:
    """One layer's Adam state in its eigenbasis (see the module docstring)."""

    first: Tensor  # m, the gradient's shape, original coordinates
    first_left: Tensor | None  # U_Gᵀ m in ``basis`` (None where U_G is the identity: it is m)
    first_right: Tensor | None  # m U_A likewise
    second: SecondMoments  # in ``basis``
    steps: int  # t, for the bias correction of m
    second_steps: int  # t of the second moments (restarts with carry="reset")
    basis: tuple[Tensor | None, Tensor | None]  # (U_G, U_A) that the rotated moments were measured in
    first_core: Tensor | None = None  # U_Gᵀ m U_A (None where either side is the identity)

    def rotate_first(self) -> None:
        """U_Gᵀ m, m U_A and U_Gᵀ m U_A for the current basis (on a new basis; between, they are
        averaged)."""
        u_g, u_a = self.basis
        self.first_left = None if u_g is None else _left(u_g, self.first)
        self.first_right = None if u_a is None else _right(self.first, u_a)
        self.first_core = None if self.first_left is None or u_a is None else _right(self.first_left, u_a)

    def state_dict(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "first_left": self.first_left,
            "first_right": self.first_right,
            "first_core": self.first_core,
            "second": self.second.as_dict(),
            "steps": self.steps,
            "second_steps": self.second_steps,
            "basis": list(self.basis),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> LayerMoments:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        u_g, u_a = state["basis"]
        second = SecondMoments(**{name: t.to(device) for name, t in state["second"].items()})
        first_core, left = state.get("first_core"), state["first_left"]
        if "first_core" not in state and left is not None and u_a is not None:  # saved before it was averaged
            first_core = _right(left, u_a)
        return cls(
            state["first"].to(device),
            move(state["first_left"]),
            move(state["first_right"]),
            second,
            int(state["steps"]),
            int(state["second_steps"]),
            (move(u_g), move(u_a)),
            move(first_core),
        )


def same_basis(old: Tensor | None, new: Tensor | None) -> bool:
    """Whether two bases are the same values (the same tensor, or equal: e.g. after a restore)."""
    if old is None or new is None:
        return old is new
    return old is new or (old.shape == new.shape and torch.equal(old, new))


def _block_energies(matrix: Tensor, left: Tensor, right: Tensor, core: Tensor) -> SecondMoments:
    """Mean squares of the four blocks of the rotated ``matrix`` from its half rotations
    ``left`` = U_Gᵀ X, ``right`` = X U_A and ``core`` = U_Gᵀ X U_A (orthonormal bases: a block's
    energy is a difference of norms, floored at the float resolution of that difference)."""
    tiny = torch.finfo(matrix.dtype).eps
    core_sq = core.square()
    row_norms, col_norms = core_sq.sum(-1), core_sq.sum(-2)
    left_rows, right_cols = left.square().sum(-1), right.square().sum(-2)
    total = matrix.square().sum((-2, -1))
    rows = torch.maximum(left_rows - row_norms, tiny * left_rows)
    cols = torch.maximum(right_cols - col_norms, tiny * right_cols)
    rest = torch.maximum(total - left_rows.sum(-1) - right_cols.sum(-1) + core_sq.sum((-2, -1)), tiny * total)
    return SecondMoments(core_sq, rows, cols, rest)


class EigenbasisAdam:
    """The direction rule of :class:`rkfac.LowRankSOAP`: per layer, Adam on the four blocks of the
    rotated gradient (module docstring). The preconditioner calls :meth:`direction` for every layer
    with a gradient, with its decompositions (None before the first: then the basis is the
    identity on both sides and the step is plain Adam)."""

    def __init__(self, options: SOAPOptions) -> None:
        self.options = options
        self.moments: dict[str, LayerMoments] = {}

    needs_pairs = False  # before a layer's first decomposition the basis is the identity: Adam

    def direction(
        self, name: str, grad: Tensor, pairs: tuple[FactorInverse, FactorInverse] | None, dampings: object = None
    ) -> Tensor:
        """The layer's direction; ``dampings`` (K-FAC's) are not used: ε is Adam's damping."""
        a_pairs, g_pairs = pairs if pairs is not None else (None, None)
        if isinstance(a_pairs, BlockEigenpairs) != isinstance(g_pairs, BlockEigenpairs):
            raise ValueError(f"layer {name}: block eigenpairs must be on both sides")
        u_g, u_a = basis = (basis_of(g_pairs), basis_of(a_pairs))
        beta1, beta2, eps = self.options.beta1, self.options.beta2, self.options.eps
        state = self._moments(name, grad, basis)
        state.steps += 1
        state.second_steps += 1
        left, right = _left(u_g, grad), _right(grad, u_a)  # the step's two products with the bases
        # U_Gᵀ ∇W U_A from the half rotation whose remaining product is the smaller
        core = _right(left, u_a) if u_g is None or grad.shape[-1] <= grad.shape[-2] else _left(u_g, right)
        # m and its rotations are averaged alike (the rotations are linear, the basis fixed)
        averaged = ((state.first, grad), (state.first_left, left), (state.first_right, right), (state.first_core, core))
        for moment, value in averaged:
            if moment is not None:
                moment.lerp_(value, 1 - beta1)
        m_left = state.first if state.first_left is None else state.first_left
        m_right = state.first if state.first_right is None else state.first_right
        m_core = state.first_core if state.first_core is not None else m_right if u_g is None else m_left
        d_g, d_a = grad.shape[-2:]
        r_g, r_a = core.shape[-2:]
        counts = (d_a - r_a, d_g - r_g, (d_g - r_g) * (d_a - r_a))  # entries per row, per column, in rest
        energies = _block_energies(grad, left, right, core)
        energies.rows, energies.cols, energies.rest = (
            e / max(n, 1) for e, n in zip((energies.rows, energies.cols, energies.rest), counts, strict=True)
        )
        state.second.lerp_(energies, 1 - beta2)
        second_correction, first_correction = 1 - beta2**state.second_steps, 1 - beta1**state.steps

        def scale(moment: Tensor) -> Tensor:  # 1 / (√v̂ + ε) / (1 − β₁ᵗ): turns m into m̂ / (√v̂ + ε)
            return 1 / ((moment / second_correction).sqrt_().add_(eps)) / first_correction

        second = state.second
        rest = scale(second.rest) if counts[2] else torch.zeros_like(second.rest)
        scales = SecondMoments(scale(second.core), scale(second.rows), scale(second.cols), rest).filled(counts)
        return scaled_in_blocks((state.first, m_left, m_right, m_core), basis, scales)

    def _moments(self, name: str, grad: Tensor, basis: tuple[Tensor | None, Tensor | None]) -> LayerMoments:
        """The layer's moments, with the second moments carried into ``basis`` if it changed."""
        u_g, u_a = basis
        ranks = (grad.shape[-2] if u_g is None else u_g.shape[-1], grad.shape[-1] if u_a is None else u_a.shape[-1])
        state = self.moments.get(name)
        if state is None or state.first.shape != grad.shape:
            state = LayerMoments(torch.zeros_like(grad), None, None, SecondMoments.zeros(grad, ranks), 0, 0, basis)
            state.rotate_first()
            self.moments[name] = state
            return state
        if all(same_basis(old, new) for old, new in zip(state.basis, basis, strict=True)):
            state.basis = basis  # the same values (e.g. after a restore): keep the live tensors
            return state
        switched = any((old is None) != (new is None) for old, new in zip(state.basis, basis, strict=True))
        carry = self.options.carry
        if carry == "reset" or switched:  # from the identity (no basis yet) nothing carries over
            state.second, state.second_steps = SecondMoments.zeros(grad, ranks), 0
        elif carry == "rotate":
            state.second = state.second.rotated(state.basis, basis)
        else:  # keep
            state.second = state.second.resized(ranks)
        state.basis = basis
        state.rotate_first()
        return state

    def state_dict(self) -> dict[str, Any]:
        return {name: moments.state_dict() for name, moments in self.moments.items()}

    def load_state_dict(self, state: dict[str, Any], devices: dict[str, torch.device]) -> None:
        self.moments = {name: LayerMoments.from_state(entry, devices[name]) for name, entry in state.items()}


def scaled_in_blocks(
    rotations: tuple[Tensor, Tensor, Tensor, Tensor], basis: tuple[Tensor | None, Tensor | None], scales: SecondMoments
) -> Tensor:
    """A matrix M scaled block by block in the completed basis and rotated back, from its half
    rotations: ``rotations`` = (M, U_Gᵀ M, M U_A, U_Gᵀ M U_A), ``scales`` one per block (the
    module docstring's s_C, s_X, s_Y, s_Z; see :meth:`SecondMoments.filled` for empty blocks)::

        s_Z M + U_G[(s_X − s_Z) ⊙ U_Gᵀ M] + [(s_Y − s_Z) ⊙ M U_A] U_Aᵀ + U_G [U_Gᵀ M U_A ⊙ (s_C − s_X − s_Y + s_Z)] U_Aᵀ

    accumulated in place (BLAS beta = 1): no d_G × d_A temporaries beyond the output."""
    full, left, right, core = rotations
    u_g, u_a = basis
    s_rest_ = scales.rest.unsqueeze(-1)
    core_term = core * (scales.core - scales.rows.unsqueeze(-1) - scales.cols.unsqueeze(-2) + s_rest_.unsqueeze(-1))
    from_left = _add_product_(left * (scales.rows - s_rest_).unsqueeze(-1), core_term, u_a, transpose=True)
    out = full * s_rest_.unsqueeze(-1)
    _add_product_(out, u_g, from_left)
    return _add_product_(out, right * (scales.cols - s_rest_).unsqueeze(-2), u_a, transpose=True)


def _add_product_(out: Tensor, first: Tensor | None, second: Tensor | None, transpose: bool = False) -> Tensor:
    """``out += first @ second`` in place (``first @ secondᵀ`` with ``transpose``); a None factor is
    the identity. Batched (block) operands go through ``baddbmm_``."""
    if first is None or second is None:
        term = second if first is None else first
        assert term is not None, "one factor of the product must be a matrix"
        return out.add_(term)
    right = second.mT if transpose else second
    if out.dim() == first.dim() == right.dim() == 2:
        return out.addmm_(first, right)
    if out.dim() == first.dim() == right.dim() == 3:
        return out.baddbmm_(first, right)
    return out.add_(first @ right)


__all__ = ["EigenbasisAdam", "LayerMoments", "SecondMoments", "basis_of", "same_basis", "scaled_in_blocks"]
