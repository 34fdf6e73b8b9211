"""Eigenvalue-corrected K-FAC in the low-rank Kronecker eigenbasis: randomized EKFAC (issue 21).

K-FAC scales the gradient, in the eigenbasis of its factors, by the products of their
eigenvalues: mode pair (i, j) of a layer is divided by (λ_G,i + δ_G)(λ_A,j + δ_A). EKFAC (George
et al. 2018) keeps the basis and replaces the product λ_G,i λ_A,j with the second moment of the
per-sample gradient in that mode pair, the diagonal of the Fisher in the Kronecker eigenbasis,
which the product only approximates (it is exact when a and g are independent). Here the basis
is the one K-FAC's decompositions keep, U_G (d_G × r_G) and U_A (d_A × r_A), of any rank; its
orthogonal complements are never formed, and the rotated gradient has the four blocks of
:mod:`rkfac.kfac.eigenbasis_adam` (C kept × kept, X kept G × A complement, Y G complement ×
kept A, Z complement × complement).

**The statistic.** Under K-FAC's convention (:mod:`rkfac.kfac.statistics`) each row t of a layer
call is a sample of the Kronecker statistics, S_A = c_A Σ_t a_t a_tᵀ and S_G = c_G Σ_t g_t g_tᵀ
(c_G = n for a mean loss, 1/n for a sum; with subsampling, expand/reduce and several calls as
there). The per-row gradient is g_t a_tᵀ, and its squared rotation, summed the same way, is

    s_ij = c_G Σ_t (u_G,iᵀ g_t)² (u_A,jᵀ a_t)²                                   kept × kept

equal to λ_G,i λ_A,j when the two sides are independent over the rows. For the complements,
whose modes are not represented, one value per row of X, per column of Y and for Z, the mean
over the block's entries, from the per-row complement norms ‖a_t‖² − ‖U_Aᵀ a_t‖² (likewise g):

    s_X,i = c_G Σ_t (u_G,iᵀ g_t)² ‖P_A⊥ a_t‖² / (d_A − r_A),   s_Y,j likewise,
    s_Z = c_G Σ_t ‖P_G⊥ g_t‖² ‖P_A⊥ a_t‖² / ((d_G − r_G)(d_A − r_A)).

The rows are rotated in the hooks (:class:`RowObserver`): the input rows when the forward
runs, (N × d_A)(d_A × r_A), kept as their squares until the output gradient arrives, whose rows
are rotated likewise and paired row by row; O(N d r) per layer and factor step, next to the
Gram products' O(N d²). Batch by batch the statistic is averaged as the factors are, with
``factor_decay`` ρ on factor steps: s ← ρ s + (1 − ρ) ŝ.

**The step.** With the damped product written as (λ_G + δ_G)(λ_A + δ_A) = λ_G λ_A + [δ_G λ_A +
λ_G δ_A + δ_G δ_A], EKFAC replaces the first term only, and the complement's eigenvalues are 0
as in K-FAC's truncated solve::

    D_C = s_C + δ_G λ_Aᵀ + λ_G δ_A + δ_G δ_A,   D_X = s_X + λ_G δ_A + δ_G δ_A,
    D_Y = s_Y + δ_G λ_A + δ_G δ_A,              D_Z = s_Z + δ_G δ_A,
    direction = the gradient divided by D block by block in the completed basis

(:func:`rkfac.kfac.eigenbasis_adam.scaled_in_blocks`, O(d_G d_A (r_G + r_A)), as the damped
solve). δ_A, δ_G are K-FAC's factor dampings (any damping mode and scale, the adaptive step's
included), so that with s = λ_G λ_Aᵀ and s_X = s_Y = s_Z = 0 the step is exactly K-FAC's. That
is what a layer's first basis starts from: its scales are K-FAC's eigenvalue products, and the
measured statistic takes over at ρ per factor step. ``carry`` says what happens to measured
scales when a decomposition replaces the basis: ``"keep"`` (the default) leaves them as they are
(cut or padded where a rank changed; with warm-started bases the modes move little),
``"rotate"`` moves them as :class:`rkfac.kfac.eigenbasis_adam.SecondMoments` does for sre-soap,
``"reset"`` goes back to the new basis's eigenvalue products. Measured on fashion-autoencoder
(SRE-KFAC's settings there: factors every 10 steps, bases every 50, so a reset basis sees about
5 folds, s ≈ 0.77 products + 0.23 measured): one epoch of seed 0 keep 15.88, rotate 15.90, reset
16.06; 4 epochs, 3 seeds, keep 10.21 against reset 10.66 and SRE-KFAC's 10.89 (BENCHMARKS.md).
At r = d the blocks X, Y, Z are empty and this is dense EKFAC on K-FAC's factors. K-FAC's
clip, momentum, weight decay and learning rate act on this direction as on the damped solve.

An embedding's A is diagonal (token frequencies) and is its own eigenbasis, every mode kept:
its input rows are the one-hot e_token(t), so the statistic adds each G row's squared
coordinates into its token's column (an index_add, O(N r_G), never a vocabulary-wide row):
s_ij = c_G Σ_{t: token(t)=j} (u_G,iᵀ g_t)², and the G complement's s_Y,j likewise; X and Z are
empty. Under data parallelism ŝ is averaged over the ranks with the K-FAC statistics (one more
all-reduce of r_G r_A + r_G + r_A + 1 numbers per layer and factor step); each rank's ŝ carries
its own c_G as its S_G does, so the mean is the global batch's statistic.

B-KFAC's online factors (Brand's update, every factor step) give a new basis at every factor
step: the step's rows are measured in the basis they were rotated into, the one of the last
step, folded there, and then carried into the updated basis as ``carry`` says. A layer is
rotated only once it has a basis; before, it keeps its plain gradient, as in K-FAC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rkfac.health import all_finite
from rkfac.kfac.eigenbasis_adam import SecondMoments, basis_of, same_basis, scaled_in_blocks
from rkfac.lowrank import Damping, DampingsOf, DiagonalFactor, FactorInverse

EKFAC_CARRY = ("keep", "rotate", "reset")


@dataclass
class RotatedInputs:
    """One layer call's input rows in the basis: their squared coordinates (..., N, r_A) and
    complement norms (..., N), held until the output gradient arrives; ``u_g`` is U_G then."""

    squares: Tensor
    complement: Tensor
    u_g: Tensor

    def paired(self, g_squares: Tensor, g_complement: Tensor) -> SecondMoments:
        """The unscaled sums of the statistic's four blocks over the rows (module docstring)."""
        a_squares, a_complement = self.squares, self.complement
        return SecondMoments(
            g_squares.mT @ a_squares,
            (g_squares * a_complement.unsqueeze(-1)).sum(-2),
            (a_squares * g_complement.unsqueeze(-1)).sum(-2),
            (g_complement * a_complement).sum(-1),
        )


