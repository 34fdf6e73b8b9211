"""Subsampled statistics (``statistics_samples`` = m): the factors are those of the first m samples.

References: the per-sample definition written out (mean over the kept samples of a aᵀ and
δ δᵀ), and, for every layer kind and layout, the factors of the first m samples run alone
through the same model (no layer here couples samples, so their rows are the same).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from tests.kfac.test_statistics import first_factors, per_sample_output_grads
from tests.oracles import with_ones

DTYPE = torch.float64


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_factors_are_the_mean_over_the_kept_samples(reduction: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).to(DTYPE)
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 3).to(DTYPE))
    x, y = torch.randn(9, 6, dtype=DTYPE), torch.randint(0, 3, (9,))
    kept = 4
    factors = first_factors(
        model, lambda out: F.cross_entropy(out, y, reduction=reduction), x, statistics_samples=kept, loss_reduction=reduction
    )
    a, g = factors["0"]

    rows = with_ones(x[:kept])
    deltas = torch.stack(
        [
            per_sample_output_grads(model, layer, lambda out, i=i: F.cross_entropy(out, y[i : i + 1]), x[i : i + 1])[0]
            for i in range(kept)
        ]
    )
    torch.testing.assert_close(a, rows.T @ rows / kept)
    torch.testing.assert_close(g, deltas.T @ deltas / kept)


class SequenceFirst(nn.Module):
    """Linear layers on (T, n, d) inputs (batch_dim = 1), pooled over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x)).mean(0))


class TokensFirst(nn.Module):
    """An embedding with padding on (T, n) token indices, sequence first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(0))


class Attention(nn.Module):
    """nn.MultiheadAttention, sequence first, and a read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(0))


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3))


def _case(name: str) -> tuple[nn.Module, Tensor, int, dict[str, object]]:
    """(model, batch of 10 samples, the batch's sample dim, options) of one kind and layout."""
    generator = torch.Generator().manual_seed(1)
    if name == "mlp":
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(10, 5, generator=generator), 0, {}
    if name == "conv":
        return _conv(), torch.randn(10, 2, 5, 5, generator=generator), 0, {}
    if name == "sequence-first":
        return SequenceFirst(), torch.randn(7, 10, 5, generator=generator), 1, {"batch_dim": 1}
    if name == "reduce":
        return SequenceFirst(), torch.randn(7, 10, 5, generator=generator), 1, {"batch_dim": 1, "kfac_approx": "reduce"}
    if name == "embedding":
        return TokensFirst(), torch.randint(0, 9, (6, 10), generator=generator), 1, {"batch_dim": 1}
    if name == "attention":
        return Attention(), torch.randn(5, 10, 4, generator=generator), 1, {"batch_dim": 1}
    raise ValueError(name)


@pytest.mark.parametrize("name", ["mlp", "conv", "sequence-first", "reduce", "embedding", "attention"])
def test_factors_equal_those_of_the_first_samples_run_alone(name: str) -> None:
    torch.manual_seed(2)
    model, x, dim, options = _case(name)
    model = model.to(DTYPE) if x.is_floating_point() else model.double()
    x = x.to(DTYPE) if x.is_floating_point() else x
    labels = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(3))
    kept = 4

    subsampled = first_factors(model, lambda out: F.cross_entropy(out, labels), x, statistics_samples=kept, **options)
    alone = first_factors(model, lambda out: F.cross_entropy(out, labels[:kept]), x.narrow(dim, 0, kept), **options)
    assert subsampled.keys() == alone.keys() and subsampled
    for layer, (a, g) in subsampled.items():
        torch.testing.assert_close(a, alone[layer][0], msg=f"{name}: A of {layer}")
        torch.testing.assert_close(g, alone[layer][1], msg=f"{name}: G of {layer}")
    whole = first_factors(model, lambda out: F.cross_entropy(out, labels), x, **options)
    assert any(not torch.allclose(g, whole[layer][1]) for layer, (_, g) in subsampled.items())  # it did subsample


