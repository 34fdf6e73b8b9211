"""The models the experiments train: an MLP, a small CNN, the paper's VGG16_bn and a small ViT.

Every hidden width goes through :func:`scaled`, so one ``width_scale`` widens or narrows a whole
architecture: that is how the experiments study K-FAC's O(d³) decomposition cost and the
factors' spectra as the layers grow, without a separate model per width.

- ``mlp``: Flatten → (Linear → ReLU) per hidden width → Linear. Default widths (1024, 1024).
- ``cnn`` (the fashion-cnn model): Conv3×3(32) → ReLU → MaxPool(2) → Conv3×3(64) → ReLU →
  MaxPool(2) → Flatten → Linear(64·(H//4)·(W//4), 512) → ReLU → Linear(512, classes). On 28×28
  inputs the first Linear sees 64·7·7 = 3136 features, so its K-FAC A factor is 3137 wide: big
  enough (d ≥ 2048) that an exact eigendecomposition is the cost the randomized ones remove.
- ``vgg16_bn``: the paper's CIFAR-10 model. Configuration D convolutions, each 3×3 with padding 1
  and a bias, then BatchNorm and ReLU; a 2×2 max-pool ends each block; no adaptive average pool.
  Classifier Linear(512·(H/32)·(W/32), 512) → ReLU → Dropout(0.5) → Linear(512, classes):
  14,990,922 parameters on 3×32×32 inputs with 10 classes.
- ``vit`` (the fashion-vit model): a pre-norm vision transformer. The image is cut into 7×7
  patches (16 tokens on 28×28), each flattened patch (C·49 pixels) goes through a Linear to
  width 128 and gets a learned position embedding; then 4 ``nn.TransformerEncoderLayer`` blocks
  (4 heads, MLP 128-256-128 with GELU, ``norm_first=True``, no dropout), a final LayerNorm, the
  mean over tokens and a Linear head: 539,914 parameters on 1×28×28 with 10 classes. Mean
  pooling rather than a class token: the head then sees every token alike, there is one
  parameter fewer outside rkfac's layer kinds, and the "Better plain ViT baselines" recipe
  (Beyer, Zhai & Kolesnikov 2022) found it no worse for small ViTs.

Initialisation: the MLP and the CNN keep PyTorch's defaults. VGG16_bn uses the common VGG
recipe (as in most CIFAR VGG code): Kaiming-normal convolutions (fan-out, ReLU gain) with zero
bias, BatchNorm weight 1 and bias 0, Linear weights N(0, 0.01²) with zero bias. Fan-out Kaiming
keeps the activations' scale through thirteen ReLU convolutions, and the small classifier weights
start the logits near zero; PyTorch's default (Kaiming-uniform, a = √5) aims at neither. The
ViT keeps PyTorch's defaults, except that the position embedding starts at N(0, 0.02²) (as in
ViT) and each encoder block is built afresh: ``nn.TransformerEncoder`` deep-copies one layer
``depth`` times, which would start every block with the same weights.

``autoencoder`` (issue 19's ``fashion-autoencoder``, the classic K-FAC benchmark of Martens &
Grosse 2015): 784-1000-500-250-30-250-500-1000-784 for 28×28 images, every hidden layer tanh
except the 30-unit code, which is linear as in Hinton & Salakhutdinov (2006), and a linear
output: a reconstruction of the flattened pixels (:mod:`rkfac.experiments.tasks` gives it its
squared-error loss). ``num_classes`` does not apply: its output is as wide as its input. It keeps
PyTorch's default initialisation (Martens & Grosse used a sparse one; the defaults train here).

``vgg_fashion`` is the paper's regime sized for Fashion-MNIST on a CPU (issue 19's ``fashion-vgg``):
VGG-style 3×3 convolutions with BatchNorm, 64 → M → 128 → M → 256 → 512 → M → 512 on 28×28
inputs (feature maps 28, 14, 7, 7, 3), global average pooling and one Linear head, so that its
widest Kronecker factors are those of VGG16_bn's deep layers: A = 9·256 + 1 = 2305 and
9·512 + 1 = 4609, where exact K-FAC's O(d³) decompositions dominate as in the paper.

The convolutions keep their bias even before BatchNorm (where it is redundant) because the
paper's parameter count includes it; K-FAC then gives each convolution an A factor with the
bias column (9·C_in + 1 wide). Every convolution has groups = 1 and every layer with weights is an
``nn.Linear`` or ``nn.Conv2d``: exactly what :mod:`rkfac.layers` supports (:data:`rkfac.layers.KINDS`). ``ReLU(inplace=True)``
is safe with rkfac's statistics capture, which hooks output tensors, not modules. The ViT's
patch embedding, its blocks' feed-forward Linears and its head are ``nn.Linear`` too; its
``nn.MultiheadAttention`` layers are preconditioned where :mod:`rkfac.layers` supports them (else
named in rkfac's warning and given the plain step), and its LayerNorms take the plain step. Its
position embedding is an ``nn.Embedding`` looked up per sample, so rkfac preconditions it too
(a diagonal A); a bare ``nn.Parameter`` would take the plain step and get the root module named
as unsupported in rkfac's warning (as a class token would).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

MODELS = ("mlp", "cnn", "vgg16_bn", "vgg_fashion", "vit", "autoencoder")

#: The deep autoencoder's encoder widths (Hinton & Salakhutdinov 2006), before ``width_scale``;
#: the decoder mirrors them, and the last one is the linear code.
AUTOENCODER_WIDTHS: tuple[int, ...] = (1000, 500, 250, 30)

#: The default hidden widths of the MLP, before ``width_scale``.
MLP_WIDTHS: tuple[int, ...] = (1024, 1024)

#: VGG configuration D: output channels of each 3×3 convolution, "M" for a 2×2 max-pool.
VGG16_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

#: The ViT's side of a square patch (pixels), and its shape before ``width_scale``: the token
#: width (d_model), the feed-forward width (MLP ratio 2), the heads and the blocks. Sized so that
#: one AdamW step at batch 256 takes about 0.3 s on two CPU cores.
VIT_PATCH = 7
VIT_WIDTH = 128
VIT_FEEDFORWARD = 256
VIT_HEADS = 4
VIT_DEPTH = 4


def scaled(width: int, width_scale: float) -> int:
    """``width`` times ``width_scale``, rounded, and at least 1 so that no layer vanishes.

    Python's ``round`` rounds halves to even (``scaled(5, 0.5) == 2``); what matters is that the
    same (width, scale) always gives the same size, so checkpoints and runs stay comparable.
    """
    return max(1, round(width * width_scale))


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width_scale: float = 1.0,
    widths: Sequence[int] | None = None,
) -> nn.Module:
    """One of :data:`MODELS` for inputs of shape (B, *input_shape) and ``num_classes`` logits.

    Args:
        name: "mlp", "cnn", "vgg16_bn", "vgg_fashion", "vit" or "autoencoder".
        input_shape: (channels, height, width) of one sample. The CNN needs height and width
            of at least 4 (two 2× poolings); VGG16_bn needs multiples of 32 (five of them); the
            ViT multiples of 7 (its patches).
        num_classes: the width of the output layer.
        width_scale: multiplies every hidden width (through :func:`scaled`); > 0.
        widths: the MLP's hidden widths before scaling (default (1024, 1024); empty gives
            multinomial logistic regression). The CNN, VGG16_bn and the ViT have fixed shapes and
            take only ``width_scale``, so passing ``widths`` to them is an error rather than
            ignored. The ViT's scaled token width must divide among its 4 heads.

    Raises:
        ValueError: naming the bad value, for any argument outside the ranges above.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    channels, height, width = _check_input_shape(input_shape)
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    _check_width_scale(width_scale)
    if name != "mlp" and widths is not None:
        raise ValueError(f"widths applies to the mlp only; {name} takes width_scale, got widths={list(widths)}")

    if name == "mlp":
        hidden = MLP_WIDTHS if widths is None else _check_widths(widths)
        return _mlp(channels * height * width, num_classes, [scaled(w, width_scale) for w in hidden])
    if name == "autoencoder":
        return _autoencoder(channels * height * width, [scaled(w, width_scale) for w in AUTOENCODER_WIDTHS])
    if name == "cnn":
        if height < 4 or width < 4:
            raise ValueError(f"cnn needs inputs of at least 4×4 (two 2× poolings), got {height}×{width}")
        return _cnn(channels, height, width, num_classes, width_scale)
    if name == "vit":
        if height % VIT_PATCH or width % VIT_PATCH:
            raise ValueError(
                f"vit needs inputs whose sides are multiples of {VIT_PATCH} ({VIT_PATCH}×{VIT_PATCH} patches), "
                f"got {height}×{width}"
            )
        model_width = scaled(VIT_WIDTH, width_scale)
        if model_width % VIT_HEADS:
            raise ValueError(
                f"vit needs a token width divisible by its {VIT_HEADS} heads: width_scale={width_scale!r} gives {model_width}"
            )
        tokens = (height // VIT_PATCH) * (width // VIT_PATCH)
        return VisionTransformer(channels, tokens, num_classes, model_width, scaled(VIT_FEEDFORWARD, width_scale))
    if name == "vgg_fashion":
        if height < 8 or width < 8:
            raise ValueError(f"vgg_fashion needs inputs of at least 8×8 (three 2× poolings), got {height}×{width}")
        return _vgg_fashion(channels, num_classes, width_scale)
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(f"vgg16_bn needs inputs whose sides are multiples of 32 (five 2× poolings), got {height}×{width}")
    return _vgg16_bn(channels, height, width, num_classes, width_scale)


# ---------------------------------------------------------------------- argument checks


def _is_int(value: object) -> bool:
    """An integer, NumPy ones included; not a bool (``True`` as a width is surely a mistake)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _check_input_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) as plain ints; a (B, C, H, W) shape or a zero size is rejected here, early."""
    if not isinstance(input_shape, Sequence) or len(input_shape) != 3 or not all(_is_int(s) and s > 0 for s in input_shape):
        raise ValueError(f"input_shape must be (channels, height, width) of positive integers, got {input_shape!r}")
    channels, height, width = (operator.index(s) for s in input_shape)
    return channels, height, width


def _check_width_scale(width_scale: float) -> None:
    if isinstance(width_scale, bool) or not isinstance(width_scale, (int, float)) or width_scale <= 0:
        raise ValueError(f"width_scale must be > 0, got {width_scale!r}")
    if not math.isfinite(width_scale):
        raise ValueError(f"width_scale must be finite, got {width_scale!r}")


def _check_widths(widths: Sequence[int]) -> list[int]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(f"widths must be a sequence of positive integers, got {widths!r}")
    if not all(_is_int(w) and w > 0 for w in widths):
        raise ValueError(f"widths must be positive integers, got {list(widths)}")
    return [operator.index(w) for w in widths]


# ---------------------------------------------------------------------- architectures


def _mlp(inputs: int, num_classes: int, hidden: Sequence[int]) -> nn.Sequential:
    """Flatten, then (Linear → ReLU) for each width in ``hidden`` (already scaled), then the head."""
    layers: list[nn.Module] = [nn.Flatten()]
    previous = inputs
    for width in hidden:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, num_classes))
    return nn.Sequential(*layers)


