"""The experiment models (the ViT in test_vit.py): VGG16_bn's parameter count, shapes, width scaling, rkfac support, errors.

Kept fast (a few seconds on two CPU cores): the full-width VGG16_bn is built once per module and
run on a batch of two; everything that trains or preconditions a VGG uses a narrow one.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import rkfac
from rkfac import layers
from rkfac.experiments.models import MODELS, build_model, scaled
from rkfac.layers import kind_for

FASHION = (1, 28, 28)
CIFAR = (3, 32, 32)

# Written out here rather than imported, so that the count below does not trust the model's own table.
VGG16_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG16_CHANNELS = [item for item in VGG16_D if isinstance(item, int)]


def vgg16_bn_parameters(in_channels: int = 3, classes: int = 10, spatial: int = 1) -> int:
    """Parameters from the layer shapes: a 3×3 conv with bias has 9·c_in·c_out + c_out, its
    BatchNorm 2·c_out (weight, bias; running stats are buffers), then the classifier
    Linear(512·spatial, 512) and Linear(512, classes), each with a bias."""
    total, previous = 0, in_channels
    for out in VGG16_CHANNELS:
        total += (9 * previous * out + out) + 2 * out
        previous = out
    return total + (512 * spatial * 512 + 512) + (512 * classes + classes)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vgg16_bn", CIFAR, 10)


# ---------------------------------------------------------------------- VGG16_bn


def test_vgg16_bn_has_the_papers_parameter_count(vgg: nn.Module) -> None:
    assert vgg16_bn_parameters() == 14_990_922
    assert count(vgg) == 14_990_922


def test_vgg16_bn_count_follows_the_input_size_and_classes() -> None:
    """A 64×64 input leaves a 2×2 map, so only the first classifier Linear grows (×4)."""
    model = build_model("vgg16_bn", (3, 64, 64), 100)
    assert count(model) == vgg16_bn_parameters(classes=100, spatial=4)
    assert (linears(model)[0].in_features, linears(model)[0].out_features) == (512 * 2 * 2, 512)


def test_vgg16_bn_structure(vgg: nn.Module) -> None:
    conv_layers = convs(vgg)
    assert len(conv_layers) == 13
    assert [c.out_channels for c in conv_layers] == VGG16_CHANNELS
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None for c in conv_layers)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 5
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) for m in vgg.modules())
    dropouts = [m for m in vgg.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    assert [(m.in_features, m.out_features) for m in linears(vgg)] == [(512, 512), (512, 10)]


def test_vgg16_bn_initialisation(vgg: nn.Module) -> None:
    """Kaiming-normal fan-out convs, zero biases, BatchNorm (1, 0), Linear N(0, 0.01)."""
    for conv in convs(vgg):
        fan_out = conv.out_channels * 9
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert conv.bias is not None and torch.count_nonzero(conv.bias) == 0
    for norm in (m for m in vgg.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    for linear in linears(vgg):
        assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
        assert torch.count_nonzero(linear.bias) == 0


def test_vgg16_bn_forward(vgg: nn.Module) -> None:
    vgg.eval()
    with torch.no_grad():
        assert vgg(torch.randn(2, *CIFAR)).shape == (2, 10)


def test_vgg16_bn_width_scale_scales_every_channel_and_the_hidden_width() -> None:
    model = build_model("vgg16_bn", CIFAR, 10, width_scale=0.25)
    assert [c.out_channels for c in convs(model)] == [scaled(w, 0.25) for w in VGG16_CHANNELS]
    assert [(m.in_features, m.out_features) for m in linears(model)] == [(128, 128), (128, 10)]


# ---------------------------------------------------------------------- MLP and CNN


@pytest.mark.parametrize(("name", "shape"), [("mlp", FASHION), ("cnn", FASHION), ("mlp", CIFAR), ("cnn", CIFAR)])
def test_forward_shapes(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, shape, 10)
    assert model(torch.randn(3, *shape)).shape == (3, 10)


def test_mlp_widths_and_width_scale() -> None:
    assert [(m.in_features, m.out_features) for m in linears(build_model("mlp", FASHION, 10))] == [
        (784, 1024),
        (1024, 1024),
        (1024, 10),
    ]
    half = build_model("mlp", FASHION, 10, width_scale=0.5)
    assert [m.out_features for m in linears(half)] == [512, 512, 10]
    custom = build_model("mlp", FASHION, 7, widths=(64, 32, 16), width_scale=1.5)
    assert [m.out_features for m in linears(custom)] == [96, 48, 24, 7]
    assert custom(torch.randn(2, *FASHION)).shape == (2, 7)


def test_mlp_without_hidden_layers_is_a_single_linear() -> None:
    model = build_model("mlp", FASHION, 10, widths=[])
    assert [(m.in_features, m.out_features) for m in linears(model)] == [(784, 10)]


@pytest.mark.parametrize(("scale", "channels", "hidden"), [(1.0, 64, 512), (2.0, 128, 1024), (0.5, 32, 256)])
def test_cnn_width_scale(scale: float, channels: int, hidden: int) -> None:
    model = build_model("cnn", FASHION, 10, width_scale=scale)
    assert [c.out_channels for c in convs(model)] == [channels // 2, channels]
    first = linears(model)[0]
    assert (first.in_features, first.out_features) == (channels * 7 * 7, hidden)
    assert model(torch.randn(2, *FASHION)).shape == (2, 10)


@pytest.mark.parametrize(("height", "width"), [(4, 4), (30, 30), (5, 11)])
def test_cnn_pooling_floors_odd_sizes(height: int, width: int) -> None:
    model = build_model("cnn", (2, height, width), 3)
    assert linears(model)[0].in_features == 64 * (height // 4) * (width // 4)
    assert model(torch.randn(2, 2, height, width)).shape == (2, 3)


def test_cnn_widest_kfac_factor_reaches_2048() -> None:
    """The fashion-cnn exists to have a factor wider than 2048: the first Linear's A is 3137."""
    model = build_model("cnn", FASHION, 10)
    dims = [kind_for(m).factor_dims for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert dims == [(10, 32), (289, 64), (3137, 512), (513, 10)]
    assert max(max(d) for d in dims) == 3137 >= 2048


def test_scaled() -> None:
    assert scaled(1024, 1.0) == 1024
    assert scaled(1024, 0.5) == 512
    assert scaled(64, 1.5) == 96
    assert scaled(3, 0.1) == 1  # never zero
    assert scaled(5, 0.5) == 2  # Python rounds halves to even


# ---------------------------------------------------------------------- what rkfac supports


@pytest.mark.parametrize(
    ("name", "shape", "expected_layers"), [("mlp", FASHION, 3), ("cnn", FASHION, 4), ("vgg16_bn", CIFAR, 15)]
)
def test_every_weighted_layer_is_one_rkfac_preconditions(name: str, shape: tuple[int, int, int], expected_layers: int) -> None:
    model = build_model(name, shape, 10, width_scale=0.125)
    with_weights = [m for m in model.modules() if getattr(m, "weight", None) is not None]
    assert all(isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)) for m in with_weights)
    assert all(c.groups == 1 for c in convs(model))
    assert all(layers.is_supported(m) for m in with_weights if not isinstance(m, nn.BatchNorm2d))
    pre = rkfac.KFACPreconditioner(model)
    assert len(pre.layer_names) == expected_layers
    pre.remove()


