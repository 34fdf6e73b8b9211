"""Grouped and depthwise convolutions (issue 18) against the model that splits them into groups=1 convs.

A Conv1d/Conv2d with g groups computes exactly what g groups=1 convolutions compute, each on its
slice of c_in/g input channels, with their outputs concatenated (:class:`Split`). K-FAC's
block-diagonal approximation of the grouped layer is, by definition, the K-FAC of those g layers:
the same factors per group and the same preconditioned gradients (float64, to rounding), with the
damping of each block from its own factors. rkfac preconditions the split model with its ordinary
groups=1 code, one layer per group, so it is the reference; the grouped layer goes through the
batched path (block statistics, ``decompose_blocks``, :class:`~rkfac.lowrank.BlockEigenpairs`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from rkfac.damping import factor_dampings
from rkfac.distributed import Communicator
from rkfac.health import Health
from rkfac.lowrank import BlockEigenpairs, kronecker_solve
from tests.oracles import dense_kfac_direction, planted

DTYPE = torch.float64


class Split(nn.Module):
    """``grouped`` written as ``groups`` groups=1 convolutions on its channel slices, same weights."""

    def __init__(self, grouped: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        groups = grouped.groups
        self.width = grouped.in_channels // groups
        out = grouped.out_channels // groups
        self.convs = nn.ModuleList()
        for j in range(groups):
            conv = type(grouped)(
                self.width,
                out,
                grouped.kernel_size,
                stride=grouped.stride,
                padding=grouped.padding,  # type: ignore[arg-type]
                dilation=grouped.dilation,
                bias=grouped.bias is not None,
                padding_mode=grouped.padding_mode,
            ).to(DTYPE)
            with torch.no_grad():
                conv.weight.copy_(grouped.weight[j * out : (j + 1) * out])
                if grouped.bias is not None:
                    conv.bias.copy_(grouped.bias[j * out : (j + 1) * out])
            self.convs.append(conv)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x[:, j * self.width : (j + 1) * self.width]) for j, conv in enumerate(self.convs)], dim=1)


#: (name, the grouped convolution, input shape of one sample)
CONVS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("2d-groups2-bias", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 5, 5)),
    ("2d-depthwise-stride2-no-bias", lambda: nn.Conv2d(4, 4, 3, groups=4, stride=2, bias=False), (4, 7, 6)),
    (
        "2d-depthwise-x2-rect-dilation-reflect",
        lambda: nn.Conv2d(3, 6, (3, 2), groups=3, dilation=(1, 2), padding=1, padding_mode="reflect"),
        (3, 5, 6),
    ),
    ("1d-groups2-bias", lambda: nn.Conv1d(4, 6, 3, groups=2, padding=1), (4, 9)),
    (
        "1d-depthwise-circular-no-bias",
        lambda: nn.Conv1d(6, 6, 5, groups=6, padding=2, padding_mode="circular", bias=False),
        (6, 8),
    ),
    ("1d-depthwise-x2-stride2", lambda: nn.Conv1d(4, 8, 3, groups=4, stride=2), (4, 11)),
]


def models(build: Callable[[], nn.Module], shape: tuple[int, ...]) -> tuple[nn.Sequential, nn.Sequential, Tensor, Tensor]:
    """(grouped model, split model, inputs, labels): the convolution, tanh, a Linear head, same weights."""
    torch.manual_seed(0)
    conv = build().to(DTYPE)
    x = torch.randn(5, *shape, dtype=DTYPE)
    grouped = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    split = nn.Sequential(Split(conv), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(DTYPE)
    grouped(x), split(x)  # materialise the lazy heads
    split[3].load_state_dict(grouped[3].state_dict())
    return grouped, split, x, torch.tensor([0, 1, 2, 1, 0])


def check_same(grouped: nn.Sequential, split: nn.Sequential, pre: rkfac.KFAC, split_pre: rkfac.KFAC) -> None:
    """Factors per group, then the preconditioned gradients (rewritten into .grad) of both models."""
    conv, parts = grouped[0], split[0].convs
    groups = conv.groups
    a, g = pre.preconditioner.factors()["0"]
    assert a.shape[0] == g.shape[0] == groups
    split_factors = split_pre.preconditioner.factors()
    for j in range(groups):
        a_j, g_j = split_factors[f"0.convs.{j}"]
        torch.testing.assert_close(a[j], a_j, msg=lambda m: f"A of group {j}: {m}")
        torch.testing.assert_close(g[j], g_j, msg=lambda m: f"G of group {j}: {m}")
    torch.testing.assert_close(conv.weight.grad, torch.cat([part.weight.grad for part in parts]))
    if conv.bias is not None:
        torch.testing.assert_close(conv.bias.grad, torch.cat([part.bias.grad for part in parts]))
    torch.testing.assert_close(grouped[3].weight.grad, split[3].weight.grad)
    torch.testing.assert_close(conv.weight, torch.cat([part.weight for part in parts]))  # same steps so far


def run_both(build: Callable[[], nn.Module], shape: tuple[int, ...], steps: int = 3, **options: object) -> None:
    grouped, split, x, y = models(build, shape)
    settings = {"lr": 0.1, "factor_every": 1, "inverse_every": 1, "clip": None, **options}
    pre, split_pre = rkfac.KFAC(grouped, **settings), rkfac.KFAC(split, **settings)
    assert pre.preconditioner.layer_names == ["0", "3"] and not pre.preconditioner.unsupported
    for _ in range(steps):
        for model, opt in ((grouped, pre), (split, split_pre)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        check_same(grouped, split, pre, split_pre)


@pytest.mark.parametrize(("build", "shape"), [pytest.param(b, s, id=name) for name, b, s in CONVS])
@pytest.mark.parametrize("decomposition", [rkfac.ExactEigh(), None], ids=["eigh", "default"])
def test_grouped_conv_equals_its_split_groups(build, shape, decomposition) -> None:  # type: ignore[no-untyped-def]
    run_both(build, shape, decomposition=decomposition)


@pytest.mark.parametrize(
    "options",
    [
        {"damping_mode": "pi"},
        {"kfac_approx": "reduce"},
        {"loss_reduction": "sum", "inverse_every": 2},
        {"decomposition": rkfac.BrandUpdate(fallback=rkfac.ExactEigh())},  # convolutions take the fallback
        {"decomposition": rkfac.RandomizedSVD(rank=30)},  # rank + oversample ≥ d: the exact path
    ],
    ids=["pi", "reduce", "sum-loss", "brand-fallback", "rsvd-exact"],
)
@pytest.mark.parametrize("case", [0, 4], ids=["2d-groups2", "1d-depthwise"])
def test_grouped_conv_options_match_the_split_groups(options: dict, case: int) -> None:
    _, build, shape = CONVS[case]
    run_both(build, shape, **options)


def test_describe_lists_the_blocks_and_nothing_is_left_out() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv1d(3, 6, 2, groups=3, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "plain gradient" warning
        pre = rkfac.KFACPreconditioner(model)
    assert pre.describe().splitlines() == [
        "0: GroupedConv2d, A 4 blocks of 10 × 10, G 4 blocks of 1 × 1",
        "1: GroupedConv1d, A 3 blocks of 2 × 2, G 3 blocks of 2 × 2",
    ]


def planted_stack(blocks: int, dim: int, rank: int) -> Tensor:
    """``blocks`` PSD matrices of exact rank ``rank`` with known, different spectra."""
    values = torch.zeros(blocks, dim, dtype=DTYPE)
    values[:, :rank] = torch.arange(rank, 0, -1, dtype=DTYPE) * torch.arange(1, blocks + 1, dtype=DTYPE).unsqueeze(1)
    return torch.stack([planted(values[b], seed=b) for b in range(blocks)])


class LoopedEigh(rkfac.ExactEigh):
    """A decomposition that does not declare a batched ``_top``: ``decompose_blocks`` loops over blocks."""

    batched = False


@pytest.mark.parametrize(
    "method",
    [
        rkfac.ExactEigh(),
        rkfac.ExactEigh(rank=3),
        LoopedEigh(rank=3),
        rkfac.SymmetricRandomizedEVD(rank=3, oversample=2, power_iters=2),
        rkfac.RandomizedSVD(rank=3, oversample=2, power_iters=2),
        rkfac.SymmetricRandomizedEVD(rank=3, oversample=2, warm_start=True),
        rkfac.SymmetricRandomizedEVD(rank=6, oversample=2, adaptive_rank=True, min_rank=1),
    ],
    ids=["eigh", "eigh-rank3", "looped", "sre", "rsvd", "sre-warm", "sre-adaptive"],
)
def test_decompose_blocks_recovers_each_block(method: rkfac.Decomposition) -> None:
    """Blocks of rank 3 in d = 12: every method keeping ≥ 3 pairs reproduces each block, with that
    block's own trace and λ_max, orthonormal vectors and descending values ≥ 0."""
    stack = planted_stack(4, 12, 3)
    pairs = method.decompose_blocks(stack, torch.Generator().manual_seed(0))
    pairs = method.decompose_blocks(stack, torch.Generator().manual_seed(1), step=1, previous=pairs)  # warm / adaptive
    assert isinstance(pairs, BlockEigenpairs) and pairs.blocks == 4 and pairs.dim == 12
    torch.testing.assert_close(pairs.dense(), stack, atol=1e-10, rtol=0)
    for b in range(4):
        exact = rkfac.ExactEigh().decompose(stack[b])
        assert pairs.traces[b].item() == pytest.approx(exact.trace, rel=1e-12)
        assert pairs.tops[b].item() == pytest.approx(exact.top, rel=1e-10)
        eye = torch.eye(pairs.rank, dtype=DTYPE)
        torch.testing.assert_close(pairs.vectors[b].T @ pairs.vectors[b], eye, atol=1e-10, rtol=0)
    assert bool((pairs.values[:, :-1] >= pairs.values[:, 1:]).all()) and bool((pairs.values >= 0).all())
    if method.uses_previous and getattr(method, "adaptive_rank", False):
        assert pairs.rank == 4  # 1.1 × 3 modes above the threshold + 1, shared by all blocks


