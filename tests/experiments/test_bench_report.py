"""The bench's report: each curvature method against the best tuned peer, and median curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rkfac.experiments.bench import format_table, summarize
from rkfac.experiments.plot import median_curve
from rkfac.experiments.rundir import RunDirectory
from rkfac.experiments.tasks import Target

TARGETS = [Target("train_eval_loss", 12.0), Target("train_eval_loss", 10.0)]


def _summary(optimizer: str, times: dict[str, float | None]) -> dict[str, Any]:
    return {
        "optimizer": optimizer,
        "status": "completed",
        "seconds_per_epoch": 1.0,
        "epochs": 1,
        "phase_seconds": {},
        "final_test_acc": None,
        "final_train_eval_loss": 9.0,
        "final_test_loss": 9.5,
        "targets": {key: None if time is None else {"time": time, "epoch": 1.0} for key, time in times.items()},
    }


def test_each_curvature_method_is_compared_with_the_peer_that_reached_the_target_first() -> None:
    results = {
        "sgd": [_summary("sgd", {"loss:12": 10.0, "loss:10": None})],
        "adamw": [_summary("adamw", {"loss:12": 8.0, "loss:10": None})],
        "soap": [_summary("soap", {"loss:12": 9.0, "loss:10": 30.0})],
        "kfac": [_summary("kfac", {"loss:12": 4.0, "loss:10": 40.0})],
        "sre-kfac": [_summary("sre-kfac", {"loss:12": None, "loss:10": 15.0})],
    }
    rows = {row["optimizer"]: row for row in summarize("fashion-autoencoder", results, TARGETS)}
    kfac, sre = rows["kfac"], rows["sre-kfac"]
    assert kfac["best_peer_time_to_loss:12"] == "adamw" and kfac["peer_over_this_time_to_loss:12"] == 2.0
    assert kfac["best_peer_time_to_loss:10"] == "soap" and kfac["peer_over_this_time_to_loss:10"] == pytest.approx(0.75)
    assert sre["peer_over_this_time_to_loss:12"] is None and sre["peer_over_this_time_to_loss:10"] == 2.0
    assert "best_peer_time_to_loss:12" not in rows["adamw"]  # peers are not compared with themselves
    table = format_table(list(rows.values()), TARGETS)
    assert "best peer/this time to loss 12" in table
    kfac_line = next(line for line in table.splitlines() if line.startswith("| kfac |"))
    assert "2.00 (adamw)" in kfac_line and "0.75 (soap)" in kfac_line
    sre_line = next(line for line in table.splitlines() if line.startswith("| sre-kfac |"))
    assert "not reached (adamw 8.0 s)" in sre_line and "2.00 (soap)" in sre_line


def test_a_target_no_peer_reached_is_said_so() -> None:
    results = {
        "adamw": [_summary("adamw", {"loss:12": None, "loss:10": None})],
        "sre-kfac": [_summary("sre-kfac", {"loss:12": 5.0, "loss:10": None})],
    }
    rows = summarize("fashion-autoencoder", results, TARGETS)
    line = next(line for line in format_table(rows, TARGETS).splitlines() if line.startswith("| sre-kfac |"))
    assert line.rstrip(" |").endswith("no peer | —")


def test_without_peers_there_is_no_peer_column() -> None:
    rows = summarize("quick", {"kfac": [_summary("kfac", {"loss:12": 4.0, "loss:10": 5.0})]}, TARGETS)
    assert "best peer" not in format_table(rows, TARGETS)


def test_the_median_curve_takes_the_median_over_seeds_at_each_step(tmp_path: Path) -> None:
    losses = {0: [3.0, 3.0, 3.0], 1: [1.0, 1.0, 1.0, 1.0], 2: [2.0, 2.0, 2.0]}
    seconds = {0: 1.0, 1: 3.0, 2: 2.0}
    paths = []
    for seed, values in losses.items():
        run = RunDirectory(tmp_path / f"adamw-seed{seed}").create()
        run.append_metrics(
            [{"kind": "step", "step": i, "loss": v, "time": {"optimizer": seconds[seed]}} for i, v in enumerate(values)]
        )
        paths.append(run.path)
    times, steps, median = median_curve(paths)
    assert steps == [1, 2, 3]  # up to the shortest run
    assert times == [2.0, 4.0, 6.0] and median == pytest.approx([2.0, 2.0, 2.0])
