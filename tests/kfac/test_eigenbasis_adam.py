"""rkfac.LowRankSOAP (Adam in K-FAC's eigenbasis) against a dense SOAP written here.

The reference keeps dense float64 matrices: the bases come from ``torch.linalg.eigh`` of the
preconditioner's factors at full rank (the factors themselves are checked against hand-computed
statistics in test_statistics), or are read from the preconditioner when truncated; the
complement is formed explicitly with the projectors U Uᵀ; the carry of v is written as an
einsum over its definition. Nothing here calls rkfac's rotation code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from rkfac.kfac.eigenbasis_adam import SecondMoments
from tests.oracles import batch, grad_matrix, mlp, saved_and_loaded

DTYPE = torch.float64
BETAS = (0.9, 0.8)  # unequal, so that a swapped β cannot pass
EPS = 1e-8


def completed(u: Tensor) -> Tensor:
    """An orthonormal basis of the complement of span(u): the last columns of a full QR."""
    q, _ = torch.linalg.qr(u, mode="complete")
    return q[:, u.shape[1] :]


class DenseSOAP:
    """One layer's step with the basis completed densely: the full rotated gradient
    [U_G, U_G⊥]ᵀ ∇W [U_A, U_A⊥] is formed, its blocks' second moments are plain means over the
    block (per kept mode, per row / column, one for the rest), and m̂ is scaled block by block
    and rotated back, the module docstring's algorithm with explicit matrices."""

    def __init__(self, carry: str) -> None:
        self.carry = carry
        self.m: Tensor | None = None
        self.moments: list[Tensor] = []  # core, rows, cols, rest
        self.t = self.t_second = 0
        self.basis: tuple[Tensor, Tensor] | None = None

    def _carry(self, new_g: Tensor, new_a: Tensor) -> None:
        assert self.basis is not None
        old_g, old_a = self.basis
        core, rows, cols, rest = self.moments
        if self.carry == "reset":
            self.moments = [
                torch.zeros(new_g.shape[1], new_a.shape[1], dtype=DTYPE),
                torch.zeros(new_g.shape[1], dtype=DTYPE),
                torch.zeros(new_a.shape[1], dtype=DTYPE),
                torch.zeros((), dtype=DTYPE),
            ]
            self.t_second = 0
            return
        if self.carry == "keep":

            def fit(moment: Tensor, shape: tuple[int, ...]) -> Tensor:
                out = torch.full(shape, float(rest), dtype=DTYPE)
                kept = tuple(slice(0, min(a, b)) for a, b in zip(shape, moment.shape, strict=True))
                out[kept] = moment[kept]
                return out

            r_g, r_a = new_g.shape[1], new_a.shape[1]
            self.moments = [fit(core, (r_g, r_a)), fit(rows, (r_g,)), fit(cols, (r_a,)), rest]
            return
        w_g, w_a = (new_g.T @ old_g) ** 2, (new_a.T @ old_a) ** 2
        lost_g, lost_a = (1 - w_g.sum(1)).clamp(min=0), (1 - w_a.sum(1)).clamp(min=0)
        rows_in_new, cols_in_new = w_g @ rows, w_a @ cols
        carried = torch.einsum("ik,jl,kl->ij", w_g, w_a, core)
        carried = (
            carried + torch.outer(rows_in_new, lost_a) + torch.outer(lost_g, cols_in_new) + torch.outer(lost_g, lost_a) * rest
        )
        self.moments = [carried, rows_in_new + lost_g * rest, cols_in_new + lost_a * rest, rest]

    def step(self, grad: Tensor, u_g: Tensor, u_a: Tensor) -> Tensor:
        beta1, beta2 = BETAS
        grad = grad.double()
        r_g, r_a = u_g.shape[1], u_a.shape[1]
        if self.m is None:
            self.m = torch.zeros_like(grad)
            self.moments = [
                torch.zeros(r_g, r_a, dtype=DTYPE),
                torch.zeros(r_g, dtype=DTYPE),
                torch.zeros(r_a, dtype=DTYPE),
                torch.zeros((), dtype=DTYPE),
            ]
        elif self.basis is not None and not (torch.equal(self.basis[0], u_g) and torch.equal(self.basis[1], u_a)):
            self._carry(u_g, u_a)
        self.basis = (u_g, u_a)
        self.t += 1
        self.t_second += 1
        full_g, full_a = torch.cat([u_g, completed(u_g)], 1), torch.cat([u_a, completed(u_a)], 1)
        rotated = full_g.T @ grad @ full_a
        blocks = [
            rotated[:r_g, :r_a] ** 2,
            (rotated[:r_g, r_a:] ** 2).mean(1) if rotated.shape[1] > r_a else torch.zeros(r_g, dtype=DTYPE),
            (rotated[r_g:, :r_a] ** 2).mean(0) if rotated.shape[0] > r_g else torch.zeros(r_a, dtype=DTYPE),
            (rotated[r_g:, r_a:] ** 2).mean() if rotated[r_g:, r_a:].numel() else torch.zeros((), dtype=DTYPE),
        ]
        self.moments = [beta2 * old + (1 - beta2) * new for old, new in zip(self.moments, blocks, strict=True)]
        self.m = beta1 * self.m + (1 - beta1) * grad
        m_hat = full_g.T @ (self.m / (1 - beta1**self.t)) @ full_a
        core, rows, cols, rest = ((v / (1 - beta2**self.t_second)).sqrt() + EPS for v in self.moments)
        scaled = torch.empty_like(m_hat)
        scaled[:r_g, :r_a] = m_hat[:r_g, :r_a] / core
        scaled[:r_g, r_a:] = m_hat[:r_g, r_a:] / rows[:, None]
        scaled[r_g:, :r_a] = m_hat[r_g:, :r_a] / cols[None, :]
        scaled[r_g:, r_a:] = m_hat[r_g:, r_a:] / rest
        return full_g @ scaled @ full_a.T


