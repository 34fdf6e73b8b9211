"""rkfac.LowRankEKFAC (eigenvalue-corrected K-FAC in the low-rank eigenbasis) against a dense EKFAC
written here.

The reference takes the rows a_t, g_t of each layer by hand (the input with a ones column, the
output's gradient from autograd; a convolution's patches from ``F.unfold``), the factors as
their averages, their eigenvectors from ``torch.linalg.eigh`` (or, when truncated, the kept ones
read from the preconditioner and completed densely by QR), and the per-sample second moments of
the gradient in that full basis as an explicit sum over rows. A truncated basis's complement
blocks are the block means of that dense statistic. Nothing here calls rkfac's rotation code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from rkfac.kfac import KFACPreconditioner
from rkfac.kfac.eigenvalue_correction import EigenvalueCorrection
from rkfac.lowrank import Eigenpairs
from tests.oracles import grad_matrix, mlp, saved_and_loaded, with_ones

DTYPE = torch.float64
DECAY, DAMPING = 0.8, 0.05


def completed(u: Tensor) -> Tensor:
    """[u, u⊥]: u followed by an orthonormal basis of its complement (the last columns of a full QR)."""
    q, _ = torch.linalg.qr(u, mode="complete")
    return torch.cat([u, q[:, u.shape[1] :]], dim=1)


def descending(factor: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(factor)
    return values.flip(0).clamp(min=0), vectors.flip(1)


def block_means(full: Tensor, r_g: int, r_a: int) -> Tensor:
    """``full`` (d_G × d_A) with each complement block replaced by its means as the module
    docstring defines them: per row of X, per column of Y, one for Z."""
    out = full.clone()
    out[:r_g, r_a:] = full[:r_g, r_a:].mean(1, keepdim=True)
    out[r_g:, :r_a] = full[r_g:, :r_a].mean(0, keepdim=True)
    out[r_g:, r_a:] = full[r_g:, r_a:].mean()
    return out


def dense_ekfac_direction(
    grad: Tensor,
    rows: tuple[Tensor, Tensor],
    scale: float,
    kept: tuple[Tensor, Tensor],
    factors: tuple[Tensor, Tensor],
    initial: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """One EKFAC step after one fold of the statistic into K-FAC's eigenvalue products.

    ``rows`` (a (N, d_A), g (N, d_G)) are the step's rows and ``scale`` c_G; ``kept`` (U_G, U_A)
    the kept eigenvectors of the factors of the previous step, ``factors`` (G, A) those factors
    (for the eigenvalues and the relative damping); ``initial`` the factors whose eigenvalue
    products the scales started from, if not those."""
    a_rows, g_rows = rows
    (u_g, u_a), (g_factor, a_factor) = kept, factors
    q_g, q_a = completed(u_g), completed(u_a)
    r_g, r_a = u_g.shape[1], u_a.shape[1]

    def kept_values(u: Tensor, factor: Tensor, q: Tensor) -> Tensor:
        """The kept eigenvalues in that basis (uᵀ F u), 0 on the complement, as K-FAC's truncated solve has them."""
        return torch.cat([torch.einsum("di,de,ei->i", u, factor, u), torch.zeros(q.shape[1] - u.shape[1], dtype=DTYPE)])

    values_g, values_a = kept_values(u_g, g_factor, q_g), kept_values(u_a, a_factor, q_a)
    measured = scale * torch.einsum("ti,tj->ij", (g_rows @ q_g) ** 2, (a_rows @ q_a) ** 2)
    start_g, start_a = initial if initial is not None else factors
    products = torch.outer(kept_values(u_g, start_g, q_g), kept_values(u_a, start_a, q_a))  # zero on the complement blocks
    scales = DECAY * products + (1 - DECAY) * block_means(measured, r_g, r_a)
    lam_g = DAMPING * float(torch.linalg.eigvalsh(g_factor)[-1])
    lam_a = DAMPING * float(torch.linalg.eigvalsh(a_factor)[-1])
    damped = scales + lam_g * values_a[None, :] + values_g[:, None] * lam_a + lam_g * lam_a
    return q_g @ ((q_g.T @ grad @ q_a) / damped) @ q_a.T