@dataclass
class TokenInputs:
    """A diagonal factor's input rows (an embedding's): row t is the one-hot e_token(t), whose
    squared coordinates in A's basis (the unit vectors, every mode kept) are itself and whose
    complement is empty. ``width`` is d_A (the vocabulary)."""

    tokens: Tensor
    width: int
    u_g: Tensor

    def paired(self, g_squares: Tensor, g_complement: Tensor) -> SecondMoments:
        """The sums of :meth:`RotatedInputs.paired` for one-hot rows: the G rows' squares added
        into the column of their token (core, and cols for the G complement); X and Z are empty."""
        core = g_squares.new_zeros(g_squares.shape[-1], self.width).index_add_(1, self.tokens, g_squares.mT)
        cols = g_complement.new_zeros(self.width).index_add_(0, self.tokens, g_complement)
        return SecondMoments(core, g_squares.new_zeros(g_squares.shape[-1]), cols, g_squares.new_zeros(()))


@dataclass
class LayerScales:
    """One layer's EKFAC scales s (per block, :class:`SecondMoments` layout) and the basis they are in."""

    scales: SecondMoments
    basis: tuple[Tensor, Tensor | None]  # (U_G, U_A); U_A None: the identity (a diagonal A)

    def state_dict(self) -> dict[str, Any]:
        return {"scales": self.scales.as_dict(), "basis": list(self.basis)}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> LayerScales:
        scales = SecondMoments(**{name: t.to(device) for name, t in state["scales"].items()})
        u_g, u_a = state["basis"]
        return cls(scales, (u_g.to(device), None if u_a is None else u_a.to(device)))


