"""Issue 19's peers (Muon on hidden matrices + AdamW on the rest, SOAP from pytorch-optimizer)
and workloads (every Fashion preset runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rkfac.experiments.cli import main
from rkfac.experiments.models import build_model
from rkfac.experiments.optimizers import build_optimizer
from rkfac.experiments.peers import SOAP_MISSING, MuonWithAdamW, muon_split
from rkfac.experiments.presets import PRESETS, resolve_config

SMALL = ["--dataset", "synthetic", "--model", "mlp", "--widths", "16", "--batch-size", "16", "--quiet"]
FASHION = (1, 28, 28)


def soap_installed() -> bool:
    try:
        import pytorch_optimizer  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def test_muon_gets_the_hidden_matrices_and_adamw_the_head_embeddings_norms_biases_and_kernels() -> None:
    model = build_model("vit", FASHION, 10, width_scale=0.25)
    hidden, rest = muon_split(model)
    names = {id(p): name for name, p in model.named_parameters()}
    hidden_names, rest_names = {names[id(p)] for p in hidden}, {names[id(p)] for p in rest}
    assert "encoder.layers.0.self_attn.in_proj_weight" in hidden_names
    assert "encoder.layers.3.linear2.weight" in hidden_names
    assert all(p.dim() == 2 for p in hidden)
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert f"{head}.weight" in rest_names
    assert any("position" in name or "embed" in name for name in rest_names if name.endswith("weight") and "norm" not in name)
    assert all(not name.endswith("bias") for name in hidden_names)
    assert hidden_names | rest_names == set(names.values()) and not hidden_names & rest_names
    cnn_hidden, cnn_rest = muon_split(build_model("cnn", FASHION, 10))
    assert all(p.dim() == 2 for p in cnn_hidden) and any(p.dim() == 4 for p in cnn_rest)


def test_muon_steps_both_parts_with_the_trainers_learning_rate_and_resumes_exactly() -> None:
    def make() -> tuple[nn.Module, MuonWithAdamW]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, MuonWithAdamW(model, lr=1e-2, weight_decay=0.0)

    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.randint(0, 3, (32,))

    def train(model: nn.Module, opt: MuonWithAdamW, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model, opt = make()
    assert len(opt.param_groups) == 2  # the trainer sets the lr of both parts
    for group in opt.param_groups:
        group["lr"] = 2e-2
    losses = train(model, opt, 20)
    assert losses[-1] < losses[0]
    first = {name: p.detach().clone() for name, p in model.named_parameters()}
    model2, opt2 = make()
    for group in opt2.param_groups:
        group["lr"] = 2e-2
    train(model2, opt2, 10)
    state = opt2.state_dict()
    model3, opt3 = make()
    model3.load_state_dict(model2.state_dict())
    opt3.load_state_dict(state)
    train(model3, opt3, 10)
    for name, p in model3.named_parameters():
        torch.testing.assert_close(p, first[name], rtol=0, atol=0)


def test_muon_refuses_a_model_without_hidden_matrices() -> None:
    with pytest.raises(ValueError, match="no hidden 2-D weight"):
        MuonWithAdamW(nn.Linear(4, 2), lr=1e-3, weight_decay=0.0)


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "soap"])
def test_every_peer_trains_from_the_command_line(tmp_path: Path, optimizer: str) -> None:
    if optimizer == "soap" and not soap_installed():
        pytest.skip("pytorch-optimizer (the 'peers' extra) is not installed")
    assert main(["train", "--optimizer", optimizer, "--max-steps", "3", "--out", str(tmp_path / optimizer), *SMALL]) == 0
    summary = json.loads((tmp_path / optimizer / "summary.json").read_text())
    assert summary["status"] == "max_steps" and summary["steps"] == 3


def test_soap_without_its_package_is_refused_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # makes the import fail
    config = resolve_config("soap", None, {"dataset": "synthetic"})
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[peers\]' -c constraints\.txt"):
        build_optimizer(config, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), steps_per_epoch=1)
    assert "pytorch-optimizer" in SOAP_MISSING


FASHION_PRESETS = [name for name, preset in PRESETS.items() if preset.common["dataset"] == "fashion-mnist"]


def test_the_smoke_tests_cover_every_workload() -> None:
    expected = ["fashion-autoencoder", "fashion-autoencoder-auto", "fashion-cnn", "fashion-cnn-2048", "fashion-mlp-wide"]
    expected.append("fashion-mlp-wide-2048")
    assert sorted(FASHION_PRESETS) == ["demo", *expected, "fashion-vgg", "fashion-vit", "quick"]


@pytest.mark.parametrize("preset", FASHION_PRESETS)
def test_every_fashion_preset_trains_two_steps_of_its_last_optimizer_on_synthetic_data(tmp_path: Path, preset: str) -> None:
    optimizer = PRESETS[preset].optimizers[-1]  # a curvature method (K-FAC or SENG) in every preset
    out = tmp_path / preset
    args = ["train", "--preset", preset, "--optimizer", optimizer, "--dataset", "synthetic", "--width-scale", "0.125"]
    args += ["--batch-size", "16", "--max-steps", "2", "--out", str(out), "--quiet"]
    if "mlp" in preset or preset == "quick":
        args += ["--widths", "32,32"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "max_steps" and summary["steps"] == 2
