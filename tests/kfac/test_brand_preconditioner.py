"""B-KFAC inside the preconditioner: online factors against exact K-FAC and the dense references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac

DTYPE = torch.float64


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 40), nn.Tanh(), nn.Linear(40, 4)
    ).to(DTYPE)  # fmt: skip


def batches(steps: int = 6, n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def run(decomposition: rkfac.Decomposition, steps: int = 6, **options) -> tuple[nn.Module, rkfac.KFACPreconditioner, list]:
    net = model()
    pre = rkfac.KFACPreconditioner(net, decomposition=decomposition, factor_every=1, inverse_every=1, clip=None, **options)
    directions = []
    for x, y in batches(steps):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        pre.step()
        directions.append([p.grad.clone() for p in net.parameters()])
    return net, pre, directions


def test_untruncated_b_kfac_equals_exact_k_fac():
    _, exact, exact_directions = run(rkfac.ExactEigh())
    _, brand, brand_directions = run(rkfac.BrandUpdate(rank=1000, fallback=rkfac.ExactEigh()))
    # Linear layers with batch 12 narrower than the factor go online; the conv and fc2's G (width 4) stay dense
    views = {layer.name: layer for layer in brand.layers}
    assert (views["3"].a.online, views["3"].g.online) == (True, True)
    assert (views["5"].a.online, views["5"].g.online) == (True, False)
    assert (views["0"].a.online, views["0"].g.online) == (False, False)  # a convolution: dense
    assert set(brand.factors()) == {"0"}  # online factors keep no d × d average
    for mine, theirs in zip(brand_directions, exact_directions, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for name, (a, g) in exact.factors().items():  # the online pairs are the eigenpairs of the exact averages
        brand_a, brand_g = brand.eigenpairs()[name]
        torch.testing.assert_close(brand_a.dense(), a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(brand_g.dense(), g, rtol=1e-9, atol=1e-12)


def test_truncated_b_kfac_stays_below_the_exact_average():
    _, exact, _ = run(rkfac.ExactEigh())
    _, brand, _ = run(rkfac.BrandUpdate(rank=8, fallback=rkfac.ExactEigh()))
    a_exact = exact.factors()["3"][0]
    a_brand = brand.eigenpairs()["3"][0]
    assert a_brand.rank == 8
    error = torch.linalg.eigvalsh(a_exact - a_brand.dense())
    assert error.min() > -1e-10  # the truncated estimate never exceeds the true average (Loewner order)
    assert a_brand.trace == pytest.approx(float(a_exact.trace()))


def test_b_r_kfac_refreshes_from_the_dense_factor():
    fallback = rkfac.SymmetricRandomizedEVD(rank=8, oversample=2, power_iters=2)
    _, exact, _ = run(rkfac.ExactEigh(), steps=4)
    _, refreshed, _ = run(rkfac.BrandUpdate(rank=8, fallback=fallback, refresh_every=3), steps=4)
    a_dense = next(layer.a.factor for layer in refreshed.layers if layer.name == "3")  # B-R keeps the dense average too
    torch.testing.assert_close(a_dense, exact.factors()["3"][0])
    # step 3 refreshed (U, D) from the dense factor with the fallback, sketch keyed like any decomposition
    generator = torch.Generator().manual_seed(rkfac.seeding.derived_seed(0, "sketch", 1, 0, 3))
    expected = fallback.decompose(a_dense, generator, 3)
    torch.testing.assert_close(refreshed.eigenpairs()["3"][0].values, expected.values)


def test_b_kfac_c_reprojection_does_not_increase_the_error():
    _, plain, _ = run(rkfac.BrandUpdate(rank=8, fallback=rkfac.ExactEigh(), refresh_every=10**6))
    _, corrected, _ = run(rkfac.BrandUpdate(rank=8, fallback=rkfac.ExactEigh(), reproject_every=1, reproject_count=4))
    dense = next(layer.a.factor for layer in corrected.layers if layer.name == "3")
    before = (dense - plain.eigenpairs()["3"][0].dense()).norm()
    after = (dense - corrected.eigenpairs()["3"][0].dense()).norm()
    assert after <= before + 1e-12


def test_b_kfac_state_dict_round_trip():
    net, pre, _ = run(rkfac.BrandUpdate(rank=8), steps=3)
    twin = copy.deepcopy(net)
    twin_pre = rkfac.KFACPreconditioner(twin, decomposition=rkfac.BrandUpdate(rank=8), factor_every=1, inverse_every=1, clip=None)
    twin_pre.load_state_dict(pre.state_dict())
    for model_, pre_ in ((net, pre), (twin, twin_pre)):
        x, y = batches(4)[3]
        model_.zero_grad()
        F.cross_entropy(model_(x), y).backward()
        pre_.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_bad_brand_options_are_named():
    with pytest.raises(ValueError, match="refresh_every must be >= 1"):
        rkfac.BrandUpdate(refresh_every=0)
    with pytest.raises(ValueError, match="fallback must be a dense rkfac Decomposition"):
        rkfac.BrandUpdate(fallback=rkfac.BrandUpdate())
