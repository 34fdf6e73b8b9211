"""K-FAC-expand and K-FAC-reduce (Eschenhagen et al. 2023) against hand-computed factors.

For a layer applied at R shared positions per sample (tokens, conv output pixels), with input
rows a_{i,r} (a trailing 1 for the bias) and output gradients g_{i,r} of a mean loss over n samples:

    expand: S_A = Σ_{i,r} a aᵀ / (n R),          S_G = n Σ_{i,r} g gᵀ
    reduce: S_A = Σ_i ā_i ā_iᵀ / n, ā_i = mean_r a_{i,r};   S_G = n Σ_i ḡ_i ḡ_iᵀ, ḡ_i = Σ_r g_{i,r}
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac

DTYPE = torch.float64


def factors(model: nn.Module, x: Tensor, approx: str, batch_dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(A, G) of the first layer after one factor step, and the output gradient it saw."""
    layer = model[0]  # type: ignore[index]
    seen = {}

    def keep_grad(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        output.register_hook(lambda g: seen.update(g=g))

    handle = layer.register_forward_hook(keep_grad)
    pre = rkfac.KFACPreconditioner(model, factor_every=1, kfac_approx=approx, batch_dim=batch_dim)
    model.zero_grad()
    model(x).square().sum().div(x.shape[batch_dim]).backward()  # a mean over the n samples
    pre.step()
    handle.remove()
    pre.remove()
    a, g = pre.factors()["0"]
    return a, g, seen["g"]


def tokens_model() -> nn.Module:
    """Linear layers over tokens: (n, R, 4) → (n, R, 2)."""
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.Tanh()).double()


def test_linear_on_tokens_expand_and_reduce() -> None:
    torch.manual_seed(0)
    model = tokens_model()
    x = torch.randn(5, 6, 4, dtype=DTYPE)  # n = 5 samples of R = 6 tokens
    n, r = 5, 6
    rows = torch.cat([x, torch.ones(n, r, 1, dtype=DTYPE)], dim=2)  # (n, R, d_A)
    a, g, grad = factors(model, x, "expand")
    torch.testing.assert_close(a, torch.einsum("ira,irb->ab", rows, rows) / (n * r))
    torch.testing.assert_close(g, n * torch.einsum("ira,irb->ab", grad, grad))
    a, g, grad = factors(model, x, "reduce")
    mean_rows, summed = rows.mean(1), grad.sum(1)
    torch.testing.assert_close(a, mean_rows.T @ mean_rows / n)
    torch.testing.assert_close(g, n * summed.T @ summed)


def test_reduce_with_sequence_first_inputs_groups_by_sample() -> None:
    torch.manual_seed(0)
    model = tokens_model()
    x = torch.randn(5, 6, 4, dtype=DTYPE)
    a_first, g_first, _ = factors(model, x, "reduce")
    a_seq, g_seq, _ = factors(model, x.transpose(0, 1), "reduce", batch_dim=1)
    torch.testing.assert_close(a_seq, a_first)
    torch.testing.assert_close(g_seq, g_first)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv2d_expand_and_reduce(approx: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh()).double()
    x = torch.randn(4, 2, 6, 6, dtype=DTYPE)
    a, g, grad = factors(model, x, approx)
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # (n, R, c·k·k)
    rows = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=DTYPE)], dim=2)
    out = grad.flatten(2).transpose(1, 2)  # (n, R, c_out)
    n, r = rows.shape[:2]
    if approx == "expand":
        expected_a = torch.einsum("ira,irb->ab", rows, rows) / (n * r)
        expected_g = n * torch.einsum("ira,irb->ab", out, out)
    else:
        expected_a = rows.mean(1).T @ rows.mean(1) / n
        expected_g = n * out.sum(1).T @ out.sum(1)
    torch.testing.assert_close(a, expected_a)
    torch.testing.assert_close(g, expected_g)


def test_reduce_is_refused_when_misspelled() -> None:
    with pytest.raises(ValueError, match=r"kfac_approx must be one of \('expand', 'reduce'\), got 'reduced'"):
        rkfac.KFACOptions(kfac_approx="reduced")


def test_reduce_feeds_b_kfac_the_same_statistics() -> None:
    """B-KFAC keeps rows, not Gram sums: under reduce its (untruncated) online factors must be the
    exact K-FAC ones, with n reduced rows per call (narrower than the factors, so they go online)."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, dtype=DTYPE)
    directions = []
    for decomposition in (rkfac.ExactEigh(), rkfac.BrandUpdate(rank=100, fallback=rkfac.ExactEigh())):
        torch.manual_seed(1)  # the same weights for both
        model = tokens_model()
        pre = rkfac.KFACPreconditioner(model, decomposition=decomposition, factor_every=1, kfac_approx="reduce", clip=None)
        model(x).square().sum().div(3).backward()
        pre.step()
        directions.append([p.grad.clone() for p in model.parameters()])
        if isinstance(decomposition, rkfac.BrandUpdate):
            assert all(layer.a.online for layer in pre.layers)
    for brand, exact in zip(directions[1], directions[0], strict=True):
        torch.testing.assert_close(brand, exact)
