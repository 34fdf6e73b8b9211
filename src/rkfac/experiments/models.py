"""The models the experiments train: an MLP, a small CNN and the paper's VGG16_bn.

Every hidden width scales with ``width_scale`` (``scaled``), so that the same architecture
can be widened to study how K-FAC's costs and the factors' spectra change with width.

- ``mlp``: Flatten → (Linear → ReLU) per hidden width → Linear. Default widths (1024, 1024).
- ``cnn`` (the fashion-cnn model): conv3×3(32) → ReLU → maxpool → conv3×3(64) → ReLU →
  maxpool → Linear(64·H/4·W/4, 512) → ReLU → Linear(512, classes). On 28×28 inputs the first
  Linear sees 3136 features, so its K-FAC A factor is 3137 wide: the O(d³) cost is real.
- ``vgg16_bn``: configuration D convolutions, each 3×3 with bias + BatchNorm + ReLU, max-pool
  after each block, no average pool, classifier Linear(512·H/32·W/32, 512) → ReLU →
  Dropout(0.5) → Linear(512, classes): 14,990,922 parameters on CIFAR-10 (spec section 6).
  Initialisation: Kaiming-normal convs (fan-out, ReLU) with zero bias, BatchNorm (1, 0),
  Linear N(0, 0.01) with zero bias, the usual VGG recipe.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

MODELS = ("mlp", "cnn", "vgg16_bn")
VGG16_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def scaled(width: int, width_scale: float) -> int:
    return max(1, round(width * width_scale))


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width_scale: float = 1.0,
    widths: Sequence[int] | None = None,
) -> nn.Module:
    """One of :data:`MODELS` for inputs (B, *input_shape) and ``num_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if isinstance(width_scale, bool) or not isinstance(width_scale, (int, float)) or width_scale <= 0:
        raise ValueError(f"width_scale must be > 0, got {width_scale!r}")
    if name != "mlp" and widths is not None:
        raise ValueError(f"widths applies to the mlp only; {name} takes width_scale, got widths={list(widths)}")
    channels, height, width = input_shape
    if name == "mlp":
        return _mlp(channels * height * width, num_classes, widths if widths is not None else (1024, 1024), width_scale)
    if name == "cnn":
        if height < 4 or width < 4:
            raise ValueError(f"cnn needs inputs of at least 4×4 (two 2× poolings), got {height}×{width}")
        return _cnn(input_shape, num_classes, width_scale)
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(f"vgg16_bn needs inputs whose sides are multiples of 32 (five 2× poolings), got {height}×{width}")
    return _vgg16_bn(input_shape, num_classes, width_scale)


def _mlp(inputs: int, num_classes: int, widths: Sequence[int], width_scale: float) -> nn.Module:
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"widths must be positive integers, got {list(widths)}")
    layers: list[nn.Module] = [nn.Flatten()]
    previous = inputs
    for hidden in widths:
        layers += [nn.Linear(previous, scaled(hidden, width_scale)), nn.ReLU()]
        previous = scaled(hidden, width_scale)
    layers.append(nn.Linear(previous, num_classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: tuple[int, int, int], num_classes: int, width_scale: float) -> nn.Module:
    channels, height, width = input_shape
    first, second, hidden = scaled(32, width_scale), scaled(64, width_scale), scaled(512, width_scale)
    return nn.Sequential(
        nn.Conv2d(channels, first, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(first, second, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(second * (height // 4) * (width // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _vgg16_bn(input_shape: tuple[int, int, int], num_classes: int, width_scale: float) -> nn.Module:
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    previous = channels
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out = scaled(int(item), width_scale)
            layers += [nn.Conv2d(previous, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            previous = out
    hidden = scaled(512, width_scale)
    model = nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(previous * (height // 32) * (width // 32), hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)  # type: ignore[arg-type]  # every VGG conv has a bias
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    return model