def test_a_limit_at_or_above_the_batch_changes_nothing_bitwise() -> None:
    torch.manual_seed(4)
    model, x, _, options = _case("sequence-first")
    model = model.to(DTYPE)
    x = x.to(DTYPE)
    labels = torch.randint(0, 3, (10,))
    loss: Callable[[Tensor], Tensor] = lambda out: F.cross_entropy(out, labels)  # noqa: E731
    default = first_factors(model, loss, x, **options)
    for limit in (10, 64):
        limited = first_factors(model, loss, x, statistics_samples=limit, **options)
        for layer, (a, g) in default.items():
            assert torch.equal(limited[layer][0], a) and torch.equal(limited[layer][1], g)


def test_accumulated_micro_batches_keep_the_first_samples_of_each() -> None:
    """4 micro-batches of 6 with m = 3 are the 4 micro-batches of their first 3 samples."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).to(DTYPE)
    x, y = torch.randn(24, 5, dtype=DTYPE), torch.randint(0, 3, (24,))

    def accumulated(size: int, **options: object) -> dict[str, tuple[Tensor, Tensor]]:
        exact = {"decomposition": rkfac.ExactEigh(), "factor_every": 1, "inverse_every": 1, "clip": None}
        pre = rkfac.KFACPreconditioner(model, **exact, **options)
        model.zero_grad()
        for part in range(4):
            index = slice(6 * part, 6 * part + size)
            (F.cross_entropy(model(x[index]), y[index]) / 4).backward()
        pre.step()
        return pre.factors()

    subsampled, alone = accumulated(6, statistics_samples=3), accumulated(3)
    for layer, (a, g) in subsampled.items():
        torch.testing.assert_close(a, alone[layer][0])
        torch.testing.assert_close(g, alone[layer][1])


def test_low_rank_soap_takes_the_limit_too() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    x, y = torch.randn(10, 5, dtype=DTYPE), torch.randint(0, 3, (10,))
    alone = first_factors(copy.deepcopy(model), lambda out: F.cross_entropy(out, y[:4]), x[:4])
    optimizer = rkfac.LowRankSOAP(model, statistics_samples=4, factor_every=1, decomposition=rkfac.ExactEigh())
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for layer, (a, g) in optimizer.preconditioner.factors().items():
        torch.testing.assert_close(a, alone[layer][0])
        torch.testing.assert_close(g, alone[layer][1])


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_a_limit_that_is_not_a_positive_count_is_refused(limit: object) -> None:
    with pytest.raises(ValueError, match="statistics_samples"):
        rkfac.KFACPreconditioner(nn.Linear(3, 2), statistics_samples=limit)


def test_brand_updates_fold_the_kept_samples_online() -> None:
    """B-KFAC with m = 4 of 10 samples: every factor is wider than 4, so each step's m columns
    go through the online Brand update (10 columns would not: a dense statistic), and the
    low-rank factors after two steps equal those of the first 4 samples run alone."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 9), nn.Tanh(), nn.Linear(9, 7)).to(DTYPE)
    twin = copy.deepcopy(model)
    batches = [torch.randn(10, 8, dtype=DTYPE) for _ in range(2)]
    labels = [torch.randint(0, 7, (10,)) for _ in range(2)]
    kept = 4

    def run(net: nn.Module, narrow: bool, **options: object) -> dict[str, tuple[Tensor, Tensor]]:
        brand = rkfac.BrandUpdate(rank=5, fallback=rkfac.ExactEigh())
        pre = rkfac.KFACPreconditioner(net, decomposition=brand, factor_every=1, inverse_every=1, clip=None, **options)
        for x, y in zip(batches, labels):
            net.zero_grad()
            x, y = (x[:kept], y[:kept]) if narrow else (x, y)
            F.cross_entropy(net(x), y).backward()
            pre.step()
        assert not pre.factors(), "the online factors keep no dense matrix"
        return {name: (a.dense(), g.dense()) for name, (a, g) in pre.eigenpairs().items()}

    subsampled = run(model, narrow=False, statistics_samples=kept)
    alone = run(twin, narrow=True)
    assert subsampled.keys() == alone.keys() == {"0", "2"}
    for layer, (a, g) in subsampled.items():
        torch.testing.assert_close(a, alone[layer][0], msg=f"A of {layer}")
        torch.testing.assert_close(g, alone[layer][1], msg=f"G of {layer}")
