"""The rkfac command on synthetic data: run directories, resume, plots, bench, time accounting."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rkfac.experiments import train as train_module
from rkfac.experiments.bench import run_bench
from rkfac.experiments.cli import RUN_FLAGS, main
from rkfac.experiments.config import RunConfig, parse_schedule, step_schedule, value_at_epoch
from rkfac.experiments.metrics import PHASES
from rkfac.experiments.presets import resolve_config
from rkfac.experiments.rundir import RunDirectory
from tests.experiments.flags import read_by

SMALL = [
    "--dataset",
    "synthetic",
    "--synthetic-train",
    "256",
    "--synthetic-test",
    "128",
    "--model",
    "mlp",
    "--widths",
    "48",
    "--batch-size",
    "32",
    "--rank",
    "8",
    "--oversample",
    "2",
    "--factor-every",
    "2",
    "--inverse-every",
    "4",
    "--quiet",
]


def read_metrics(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_train_writes_a_complete_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        main(["train", "--optimizer", "sre-kfac", "--epochs", "2", "--target-acc", "0.05,0.999", "--out", str(run), *SMALL]) == 0
    )
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"] == "sre-kfac" and config["rank"] == 8 and config["widths"] == [48] and config["lr"] == 0.1
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    steps, epochs = read_metrics(run, "step"), read_metrics(run, "epoch")
    assert [r["step"] for r in steps] == list(range(16))
    assert set(steps[0]["time"]) == set(PHASES)
    assert steps[0]["damping"] == 0.1 and steps[0]["lr"] == 0.1
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 <= r["test_acc"] <= 1 for r in epochs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 16
    assert summary["health"] == {
        "skipped_statistics": 0,
        "skipped_gradients": 0,
        "failed_decompositions": 0,
        "float64_retries": 0,
        "layers_without_statistics": 0,
    }
    assert epochs[-1]["health"] == summary["health"]
    assert summary["targets"]["0.05"] == {"time": epochs[0]["train_time"], "epoch": 1}
    assert summary["targets"]["0.999"] is None
    assert summary["final_test_acc"] == epochs[-1]["test_acc"]


@pytest.mark.parametrize(
    "optimizer",
    ["sgd", "adam", "kfac", "rs-kfac", "b-kfac", "b-r-kfac", "seng", "kfac-auto", "sre-kfac-auto", "sre-soap", "sre-ekfac"],
)
def test_every_optimizer_trains(tmp_path: Path, optimizer: str) -> None:
    argv = ["train", "--optimizer", optimizer, "--max-steps", "3", "--out", str(tmp_path / optimizer), *read_by(optimizer, SMALL)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / optimizer / "summary.json").read_text())
    assert summary["status"] == "max_steps" and summary["steps"] == 3


def test_resume_continues_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["train", "--optimizer", "sre-kfac", "--epochs", "2", "--momentum", "0.9", *SMALL]
    assert main([*common, "--out", str(whole)]) == 0
    assert main([*common, "--out", str(split), "--max-steps", "11"]) == 0  # stops inside epoch 2
    assert json.loads((split / "summary.json").read_text())["status"] == "max_steps"
    assert main(["train", "--resume", str(split), "--max-steps", "none", "--quiet"]) == 0
    final = {name: RunDirectory(path).load_checkpoint()["model"] for name, path in (("whole", whole), ("split", split))}
    for key, tensor in final["whole"].items():
        assert torch.equal(tensor, final["split"][key]), key
    assert [r["loss"] for r in read_metrics(whole, "step")] == [r["loss"] for r in read_metrics(split, "step")]
    assert [r["test_acc"] for r in read_metrics(whole, "epoch")] == [r["test_acc"] for r in read_metrics(split, "epoch")]


def test_an_adaptive_run_logs_its_choices_and_resumes_exactly(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["train", "--optimizer", "sre-kfac-auto", "--epochs", "2", "--curvature-samples", "8", *SMALL]
    assert main([*common, "--out", str(whole)]) == 0
    assert main([*common, "--out", str(split), "--max-steps", "11"]) == 0
    assert main(["train", "--resume", str(split), "--max-steps", "none", "--quiet"]) == 0
    final = {name: RunDirectory(path).load_checkpoint()["model"] for name, path in (("whole", whole), ("split", split))}
    for key, tensor in final["whole"].items():
        assert torch.equal(tensor, final["split"][key]), key
    steps = read_metrics(whole, "step")
    assert [r["loss"] for r in steps] == [r["loss"] for r in read_metrics(split, "step")]
    assert all(r["lr"] > 0 and r["damping"] > 0 and not r["skipped"] for r in steps)  # α and λ in place of lr, damping
    assert steps[0]["mu"] == 0.0 and any(r["mu"] != 0.0 for r in steps[1:])
    assert [r["rho"] is not None for r in steps[:6]] == [True, False, False, False, False, True]  # every 5 steps
    assert all(r["time"]["adaptive"] > 0 for r in steps)
    assert main(["plot", str(whole), "--out", str(tmp_path / "runs.png")]) == 0
    assert (tmp_path / "runs-adaptive.png").stat().st_size > 0  # α, μ, λ, ρ per step


def test_a_plot_of_fixed_step_runs_draws_no_adaptive_panel(tmp_path: Path) -> None:
    assert main(["train", "--optimizer", "sre-kfac", "--epochs", "1", "--out", str(tmp_path / "run"), *SMALL]) == 0
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "run.png")]) == 0
    assert (tmp_path / "run.png").exists() and not (tmp_path / "run-adaptive.png").exists()


def test_truncated_or_corrupted_checkpoint_gives_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--optimizer", "sre-kfac", "--max-steps", "2", "--out", str(run), *SMALL]) == 0
    data = (run / "checkpoint.pt").read_bytes()
    rng = random.Random(0)
    damaged = [data[:cut] for cut in sorted(rng.sample(range(len(data)), 8))]  # truncated at random offsets
    for offset in rng.sample(range(len(data)), 8):  # one byte flipped anywhere, tensor data included
        damaged.append(data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1 :])
    for content in damaged:
        (run / "checkpoint.pt").write_bytes(content)
        assert main(["train", "--resume", str(run), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert "checkpoint" in error and ("corrupted" in error or "truncated" in error), error
    (run / "checkpoint.pt").write_bytes(data)
    assert RunDirectory(run).load_checkpoint()["progress"]["step"] == 2  # the intact file still loads


def test_plot_writes_a_png(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--optimizer", "sgd", "--epochs", "2", "--out", str(run), *read_by("sgd", SMALL)]) == 0
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("name", ["sgd", "sre-kfac", "sre-kfac-adaptive", "sre-kfac-bf16", "sre-kfac-adaptive-bf16"])
def test_a_plot_labels_a_run_by_the_name_it_was_run_under(tmp_path: Path, name: str) -> None:
    from rkfac.experiments.plot import run_label

    run = RunDirectory(tmp_path)
    run.write_json("config.json", resolve_config(name, "fashion-cnn", {"seed": 3}).to_json())
    assert run_label(run) == f"{name} (seed 3)"


def test_bench_runs_side_by_side_and_writes_table_json_csv_plot(tmp_path: Path) -> None:
    overrides = dict(
        dataset="synthetic",
        synthetic_train=256,
        synthetic_test=128,
        widths=[48],
        batch_size=32,
        epochs=2,
        rank=8,
        oversample=2,
        target_acc=[0.05],
    )
    optimizers = ["sgd", "kfac", "sre-kfac", "seng", "sre-kfac-adaptive"]
    rows = run_bench("quick", tmp_path, optimizers=optimizers, seeds=[0, 1], overrides=overrides, quiet=True)
    assert [row["optimizer"] for row in rows] == optimizers
    assert "| seng |" in (tmp_path / "bench.md").read_text()
    for name in ("bench.json", "bench.csv", "bench.png", "bench.md"):
        assert (tmp_path / name).exists()
    sre = rows[2]
    assert sre["reached_0.05"] == "2/2"
    summaries = [
        json.loads((tmp_path / f"{o}-seed{s}" / "summary.json").read_text()) for o in ("kfac", "sre-kfac") for s in (0, 1)
    ]
    exact = sorted(s["seconds_per_epoch"] for s in summaries[:2])
    mine = sorted(s["seconds_per_epoch"] for s in summaries[2:])
    assert sre["exact_over_this_per_epoch"] == pytest.approx((exact[0] + exact[1]) / (mine[0] + mine[1]))
    # a named variant runs as its optimizer with its settings, and is compared with exact K-FAC too
    adaptive = json.loads((tmp_path / "sre-kfac-adaptive-seed0" / "config.json").read_text())
    assert adaptive["optimizer"] == "sre-kfac" and adaptive["adaptive_rank"] is True
    assert rows[4]["family"] == "sre-kfac" and rows[4]["exact_over_this_per_epoch"] is not None
    assert rows[3]["family"] == "seng" and "exact_over_this_per_epoch" not in rows[3]


def test_an_interrupted_bench_keeps_the_tables_of_the_seeds_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rkfac.experiments import bench as bench_module

    real_train = bench_module.train

    def train_until_seed_1(config: RunConfig, out: Path, **options: object) -> dict:
        if config.seed == 1:
            raise KeyboardInterrupt
        return real_train(config, out, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(bench_module, "train", train_until_seed_1)
    overrides = dict(dataset="synthetic", synthetic_train=128, synthetic_test=64, widths=[16], batch_size=32, target_acc=[0.5])
    with pytest.raises(KeyboardInterrupt):
        run_bench("quick", tmp_path, optimizers=["sgd", "sre-kfac"], seeds=[0, 1], overrides=overrides, quiet=True)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["seeds"] == [0] and [row["seeds"] for row in saved["rows"]] == [1, 1]
    summary = json.loads((tmp_path / "sgd-seed0" / "summary.json").read_text())
    assert saved["rows"][0]["seconds_per_epoch"] == summary["seconds_per_epoch"]
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.png").exists()


def test_a_resumed_bench_reuses_finished_runs_and_continues_a_cut_off_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rkfac.experiments import bench as bench_module
    from rkfac.experiments.train import Trainer

    overrides = dict(dataset="synthetic", synthetic_train=128, synthetic_test=64, widths=[16], batch_size=32, epochs=2)
    options = dict(optimizers=["sgd", "sre-kfac"], seeds=[0, 1], overrides=overrides, quiet=True)
    whole = run_bench("quick", tmp_path / "whole", **options)  # type: ignore[arg-type]

    real_run_epoch = Trainer._run_epoch

    def cut_off_in_second_epoch_of_seed_1(self: Trainer, *args: object) -> None:
        if self.config.seed == 1 and self.progress.epoch == 1:
            raise KeyboardInterrupt  # after the checkpoint of epoch 1
        real_run_epoch(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "_run_epoch", cut_off_in_second_epoch_of_seed_1)
    with pytest.raises(KeyboardInterrupt):
        run_bench("quick", tmp_path / "cut", **options)  # type: ignore[arg-type]
    monkeypatch.setattr(Trainer, "_run_epoch", real_run_epoch)
    calls: list[tuple[str, int, bool]] = []
    real_train = bench_module.train

    def spy(config: RunConfig, out: Path, **kwargs: object) -> dict:
        calls.append((config.optimizer, config.seed, bool(kwargs["resume"])))
        return real_train(config, out, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bench_module, "train", spy)
    resumed = run_bench("quick", tmp_path / "cut", resume=True, **options)  # type: ignore[arg-type]
    assert calls == [("sgd", 1, True), ("sre-kfac", 1, False)]  # seed 0 read back, not rerun
    for before, after in zip(whole, resumed):
        assert after["final_test_acc"] == before["final_test_acc"] and after["seeds"] == 2
    losses = [[r["loss"] for r in read_metrics(root / "sgd-seed1", "step")] for root in (tmp_path / "whole", tmp_path / "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    with pytest.raises(ValueError, match="sgd-seed0 holds a run with other settings than sgd seed 0"):
        run_bench("quick", tmp_path / "cut", resume=True, **{**options, "overrides": {**overrides, "lr": 0.01}})  # type: ignore[arg-type]


def test_evaluations_inside_epochs_time_targets_without_changing_the_run(tmp_path: Path) -> None:
    common = ["train", "--optimizer", "sre-kfac", "--epochs", "2", "--target-acc", "0.0,0.999", *SMALL]
    assert main([*common, "--out", str(tmp_path / "once")]) == 0
    assert main([*common, "--out", str(tmp_path / "four"), "--evals-per-epoch", "4"]) == 0
    once, four = tmp_path / "once", tmp_path / "four"
    assert [r["loss"] for r in read_metrics(once, "step")] == [r["loss"] for r in read_metrics(four, "step")]
    assert read_metrics(once, "eval") == []
    evals = read_metrics(four, "eval")  # 8 steps per epoch: after steps 2, 4, 6 of each epoch
    assert [r["step"] for r in evals] == [2, 4, 6, 10, 12, 14]
    assert [r["epoch"] for r in evals] == [0.25, 0.5, 0.75, 1.25, 1.5, 1.75]
    steps = read_metrics(four, "step")
    assert evals[0]["train_time"] == pytest.approx(sum(sum(r["time"].values()) for r in steps[:2]))
    assert [r["test_acc"] for r in read_metrics(once, "epoch")] == [r["test_acc"] for r in read_metrics(four, "epoch")]
    targets = {name: json.loads((run / "summary.json").read_text())["targets"] for name, run in (("once", once), ("four", four))}
    assert targets["once"]["0"]["epoch"] == 1 and targets["four"]["0"] == {"time": evals[0]["train_time"], "epoch": 0.25}
    assert targets["four"]["0.999"] is None
    with pytest.raises(ValueError, match="evals_per_epoch must be >= 1, got 0"):
        resolve_config("sgd", None, {"evals_per_epoch": 0})


def test_evaluation_time_is_excluded_from_training_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: every reading advances 1 s, and each evaluation advances it 1000 s."""
    clock = itertools.count(0.0)
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))  # the step clock reads time.perf_counter
    real_evaluate = train_module.Trainer._evaluate

    def slow_evaluate(self: train_module.Trainer) -> dict[str, float]:
        for _ in range(1000):
            next(clock)
        return real_evaluate(self)

    monkeypatch.setattr(train_module.Trainer, "_evaluate", slow_evaluate)
    config = resolve_config(
        "sgd", None, dict(dataset="synthetic", synthetic_train=128, synthetic_test=64, widths=[16], batch_size=32, epochs=2)
    )
    summary = train_module.train(config, tmp_path / "run", quiet=True)
    steps = read_metrics(tmp_path / "run", "step")
    per_step = [sum(r["time"].values()) for r in steps]
    assert per_step == [3.0] * 8  # 4 clock readings per step: data, forward/backward, optimizer
    assert summary["train_time"] == 24.0


