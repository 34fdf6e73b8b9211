"""Adam in the low-rank Kronecker eigenbasis: randomized SOAP (issue 21).

SOAP (Vyas et al. 2024) runs Adam in the eigenbasis of Kronecker factors; EKFAC (George et al.
2018) keeps K-FAC's eigenbasis and re-estimates each mode's scale from the gradients. Here the
basis is K-FAC's own: the kept eigenvectors U_G (d_G × r_G) and U_A (d_A × r_A) of G and A, from
any decomposition (exact, SRE, RSVD, Brand), on the usual ``inverse_every`` schedule. The
eigenvalues are not used: each mode's scale is learned from the gradients, as in Adam.

Per layer, with ∇W the gradient matrix (d_G × d_A, bias last) and t its step count::

    m ← β₁ m + (1 − β₁) ∇W                         first moment, dense, original coordinates
    C = U_Gᵀ ∇W U_A                                 the rotated gradient on the r_G × r_A core
    v ← β₂ v + (1 − β₂) C ⊙ C                       second moment of each kept mode pair
    e ← β₂ e + (1 − β₂) ‖∇W − U_G C U_Aᵀ‖² / n_⊥     one second moment for the complement
    m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ),  ê = e / (1 − β₂ᵗ)
    M = U_Gᵀ m̂ U_A,  s = 1 / (√ê + ε)
    direction = s m̂ + U_G [M / (√v̂ + ε) − s M] U_Aᵀ

so the kept modes get Adam's per-mode scale and the complement m̂ − U_G M U_Aᵀ (the part of
the gradient the truncated basis cannot rotate; n_⊥ = d_G d_A − r_G r_A entries) gets one
Adam scale for the whole layer, the low-rank analogue of K-FAC's 1/λ on the discarded modes.
The complement's energy is ‖∇W‖² − ‖C‖² (the bases are orthonormal), floored at the float
resolution of that difference, ε_float · ‖∇W‖², so that a gradient lying wholly in the kept
modes is not divided by ≈ 0. Cost per step O(d_G d_A (r_G + r_A)): three products with the
bases (C and M together, then the back-rotation), no d × d matrix; memory: m (d_G × d_A), v
(r_G × r_A), e and the basis v was measured in.

With r = d on both sides (the exact decomposition, or any rank ≥ d) there is no complement and
this is dense SOAP with K-FAC's factors as the Kronecker factors, Adam's ε inside the root's
sum: direction = U_G [M / (√v̂ + ε)] U_Aᵀ. A diagonal factor (an embedding's A) is its own
eigenbasis: that side is the identity, every mode kept. Grouped convolutions' block factors
rotate block by block (the products broadcast over the leading block dimension).

When a decomposition replaces the basis, ``carry`` says what v becomes:

- ``"rotate"`` (default): v measured in the old basis, read as the diagonal of a covariance
  that is diagonal there, rotated into the new one: with O = U_newᵀ U_old per side,
  v_new = (O_G ⊙ O_G) v (O_A ⊙ O_A)ᵀ + (1 − p_G p_Aᵀ) e, where p = rowsum(O ⊙ O) ≤ 1 is how much
  of each new mode the old basis held; the rest of it comes from the complement's e.
  O(d r²) per side, on decomposition steps only.
- ``"keep"``: v stays as it is (SOAP's choice: it only re-sorts, the modes being sorted by
  eigenvalue in both bases), padded with e or cut where the rank changed.
- ``"reset"``: v restarts from zero with its own bias-correction count (EKFAC re-estimates
  its scales after each new basis).

m lives in the original coordinates, so it needs no carrying. Weight decay is not here: the
optimizer (:class:`rkfac.optim.LowRankSOAP`) decays decoupled from this direction, as AdamW.
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


def rotate(matrix: Tensor, u_g: Tensor | None, u_a: Tensor | None) -> Tensor:
    """U_Gᵀ matrix U_A for matrix (..., d_G, d_A); a None basis is the identity."""
    if u_a is not None:
        matrix = matrix @ u_a
    if u_g is not None:
        matrix = u_g.mT @ matrix
    return matrix


def rotate_back(core: Tensor, u_g: Tensor | None, u_a: Tensor | None) -> Tensor:
    """U_G core U_Aᵀ for core (..., r_G, r_A)."""
    if u_g is not None:
        core = u_g @ core
    if u_a is not None:
        core = core @ u_a.mT
    return core


def _overlap(new: Tensor | None, old: Tensor | None) -> Tensor | None:
    """(O ⊙ O) with O = U_newᵀ U_old: how much of old mode j each new mode i holds; None if
    both are the identity."""
    if new is None and old is None:
        return None
    if new is None or old is None:
        raise ValueError("a factor's basis switched between the identity and eigenvectors")
    return (new.mT @ old).square()


def carried_second_moment(
    core_sq: Tensor, rest_sq: Tensor, old: tuple[Tensor | None, Tensor | None], new: tuple[Tensor | None, Tensor | None]
) -> Tensor:
    """``carry="rotate"``: v of the old basis (U_G, U_A) in the new one (see the module docstring)."""
    w_g, w_a = _overlap(new[0], old[0]), _overlap(new[1], old[1])
    carried = core_sq
    if w_g is not None:
        carried = w_g @ carried
    if w_a is not None:
        carried = carried @ w_a.mT
    held_g = w_g.sum(-1, keepdim=True) if w_g is not None else carried.new_ones(carried.shape[-2], 1)
    held_a = w_a.sum(-1).unsqueeze(-2) if w_a is not None else carried.new_ones(1, carried.shape[-1])
    return carried + (1 - held_g * held_a).clamp_(min=0) * rest_sq


def resized(core_sq: Tensor, shape: torch.Size, fill: Tensor) -> Tensor:
    """``carry="keep"``: v cut or padded (with the complement's value) to the new core's shape."""
    if core_sq.shape == shape:
        return core_sq
    out = fill.expand(shape).clone()
    rows, cols = min(shape[-2], core_sq.shape[-2]), min(shape[-1], core_sq.shape[-1])
    out[..., :rows, :cols] = core_sq[..., :rows, :cols]
    return out


@dataclass
class LayerMoments:
    """One layer's Adam state in its eigenbasis (see the module docstring)."""

    first: Tensor  # m, the gradient's shape
    core_sq: Tensor  # v, (..., r_G, r_A)
    rest_sq: Tensor  # e, a 0-dim tensor
    steps: int  # t, for the bias correction of m and e
    core_steps: int  # t of v (restarts with carry="reset")
    basis: tuple[Tensor | None, Tensor | None]  # (U_G, U_A) that v was measured in

    def state_dict(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "core_sq": self.core_sq,
            "rest_sq": self.rest_sq,
            "steps": self.steps,
            "core_steps": self.core_steps,
            "basis": list(self.basis),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> LayerMoments:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        u_g, u_a = state["basis"]
        return cls(
            state["first"].to(device),
            state["core_sq"].to(device),
            state["rest_sq"].to(device),
            int(state["steps"]),
            int(state["core_steps"]),
            (move(u_g), move(u_a)),
        )


def _same(old: Tensor | None, new: Tensor | None) -> bool:
    if old is None or new is None:
        return old is new
    return old is new or (old.shape == new.shape and torch.equal(old, new))


class EigenbasisAdam:
    """The direction rule of :class:`rkfac.optim.LowRankSOAP`: per layer, Adam on the rotated
    gradient's core and one Adam scale on the complement (module docstring). The preconditioner
    calls :meth:`direction` for every layer with a gradient, with its decompositions (or None
    before the first: then the whole gradient is complement, a single Adam scale per layer)."""

    def __init__(self, options: SOAPOptions) -> None:
        self.options = options
        self.moments: dict[str, LayerMoments] = {}

    def direction(self, name: str, grad: Tensor, pairs: tuple[FactorInverse, FactorInverse] | None) -> Tensor:
        a_pairs, g_pairs = pairs if pairs is not None else (None, None)
        if isinstance(a_pairs, BlockEigenpairs) != isinstance(g_pairs, BlockEigenpairs):
            raise ValueError(f"layer {name}: block eigenpairs must be on both sides")
        basis = (basis_of(g_pairs), basis_of(a_pairs))
        beta1, beta2, eps = self.options.beta1, self.options.beta2, self.options.eps
        state = self._moments(name, grad, basis)
        state.steps += 1
        state.core_steps += 1
        state.first.lerp_(grad, 1 - beta1)
        core_grad, core_first = rotate(torch.stack([grad, state.first]), *basis).unbind(0)
        state.core_sq.lerp_(core_grad.square(), 1 - beta2)
        rest_count = grad.numel() - core_grad.numel()
        if rest_count > 0:
            total = grad.square().sum()
            rest = torch.maximum(total - core_grad.square().sum(), total * torch.finfo(grad.dtype).eps)
            state.rest_sq.lerp_(rest / rest_count, 1 - beta2)
        first_correction = 1 - beta1**state.steps
        core_scale = 1 / ((state.core_sq / (1 - beta2**state.core_steps)).sqrt_().add_(eps))
        core_step = core_first * core_scale / first_correction
        if rest_count == 0:
            return rotate_back(core_step, *basis)
        rest_step = 1 / ((state.rest_sq / (1 - beta2**state.steps)).sqrt() + eps) / first_correction  # 0-dim, no sync
        core_step -= core_first * rest_step
        return rotate_back(core_step, *basis).add_(state.first * rest_step)

    def _moments(self, name: str, grad: Tensor, basis: tuple[Tensor | None, Tensor | None]) -> LayerMoments:
        """The layer's moments, with v carried into ``basis`` if the decomposition changed it."""
        u_g, u_a = basis
        rows = grad.shape[-2] if u_g is None else u_g.shape[-1]
        cols = grad.shape[-1] if u_a is None else u_a.shape[-1]
        core_shape = torch.Size((*grad.shape[:-2], rows, cols))
        state = self.moments.get(name)
        if state is None or state.first.shape != grad.shape:
            state = LayerMoments(
                torch.zeros_like(grad),
                grad.new_zeros(core_shape),
                grad.new_zeros(()),
                0,
                0,
                basis,
            )
            self.moments[name] = state
            return state
        if all(_same(old, new) for old, new in zip(state.basis, basis, strict=True)):
            state.basis = basis  # the same values (e.g. after a restore): keep the live tensors
            return state
        carry = self.options.carry
        if carry == "rotate":
            state.core_sq = carried_second_moment(state.core_sq, state.rest_sq, state.basis, basis)
        elif carry == "keep":
            state.core_sq = resized(state.core_sq, core_shape, state.rest_sq)
        else:  # reset
            state.core_sq = grad.new_zeros(core_shape)
            state.core_steps = 0
        state.basis = basis
        return state

    def state_dict(self) -> dict[str, Any]:
        return {name: moments.state_dict() for name, moments in self.moments.items()}

    def load_state_dict(self, state: dict[str, Any], devices: dict[str, torch.device]) -> None:
        self.moments = {name: LayerMoments.from_state(entry, devices[name]) for name, entry in state.items()}


__all__ = ["EigenbasisAdam", "LayerMoments", "basis_of", "carried_second_moment", "rotate", "rotate_back"]