def assert_close_scaled(actual: Tensor, expected: Tensor, where: str) -> None:
    """Equal to 1e-8 of the direction's largest entry: a factor's null modes (the output layer's
    G, whose rows sum to zero) carry gradient at the rounding level, which Adam divides by its own
    root, so their entries agree only to about that."""
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= 1e-8 * scale, f"{where}: max |difference| {error:.3g} against max |entry| {scale:.3g}"


def descending_eigenvectors(factor: Tensor) -> Tensor:
    _, vectors = torch.linalg.eigh(factor.double())
    return vectors.flip(-1)


def soap(model: nn.Module, **options: object) -> rkfac.LowRankSOAP:
    defaults: dict[str, object] = {"beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "lr": 0.01, "weight_decay": 0.0}
    return rkfac.LowRankSOAP(model, **{**defaults, **options})


def step_and_read(model: nn.Module, opt: rkfac.LowRankSOAP, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One step on batch ``seed``: the raw gradient matrices and the directions written into .grad."""
    x, y = batch(seed, dtype=next(model.parameters()).dtype)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    raw = {name: grad_matrix(m) for name, m in layers.items()}
    opt.step()
    return raw, {name: grad_matrix(m) for name, m in layers.items()}


@pytest.mark.parametrize("carry", ["rotate", "keep", "reset"])
def test_full_rank_equals_dense_soap_in_the_factors_eigenbasis(carry: str) -> None:
    """r = d: no complement; the basis changes every 2 steps, so the carry is exercised."""
    model = mlp()
    opt = soap(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=2, carry=carry)
    references = {name: DenseSOAP(carry) for name in opt.preconditioner.layer_names}
    bases: dict[str, tuple[Tensor, Tensor]] = {}
    for step in range(7):
        raw, directions = step_and_read(model, opt, step)
        if step % 2 == 0:
            factors = opt.preconditioner.factors()
            bases = {name: (descending_eigenvectors(g), descending_eigenvectors(a)) for name, (a, g) in factors.items()}
        for name, reference in references.items():
            expected = reference.step(raw[name], *bases[name])
            assert_close_scaled(directions[name], expected, f"{name}, step {step}")


def test_truncated_basis_gives_the_complement_one_adam_scale() -> None:
    """r < d: the bases are the decomposition's (read back); the complement is formed densely."""
    model = mlp()
    decomposition = rkfac.SymmetricRandomizedEVD(rank=3, oversample=2, power_iters=2)
    opt = soap(model, decomposition=decomposition, factor_every=1, inverse_every=3, carry="rotate")
    references = {name: DenseSOAP("rotate") for name in opt.preconditioner.layer_names}
    for step in range(7):
        raw, directions = step_and_read(model, opt, step)
        pairs = opt.preconditioner.eigenpairs()
        for name, reference in references.items():
            a_pairs, g_pairs = pairs[name]
            assert g_pairs.rank < g_pairs.dim or a_pairs.rank < a_pairs.dim
            expected = reference.step(raw[name], g_pairs.vectors.double(), a_pairs.vectors.double())
            assert_close_scaled(directions[name], expected, f"{name}, step {step}")


def test_rotate_carry_keeps_the_mass_of_an_orthogonal_change_and_permutes_exactly() -> None:
    """For a full-rank change of basis O ⊙ O is doubly stochastic, so Σ v is kept; a permutation
    with sign flips moves each entry to its new place; a mode the old basis did not keep takes the
    complement's moments."""
    generator = torch.Generator().manual_seed(0)
    v = torch.rand(4, 3, generator=generator, dtype=DTYPE)
    e = torch.tensor(0.25, dtype=DTYPE)
    old_g = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=DTYPE))[0]
    old_a = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=DTYPE))[0]
    new_g = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=DTYPE))[0]

    def carried_second_moment(core: Tensor, rest: Tensor, old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor]) -> Tensor:
        rows, cols = rest.expand(core.shape[0]).clone(), rest.expand(core.shape[1]).clone()  # complements carry e
        return SecondMoments(core, rows, cols, rest).rotated(old, new).core

    moved = carried_second_moment(v, e, (old_g, old_a), (new_g, old_a))
    torch.testing.assert_close(moved.sum(), v.sum())
    order, signs = torch.tensor([2, 0, 3, 1]), torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DTYPE)
    permuted = carried_second_moment(v, e, (old_g, old_a), (old_g[:, order] * signs, old_a))
    torch.testing.assert_close(permuted, v[order])
    half = carried_second_moment(v[:2], e, (old_g[:, :2], old_a), (old_g[:, 1:3], old_a))  # mode 2 was not kept
    torch.testing.assert_close(half, torch.stack([v[1], torch.full((3,), 0.25, dtype=DTYPE)]))


