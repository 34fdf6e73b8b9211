"""Issue 17, library side: ordinary training loops give the right numbers or say why not.

Each test reproduces a case that gave a wrong result (or lost information) without a word
before the fix, against hand-computed statistics or an equivalent model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac

DTYPE = torch.float64


def with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def test_a_forward_that_is_never_backpropagated_adds_nothing_to_a() -> None:
    """``m(100 x); m(x).sum().backward()``: A is that of x alone (it was ~5900 on the diagonal)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    pre = rkfac.KFACPreconditioner(layer, factor_every=1, factor_decay=0.5)
    x = torch.randn(8, 3, dtype=DTYPE)
    layer(100 * x)  # a logging forward with grad enabled, never backpropagated
    layer(x).sum().backward()
    pre.step()
    a, g = pre.factors()[""]
    rows = with_ones(x)
    torch.testing.assert_close(a, rows.T @ rows / 8)
    torch.testing.assert_close(g, 8 * 8 * torch.ones(2, 2, dtype=DTYPE))  # n · Σ_rows g gᵀ with g = 1
    # the next good statistic is folded in as usual: F = ρ S₁ + (1 − ρ) S₂
    x2 = torch.randn(8, 3, dtype=DTYPE)
    layer.zero_grad()
    layer(x2).sum().backward()
    pre.step()
    rows2 = with_ones(x2)
    torch.testing.assert_close(pre.factors()[""][0], 0.5 * rows.T @ rows / 8 + 0.5 * rows2.T @ rows2 / 8)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_attention_projections_are_listed_and_preconditioned() -> None:
    """Issue 17 named attention unsupported; issue 18 routes it (tests/layers/test_attention.py)."""
    torch.manual_seed(0)
    model = Attention()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre = rkfac.KFACPreconditioner(model, factor_every=1)
    assert pre.layer_names == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"]
    assert pre.unsupported == []
    x = torch.randn(4, 5, 8)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    plain = model.attn.out_proj.weight.grad.clone(), model.attn.in_proj_weight.grad.clone()
    pre.step()
    assert not torch.allclose(model.attn.out_proj.weight.grad, plain[0])
    assert not torch.allclose(model.attn.in_proj_weight.grad, plain[1])
    assert "not preconditioned" not in pre.describe()


def test_a_listed_layer_without_statistics_is_warned_about_and_counted() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "spare": nn.Linear(4, 3)})
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    x = torch.randn(6, 4)
    model["used"](x).sum().backward()
    with pytest.warns(RuntimeWarning, match=r"layers 'spare' are listed as preconditioned but received no statistics"):
        pre.step()
    assert pre.health.layers_without_statistics == 1
    model["used"](x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        pre.step()
    assert pre.health.layers_without_statistics == 1


def test_frozen_layers_are_left_out_and_said_so() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    pre = rkfac.KFACPreconditioner(model)
    assert pre.layer_names == ["2"]
    assert pre.describe().endswith("frozen, left out: 0")
    model[0].bias.requires_grad_(True)  # a frozen weight with a trainable bias: named, not listed
    with pytest.warns(UserWarning, match=r"0 \(Linear, frozen weight with a trainable bias\)"):
        pre = rkfac.KFACPreconditioner(model)
    assert pre.layer_names == ["2"]


@pytest.mark.parametrize("make", [rkfac.KFAC, rkfac.SENG, rkfac.KFACPreconditioner, rkfac.SENGPreconditioner])
def test_parameters_instead_of_the_model_are_refused_with_the_reason(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=r"takes the model \(an nn\.Module\), not generator: it hooks the model's layers"):
        make(nn.Linear(3, 2).parameters())


def test_skip_patterns_name_a_module_and_what_is_inside_it() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.classifier = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.classifier(self.features(x))

    net = Net()
    assert rkfac.KFACPreconditioner(net, skip="classifier.*").layer_names == ["features.0", "features.1"]
    assert rkfac.KFACPreconditioner(net, skip="classifier").layer_names == ["features.0", "features.1"]
    assert rkfac.KFACPreconditioner(net, skip=["features"]).layer_names == ["classifier"]
    assert rkfac.KFACPreconditioner(net, skip=["features.1"]).layer_names == ["features.0", "classifier"]
    with pytest.warns(UserWarning, match=r"skip rules \['clasifier\.\*'\] match no module"):
        rkfac.KFACPreconditioner(net, skip="clasifier.*")


def test_a_parameter_on_the_root_module_is_named_root() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.scale * self.fc(x)

    with pytest.warns(UserWarning, match=r"plain gradient: <root> \(Scaled\)"):
        pre = rkfac.KFACPreconditioner(Scaled())
    assert pre.unsupported == [("<root>", "Scaled")]


class TokenMLP(nn.Module):
    """Linear layers over tokens; ``batch_first`` says where the samples are."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inner = nn.Linear(5, 6)
        self.outer = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.outer(torch.tanh(self.inner(x)))
        return h.mean(1 if self.batch_first else 0)


@pytest.mark.parametrize("method", ["kfac", "seng"])
def test_sequence_first_inputs_with_batch_dim_give_the_batch_first_direction(method: str) -> None:
    torch.manual_seed(0)
    first = TokenMLP(batch_first=True).double()
    second = TokenMLP(batch_first=False).double()
    second.load_state_dict(first.state_dict())
    x = torch.randn(4, 7, 5, dtype=DTYPE)  # 4 samples of 7 tokens
    y = torch.tensor([0, 1, 2, 1])

    def direction(model: nn.Module, inputs: Tensor, batch_dim: int) -> list[Tensor]:
        if method == "kfac":
            pre = rkfac.KFACPreconditioner(model, factor_every=1, batch_dim=batch_dim, clip=None)
        else:
            pre = rkfac.SENGPreconditioner(model, update_freq=1, batch_dim=batch_dim, sketch_threshold=1e9)
        F.cross_entropy(model(inputs), y).backward()
        pre.step()
        return [p.grad for p in model.parameters()]

    expected = direction(first, x, 0)
    got = direction(second, x.transpose(0, 1), 1)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_clip_none_is_spelled_the_same_as_none() -> None:
    assert rkfac.KFACOptions(clip="none").clip is None
    assert rkfac.KFACOptions(clip=None).clip is None