def ekfac(model: nn.Module, **options: object) -> KFACPreconditioner:
    settings: dict[str, object] = {
        "factor_every": 1,
        "inverse_every": 100,
        "factor_decay": DECAY,
        "damping": DAMPING,
        "clip": None,
        **options,
    }
    return KFACPreconditioner(model, direction=EigenvalueCorrection(), **settings)  # type: ignore[arg-type]


def linear_rows(layer: nn.Linear, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """One mean-squared-error backward through ``layer``; its rows (a with ones, g = ∂loss/∂out)."""
    layer.zero_grad()
    out = layer(x)
    out.retain_grad()
    ((out - target) ** 2).sum(1).mean().backward()
    assert out.grad is not None
    return with_ones(x), out.grad


@pytest.mark.parametrize("rank", [None, 3])
def test_linear_step_equals_dense_ekfac(rank: int | None) -> None:
    """Step 0 builds the factors and their basis; step 1's rows are measured in that basis and
    folded once into the eigenvalue products; its direction is the dense EKFAC step, at full rank
    and with a truncated basis (whose complement blocks are the dense statistic's block means)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).to(DTYPE)
    model = nn.Sequential(layer)
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(6, 6, generator=generator, dtype=DTYPE)  # correlated inputs: A is not diagonal
    x0, x1 = (torch.randn(40, 6, generator=generator, dtype=DTYPE) @ mixing for _ in range(2))
    t0, t1 = (torch.randn(40, 5, generator=generator, dtype=DTYPE) for _ in range(2))
    decomposition = rkfac.ExactEigh() if rank is None else rkfac.SymmetricRandomizedEVD(rank=rank, oversample=4, power_iters=4)
    pre = ekfac(model, decomposition=decomposition)
    a0, g0 = linear_rows(layer, x0, t0)
    pre.step()
    n = x0.shape[0]
    a_factor, g_factor = a0.T @ a0 / n, n * g0.T @ g0  # mean loss: S_G = n Σ g gᵀ
    if rank is None:
        kept = (descending(g_factor)[1], descending(a_factor)[1])
    else:
        a_pairs, g_pairs = pre.eigenpairs()["0"]
        kept = (g_pairs.vectors, a_pairs.vectors)
    a1, g1 = linear_rows(layer, x1, t1)
    grad = grad_matrix(layer)
    pre.step()
    expected = dense_ekfac_direction(grad, (a1, g1), float(n), kept, (g_factor, a_factor))
    torch.testing.assert_close(grad_matrix(layer), expected, rtol=1e-9, atol=1e-12)


def test_convolution_pairs_each_patch_with_its_output_position() -> None:
    """A Conv2d's rows are its patches and output positions: the statistic pairs them row by row."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DTYPE)
    model = nn.Sequential(conv)
    generator = torch.Generator().manual_seed(2)
    x0, x1 = (torch.randn(4, 2, 5, 5, generator=generator, dtype=DTYPE) for _ in range(2))
    pre = ekfac(model, decomposition=rkfac.ExactEigh())

    def rows(x: Tensor) -> tuple[Tensor, Tensor]:
        conv.zero_grad()
        out = conv(x)
        out.retain_grad()
        (out**3).mean().backward()
        assert out.grad is not None
        patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 2 * 9)
        return with_ones(patches), out.grad.flatten(2).transpose(1, 2).reshape(-1, 3)

    a0, g0 = rows(x0)
    pre.step()
    n, positions = x0.shape[0], 25
    a_factor, g_factor = a0.T @ a0 / (n * positions), n * g0.T @ g0
    a1, g1 = rows(x1)
    grad = grad_matrix(conv)
    pre.step()
    kept = (descending(g_factor)[1], descending(a_factor)[1])
    expected = dense_ekfac_direction(grad, (a1, g1), float(n), kept, (g_factor, a_factor))
    torch.testing.assert_close(grad_matrix(conv), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 4])
