"""The fashion-vit model and preset: shapes, parameter count, structure, AdamW, rkfac, errors.

Kept fast: the full-width ViT (539,914 parameters) runs on batches of a few samples; the
200-step rkfac run trains a quarter-width one (token width 32).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rkfac
from rkfac.experiments.datasets import synthetic_dataset
from rkfac.experiments.models import VIT_PATCH, build_model
from rkfac.experiments.optimizers import build_optimizer
from rkfac.experiments.presets import PRESETS, resolve_config

FASHION = (1, 28, 28)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_parameters(channels: int = 1, tokens: int = 16, classes: int = 10, width: int = 128, mlp: int = 256) -> int:
    """From the layer shapes: patch Linear(49·C, width), a position table tokens × width; per block
    the attention's packed q/k/v (3·width² + 3·width) and out_proj (width² + width), the MLP
    Linear(width, mlp) and Linear(mlp, width), two LayerNorms (2·width each); the final LayerNorm
    and the Linear(width, classes) head."""
    block = (3 * width * width + 3 * width) + (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width
    return (49 * channels * width + width) + tokens * width + 4 * block + 2 * width + (width * classes + classes)


def blocks(model: nn.Module) -> list[nn.TransformerEncoderLayer]:
    return [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit", FASHION, 10)


def test_vit_parameter_count(vit: nn.Module) -> None:
    assert vit_parameters() == 539_914
    assert count(vit) == 539_914


@pytest.mark.parametrize(("shape", "classes"), [(FASHION, 10), ((3, 14, 21), 5)])
def test_vit_forward_shape(shape: tuple[int, int, int], classes: int) -> None:
    model = build_model("vit", shape, classes)
    assert model(torch.randn(3, *shape)).shape == (3, classes)
    tokens = (shape[1] // VIT_PATCH) * (shape[2] // VIT_PATCH)
    assert count(model) == vit_parameters(channels=shape[0], tokens=tokens, classes=classes)


def test_vit_is_built_from_standard_pre_norm_encoder_layers(vit: nn.Module) -> None:
    """Four nn.TransformerEncoderLayers (what rkfac's attention support has to cover), each pre-norm,
    batch-first, GELU, no dropout, 4 heads of width 32, in an nn.TransformerEncoder without nested tensors."""
    encoders = [m for m in vit.modules() if isinstance(m, nn.TransformerEncoder)]
    assert len(encoders) == 1 and not encoders[0].use_nested_tensor
    layers = blocks(vit)
    assert len(layers) == 4 and list(encoders[0].layers) == layers
    for layer in layers:
        attention = layer.self_attn
        assert isinstance(attention, nn.MultiheadAttention)
        assert (attention.embed_dim, attention.num_heads, attention.batch_first) == (128, 4, True)
        assert (layer.linear1.in_features, layer.linear1.out_features, layer.linear2.out_features) == (128, 256, 128)
        assert layer.norm_first and layer.activation is nn.functional.gelu
        assert layer.dropout.p == layer.dropout1.p == layer.dropout2.p == attention.dropout == 0.0
    linears = [m for m in vit.modules() if type(m) is nn.Linear]  # out_proj is a Linear subclass
    assert [(m.in_features, m.out_features) for m in (linears[0], linears[-1])] == [(49, 128), (128, 10)]
    assert isinstance(vit.position, nn.Embedding) and vit.position.weight.shape == (16, 128)


def test_vit_blocks_start_with_their_own_weights(vit: nn.Module) -> None:
    """nn.TransformerEncoder deep-copies one layer; the model re-creates each so they differ."""
    first, *others = blocks(vit)
    for other in others:
        assert not torch.equal(first.linear1.weight, other.linear1.weight)
        assert not torch.equal(first.self_attn.in_proj_weight, other.self_attn.in_proj_weight)
    assert vit.position.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_vit_patches_are_7x7_tiles_taken_row_by_row(vit: nn.Module) -> None:
    """Each token's input is one 7×7 tile, flattened; token t is tile (t // 4, t % 4)."""
    images = torch.randn(2, *FASHION)
    seen: list[torch.Tensor] = []
    handle = vit.embed.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0]))
    vit(images)
    handle.remove()
    tiles = images.reshape(2, 1, 4, 7, 4, 7).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 49)
    torch.testing.assert_close(seen[0], tiles, rtol=0, atol=0)


