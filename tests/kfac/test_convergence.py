"""Every K-FAC variant beats plain SGD at the same learning rate on an ill-conditioned task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rkfac


def task() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with feature scales from 0.03 to 3 and labels from a random teacher network."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1.5, 0.5, 32)
    x = torch.randn(1024, 32, generator=generator) * scales
    teacher = torch.randn(32, 5, generator=generator) / scales[:, None]
    return x, (x @ teacher).argmax(1)


def train(optimizer_name: str, steps: int = 150) -> float:
    x, y = task()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    lr = 0.1
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        decomposition = {
            "exact": rkfac.ExactEigh(),
            "rsvd": rkfac.RandomizedSVD(rank=16, oversample=4, power_iters=2),
            "sre": rkfac.SymmetricRandomizedEVD(rank=16, oversample=4, power_iters=2),
        }[optimizer_name]
        optimizer = rkfac.KFAC(
            model, lr=lr, decomposition=decomposition, damping=0.01, factor_every=5, inverse_every=10, clip="rms", clip_value=1.0
        )
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        index = torch.randint(0, len(x), (128,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_each_kfac_variant_reaches_lower_loss_than_sgd() -> None:
    sgd = train("sgd")
    for name in ("exact", "rsvd", "sre"):
        loss = train(name)
        assert loss < 0.5 * sgd, (name, loss, sgd)