def test_before_any_measurement_the_step_is_kfacs(rank: int | None) -> None:
    """A new basis starts from K-FAC's eigenvalue products: the first step equals rkfac's damped
    Kronecker solve with the same decomposition (truncated: the complement sees only damping)."""

    def step(direction: EigenvalueCorrection | None) -> dict[str, Tensor]:
        model = mlp(seed=3)
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
        decomposition = rkfac.ExactEigh() if rank is None else rkfac.SymmetricRandomizedEVD(rank=rank)
        pre = KFACPreconditioner(model, direction=direction, decomposition=decomposition, damping=0.1, clip=None)
        F.cross_entropy(model(x), torch.arange(32) % 4).backward()
        pre.step()
        return {name: grad_matrix(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    kfac, corrected = step(None), step(EigenvalueCorrection())
    for name in kfac:
        torch.testing.assert_close(corrected[name], kfac[name], rtol=1e-10, atol=1e-13)


def random_pairs(dim: int, seed: int) -> Eigenpairs:
    generator = torch.Generator().manual_seed(seed)
    vectors, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    values = torch.rand(dim, generator=generator, dtype=DTYPE).sort(descending=True).values
    return Eigenpairs(vectors, values, float(values.sum()), float(values[0]))


@pytest.mark.parametrize("carry", ["reset", "keep", "rotate"])
def test_a_new_basis_carries_the_scales_as_carry_says(carry: str) -> None:
    """Measured scales in one full-rank basis, then a new basis: reset gives the new eigenvalue
    products, keep the same numbers, rotate moves them with W = O ⊙ O (O = U_newᵀ U_old), which
    for orthogonal bases is doubly stochastic: the total is kept, the products are not taken."""
    rule = EigenvalueCorrection(carry)
    grad = torch.randn(4, 5, generator=torch.Generator().manual_seed(8), dtype=DTYPE)
    old, new = (random_pairs(5, 1), random_pairs(4, 2)), (random_pairs(5, 3), random_pairs(4, 4))
    rule.direction("layer", grad, old, lambda a, g: (0.1, 0.1))
    measured = torch.rand(4, 5, generator=torch.Generator().manual_seed(9), dtype=DTYPE) + 0.5
    rule.layers["layer"].scales.core = measured.clone()
    rule.direction("layer", grad, new, lambda a, g: (0.1, 0.1))
    after = rule.layers["layer"].scales.core
    products = torch.outer(new[1].values, new[0].values)
    if carry == "reset":
        torch.testing.assert_close(after, products)
    elif carry == "keep":
        torch.testing.assert_close(after, measured)
    else:
        w_g, w_a = (new[1].vectors.T @ old[1].vectors) ** 2, (new[0].vectors.T @ old[0].vectors) ** 2
        torch.testing.assert_close(after, torch.einsum("ik,kl,jl->ij", w_g, measured, w_a))


def test_state_dict_round_trip_continues_bitwise() -> None:
    def make() -> tuple[nn.Module, rkfac.LowRankEKFAC]:
        model = mlp(seed=7)
        return model, rkfac.LowRankEKFAC(
            model, lr=0.05, momentum=0.9, decomposition=rkfac.SymmetricRandomizedEVD(rank=4), factor_every=1, inverse_every=3
        )

    def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step), dtype=DTYPE)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.arange(16) % 4).backward()
            opt.step()

    model, opt = make()
    train(model, opt, range(4))
    saved = saved_and_loaded({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, range(4, 8))
    restored_model, restored = make()
    restored_model.load_state_dict(saved["model"])  # type: ignore[arg-type]
    restored.load_state_dict(saved["opt"])  # type: ignore[arg-type]
    train(restored_model, restored, range(4, 8))
    for ours, theirs in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_what_it_does_not_handle_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="carry='fresh'"):
        rkfac.LowRankEKFAC(mlp(), carry="fresh")
    with pytest.raises(ValueError, match=r"apply_dtype=torch.bfloat16"):
        rkfac.LowRankEKFAC(mlp(), apply_dtype=torch.bfloat16)


def test_the_adaptive_step_drives_the_corrected_direction() -> None:
    """With loss= the adaptive step chooses α, μ and λ for this direction too (its λ reaches the
    scales through K-FAC's factor dampings): a separable 4-class problem is fitted in 30 steps."""
    model = mlp(seed=1)
    opt = rkfac.LowRankEKFAC(
        model, loss="cross_entropy", decomposition=rkfac.SymmetricRandomizedEVD(rank=4), factor_every=1, inverse_every=5
    )
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(inputs=x, targets=y)
        losses.append(float(loss.detach()))
    assert opt.adaptive is not None and opt.adaptive.last is not None
    assert losses[-1] < 0.05 * losses[0]
    assert opt.adaptive.last.damping < 1.0  # λ moved from its start, so the scales saw it change


