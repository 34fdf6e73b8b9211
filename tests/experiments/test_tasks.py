"""The reconstruction task (fashion-autoencoder): model, loss, training-loss targets, tables, plot."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rkfac.experiments.bench import format_table, run_bench, summarize
from rkfac.experiments.config import RunConfig
from rkfac.experiments.models import build_model
from rkfac.experiments.plot import SMOOTHING, smoothed_steps
from rkfac.experiments.presets import PRESETS, resolve_config
from rkfac.experiments.rundir import RunDirectory
from rkfac.experiments.tasks import Reconstruction, Target, task_for
from rkfac.experiments.train import Trainer

SYNTHETIC = dict(dataset="synthetic", synthetic_train=96, synthetic_test=48, batch_size=32, width_scale=0.05)


def test_the_autoencoder_is_hinton_and_salakhutdinovs_shape_with_a_linear_code() -> None:
    model = build_model("autoencoder", (1, 28, 28), 10)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 1000), (1000, 500), (500, 250), (250, 30), (30, 250), (250, 500), (500, 1000), (1000, 784)
    ]  # fmt: skip
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert sum(p.numel() for p in model.parameters()) == sum((a + 1) * b for a, b in itertools.pairwise(widths)) == 2_837_314
    # tanh after every hidden layer but the code (the 4th Linear) and the output
    after = [type(model[i + 1]).__name__ if i + 1 < len(model) else None for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    assert after == ["Tanh", "Tanh", "Tanh", "Linear", "Tanh", "Tanh", "Tanh", None]


def test_reconstruction_recovers_pixels_and_sums_the_squared_error_per_image() -> None:
    mean, std = (0.2860,), (0.3530,)
    pixels = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    task = Reconstruction(mean=mean, std=std)
    inputs, targets = task.batch((pixels - mean[0]) / std[0], torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(inputs, pixels.flatten(1))
    assert targets is inputs
    outputs = torch.randn(5, 784, dtype=torch.float64)
    by_hand = sum(float(((outputs[b] - pixels[b].flatten()) ** 2).sum()) for b in range(5)) / 5
    assert float(task.loss(outputs, targets)) == pytest.approx(by_hand, rel=1e-12)
    assert float(task.loss(outputs, targets, reduction="sum")) == pytest.approx(5 * by_hand, rel=1e-12)
    assert task_for("autoencoder").mc_loss == "mse" and task_for("mlp").mc_loss == "cross_entropy"
    # per channel, as CIFAR-10 normalises
    means, stds = (0.49, 0.48, 0.45), (0.20, 0.19, 0.21)
    colour = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    normalised = torch.stack([(colour[:, c] - means[c]) / stds[c] for c in range(3)], dim=1)
    torch.testing.assert_close(Reconstruction(mean=means, std=stds).pixels(normalised), colour.flatten(1))


def test_a_target_level_is_met_from_the_right_side() -> None:
    accuracy, loss = Target("test_acc", 0.9), Target("train_eval_loss", 12.0)
    assert accuracy.met(0.9) and not accuracy.met(0.89) and not accuracy.met(math.nan)
    assert loss.met(12.0) and loss.met(3.0) and not loss.met(12.5) and not loss.met(math.nan)
    assert (accuracy.key, accuracy.label, loss.key, loss.label) == ("0.9", "90%", "loss:12", "loss 12")


def test_an_autoencoder_with_an_accuracy_target_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"target_acc=\[0.8\]"):
        RunConfig(model="autoencoder", target_acc=[0.8])


@pytest.mark.parametrize("optimizer", ["adamw", "sre-kfac"])
def test_an_autoencoder_run_trains_on_the_squared_error_and_reports_the_training_subset(tmp_path: Path, optimizer: str) -> None:
    config = resolve_config(
        optimizer, "fashion-autoencoder", {**SYNTHETIC, "epochs": 2, "rank": 4, "oversample": 2, "target_loss": [1e9, 1e-9]}
    )
    trainer = Trainer(config, tmp_path, quiet=True)
    if optimizer == "sre-kfac":  # the preset's MC Fisher samples from the Gaussian the squared error defines
        assert trainer.preconditioner.options.fisher == "mc" and trainer.preconditioner.options.mc_loss == "mse"
    images = trainer.train_images.clone()
    first_batch = images[torch.randperm(96, generator=_order_generator(config.seed))[:32]]
    model_at_start = build_model("autoencoder", (1, 28, 28), 10, width_scale=0.05)
    model_at_start.load_state_dict(trainer.net.state_dict())
    summary = trainer.run()

    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(record for record in steps if record["kind"] == "step")
    x = first_batch.flatten(1)  # synthetic images are used as they are (mean 0, std 1)
    with torch.no_grad():
        expected_first = float(((model_at_start(x) - x) ** 2).sum(1).mean())
    assert first["loss"] == pytest.approx(expected_first, rel=1e-5)

    net = trainer.net.eval()
    with torch.no_grad():
        train_loss = float(((net(images.flatten(1)) - images.flatten(1)) ** 2).sum(1).mean())
        test = trainer.test_images.flatten(1)
        test_loss = float(((net(test) - test) ** 2).sum(1).mean())
    assert summary["final_train_eval_loss"] == pytest.approx(train_loss, rel=1e-5)
    assert summary["final_test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert summary["final_test_acc"] is None and summary["best_test_acc"] is None
    assert summary["objective"] == summary["final_train_eval_loss"]
    first_eval = next(record for record in steps if record["kind"] == "eval")  # the 1e9 level is met there
    assert summary["targets"]["loss:1e+09"] == {"time": first_eval["train_time"], "epoch": first_eval["epoch"]}
    assert summary["targets"]["loss:1e-09"] is None


def _order_generator(seed: int) -> torch.Generator:
    from rkfac.seeding import keyed_generator

    return keyed_generator(torch.device("cpu"), seed, "order", 0)


def test_a_classifier_may_be_timed_at_training_loss_levels_too(tmp_path: Path) -> None:
    config = resolve_config("sgd", "quick", {**SYNTHETIC, "widths": [16], "target_acc": [0.0], "target_loss": [1e9]})
    summary = Trainer(config, tmp_path, quiet=True).run()
    assert summary["targets"]["0"] is not None and summary["targets"]["loss:1e+09"] is not None
    assert summary["final_train_eval_loss"] is not None and summary["objective"] == pytest.approx(1 - summary["final_test_acc"])


def test_a_reconstruction_bench_tables_losses_not_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = {**SYNTHETIC, "epochs": 1, "evals_per_epoch": 1, "target_loss": [1e9, 1e-9]}
    rows = run_bench("demo", tmp_path, optimizers=["sgd", "adamw"], seeds=[0], overrides=overrides, quiet=True)
    assert PRESETS["demo"].note in capsys.readouterr().out  # the demo says where rkfac loses
    table = (tmp_path / "bench.md").read_text()
    assert "time to loss 1e+09" in table and "final train loss" in table and "final test loss" in table
    assert "final acc" not in table
    summary = json.loads((tmp_path / "adamw-seed0" / "summary.json").read_text())
    assert rows[1]["final_train_eval_loss"] == summary["final_train_eval_loss"]
    assert rows[1]["reached_loss:1e+09"] == "1/1" and rows[1]["reached_loss:1e-09"] == "0/1"
    assert (tmp_path / "bench.png").exists() and (tmp_path / "bench-curves.png").exists()


def test_bench_rows_average_the_seeds_final_losses() -> None:
    finished = {
        "optimizer": "adamw",
        "status": "completed",
        "seconds_per_epoch": 1.0,
        "epochs": 1,
        "phase_seconds": {},
        "targets": {},
    }
    summaries = [
        {**finished, "final_test_acc": None, "final_train_eval_loss": 4.0, "final_test_loss": 5.0},
        {**finished, "final_test_acc": None, "final_train_eval_loss": 6.0, "final_test_loss": 7.0},
    ]
    rows = summarize("fashion-autoencoder", {"adamw": summaries}, [])
    assert rows[0]["final_train_eval_loss"] == 5.0 and rows[0]["final_test_loss"] == 6.0 and rows[0]["final_test_acc"] is None
    assert "final acc" not in format_table(rows, [])


def test_the_plotted_step_loss_is_a_bias_corrected_causal_average(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path).create()
    losses = [4.0, 2.0, 3.0, float("nan"), 1.0]
    run.append_metrics(
        [{"kind": "step", "step": i, "loss": v, "time": {"data": 0.5, "optimizer": 0.25}} for i, v in enumerate(losses)]
    )
    seconds, steps, smoothed = smoothed_steps(run)
    average, expected = 0.0, []
    for count, value in enumerate(losses[:3], start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        expected.append(average / (1 - SMOOTHING**count))
    assert steps == [1, 2, 3] and seconds == [0.75, 1.5, 2.25]  # the curve ends at the non-finite loss
    assert smoothed == pytest.approx(expected) and smoothed[0] == 4.0