def test_narrow_vgg16_bn_takes_a_kfac_step() -> None:
    """A K-FAC step through BatchNorm and in-place ReLUs: factors of the expected widths, finite grads."""
    torch.manual_seed(0)
    model = build_model("vgg16_bn", CIFAR, 10, width_scale=1 / 16)  # 4 to 32 channels: factors ≤ 289 wide
    pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, *CIFAR)), torch.randint(0, 10, (4,)))
    loss.backward()
    pre.step()
    factors = pre.factors()
    assert len(factors) == 15
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            a, g = factors[name]
            assert (a.shape[0], g.shape[0]) == kind_for(module).factor_dims
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_parameters(name: str) -> None:
    shape = CIFAR if name == "vgg16_bn" else FASHION

    def make(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(build_model(name, shape, 10, width_scale=0.125).state_dict().values())

    first, second, other = make(0), make(0), make(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            ("resnet", FASHION, 10),
            {},
            r"model must be one of \('mlp', 'cnn', 'vgg16_bn', 'vgg_fashion', 'vit', 'autoencoder'\), got 'resnet'",
        ),
        (("MLP", FASHION, 10), {}, "got 'MLP'"),
        (("mlp", FASHION, 10), {"width_scale": 0}, "width_scale must be > 0, got 0"),
        (("cnn", FASHION, 10), {"width_scale": -0.5}, r"width_scale must be > 0, got -0\.5"),
        (("mlp", FASHION, 10), {"width_scale": float("nan")}, "width_scale must be finite, got nan"),
        (("mlp", FASHION, 10), {"width_scale": float("inf")}, "width_scale must be finite, got inf"),
        (("mlp", FASHION, 10), {"width_scale": True}, "width_scale must be > 0, got True"),
        (("mlp", FASHION, 10), {"width_scale": "2"}, "width_scale must be > 0, got '2'"),
        (("mlp", FASHION, 10), {"widths": [16, -2]}, r"widths must be positive integers, got \[16, -2\]"),
        (("mlp", FASHION, 10), {"widths": [0]}, r"widths must be positive integers, got \[0\]"),
        (("mlp", FASHION, 10), {"widths": [1.5]}, r"widths must be positive integers, got \[1\.5\]"),
        (("mlp", FASHION, 10), {"widths": [True]}, r"widths must be positive integers, got \[True\]"),
        (("mlp", FASHION, 10), {"widths": "64"}, "widths must be a sequence of positive integers, got '64'"),
        (("cnn", FASHION, 10), {"widths": [16]}, r"widths applies to the mlp only; cnn .*got widths=\[16\]"),
        (("vgg16_bn", CIFAR, 10), {"widths": [16]}, r"widths applies to the mlp only; vgg16_bn .*got widths=\[16\]"),
        (("cnn", (1, 3, 3), 10), {}, r"cnn needs inputs of at least 4×4 \(two 2× poolings\), got 3×3"),
        (("cnn", (1, 28, 2), 10), {}, "cnn needs .*got 28×2"),
        (("vgg16_bn", (3, 28, 28), 10), {}, "vgg16_bn needs inputs whose sides are multiples of 32.*got 28×28"),
        (("vgg16_bn", (3, 16, 16), 10), {}, "multiples of 32.*got 16×16"),
        (("vgg16_bn", (3, 48, 64), 10), {}, "multiples of 32.*got 48×64"),
        (("mlp", (28, 28), 10), {}, r"input_shape must be \(channels, height, width\).*got \(28, 28\)"),
        (("mlp", (1, 1, 28, 28), 10), {}, r"input_shape .*got \(1, 1, 28, 28\)"),
        (("cnn", (0, 28, 28), 10), {}, r"input_shape .*positive integers, got \(0, 28, 28\)"),
        (("cnn", (1, 28.0, 28), 10), {}, r"input_shape .*got \(1, 28\.0, 28\)"),
        (("mlp", FASHION, 0), {}, "num_classes must be a positive integer, got 0"),
        (("mlp", FASHION, 2.5), {}, r"num_classes must be a positive integer, got 2\.5"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(*args, **kwargs)


# ---------------------------------------------------------------------- fashion-vgg (issue 19)


def test_vgg_fashion_has_the_papers_widest_factors_and_its_parameter_count() -> None:
    model = build_model("vgg_fashion", (1, 28, 28), 10)
    channels = [1, 64, 128, 256, 512, 512]
    convs = sum(9 * c_in * c_out + c_out + 2 * c_out for c_in, c_out in itertools.pairwise(channels))
    assert sum(p.numel() for p in model.parameters()) == convs + 512 * 10 + 10 == 3_917_706
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    pre = rkfac.KFACPreconditioner(model)
    widths = sorted(layer.kind.factor_dims[0] for layer in pre.layers)
    assert widths[-2:] == [2305, 4609]
    assert pre.unsupported == []


def test_vgg_fashion_refuses_inputs_too_small_for_three_poolings() -> None:
    with pytest.raises(ValueError, match=r"vgg_fashion needs inputs of at least 8×8 .* got 7×7"):
        build_model("vgg_fashion", (1, 7, 7), 10)


def test_the_issue_19_presets_resolve() -> None:
    from rkfac.experiments.presets import resolve_config

    assert resolve_config("kfac", "fashion-vgg", {}).model == "vgg_fashion"
    for name in ("fashion-cnn-2048", "fashion-mlp-wide-2048"):
        config = resolve_config("sre-kfac", name, {})
        assert config.batch_size == 2048 and config.epochs == 10
    assert resolve_config("sgd", "fashion-mlp-wide-2048", {}).widths == [2048, 2048]