def test_every_run_setting_has_a_flag() -> None:
    flags = {dest for _, dest, _, _ in RUN_FLAGS}
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"optimizer", "seed", "preset"}
    assert fields <= flags, fields - flags


def test_schedules_and_precedence() -> None:
    assert parse_schedule("0.5") == 0.5
    assert parse_schedule("1:0.3,13:0.03") == {1: 0.3, 13: 0.03}
    with pytest.raises(ValueError, match="bad schedule 'x:1'"):
        parse_schedule("x:1")
    assert value_at_epoch({1: 0.3, 13: 0.03}, 12) == 0.3 and value_at_epoch({1: 0.3, 13: 0.03}, 13) == 0.03
    per_step = step_schedule({1: 220, 15: 230}, steps_per_epoch=10, cast=int)
    assert per_step(139) == 220 and per_step(140) == 230
    paper = resolve_config("sre-kfac", "paper-vgg16-cifar10", {"epochs": 3})
    assert paper.epochs == 3 and paper.rank == {1: 220, 15: 230} and paper.weight_decay_start == 200
    assert resolve_config("kfac", "paper-vgg16-cifar10").inverse_every == 30
    assert resolve_config("sgd", "fashion-cnn").lr == 0.05
    seng = resolve_config("seng", "paper-vgg16-cifar10")
    assert (seng.damping, seng.update_freq, seng.momentum, seng.weight_decay) == (2.0, 200, 0.9, 1e-2)
    assert seng.lr[1] == 0.05 and seng.lr[31] == pytest.approx(0.05 * (1 - 30 / 75) ** 6)  # type: ignore[index]
    adaptive = resolve_config("sre-kfac-adaptive", "fashion-cnn", {"min_rank": 16})
    assert (adaptive.optimizer, adaptive.adaptive_rank, adaptive.min_rank, adaptive.rank) == ("sre-kfac", True, 16, 220)
    with pytest.raises(ValueError, match=r"optimizer must be one of .*sre-kfac-adaptive.*got 'sre'"):
        resolve_config("sre", "fashion-cnn")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        resolve_config("sgd", "nope")
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        resolve_config("sgd", None, {"epochs": 0})
    with pytest.raises(ValueError, match=r"model must be one of .*got 'resnet'"):
        resolve_config("sgd", None, {"model": "resnet"})
    with pytest.raises(ValueError, match=r"clip must be one of .*got 'norm'"):
        resolve_config("kfac", None, {"clip": "norm"})