def test_block_solve_is_each_blocks_dense_solve() -> None:
    """(G_b + λ_G,b)⁻¹ M_b (A_b + λ_A,b)⁻¹ per block, against dense float64 solves, both damping modes."""
    a, g = planted_stack(3, 5, 5), planted_stack(3, 2, 2)
    grad = torch.randn(3, 2, 5, dtype=DTYPE)
    a_pairs, g_pairs = rkfac.ExactEigh().decompose_blocks(a), rkfac.ExactEigh().decompose_blocks(g)

    for mode in ("relative", "pi"):
        a_damping, g_damping = factor_dampings(mode, 0.1, a_pairs, g_pairs)
        solved = kronecker_solve(grad, g_pairs, g_damping, a_pairs, a_damping)
        for b in range(3):
            torch.testing.assert_close(solved[b], dense_kfac_direction(a[b], g[b], grad[b], 0.1, mode))


def small_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """conv → depthwise → pointwise → grouped Conv1d over the rows → linear, MobileNet-style."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),  # pointwise
        nn.ReLU(),
        nn.Flatten(2),  # (n, 8, 36): a sequence of 36 positions
        nn.Conv1d(8, 8, 3, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).to(dtype)


def test_a_small_model_with_grouped_convs_trains_without_faults() -> None:
    model = small_model()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 6, 6, generator=generator), torch.randint(0, 4, (32,), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = rkfac.KFAC(model, lr=0.2, factor_every=2, inverse_every=4, decomposition=rkfac.SymmetricRandomizedEVD(rank=8))
    assert opt.preconditioner.layer_names == ["0", "2", "4", "7", "11"]
    assert list(opt.groups()) == ["preconditioned"]  # every parameter is in a preconditioned layer
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert opt.preconditioner.health == Health()
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    a_pairs, _ = opt.preconditioner.eigenpairs()["2"]
    assert isinstance(a_pairs, BlockEigenpairs) and a_pairs.blocks == 8 and a_pairs.dim == 10


def test_state_dict_round_trips_block_factors() -> None:
    model = small_model(DTYPE)
    x, y = torch.randn(8, 3, 6, 6, dtype=DTYPE), torch.randint(0, 4, (8,))
    pre = rkfac.KFACPreconditioner(model, factor_every=1, inverse_every=2)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    state = pre.state_dict()
    restored = rkfac.KFACPreconditioner(model, factor_every=1, inverse_every=2)
    restored.load_state_dict(state)
    for name, (a, g) in pre.factors().items():
        torch.testing.assert_close(restored.factors()[name][0], a, rtol=0, atol=0)
        torch.testing.assert_close(restored.factors()[name][1], g, rtol=0, atol=0)
    pairs, back = pre.eigenpairs()["2"][0], restored.eigenpairs()["2"][0]
    assert isinstance(back, BlockEigenpairs) and isinstance(pairs, BlockEigenpairs)
    assert torch.equal(back.vectors, pairs.vectors) and torch.equal(back.tops, pairs.tops)
    bad = {**state, "layers": {**state["layers"], "2": {**state["layers"]["2"]}}}
    bad["layers"]["2"]["A"] = {**bad["layers"]["2"]["A"], "factor": torch.zeros(10, 10, dtype=DTYPE)}
    with pytest.raises(ValueError, match=r"factor A of layer '2' has shape \(10, 10\), expected \(8, 10, 10\)"):
        restored.load_state_dict(bad)


def test_a_process_group_is_refused_naming_the_grouped_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    class TwoRanks(Communicator):
        def __init__(self, group: object = None) -> None:
            super().__init__(None)
            self.active, self.world_size = True, 2

    monkeypatch.setattr("rkfac.kfac.preconditioner.Communicator", TwoRanks)
    with pytest.raises(ValueError, match=r"layers \['2', '7'\] are grouped convolutions.*2 ranks pass them in skip="):
        rkfac.KFACPreconditioner(small_model())
    assert rkfac.KFACPreconditioner(small_model(), skip=["2", "7"]).layer_names == ["0", "4", "11"]


def test_seng_gives_grouped_convs_its_plain_step() -> None:
    pre = rkfac.SENGPreconditioner(small_model())
    assert pre.layer_names == ["0", "4", "11"]
    assert pre.describe().splitlines()[-1] == "divided by (1 + λ): 4 other parameters"


@pytest.mark.gpu
def test_grouped_convs_on_cuda_match_cpu() -> None:
    """The batched path on CUDA (batched eigh, baddbmm, dampings read back to the CPU) gives the CPU's directions."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 6, 6, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    grads = {}
    for device in ("cpu", "cuda"):
        model = small_model().to(device)
        pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), clip=None)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        pre.step()
        a, _ = pre.factors()["2"]
        assert a.device.type == device and a.shape == (8, 10, 10)
        grads[device] = [p.grad.detach().cpu() for p in model.parameters()]
    for cpu, cuda in zip(grads["cpu"], grads["cuda"], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-5)