def _rotated_rows(rows: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """((rows U)², ‖rows‖² − ‖rows U‖² floored): a row's squared coordinates in the kept modes
    and its squared norm in the complement, in the dtype of ``rows`` (outside any autocast)."""
    with torch.autocast(rows.device.type, enabled=False):
        squares = (rows @ basis.to(rows.dtype)).square_()
    norms = rows.square().sum(-1)
    kept = squares.sum(-1)
    return squares, torch.maximum(norms - kept, torch.finfo(rows.dtype).eps * norms)


def eigenvalue_products(pairs: tuple[FactorInverse, FactorInverse]) -> SecondMoments:
    """K-FAC's scales in its own basis: λ_G λ_Aᵀ on the kept modes, 0 on the complements."""
    a_pairs, g_pairs = pairs
    values_g, values_a = g_pairs.values, a_pairs.values
    core = values_g.unsqueeze(-1) * values_a.unsqueeze(-2)
    return SecondMoments(core, torch.zeros_like(values_g), torch.zeros_like(values_a), values_g.new_zeros(values_g.shape[:-1]))


def _per_block(damping: Damping, like: Tensor, extra_dims: int) -> Damping:
    """A factor damping broadcastable against a block statistic: a per-block tensor (B,) gains
    ``extra_dims`` trailing dimensions; a float stays as it is."""
    if isinstance(damping, Tensor):
        return damping.to(like.dtype).reshape(*damping.shape, *([1] * extra_dims))
    return damping


def damped_scales(
    scales: SecondMoments, pairs: tuple[FactorInverse, FactorInverse], dampings: tuple[Damping, Damping]
) -> SecondMoments:
    """1 / D per block (module docstring): the measured scales plus the damping terms of K-FAC's
    damped product, the complements' eigenvalues taken as 0."""
    (a_pairs, g_pairs), (a_damping, g_damping) = pairs, dampings
    values_g, values_a = g_pairs.values, a_pairs.values
    d_g2, d_a2 = _per_block(g_damping, values_g, 2), _per_block(a_damping, values_a, 2)
    d_g1, d_a1 = _per_block(g_damping, values_g, 1), _per_block(a_damping, values_a, 1)
    d_g0, d_a0 = _per_block(g_damping, values_g, 0), _per_block(a_damping, values_a, 0)
    core = scales.core + d_g2 * values_a.unsqueeze(-2) + values_g.unsqueeze(-1) * d_a2 + d_g2 * d_a2
    rows = scales.rows + values_g * d_a1 + d_g1 * d_a1
    cols = scales.cols + d_g1 * values_a + d_g1 * d_a1
    rest = scales.rest + d_g0 * d_a0
    return SecondMoments(core.reciprocal(), rows.reciprocal(), cols.reciprocal(), rest.reciprocal())


class EigenvalueCorrection:
    """The direction rule of :class:`rkfac.LowRankEKFAC` (module docstring), and the
    :class:`RowObserver` that measures its statistic in the preconditioner's hooks."""

    needs_pairs = True  # a layer without a decomposition keeps its plain gradient, as in K-FAC

    def __init__(self, carry: str = "keep") -> None:
        if carry not in EKFAC_CARRY:
            raise ValueError(f"carry={carry!r}: the eigenvalue-corrected scales take one of {EKFAC_CARRY}")
        self.carry = carry
        self.layers: dict[str, LayerScales] = {}
        self._sums: dict[str, SecondMoments] = {}  # this factor step's raw sums, per layer
        self._batch: dict[str, SecondMoments] = {}  # ŝ, taken from the sums at the step

    # ------------------------------------------------------------------ the hooks (RowObserver)

    def on_input_rows(self, name: str, rows: Tensor) -> RotatedInputs | None:
        """Rotate one call's input rows into the layer's basis (None before it has one)."""
        state = self.layers.get(name)
        if state is None:
            return None
        u_g, u_a = state.basis
        assert u_a is not None, f"layer {name}: dense input rows for a diagonal A"
        squares, complement = _rotated_rows(rows, u_a)
        return RotatedInputs(squares, complement, u_g)

    def on_input_tokens(self, name: str, tokens: Tensor) -> TokenInputs | None:
        """An embedding's call: its tokens, whose one-hot rows need no rotation (None before a basis)."""
        state = self.layers.get(name)
        if state is None:
            return None
        return TokenInputs(tokens, state.scales.cols.shape[-1], state.basis[0])

    def on_output_grad_rows(self, name: str, inputs: RotatedInputs | TokenInputs | None, rows: Tensor) -> None:
        """Pair the output-gradient rows with their call's rotated inputs, row by row, into the sums."""
        if inputs is None:
            return
        g_squares, g_complement = _rotated_rows(rows, inputs.u_g)
        with torch.autocast(rows.device.type, enabled=False):
            batch = inputs.paired(g_squares, g_complement)
        sums = self._sums.get(name)
        if sums is None:
            self._sums[name] = batch
        else:
            for field in ("core", "rows", "cols", "rest"):
                getattr(sums, field).add_(getattr(batch, field))

    # ------------------------------------------------------------------ the step

    def take_batch(self, name: str, grad_scale: float, dims: tuple[int, int]) -> None:
        """ŝ of one layer from this step's sums: ``grad_scale`` is c_G (divided by a loss scale²),
        ``dims`` (d_G, d_A) count the complement entries."""
        sums = self._sums.pop(name, None)
        if sums is None:
            return
        d_g, d_a = dims
        r_g, r_a = sums.core.shape[-2:]
        per_row, per_col = max(d_a - r_a, 1), max(d_g - r_g, 1)
        self._batch[name] = SecondMoments(
            sums.core * grad_scale,
            sums.rows * (grad_scale / per_row),
            sums.cols * (grad_scale / per_col),
            sums.rest * (grad_scale / (per_row * per_col)),
        )

    def fold(self, name: str, decay: float) -> bool:
        """s ← ρ s + (1 − ρ) ŝ for a layer whose K-FAC statistics passed the guards; False (and
        s unchanged) if ŝ itself is not finite: it holds fourth powers of the rows, which can
        overflow where the Gram products do not."""
        batch = self._batch.pop(name, None)
        state = self.layers.get(name)
        if batch is None or state is None:
            return True
        if not all(all_finite(list(batch.as_dict().values()))):  # one host sync
            return False
        state.scales.lerp_(batch, 1 - decay)
        return True

    def clear_rows(self) -> None:
        """Drop what the hooks collected since the last step (the collector clears with it)."""
        self._sums.clear()

    def clear_batch(self) -> None:
        """Drop the ŝ that were not folded (a layer whose statistics the guards rejected)."""
        self._batch.clear()

    def average_batch(self, average: Callable[[list[Tensor]], list[Tensor]]) -> None:
        """ŝ of every layer averaged over data-parallel ranks (``average``: the communicator's mean
        over ranks of a list of tensors, one all-reduce), as the K-FAC statistics are: each rank's
        ŝ carries its own c_G as its S_G does, so the mean is the global batch's statistic. The
        bases are the same on every rank (the decompositions are shared), and so are the layers
        with a ŝ: they are the layers with statistics, in model order."""
        names = list(self._batch)
        fields = ("core", "rows", "cols", "rest")
        averaged = iter(average([getattr(self._batch[name], field) for name in names for field in fields]))
        for name in names:
            self._batch[name] = SecondMoments(*(next(averaged) for _ in fields))

    def direction(
        self, name: str, grad: Tensor, pairs: tuple[FactorInverse, FactorInverse] | None, dampings: DampingsOf | None = None
    ) -> Tensor:
        if pairs is None or dampings is None:
            raise ValueError(f"layer {name}: the eigenvalue correction needs the layer's decompositions and dampings")
        a_pairs, g_pairs = pairs
        if isinstance(g_pairs, DiagonalFactor):
            raise ValueError(f"layer {name}: the eigenvalue correction takes a diagonal factor on the input side only")
        u_g, u_a = basis_of(g_pairs), basis_of(a_pairs)  # U_A None: a diagonal A, its own basis
        assert u_g is not None
        state = self._scales(name, pairs, (u_g, u_a))
        left = u_g.mT @ grad
        right = grad if u_a is None else grad @ u_a
        if u_a is None:
            core = left
        else:  # from the cheaper side
            core = left @ u_a if grad.shape[-1] <= grad.shape[-2] else u_g.mT @ right
        d_g, d_a = grad.shape[-2:]
        r_g, r_a = core.shape[-2:]
        counts = (d_a - r_a, d_g - r_g, (d_g - r_g) * (d_a - r_a))
        scales = damped_scales(state.scales, pairs, dampings(a_pairs, g_pairs)).filled(counts)
        return scaled_in_blocks((grad, left, right, core), (u_g, u_a), scales)

    def _scales(self, name: str, pairs: tuple[FactorInverse, FactorInverse], basis: tuple[Tensor, Tensor | None]) -> LayerScales:
        """The layer's scales in ``basis``: created, or carried over if the basis changed."""
        state = self.layers.get(name)
        if state is None or (state.scales.core.shape[:-2] != basis[0].shape[:-2]):
            state = LayerScales(eigenvalue_products(pairs), basis)
            self.layers[name] = state
            return state
        old = state.basis
        if all(same_basis(a, b) for a, b in zip(old, basis, strict=True)):
            state.basis = basis
            return state
        ranks = (basis[0].shape[-1], state.scales.core.shape[-1] if basis[1] is None else basis[1].shape[-1])
        if self.carry == "reset":
            state.scales = eigenvalue_products(pairs)
        elif self.carry == "rotate":
            state.scales = state.scales.rotated(old, basis)
        else:
            state.scales = state.scales.resized(ranks)
        state.basis = basis
        return state

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {name: layer.state_dict() for name, layer in self.layers.items()}

    def load_state_dict(self, state: dict[str, Any], devices: dict[str, torch.device]) -> None:
        self.layers = {name: LayerScales.from_state(entry, devices[name]) for name, entry in state.items()}
        self.clear_rows()
        self.clear_batch()


__all__ = [
    "EKFAC_CARRY",
    "EigenvalueCorrection",
    "LayerScales",
    "RotatedInputs",
    "TokenInputs",
    "damped_scales",
    "eigenvalue_products",
]