def test_bad_flag_value_is_reported_not_raised(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", "--optimizer", "sgd", "--epochs", "0", "--out", str(tmp_path), "--quiet"]) == 2
    assert "epochs must be >= 1, got 0" in capsys.readouterr().err


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    common = [
        "train", "--optimizer", "sre-kfac", "--dataset", "synthetic", "--synthetic-train", "2048",
        "--synthetic-test", "64", "--model", "mlp", "--widths", "48", "--batch-size", "32", "--epochs", "10",
        "--rank", "8", "--momentum", "0.9", "--quiet",
    ]  # fmt: skip
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "rkfac", *common, "--out", str(killed)])
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # mid-run, right after the first epoch's checkpoint
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    assert main(["train", "--resume", str(killed), "--quiet"]) == 0

    whole = tmp_path / "whole"
    assert main([*common, "--out", str(whole)]) == 0

    # the epoch record taken at the checkpoint survives the resume (it once was dropped)
    def untimed(run: Path) -> list[tuple]:
        return [(r["epoch"], r["step"], r["train_loss"], r["test_acc"]) for r in read_metrics(run, "epoch")]

    assert untimed(killed) == untimed(whole) and [e[0] for e in untimed(killed)] == list(range(1, 11))
    final = [RunDirectory(path).load_checkpoint()["model"] for path in (killed, whole)]
    for key, tensor in final[1].items():
        assert torch.equal(final[0][key], tensor), key
    assert (
        json.loads((killed / "summary.json").read_text())["final_test_acc"]
        == json.loads((whole / "summary.json").read_text())["final_test_acc"]
    )


