"""The run records of :mod:`rkfac.experiments.metrics`: time split, traffic, targets, health, schema."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import rkfac
from rkfac.distributed import TrafficCounter
from rkfac.experiments.metrics import (
    PHASES,
    Progress,
    StepClock,
    TrafficLedger,
    bytes_per_step,
    health_record,
    preconditioner_of,
    ranks_record,
)
from rkfac.experiments.presets import resolve_config
from rkfac.experiments.rundir import RunDirectory
from rkfac.experiments.tasks import Target
from rkfac.experiments.train import Trainer


def test_the_time_split_takes_the_inner_phases_out_of_their_spans_and_sums_to_the_training_time() -> None:
    clock = StepClock(torch.device("cpu"), start=1.0, data_done=1.5, backward_done=3.5, optimizer_start=10.0, step_done=14.0)
    times = clock.split({"statistics": 0.5, "decomposition": 2.0, "precondition": 1.0, "adaptive": 0.25})
    assert list(times) == list(PHASES)
    assert times == {
        "data": 0.5,
        "forward_backward": 1.5,
        "statistics": 0.5,
        "decomposition": 2.0,
        "precondition": 1.0,
        "adaptive": 0.25,
        "optimizer": 0.75,
    }
    assert clock.elapsed() == sum(times.values()) == 6.5  # the after_backward gap (3.5 → 10) is not training
    assert clock.split({})["optimizer"] == 4.0  # without a PhaseTimer the whole step() is the optimizer's


def test_the_traffic_ledger_counts_each_steps_bytes_and_the_steps_that_sent_any() -> None:
    counter = TrafficCounter()
    ledger = TrafficLedger(SimpleNamespace(traffic=counter), gradient_bytes=40)
    totals: dict[str, int] = {}
    sent = [(100, 0), (0, 0), (100, 64)]
    records = []
    for statistics, decomposition in sent:
        ledger.begin()
        counter.statistics_bytes += statistics
        counter.decomposition_bytes += decomposition
        records.append(ledger.end(totals))
    assert records == [
        {"statistics": 100, "decomposition": 0, "gradients": 40},
        {"statistics": 0, "decomposition": 0, "gradients": 40},
        {"statistics": 100, "decomposition": 64, "gradients": 40},
    ]
    assert totals == {"statistics": 200, "statistics_steps": 2, "decomposition": 64, "decomposition_steps": 1}
    assert bytes_per_step(totals, "statistics") == 100.0 and bytes_per_step(totals, "decomposition") == 64.0
    assert bytes_per_step({}, "statistics") is None


def test_without_a_preconditioner_the_ledger_records_only_the_gradients() -> None:
    ledger, totals = TrafficLedger(None, gradient_bytes=0), {}  # type: ignore[var-annotated]
    ledger.begin()
    assert ledger.end(totals) == {"statistics": 0, "decomposition": 0, "gradients": 0} and totals == {}


def test_a_target_is_timed_at_the_first_evaluation_that_meets_it() -> None:
    progress = Progress(train_time=2.0)
    targets = [Target("test_acc", 0.5), Target("test_acc", 0.9), Target("train_eval_loss", 12.0)]
    progress.note_targets(targets, {"test_acc": 0.6, "test_loss": 1.0}, epoch=0.5)
    progress.train_time = 3.0
    progress.note_targets(targets, {"test_acc": 0.95, "train_eval_loss": 12.5}, epoch=1)
    progress.train_time = 4.0
    progress.note_targets(targets, {"test_acc": 0.2, "train_eval_loss": 12.0}, epoch=1.5)  # a level is met at equality
    assert progress.reached == {
        "0.5": {"time": 2.0, "epoch": 0.5},
        "0.9": {"time": 3.0, "epoch": 1},
        "loss:12": {"time": 4.0, "epoch": 1.5},
    }


def test_progress_sums_steps_and_clears_the_epochs_counters() -> None:
    progress = Progress()
    progress.add_step(2.0, {"data": 0.25, "optimizer": 0.5}, elapsed=0.75)
    progress.add_step(1.0, {"data": 0.25, "optimizer": 0.5}, elapsed=0.75)
    assert progress.epoch_loss == 1.5 and progress.phase_totals == {"data": 0.5, "optimizer": 1.0}
    progress.start_epoch(1)
    assert (progress.epoch, progress.batch, progress.epoch_loss_count, progress.epoch_time) == (1, 0, 0, 0.0)
    assert progress.train_time == 1.5 and progress.epoch_loss == 0.0


def test_health_and_ranks_come_from_the_preconditioner_or_are_none() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    assert preconditioner_of(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    assert health_record(None) is None and ranks_record(None) is None
    kfac = rkfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1)
    pre = preconditioner_of(kfac)
    assert pre is kfac.preconditioner
    assert health_record(pre) == {
        "skipped_statistics": 0,
        "skipped_gradients": 0,
        "failed_decompositions": 0,
        "float64_retries": 0,
        "layers_without_statistics": 0,
    }
    assert ranks_record(pre) == {}  # nothing decomposed yet
    torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(3, (8,))).backward()
    kfac.step()
    assert ranks_record(pre) == {"0": [5, 3]}  # exact K-FAC keeps every eigenpair: [k_A, k_G] as a JSON list


SMALL = {"dataset": "synthetic", "synthetic_train": 128, "synthetic_test": 32, "model": "mlp", "widths": [8], "batch_size": 32}
STEP_KEYS = ["kind", "step", "epoch", "loss", "lr", "damping", "time", "bytes"]
EVAL_KEYS = ["kind", "epoch", "step", "test_loss", "test_acc", "train_time"]
EPOCH_KEYS = ["kind", "epoch", "step", "train_loss", "test_loss", "test_acc", "epoch_time", "train_time", "health", "ranks"]
SUMMARY_KEYS = [
    "optimizer",
    "preset",
    "status",
    "steps",
    "epochs",
    "train_time",
    "seconds_per_epoch",
    "epoch_times",
    "final_test_loss",
    "final_test_acc",
    "best_test_acc",
    "final_train_eval_loss",
    "objective",
    "targets",
    "phase_seconds",
    "world_size",
    "health",
    "bytes_per_factor_step",
    "bytes_per_inverse_step",
]


def _run(tmp_path: Path, optimizer: str, **overrides: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    config = resolve_config(optimizer, None, {**SMALL, "checkpoint_every": 0, **overrides})
    summary = Trainer(config, tmp_path, quiet=True).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    return records, summary


@pytest.mark.parametrize("optimizer", ["sgd", "sre-kfac", "seng"])
def test_metrics_and_summary_keep_the_fields_that_plots_and_benchmarks_read(tmp_path: Path, optimizer: str) -> None:
    records, summary = _run(tmp_path, optimizer, epochs=2, evals_per_epoch=2, target_acc=[0.0, 1.0], rank=4, inverse_every=2)
    kinds = [record["kind"] for record in records]
    assert kinds == ["step", "step", "eval", "step", "step", "epoch"] * 2
    for record in records:
        assert list(record) == {"step": STEP_KEYS, "eval": EVAL_KEYS, "epoch": EPOCH_KEYS}[record["kind"]]
        if record["kind"] == "step":
            assert list(record["time"]) == list(PHASES)
            assert record["bytes"] == {"statistics": 0, "decomposition": 0, "gradients": 0}  # one process
    assert list(summary) == SUMMARY_KEYS and list(summary["phase_seconds"]) == list(PHASES)
    assert (summary["status"], summary["steps"], summary["epochs"], summary["world_size"]) == ("completed", 8, 2.0, 1)
    assert summary["train_time"] == pytest.approx(sum(summary["phase_seconds"].values()))
    assert summary["targets"]["0"] == {"time": records[2]["train_time"], "epoch": 0.5} and summary["targets"]["1"] is None
    assert summary["best_test_acc"] == max(r["test_acc"] for r in records if r["kind"] == "epoch")
    assert summary["bytes_per_factor_step"] is None and summary["bytes_per_inverse_step"] is None
    epoch = records[-1]
    if optimizer == "sre-kfac":
        counts = {
            "skipped_statistics": 0,
            "skipped_gradients": 0,
            "failed_decompositions": 0,
            "float64_retries": 0,
            "layers_without_statistics": 0,
        }
        assert summary["health"] == epoch["health"] == counts
        assert epoch["ranks"] == {"1": [4, 4], "3": [4, 4]} and records[0]["damping"] == 0.1
    if optimizer == "sgd":
        assert summary["health"] is epoch["health"] is epoch["ranks"] is records[0]["damping"] is None


def test_a_run_stopped_by_max_steps_is_summarised_where_it_stopped(tmp_path: Path) -> None:
    records, summary = _run(tmp_path, "sre-kfac", epochs=3, max_steps=6, rank=4)
    assert (summary["status"], summary["steps"], summary["epochs"]) == ("max_steps", 6, 1.5)
    assert summary["epoch_times"] == [records[4]["epoch_time"]]
    assert summary["seconds_per_epoch"] == summary["train_time"] / 1.5


def test_a_record_still_being_appended_is_not_read(tmp_path: Path) -> None:
    """Ranks other than 0 read metrics.jsonl while rank 0 appends to it: a last line without its
    newline is a record in progress, skipped rather than parsed (it was a flaky JSON error)."""
    run = RunDirectory(tmp_path).create()
    run.append_metrics([{"kind": "step", "step": 0}, {"kind": "epoch", "step": 1}])
    with open(tmp_path / "metrics.jsonl", "a") as stream:
        stream.write('{"kind": "step", "st')  # half a record
    assert [record["step"] for record in run.metrics()] == [0, 1]
    assert [record["step"] for record in run.metrics("epoch")] == [1]