def test_embedding_side_is_the_identity_basis() -> None:
    """An embedding's A is diagonal: its basis is the unit vectors, every mode kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 5), nn.Flatten(), nn.Linear(15, 3)).to(DTYPE)
    opt = soap(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, carry="rotate")
    reference = DenseSOAP("rotate")
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        tokens, y = torch.randint(0, 9, (16, 3), generator=generator), torch.randint(0, 3, (16,), generator=generator)
        opt.zero_grad()
        F.cross_entropy(model(tokens), y).backward()
        raw = grad_matrix(model[0])
        opt.step()
        _, g = opt.preconditioner.factors()["0"]
        expected = reference.step(raw, descending_eigenvectors(g), torch.eye(raw.shape[1], dtype=DTYPE))
        assert_close_scaled(grad_matrix(model[0]), expected, "embedding")


def test_grouped_convolution_rotates_each_block_in_its_own_basis() -> None:
    """Two groups: each block's direction equals the dense reference in that block's eigenbasis."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(24, 3)).to(DTYPE)
    opt = soap(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1, carry="rotate")
    references = [DenseSOAP("rotate"), DenseSOAP("rotate")]
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(8, 4, 4, 4, generator=generator, dtype=DTYPE), torch.randint(0, 3, (8,), generator=generator)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = conv.weight.grad.reshape(2, 3, -1).clone(), conv.bias.grad.reshape(2, 3, 1).clone()
        opt.step()
        a, g = opt.preconditioner.factors()["0"]
        done = conv.weight.grad.reshape(2, 3, -1), conv.bias.grad.reshape(2, 3, 1)
        for block, reference in enumerate(references):
            block_grad = torch.cat([raw[0][block], raw[1][block]], 1)
            expected = reference.step(block_grad, descending_eigenvectors(g[block]), descending_eigenvectors(a[block]))
            assert_close_scaled(torch.cat([done[0][block], done[1][block]], 1), expected, f"block {block}")


