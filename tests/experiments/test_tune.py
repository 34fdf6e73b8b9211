"""``rkfac tune``: the grid, the choice of the winner, the two phases end to end, resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from rkfac.experiments import bench as bench_module
from rkfac.experiments.cli import main
from rkfac.experiments.config import RunConfig
from rkfac.experiments.presets import resolve_config, seng_lr_schedule
from rkfac.experiments.train import TrainingDivergedError
from rkfac.experiments.tune import Grid, GridPoint, Knob, choose, objective, run_tune

TINY = [
    "--dataset", "synthetic", "--synthetic-train", "128", "--synthetic-test", "64", "--model", "mlp",
    "--widths", "16", "--batch-size", "32", "--quiet",
]  # fmt: skip
# Two optimizers, 2 lr factors × 2 momenta on seed 0 for 3 steps, then the winners on seeds 0, 1 for 6 steps.
TUNE = ["tune", "--preset", "quick", "--optimizers", "sgd,kfac", "--seeds", "0,1", "--lr-factors", "0.3,3"]
TUNE += ["--knob", "momentum=0,0.9", "--tune-steps", "3", "--max-steps", "6", *TINY]


def test_the_grid_scales_each_optimizers_own_lr_and_crosses_the_knob() -> None:
    grid = Grid.parse(None, ["momentum=0,0.9"])
    assert grid.lr_factors == (0.1, 0.3, 1.0, 3.0) and grid.knob == Knob("momentum", (0.0, 0.9)) and grid.size == 8
    for name, own in (("sgd", 0.05), ("adam", 1e-3), ("kfac", 0.1)):
        assert resolve_config(name, "quick").lr == own
        points = grid.points(own)
        assert [p.label for p in points[:3]] == ["lr-x0.1_momentum-0", "lr-x0.1_momentum-0.9", "lr-x0.3_momentum-0"]
        assert [p.settings["lr"] for p in points] == pytest.approx([f * own for f in (0.1, 0.1, 0.3, 0.3, 1, 1, 3, 3)])
        assert [p.settings["momentum"] for p in points] == [0.0, 0.9] * 4
    assert Grid().points(0.05)[1].settings == {"lr": 0.015}  # rounded: not 0.015000000000000001
    # a schedule lr is scaled value by value
    seng = resolve_config("seng", "quick").lr
    assert isinstance(seng, dict) and seng == seng_lr_schedule()
    scaled = Grid((0.3,)).points(seng)[0]
    assert scaled.label == "lr-x0.3" and set(scaled.settings["lr"]) == set(seng)
    assert all(scaled.settings["lr"][e] == pytest.approx(0.3 * v) for e, v in seng.items())
    # list values (';'-separated) get file-system-safe labels
    widths = Grid((1.0,), Knob.parse("widths=32,32;64")).points(0.1)
    assert [(p.label, p.settings["widths"]) for p in widths] == [("lr-x1_widths-32+32", [32, 32]), ("lr-x1_widths-64", [64])]


@pytest.mark.parametrize(
    ("factors", "knobs", "message"),
    [
        ([], [], r"empty grid: lr factors \[\]"),
        ([0.1, 0.0], [], "lr factor 0.0 must be a finite number > 0"),
        ([0.3, 0.30], [], "lr factor 0.3 is given twice"),
        (None, ["momentum=0,0.9", "damping=0.1,0.01"], "at most one knob .* got 2: momentum=0,0.9, damping=0.1,0.01"),
        (None, ["momentum="], "bad knob 'momentum=': it gives momentum no values"),
        (None, ["momentum"], "bad knob 'momentum': write FIELD=v1,v2"),
        (None, ["lr=0.1,0.2"], "bad knob 'lr=0.1,0.2': lr cannot be the knob .*--lr-factors"),
        (None, ["epochs=1,2"], "epochs cannot be the knob .*one epoch"),
        (None, ["momentun=0,0.9"], "unknown setting 'momentun'"),
        (None, ["momentum=0.9,0.90"], "momentum value 0.9 is given twice"),
    ],
)
def test_a_bad_grid_is_refused_naming_the_value(factors: list[float] | None, knobs: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Grid.parse(factors, knobs)


def test_objective_and_the_choice_of_the_winner() -> None:
    assert objective({"status": "completed", "final_test_acc": 0.75}) == 0.25
    assert objective({"status": "completed", "final_test_acc": 0.75, "objective": 1.5}) == 1.5  # the task's own, if any
    for bad in ({"status": "diverged", "final_test_acc": 0.9}, {"status": "max_steps", "final_test_acc": math.nan}):
        assert objective(bad) == math.inf
    assert objective({"status": "completed", "objective": None}) == math.inf

    def point(factor: float, knob_index: int = 0) -> GridPoint:
        return GridPoint(f"lr-x{factor:g}-{knob_index}", factor, knob_index, {})

    assert choose([(point(3), 0.2), (point(0.3), 0.2), (point(1), 0.3)]) == point(0.3)  # tie: the smaller lr
    assert choose([(point(1, 1), 0.2), (point(1, 0), 0.2)]) == point(1, 0)  # then the knob value given first
    assert choose([(point(3), 16.744965), (point(1), 16.744967)]) == point(1)  # within 1e-4 relative: a tie
    assert choose([(point(3), 16.74), (point(1), 16.75)]) == point(3)  # 6e-4 apart: not a tie
    assert choose([(point(3), math.inf), (point(1), 0.9)]) == point(1)
    assert choose([(point(3), math.inf), (point(1), math.inf)]) is None


def _fake_summary(config: RunConfig, status: str, acc: float) -> dict[str, Any]:
    return {
        "optimizer": config.optimizer,
        "status": status,
        "final_test_acc": acc,
        "seconds_per_epoch": 1.0,
        "epochs": 1.0,
        "phase_seconds": {},
        "targets": {},
    }


def test_the_winner_is_the_lowest_objective_ties_to_the_smaller_lr_and_a_diverged_run_never_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # test accuracy by optimizer and lr multiplier on the grid (seed 0, short); None: diverged
    accuracy: dict[str, dict[float, float | None]] = {
        "sgd": {0.1: 0.5, 0.3: 0.8, 1.0: 0.8, 3.0: None},  # x0.3 and x1 tie: x0.3 wins; x3 diverged
        "adam": {0.1: 0.6, 0.3: 0.7, 1.0: 0.9, 3.0: math.nan},  # x3's NaN is no score
        "kfac": {0.1: None, 0.3: None, 1.0: None, 3.0: None},  # no winner, no phase 2
    }
    own = {"sgd": 0.05, "adam": 1e-3, "kfac": 0.1}
    phase2: list[RunConfig] = []

    def fake_train(config: RunConfig, out: Path, **options: object) -> dict[str, Any]:
        if config.max_steps is None:  # a phase-2 run, full length
            phase2.append(config)
            return _fake_summary(config, "completed", 0.5)
        assert config.seed == 0 and config.max_steps == 2
        acc = accuracy[config.optimizer][round(float(config.lr) / own[config.optimizer], 6)]  # type: ignore[arg-type]
        summary = _fake_summary(config, "diverged" if acc is None else "max_steps", 0.1 if acc is None else acc)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        if acc is None:
            raise TrainingDivergedError("training loss is nan")
        return summary

    monkeypatch.setattr(bench_module, "train", fake_train)
    tune = run_tune("quick", tmp_path, optimizers=["sgd", "adam", "kfac"], seeds=[0, 1], tune_steps=2, quiet=True)
    assert {name: (w or {}).get("label") for name, w in tune["winners"].items()} == {
        "sgd": "lr-x0.3",
        "adam": "lr-x1",
        "kfac": None,
    }
    saved = json.loads((tmp_path / "tune.json").read_text())
    sgd_runs = saved["optimizers"]["sgd"]["runs"]
    assert [r["objective"] for r in sgd_runs] == pytest.approx([0.5, 0.2, 0.2, None]) and sgd_runs[3]["status"] == "diverged"
    assert sgd_runs[3]["run_dir"] == str(tmp_path / "grid" / "sgd" / "lr-x3-seed0")
    assert saved["optimizers"]["adam"]["runs"][3]["objective"] is None
    # phase 2: the winners alone, every seed, with the winning lr
    assert [(c.optimizer, c.seed, c.lr) for c in phase2] == [
        ("sgd", 0, 0.015),
        ("adam", 0, 0.001),
        ("sgd", 1, 0.015),
        ("adam", 1, 0.001),
    ]
    assert saved["phase2"]["optimizers"] == ["sgd", "adam"]
    markdown = (tmp_path / "tune.md").read_text()
    assert "| **lr-x0.3** | 0.015 | max_steps | 0.2000 ** |" in markdown and "| lr-x1 | 0.05 | max_steps | 0.2000 |" in markdown
    assert "kfac: every grid point diverged; no winner, left out of phase 2." in markdown
    assert "| sgd | lr-x0.3 |" in (tmp_path / "bench.md").read_text()
    assert "kfac lr-x1: training loss is nan" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tune") / "out"
    assert main([*TUNE, "--out", str(out)]) == 0
    return out


def test_tune_end_to_end_runs_the_grid_then_the_winners_on_every_seed(tuned: Path) -> None:
    tune = json.loads((tuned / "tune.json").read_text())
    assert tune["grid"] == {"lr_factors": [0.3, 3.0], "knob": {"field": "momentum", "values": [0.0, 0.9]}}
    for name, own in (("sgd", 0.05), ("kfac", 0.1)):
        runs = tune["optimizers"][name]["runs"]
        assert [r["label"] for r in runs] == [
            "lr-x0.3_momentum-0",
            "lr-x0.3_momentum-0.9",
            "lr-x3_momentum-0",
            "lr-x3_momentum-0.9",
        ]
        for run in runs:  # each grid run: seed 0, 3 steps, factor × the optimizer's own lr, the knob's value
            config = json.loads((Path(run["run_dir"]) / "config.json").read_text())
            assert (config["seed"], config["max_steps"], config["momentum"]) == (0, 3, run["settings"]["momentum"])
            assert config["lr"] == pytest.approx(run["factor"] * own) == run["settings"]["lr"]
            summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
            assert summary["steps"] == 3 and run["objective"] == pytest.approx(1 - summary["final_test_acc"])
        best = min(r["objective"] for r in runs)
        winner = tune["winners"][name]
        assert winner["objective"] == best and winner["label"] == next(r["label"] for r in runs if r["objective"] == best)
        for seed in (0, 1):  # phase 2 runs the winner's settings, every seed, full length
            config = json.loads((tuned / f"{name}-seed{seed}" / "config.json").read_text())
            assert (config["lr"], config["momentum"]) == (winner["settings"]["lr"], winner["settings"]["momentum"])
            assert (config["seed"], config["max_steps"]) == (seed, 6)
        assert f"| {name} | {winner['label']} |" in (tuned / "bench.md").read_text()
    assert json.loads((tuned / "bench.json").read_text())["seeds"] == [0, 1]


def test_a_resumed_tune_retrains_nothing_and_refuses_other_settings(
    tuned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(tuned, out)
    before = json.loads((out / "tune.json").read_text())
    calls: list[RunConfig] = []
    monkeypatch.setattr(bench_module, "train", lambda config, *args, **kwargs: calls.append(config))
    assert main([*TUNE, "--out", str(out), "--resume"]) == 0
    assert calls == []  # every run, grid and phase 2, read back
    after = json.loads((out / "tune.json").read_text())
    assert after["winners"] == {
        name: {**w, "run_dir": w["run_dir"].replace(str(tuned), str(out))} for name, w in before["winners"].items()
    }
    capsys.readouterr()
    # another grid-run length, or another setting, for the same directories: refused before any run
    for changed in (["--tune-steps", "4"], ["--widths", "24"]):
        assert main([*TUNE, "--out", str(out), "--resume", *changed]) == 2
        error = capsys.readouterr().err
        assert "grid/sgd/lr-x0.3_momentum-0-seed0 holds a run with other settings than sgd seed 0" in error
    assert calls == []
