"""Models: the paper's VGG16_bn parameter count, shapes, width scaling, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rkfac
from rkfac.experiments.models import VGG16_CONFIG, build_model


def vgg16_bn_count_by_formula(classes: int = 10) -> int:
    """Conv 3×3 with bias: 9·c_in·c_out + c_out; BN: 2·c_out; classifier 512→512→classes."""
    total, previous = 0, 3
    for item in VGG16_CONFIG:
        if item != "M":
            out = int(item)
            total += 9 * previous * out + out + 2 * out
            previous = out
    return total + (512 * 512 + 512) + (512 * classes + classes)


def test_vgg16_bn_has_the_papers_parameter_count() -> None:
    model = build_model("vgg16_bn", (3, 32, 32), 10)
    count = sum(p.numel() for p in model.parameters())
    assert count == vgg16_bn_count_by_formula() == 14_990_922
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(m.groups == 1 and m.bias is not None for m in convs)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


def test_mlp_and_cnn_shapes_and_width_scale() -> None:
    mlp = build_model("mlp", (1, 28, 28), 10, widths=[64, 32], width_scale=1.5)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [96, 48, 10]
    assert mlp(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    for scale, channels, hidden in ((1.0, 64, 512), (2.0, 128, 1024), (0.5, 32, 256)):
        cnn = build_model("cnn", (1, 28, 28), 10, width_scale=scale)
        first_linear = next(m for m in cnn.modules() if isinstance(m, nn.Linear))
        assert (first_linear.in_features, first_linear.out_features) == (channels * 7 * 7, hidden)
        assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    cnn = build_model("cnn", (1, 28, 28), 10)
    pre = rkfac.KFACPreconditioner(cnn)
    widest = max(max(m.weight[0].numel() + 1, m.weight.shape[0]) for m in cnn.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert widest == 3137 and len(pre.layer_names) == 4


def test_same_seed_same_parameters() -> None:
    torch.manual_seed(0)
    first = build_model("cnn", (1, 28, 28), 10)
    torch.manual_seed(0)
    second = build_model("cnn", (1, 28, 28), 10)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("resnet", (1, 28, 28), 10), {}, "model must be one of .*got 'resnet'"),
        (("mlp", (1, 28, 28), 10), {"width_scale": 0}, "width_scale must be > 0, got 0"),
        (("mlp", (1, 28, 28), 10), {"widths": [16, -2]}, r"widths must be positive integers, got \[16, -2\]"),
        (("cnn", (1, 28, 28), 10), {"widths": [16]}, "widths applies to the mlp only"),
        (("cnn", (1, 3, 3), 10), {}, r"at least 4×4 \(two 2× poolings\), got 3×3"),
        (("vgg16_bn", (3, 28, 28), 10), {}, "multiples of 32.*got 28×28"),
    ],
)
def test_bad_model_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(*args, **kwargs)