def test_decoupled_weight_decay_and_adamw_for_the_other_parameters() -> None:
    """p ← p − lr (direction + wd p) on the preconditioned layers; a LayerNorm gets torch's AdamW
    with the same lr, betas, ε and decay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)).to(DTYPE)
    opt = soap(model, lr=0.05, weight_decay=0.1, decomposition=rkfac.ExactEigh())
    assert opt.groups()["fallback AdamW"] == ["1.weight", "1.bias"]
    norm_copy = [p.detach().clone().requires_grad_() for p in model[1].parameters()]
    adamw = torch.optim.AdamW(norm_copy, lr=0.05, betas=BETAS, eps=EPS, weight_decay=0.1)
    for seed in range(3):
        before = model[0].weight.detach().clone()
        x, y = batch(seed, dtype=DTYPE)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for copy, p in zip(norm_copy, model[1].parameters(), strict=True):
            copy.grad = p.grad.clone()
        opt.step()
        adamw.step()
        direction = model[0].weight.grad
        torch.testing.assert_close(model[0].weight.detach(), before - 0.05 * (direction + 0.1 * before))
        for copy, p in zip(norm_copy, model[1].parameters(), strict=True):
            torch.testing.assert_close(p.detach(), copy.detach(), rtol=0, atol=0)


def test_state_dict_round_trip_continues_bitwise() -> None:
    decomposition = rkfac.SymmetricRandomizedEVD(rank=3, oversample=2, power_iters=1)

    def make() -> tuple[nn.Module, rkfac.LowRankSOAP]:
        model = mlp(dtype=torch.float32)
        return model, rkfac.LowRankSOAP(model, decomposition=decomposition, factor_every=2, inverse_every=3, seed=1)

    model, opt = make()
    for step in range(10):
        step_and_read(model, opt, step)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    model, opt = make()
    for step in range(5):
        step_and_read(model, opt, step)
    saved = saved_and_loaded({"model": model.state_dict(), "optimizer": opt.state_dict()})
    older = saved_and_loaded(saved)  # a second copy: loading shares the tensors, which the steps update
    model, opt = make()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    for step in range(5, 10):
        step_and_read(model, opt, step)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters(), strict=True))
    # a checkpoint saved before U_Gᵀ m U_A was kept: it is computed from U_Gᵀ m on load (equal up
    # to rounding, since both are averages of the same rotations)
    for entry in older["optimizer"]["preconditioner"]["direction"].values():  # type: ignore[index]
        del entry["first_core"]
    model, opt = make()
    model.load_state_dict(older["model"])
    opt.load_state_dict(older["optimizer"])
    for step in range(5, 10):
        step_and_read(model, opt, step)
    for a, b in zip(uninterrupted, model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    kfac = rkfac.KFAC(mlp(dtype=torch.float32), decomposition=decomposition)
    with pytest.raises(ValueError, match="direction rule"):
        kfac.load_state_dict(saved["optimizer"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"momentum": 0.9}, "momentum"),
        ({"damping": 0.1}, "damping"),
        ({"damping_mode": "pi"}, "damping_mode"),
        ({"clip": "rms"}, "clip"),
        ({"beta1": 1.0}, "beta1"),
        ({"carry": "rotated"}, "rotated"),
    ],
)
def test_settings_it_cannot_use_are_refused_by_name(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rkfac.LowRankSOAP(mlp(), **options)


def test_correlated_inputs_train_better_than_adamw_at_each_ones_best_lr() -> None:
    """A behavioural check with a margin: linear regression whose inputs mix four strong
    directions (scales 30, 10, 3, 1) and twelve weak ones (0.1) by a random rotation. Rank 4 of the
    17-wide A holds the strong ones; after 100 steps, each optimizer at its best lr of
    {0.01, 0.03, 0.1}, the eigenbasis Adam ends below 0.9 × AdamW's loss (measured: 0.64
    against 1.35)."""
    generator = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    scales = torch.cat([torch.tensor([30.0, 10.0, 3.0, 1.0]), torch.full((12,), 0.1)])
    mixing = (rotation * scales) @ rotation.T
    true_weight = torch.randn(3, 16, generator=generator)

    def final_loss(build: Callable[[nn.Module], torch.optim.Optimizer]) -> float:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 3))
        opt = build(model)
        for step in range(100):
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(100 + step % 8)) @ mixing
            opt.zero_grad()
            loss = F.mse_loss(model(x), x @ true_weight.T)
            loss.backward()
            opt.step()
        return float(loss.detach())

    lrs = (0.01, 0.03, 0.1)
    decomposition = rkfac.SymmetricRandomizedEVD(rank=4, oversample=2)
    schedule = {"factor_every": 1, "inverse_every": 5}
    ours = min(
        final_loss(lambda m, lr=lr: rkfac.LowRankSOAP(m, lr=lr, weight_decay=0.0, decomposition=decomposition, **schedule))
        for lr in lrs
    )
    adamw = min(
        final_loss(lambda m, lr=lr: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.95, 0.95), weight_decay=0.0)) for lr in lrs
    )
    assert ours < 0.9 * adamw, (ours, adamw)


def test_the_command_line_refuses_what_sre_soap_does_not_read() -> None:
    from rkfac.experiments.presets import resolve_config

    for override in ({"momentum": 0.9}, {"damping": 0.2}, {"clip": "rms"}, {"clip_value": 0.01}, {"apply_dtype": "bfloat16"}):
        with pytest.raises(ValueError, match=next(iter(override))):
            resolve_config("sre-soap", "fashion-autoencoder", override)
    config = resolve_config("sre-soap", "fashion-autoencoder", {"lr": 0.01, "carry": "keep"})
    assert (config.lr, config.carry, config.clip, config.inverse_every) == (0.01, "keep", "none", 10)


def _run_with_scaler(
    build: Callable[..., torch.optim.Optimizer], scale: float | None, overflow_at: int | None = None, steps: int = 4
) -> nn.Module:
    """A float32 MLP with a LayerNorm (so a fallback optimizer steps it) trained ``steps`` steps,
    the loss scaled by a GradScaler when ``scale`` is given; at step ``overflow_at`` one of the
    LayerNorm's gradients is inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    opt = build(model, scaler)
    for step in range(steps):
        x, y = batch(step, dtype=torch.float32)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()
        if step == overflow_at:
            model[1].weight.grad[0] = float("inf")  # a fallback parameter's gradient overflows
        scaler.step(opt)
        scaler.update()
    return model


