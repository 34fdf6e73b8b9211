"""The CUDA path: same math as on CPU, factors and decompositions on the model's device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac

pytestmark = pytest.mark.gpu


def model_and_batch(device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 10, (16,))
    return model.to(device), x.to(device), y.to(device)


def test_exact_direction_on_cuda_matches_cpu() -> None:
    results = {}
    for device in ("cpu", "cuda"):
        model, x, y = model_and_batch(device)
        pre = rkfac.KFACPreconditioner(model, decomposition=rkfac.SymmetricRandomizedEVD(rank=400), clip=None)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        for a, g in pre.factors().values():
            assert a.device.type == device and g.device.type == device and a.dtype == torch.float32
        results[device] = [p.grad.detach().cpu() for p in model.parameters()]
    for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-5)


def test_truncated_randomized_step_on_cuda_is_finite_and_state_moves_to_cpu() -> None:
    model, x, y = model_and_batch("cuda")
    opt = rkfac.KFAC(
        model, lr=0.1, decomposition=rkfac.SymmetricRandomizedEVD(rank=4, oversample=2), factor_every=1, inverse_every=2
    )
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    cpu_model, _, _ = model_and_batch("cpu")
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    cpu_opt = rkfac.KFAC(cpu_model, lr=0.1, decomposition=rkfac.SymmetricRandomizedEVD(rank=4, oversample=2))
    cpu_opt.load_state_dict(opt.state_dict())
    for a, g in cpu_opt.preconditioner.factors().values():
        assert a.device.type == "cpu" and g.device.type == "cpu"