def _autoencoder(inputs: int, encoder: Sequence[int]) -> nn.Sequential:
    """Flatten, the encoder widths (tanh, the last one the linear code), the mirrored decoder
    (tanh), and a linear output as wide as the input."""
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [inputs, *encoder, *reversed(encoder[:-1]), inputs]
    code = len(encoder)
    for index, (previous, width) in enumerate(itertools.pairwise(widths), start=1):
        layers.append(nn.Linear(previous, width))
        if index not in (code, len(widths) - 1):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _cnn(channels: int, height: int, width: int, num_classes: int, width_scale: float) -> nn.Sequential:
    """Two conv blocks and a two-layer head; each 2× max-pool floors, so the map is (H//4, W//4)."""
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


def _vgg_features(config: Sequence[int | str], channels: int, width_scale: float) -> tuple[list[nn.Module], int]:
    """VGG's feature layers for ``config`` (widths, "M" for a 2× max-pool): 3×3 conv + BatchNorm +
    ReLU per width; returns the layers and the last width."""
    layers: list[nn.Module] = []
    previous = channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        out = scaled(int(item), width_scale)
        layers += [nn.Conv2d(previous, out, 3, padding=1, bias=True), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        previous = out
    return layers, previous


def _vgg16_bn(channels: int, height: int, width: int, num_classes: int, width_scale: float) -> nn.Sequential:
    """VGG configuration D with BatchNorm, sized for ``width_scale``, initialised as documented above."""
    layers, previous = _vgg_features(VGG16_CONFIG, channels, width_scale)
    hidden = scaled(512, width_scale)
    model = nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(previous * (height // 32) * (width // 32), hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )
    _init_vgg(model)
    return model


VGG_FASHION_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 512, "M", 512)


def _vgg_fashion(channels: int, num_classes: int, width_scale: float) -> nn.Sequential:
    """The ``fashion-vgg`` network (module docstring), initialised as VGG16_bn."""
    layers, previous = _vgg_features(VGG_FASHION_CONFIG, channels, width_scale)
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes))
    _init_vgg(model)
    return model