def test_a_non_finite_measurement_is_skipped_counted_and_said() -> None:
    """The statistic holds fourth powers of the rows: float32 inputs of 3e10 overflow it where the
    Gram products (squares) stay finite. The scales keep their values and the skip is counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    rule = EigenvalueCorrection()
    pre = KFACPreconditioner(model, direction=rule, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=100, clip=None)
    for scale in (1.0, 3e10):
        model.zero_grad()
        (model(torch.randn(16, 6) * scale) ** 2).sum(1).mean().backward()
        if scale == 1.0:
            pre.step()
            before = rule.layers["0"].scales.core.clone()
        else:
            with pytest.warns(RuntimeWarning, match="non-finite measured statistic.*'0' at step 1"):
                pre.step()
    assert all(bool(factor.isfinite().all()) for factor in pre.factors()["0"])  # K-FAC's statistics were fine
    assert pre.health.skipped_statistics == 1
    assert torch.equal(rule.layers["0"].scales.core, before)


def test_grouped_convolution_corrects_each_block_in_its_own_basis() -> None:
    """A grouped Conv2d's factors are per group (block eigenpairs, per-block dampings): each
    group's direction is the dense EKFAC step of that group's own rows."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).to(DTYPE)
    model = nn.Sequential(conv)
    generator = torch.Generator().manual_seed(3)
    x0, x1 = (torch.randn(3, 4, 5, 5, generator=generator, dtype=DTYPE) for _ in range(2))
    pre = ekfac(model, decomposition=rkfac.ExactEigh())

    def rows(x: Tensor) -> list[tuple[Tensor, Tensor]]:
        conv.zero_grad()
        out = conv(x)
        out.retain_grad()
        (out**3).mean().backward()
        assert out.grad is not None
        per_group = []
        for group in range(2):
            inputs, grads = x[:, 2 * group : 2 * group + 2], out.grad[:, 3 * group : 3 * group + 3]
            patches = F.unfold(inputs, 3, padding=1).transpose(1, 2).reshape(-1, 2 * 9)
            per_group.append((with_ones(patches), grads.flatten(2).transpose(1, 2).reshape(-1, 3)))
        return per_group

    def group_grads() -> list[Tensor]:
        assert conv.weight.grad is not None and conv.bias is not None and conv.bias.grad is not None
        weight, bias = conv.weight.grad.reshape(6, -1), conv.bias.grad[:, None]
        return [torch.cat([weight[3 * g : 3 * g + 3], bias[3 * g : 3 * g + 3]], dim=1) for g in range(2)]

    first = rows(x0)
    pre.step()
    n, positions = x0.shape[0], 25
    factors = [(n * g.T @ g, a.T @ a / (n * positions)) for a, g in first]
    second = rows(x1)
    grads = group_grads()
    pre.step()
    for group, ((a1, g1), (g_factor, a_factor), grad, got) in enumerate(zip(second, factors, grads, group_grads(), strict=True)):
        kept = (descending(g_factor)[1], descending(a_factor)[1])
        expected = dense_ekfac_direction(grad, (a1, g1), float(n), kept, (g_factor, a_factor))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=f"group {group}")