@pytest.mark.parametrize("method", ["soap", "kfac-with-fallback"])
def test_a_grad_scaler_unscales_the_fallback_parameters_too(method: str) -> None:
    """With a GradScaler every parameter, the fallback optimizer's included, steps on the unscaled
    gradient (the same parameters as without a scaler), and an overflow in a fallback parameter's
    gradient skips the whole step, as torch's scaler does for one optimizer."""

    def build(model: nn.Module, scaler: torch.amp.GradScaler | None) -> torch.optim.Optimizer:
        decomposition = rkfac.ExactEigh()
        if method == "soap":
            return rkfac.LowRankSOAP(model, lr=0.01, decomposition=decomposition, factor_every=1, grad_scaler=scaler)
        fallback = functools.partial(torch.optim.SGD, lr=0.1)
        return rkfac.KFAC(model, lr=0.1, decomposition=decomposition, factor_every=1, fallback=fallback, grad_scaler=scaler)

    plain = _run_with_scaler(build, None)
    scaled = _run_with_scaler(build, 2.0**12)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    overflowed = _run_with_scaler(build, 2.0**12, overflow_at=3)
    three_steps = _run_with_scaler(build, 2.0**12, steps=3)
    assert all(torch.equal(p, q) for p, q in zip(overflowed.parameters(), three_steps.parameters(), strict=True))