def test_vit_evaluation_fast_path_gives_the_training_forward(vit: nn.Module) -> None:
    """In eval under no_grad PyTorch may take its fused encoder path; without dropout it must agree."""
    images = torch.randn(4, *FASHION)
    vit.train()
    with torch.no_grad():
        trained = vit(images)
        vit.eval()
        evaluated = vit(images)
    vit.train()
    torch.testing.assert_close(evaluated, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("scale", "width", "mlp"), [(0.5, 64, 128), (0.25, 32, 64), (2.0, 256, 512)])
def test_vit_width_scale(scale: float, width: int, mlp: int) -> None:
    model = build_model("vit", FASHION, 10, width_scale=scale)
    assert {(layer.linear1.in_features, layer.linear1.out_features) for layer in blocks(model)} == {(width, mlp)}
    assert count(model) == vit_parameters(width=width, mlp=mlp)
    assert model(torch.randn(2, *FASHION)).shape == (2, 10)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("vit", (1, 28, 30), 10), {}, r"vit needs inputs whose sides are multiples of 7 \(7×7 patches\), got 28×30"),
        (("vit", (1, 32, 32), 10), {}, "multiples of 7.*got 32×32"),
        (
            ("vit", FASHION, 10),
            {"width_scale": 0.3},
            r"vit needs a token width divisible by its 4 heads: width_scale=0\.3 gives 38$",
        ),
        (("vit", FASHION, 10), {"widths": [64]}, r"widths applies to the mlp only; vit .*got widths=\[64\]"),
        (("vit", FASHION, 10), {"width_scale": 0}, "width_scale must be > 0, got 0"),
    ],
)
def test_vit_bad_arguments_raise_value_error_naming_the_value(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(*args, **kwargs)


# ---------------------------------------------------------------------- preset and AdamW


def test_fashion_vit_preset() -> None:
    preset = PRESETS["fashion-vit"]
    assert preset.optimizers == ("adamw", "kfac", "sre-kfac")
    adamw = resolve_config("adamw", "fashion-vit")
    assert (adamw.model, adamw.dataset, adamw.epochs, adamw.batch_size) == ("vit", "fashion-mnist", 5, 256)
    assert (adamw.lr, adamw.weight_decay) == (1e-3, 0.05)
    assert resolve_config("sre-kfac", "fashion-vit").weight_decay == resolve_config("sre-kfac").weight_decay
    # the presets that name AdamW (issue 19's peer) themselves
    named = {"fashion-vit", "fashion-vgg", "fashion-autoencoder", "fashion-autoencoder-auto", "demo"}
    assert all("adamw" not in p.optimizers for name, p in PRESETS.items() if name not in named)


def test_one_adamw_step_lowers_the_loss_on_a_small_batch() -> None:
    torch.manual_seed(0)
    config = resolve_config("adamw", "fashion-vit", {"dataset": "synthetic"})
    model = build_model(config.model, FASHION, 10)
    optimizer = build_optimizer(config, model, steps_per_epoch=1)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.05
    images, labels = torch.randn(32, *FASHION), torch.randint(0, 10, (32,))
    before = nn.functional.cross_entropy(model(images), labels)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(images), labels)
    assert after.item() < before.item()


# ---------------------------------------------------------------------- rkfac on the whole encoder


@pytest.mark.parametrize("method", [rkfac.KFAC, rkfac.LowRankEKFAC])
def test_a_transformer_encoder_trains_200_steps_with_rkfac_without_faults(method: type[rkfac.KFAC]) -> None:
    """Every projection of every attention and the position embedding are preconditioned, and
    200 steps of K-FAC, or of EKFAC (whose statistic pairs the embedding's tokens with their
    rows), at factors every 2 and inverses every 10, run with no recovered fault, finite losses,
    and the loss going down."""
    torch.manual_seed(0)
    data = synthetic_dataset(train=512, test=16, seed=0)
    model = build_model("vit", FASHION, 10, width_scale=0.25)
    optimizer = method(model, lr=0.05, factor_every=2, inverse_every=10)
    names = optimizer.preconditioner.layer_names
    assert "position" in names
    for index in range(4):
        for role in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"encoder.layers.{index}.self_attn.{role}" in names
    losses = []
    for step in range(200):
        batch = slice(32 * (step % 16), 32 * (step % 16 + 1))
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert all(value == 0 for value in optimizer.preconditioner.health.as_dict().values())
    assert sum(losses[-20:]) < sum(losses[:20])