@pytest.mark.parametrize("rank", [None, 2])
def test_embedding_statistic_counts_each_token_in_its_own_column(rank: int | None) -> None:
    """An embedding's input rows are one-hot (A diagonal, its own basis): the dense EKFAC step with
    the unit vectors as A's basis, the rows built here as one-hot vectors (padding left out of
    both sides), at full and truncated G rank (the G complement per token column)."""
    torch.manual_seed(0)
    vocab, width, padding = 10, 4, 0
    embedding = nn.Embedding(vocab, width, padding_idx=padding).to(DTYPE)
    head = nn.Linear(2 * width, 3).to(DTYPE)
    model = nn.Sequential(embedding, nn.Flatten(), head)
    generator = torch.Generator().manual_seed(5)
    tokens0, tokens1 = (torch.randint(0, vocab - 2, (30, 2), generator=generator) for _ in range(2))  # 8, 9 unseen
    decomposition = rkfac.ExactEigh() if rank is None else rkfac.SymmetricRandomizedEVD(rank=rank, oversample=2, power_iters=4)
    pre = ekfac(model, decomposition=decomposition, skip=["2"])

    def rows(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model.zero_grad()
        out = embedding(tokens)
        out.retain_grad()
        F.cross_entropy(head(out.flatten(1)), torch.arange(30) % 3).backward()
        assert out.grad is not None and embedding.weight.grad is not None
        kept = tokens.reshape(-1) != padding
        one_hot = F.one_hot(tokens.reshape(-1), vocab).to(DTYPE)[kept]
        return one_hot, out.grad.reshape(-1, width)[kept], embedding.weight.grad.T.clone()

    a0, g0, _ = rows(tokens0)
    pre.step()
    n = tokens0.shape[0]
    a_factor, g_factor = a0.T @ a0 / a0.shape[0], n * g0.T @ g0
    kept = (descending(g_factor)[1] if rank is None else pre.eigenpairs()["0"][1].vectors, torch.eye(vocab, dtype=DTYPE))
    a1, g1, grad = rows(tokens1)
    pre.step()
    # a diagonal A needs no decomposition: its eigenvalues are the current average, this step's
    # included, while the scales started from the products of step 0's
    a_average = DECAY * a_factor + (1 - DECAY) * a1.T @ a1 / a1.shape[0]
    expected = dense_ekfac_direction(grad, (a1, g1), float(n), kept, (g_factor, a_average), (g_factor, a_factor))
    assert embedding.weight.grad is not None
    torch.testing.assert_close(embedding.weight.grad.T, expected, rtol=1e-9, atol=1e-12)


def test_online_factors_measure_in_the_rows_basis_and_carry_into_brands_update() -> None:
    """B-KFAC's online factors (4 rows per step, both factors wider: Brand's update every factor
    step) replace the basis at every step: step 1's rows are measured in step 0's basis, folded
    there into its eigenvalue products, and kept (carry "keep", the same ranks) for step 1's
    updated basis, whose eigenvalues and dampings the step then uses."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10).to(DTYPE)
    model = nn.Sequential(layer)
    generator = torch.Generator().manual_seed(6)
    x0, x1 = (torch.randn(4, 12, generator=generator, dtype=DTYPE) for _ in range(2))
    t0, t1 = (torch.randn(4, 10, generator=generator, dtype=DTYPE) for _ in range(2))
    pre = ekfac(model, decomposition=rkfac.BrandUpdate(rank=3))
    linear_rows(layer, x0, t0)
    pre.step()
    assert pre.layers[0].a.online and pre.layers[0].g.online
    a_old, g_old = pre.eigenpairs()["0"]
    a1, g1 = linear_rows(layer, x1, t1)
    grad = grad_matrix(layer)
    pre.step()
    a_new, g_new = pre.eigenpairs()["0"]
    assert not torch.equal(a_new.vectors, a_old.vectors)  # Brand's update moved the basis

    def padded(values: Tensor, dim: int) -> Tensor:
        return torch.cat([values, torch.zeros(dim - values.shape[0], dtype=DTYPE)])

    q_g, q_a = completed(g_old.vectors), completed(a_old.vectors)
    measured = 4.0 * torch.einsum("ti,tj->ij", (g1 @ q_g) ** 2, (a1 @ q_a) ** 2)  # c_G = n for a mean loss
    products = torch.outer(padded(g_old.values, 10), padded(a_old.values, 13))
    scales = DECAY * products + (1 - DECAY) * block_means(measured, 3, 3)
    values_g, values_a = padded(g_new.values, 10), padded(a_new.values, 13)
    lam_g, lam_a = DAMPING * g_new.top, DAMPING * a_new.top
    damped = scales + lam_g * values_a[None, :] + values_g[:, None] * lam_a + lam_g * lam_a
    p_g, p_a = completed(g_new.vectors), completed(a_new.vectors)
    expected = p_g @ ((p_g.T @ grad @ p_a) / damped) @ p_a.T
    torch.testing.assert_close(grad_matrix(layer), expected, rtol=1e-9, atol=1e-12)