def test_the_mc_fisher_builds_the_same_factors_as_for_kfac() -> None:
    """The basis comes from the preconditioner K-FAC uses: with fisher="mc" and the same seed,
    LowRankSOAP's factors after a step equal rkfac.KFAC's (the sampled labels included)."""
    factors = []
    for build in (rkfac.LowRankSOAP, rkfac.KFAC):
        model = mlp()
        opt = build(model, fisher="mc", seed=3, decomposition=rkfac.ExactEigh(), factor_every=1)
        x, y = batch(0, dtype=DTYPE)
        opt.zero_grad()
        logits = model(x)
        opt.preconditioner.sample_fisher(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()
        factors.append(opt.preconditioner.factors())
    for name, (a, g) in factors[0].items():
        assert torch.equal(a, factors[1][name][0]) and torch.equal(g, factors[1][name][1]), name


def test_before_its_first_statistics_a_layer_steps_as_adamw_and_keeps_float32_moments() -> None:
    """A backward in eval mode captures nothing, so no layer has a basis: the identity on both
    sides makes the step torch's AdamW (same lr, betas, ε, decay). A bfloat16 model's moments are
    kept in float32 then too, the dtype its factors will have."""
    model = mlp()
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = soap(model, lr=0.05, weight_decay=0.1)
    adamw = torch.optim.AdamW(reference, lr=0.05, betas=BETAS, eps=EPS, weight_decay=0.1)
    for seed in range(2):
        x, y = batch(seed, dtype=DTYPE)
        model.eval()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for copy, p in zip(reference, model.parameters(), strict=True):
            copy.grad = p.grad.clone()
        opt.step()
        adamw.step()
    assert opt.preconditioner.eigenpairs() == {}
    for p, q in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)

    low = mlp(dtype=torch.bfloat16)
    opt = rkfac.LowRankSOAP(low)
    x, y = batch(0, dtype=torch.bfloat16)
    for training in (False, True):  # no statistics, then the first basis
        low.train(training)
        opt.zero_grad()
        F.cross_entropy(low(x).float(), y).backward()
        opt.step()
    moments = opt.preconditioner.direction.moments["0"]  # type: ignore[attr-defined]
    assert moments.first.dtype == moments.second.core.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in low.parameters())


def test_the_library_and_the_command_line_share_the_defaults() -> None:
    """rkfac.LowRankSOAP(model) and `--optimizer sre-soap` build the same basis schedule: rank,
    warm start, factors and bases every k steps, lr and decay (issue 21's measured defaults)."""
    from rkfac.experiments.optimizers import decomposition_for
    from rkfac.experiments.presets import resolve_config

    opt = rkfac.LowRankSOAP(mlp())
    config = resolve_config("sre-soap")
    library, cli = opt.preconditioner.options.decomposition, decomposition_for(config, steps_per_epoch=100)
    assert isinstance(library, rkfac.SymmetricRandomizedEVD) and isinstance(cli, rkfac.SymmetricRandomizedEVD)
    assert library.rank_at(0) == cli.rank_at(0) == 64
    assert library.warm_start and cli.warm_start
    assert (opt.preconditioner.options.factor_every, opt.preconditioner.options.inverse_every) == (3, 10)
    assert (config.factor_every, config.inverse_every) == (3, 10)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (config.lr, config.weight_decay) == (3e-3, 0.01)