def _init_vgg(model: nn.Module) -> None:
    """The common VGG initialisation (see the module docstring for why not PyTorch's default)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """Patches → Linear embedding + position → pre-norm encoder blocks → LayerNorm → mean → head.

    Input (B, C, H, W) with H and W multiples of :data:`VIT_PATCH`; the ``tokens`` patches are
    taken row by row (``nn.Unfold``), each a vector of C·p² pixels.
    """

    positions: torch.Tensor  # 0, 1, …, tokens − 1: a buffer, so it follows the model's device

    def __init__(self, channels: int, tokens: int, num_classes: int, width: int, feedforward: int) -> None:
        super().__init__()
        self.patches = nn.Unfold(kernel_size=VIT_PATCH, stride=VIT_PATCH)
        self.embed = nn.Linear(channels * VIT_PATCH * VIT_PATCH, width)
        # An nn.Embedding over the positions rather than an nn.Parameter: see the module docstring.
        self.position = nn.Embedding(tokens, width)
        self.register_buffer("positions", torch.arange(tokens), persistent=False)

        def block() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                width, VIT_HEADS, feedforward, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )

        # Nested tensors are for padded batches (and unused with norm_first); off, PyTorch does not warn.
        self.encoder = nn.TransformerEncoder(block(), VIT_DEPTH, enable_nested_tensor=False)
        # TransformerEncoder deep-copies its one layer, so every block would start alike: build each afresh.
        self.encoder.layers = nn.ModuleList(block() for _ in range(VIT_DEPTH))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.normal_(self.position.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patches(images).transpose(1, 2)  # (B, tokens, C·p²), row by row
        tokens = self.embed(patches) + self.position(self.positions.expand(len(images), -1))  # (B, tokens, width)
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))