def test_divergence_stops_with_a_clear_message_and_keeps_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", "--optimizer", "sgd", "--epochs", "2", "--lr", "1:0.05,2:1e30", "--out", str(run), *read_by("sgd", SMALL)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "training loss is" in error and "last checkpoint" in error and "intact" in error
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    assert RunDirectory(run).load_checkpoint()["progress"]["epoch"] == 1  # the epoch-1 checkpoint survived


def test_warm_start_and_adaptive_rank_flags_reach_the_decomposition_and_the_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--widths", "64", "--rank", "40", "--min-rank", "8", "--inverse-every", "2", "--warm-start", "--adaptive-rank"]
    assert main(["train", "--optimizer", "sre-kfac", "--epochs", "2", "--out", str(run), *SMALL, *flags]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["warm_start"] is True and config["adaptive_rank"] is True and config["min_rank"] == 8
    ranks = [record["ranks"] for record in read_metrics(run, "epoch")]
    assert all(8 <= k <= 40 for epoch in ranks for pair in epoch.values() for k in pair)
    assert ranks[-1]["1"] != [40, 40]  # the hidden layer's ranks moved off the configured maximum


def test_a_bench_of_runs_shorter_than_an_epoch_writes_its_tables_without_a_plot(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """It used to end with 'no completed epoch …: nothing to plot' (exit 2) after every run had finished."""
    overrides = dict(dataset="synthetic", synthetic_train=256, synthetic_test=64, widths=[16], batch_size=32, max_steps=3)
    rows = run_bench("quick", tmp_path, optimizers=["sgd", "sre-kfac"], seeds=[0], overrides=overrides, quiet=True)
    assert [row["optimizer"] for row in rows] == ["sgd", "sre-kfac"]
    assert (tmp_path / "bench.md").exists() and not (tmp_path / "bench.png").exists()
    assert "no run completed an epoch" in capsys.readouterr().out
