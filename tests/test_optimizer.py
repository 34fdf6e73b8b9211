"""rkfac.KFAC: the preconditioner followed by SGD, as documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(12, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (12,), generator=generator)


def test_kfac_equals_preconditioner_then_sgd_with_decay_after_start() -> None:
    options = dict(decomposition=rkfac.ExactEigh(), factor_every=1, inverse_every=2, clip="rms", clip_value=0.05)
    lr, momentum, weight_decay, start = 0.2, 0.5, 0.01, 2
    model_a, model_b = make_model(), make_model()
    opt = rkfac.KFAC(model_a, lr=lr, momentum=momentum, weight_decay=weight_decay, weight_decay_start=start, **options)
    pre = rkfac.KFACPreconditioner(model_b, **options)
    buffers: dict[int, torch.Tensor] = {}
    for step in range(5):
        x, y = batch(step)
        for model in (model_a, model_b):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step()
        pre.step()
        with torch.no_grad():
            for i, p in enumerate(model_b.parameters()):
                direction = p.grad + (weight_decay * p if step >= start else 0)
                buffers[i] = direction.clone() if i not in buffers else momentum * buffers[i] + direction
                p -= lr * buffers[i]
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b)


def test_lr_scheduler_reaches_the_kl_clip() -> None:
    model = make_model()
    opt = rkfac.KFAC(model, lr=1.0, clip="kl", clip_value=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    scheduler.step()
    assert opt.preconditioner.options.lr(0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0.0, got -1.0"),
        ({"momentum": 1.0}, "momentum must be < 1.0, got 1.0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0.0, got -0.0001"),
        ({"weight_decay_start": -1}, "weight_decay_start must be >= 1|weight_decay_start must be >= 0, got -1"),
        ({"damping": -2.0}, "damping must be > 0.0, got -2.0"),
    ],
)
def test_bad_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rkfac.KFAC(make_model(), **options)


def test_load_state_dict_without_preconditioner_is_refused() -> None:
    model = make_model()
    opt = rkfac.KFAC(model)
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="no 'preconditioner' entry"):
        opt.load_state_dict(plain)


def test_unknown_or_doubled_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown option 'dampnig'.*'damping'"):
        rkfac.KFAC(make_model(), dampnig=0.1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\]"):
        rkfac.KFACPreconditioner(make_model(), rank=10)
    with pytest.raises(ValueError, match="not both"):
        rkfac.KFACPreconditioner(make_model(), options=rkfac.KFACOptions(), damping=0.2)


def test_kfac_and_seng_take_options_objects_and_schedules_alike() -> None:
    """Both wrappers: keyword options, or the options object; lr as a callable of the step."""
    model = make_model()
    pre = rkfac.KFACPreconditioner(model, options=rkfac.KFACOptions(damping=0.2, factor_every=1))
    assert pre.options.damping == 0.2 and pre.options.factor_every == 1
    for optimizer_class in (rkfac.KFAC, rkfac.SENG):
        model = make_model()
        opt = optimizer_class(model, lr=lambda step: 0.1 / (step + 1), momentum=0.5)
        x, y = batch(0)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
        assert isinstance(opt.preconditioner, rkfac.Preconditioner)
