"""config.READERS says which optimizers read a setting; the CLI refuses a flag none of a run's
optimizers reads. Checked against the training itself: a few steps with the setting changed
move the weights of every optimizer said to read it and leave those of every other one
bitwise alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rkfac.experiments.cli import main
from rkfac.experiments.config import OPTIMIZERS, READERS, RunConfig, unread_settings
from rkfac.experiments.presets import resolve_config
from rkfac.experiments.train import Trainer

# Every run: an MLP wider (32) than the rank the changed settings use (8), a batch (48) wider
# than its hidden factors (so that B-KFAC's fallback decomposes them), factors and bases renewed
# every step, weight decay on: each setting has something to change in 4 steps.
BASE = {
    "dataset": "synthetic",
    "synthetic_train": 192,
    "synthetic_test": 16,
    "model": "mlp",
    "widths": [32],
    "batch_size": 48,
    "epochs": 1,
    "checkpoint_every": 0,
    "weight_decay": 0.1,
    "factor_every": 1,
    "inverse_every": 1,
    "rank": 8,
}
# Candidate new values per setting: the first that differs from the resolved run's is used.
CHANGES: dict[str, list[Any]] = {
    "lr": [0.0123],
    "momentum": [0.55],
    "damping": [0.77],
    "damping_mode": ["pi", "relative"],
    "clip": ["none", "rms"],
    "clip_value": [0.003],
    "apply_dtype": ["bfloat16"],
    "statistics_samples": [5],
    "skip": [["1"]],
    "refresh_every": [1],
    "carry": ["reset", "keep"],
    "ekfac_carry": ["keep", "reset"],
    "weight_decay_start": [2],
    "factor_decay": [0.5],
    "factor_every": [2],
    "inverse_every": [2],
    "fisher": ["mc", "empirical"],
    "kfac_approx": ["reduce", "expand"],
    "rank": [3],
    "oversample": [1],
    "power_iters": [0],
    "warm_start": [True, False],
    "warm_power_iters": [0, 2],
    "adaptive_rank": [True, False],
    "min_rank": [2],
    "initial_damping": [5.0],
    "min_relative_damping": [10.0],
    "damping_every": [1],
    "curvature_samples": [4],
    "curvature_sampling": ["first"],
    "model_every": [2],
    "step_scale": [0.5],
    "update_freq": [1],
    "col_sample_size": [4],
    "sketch_threshold": [0.0],
    "sketch_rank": [2],
}
# What a setting needs in the base run to have an effect at all (for both of its runs).
CONTEXT: dict[str, dict[str, Any]] = {
    "clip": {"clip_value": 0.003},  # the rms clip at its default 0.07 does not bite here
    "clip_value": {"clip": "rms"},
    "col_sample_size": {"sketch_threshold": 0.0},  # SENG samples rows of sketched layers only
    "warm_power_iters": {"warm_start": True},
    "min_rank": {"adaptive_rank": True},
    "curvature_sampling": {"curvature_samples": 4},  # fewer than the batch, or the batch is used whole
    "apply_dtype": {"widths": [128]},  # layers narrower than 128 keep float32 (LOW_PRECISION_MIN_DIM)
}
# Read, but with nothing to act on in 4 steps of this MLP: kfac_approx needs shared (token,
# position) dimensions, SENG's sketch_rank convolutions, the adaptive rank (and its floor) a
# spectrum that falls below its cut; tests/layers, tests/seng and tests/kfac test them there.
NO_EFFECT_HERE = {"kfac_approx", "sketch_rank", "adaptive_rank", "min_rank"}


def _weights(optimizer: str, settings: dict[str, Any], tmp_path: Path) -> list[torch.Tensor]:
    config = resolve_config(optimizer, None, {**BASE, **settings})
    trainer = Trainer(config, tmp_path / f"run-{len(list(tmp_path.iterdir()))}", quiet=True)
    trainer.run()
    return [p.detach().clone() for p in trainer.net.parameters()]


def _changed_value(name: str, base: RunConfig) -> Any:
    return next(value for value in CHANGES[name] if value != getattr(base, name))


def test_every_setting_in_readers_has_a_change_to_test_and_names_real_optimizers() -> None:
    assert set(READERS) == set(CHANGES)
    for name, readers in READERS.items():
        assert readers and set(readers) <= set(OPTIMIZERS), name


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_readers_say_which_settings_change_the_training(optimizer: str, tmp_path: Path) -> None:
    wrong: list[str] = []
    unchanged: dict[str, list[torch.Tensor]] = {}
    for name in READERS:
        context = CONTEXT.get(name, {})
        reads = optimizer in READERS[name]
        if reads and name in NO_EFFECT_HERE:
            continue
        try:
            base = resolve_config(optimizer, None, {**BASE, **context})
            resolve_config(optimizer, None, {**BASE, **context, name: _changed_value(name, base)})
        except ValueError:  # resolve_config refuses some unread settings itself (the adaptive step's lr)
            if reads:
                raise
            continue
        key = repr(sorted(context.items()))
        if key not in unchanged:
            unchanged[key] = _weights(optimizer, context, tmp_path)
        before = unchanged[key]
        after = _weights(optimizer, {**context, name: _changed_value(name, base)}, tmp_path)
        same = all(torch.equal(a, b) for a, b in zip(before, after))
        if same == reads:
            said, moved = ("read", "did not") if reads else ("not read", "did")
            wrong.append(f"{name}: READERS says {said}, the weights {moved} move")
    assert not wrong, f"{optimizer}: " + "; ".join(wrong)


def test_unread_settings_names_the_flags_no_optimizer_of_the_run_reads() -> None:
    assert unread_settings(["sgd", "adamw"], {"rank": 8, "momentum": 0.9, "epochs": 2}) == {"rank": READERS["rank"]}
    assert unread_settings(["sgd", "sre-kfac"], {"rank": 8}) == {}


SMALL = ["--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-test", "16", "--widths", "8", "--batch-size", "16"]
SMALL += ["--quiet"]


def test_a_flag_the_optimizer_does_not_read_is_refused_with_its_value_and_readers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--optimizer", "adamw", "--statistics-samples", "512", "--out", str(run), *SMALL]) == 2
    error = capsys.readouterr().err
    assert "--statistics-samples 512" in error and "adamw" in error and "sre-soap" in error
    assert not run.exists()
    # a variant counts as its optimizer: sre-kfac-bf16 reads --rank
    assert main(["train", "--optimizer", "sre-kfac-bf16", "--rank", "4", "--max-steps", "1", "--out", str(run), *SMALL]) == 0


def test_a_bench_refuses_a_flag_none_of_its_optimizers_reads_and_notes_one_some_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = ["bench", "--preset", "quick", "--seeds", "0", "--max-steps", "1", "--out", str(tmp_path), *SMALL]
    assert main([*bench, "--optimizers", "sgd,adamw", "--carry", "reset"]) == 2
    assert "--carry reset" in capsys.readouterr().err
    assert main([*bench, "--optimizers", "sgd,sre-kfac", "--rank", "4"]) == 0
    assert "sgd run without --rank" in capsys.readouterr().err


def test_a_tune_refuses_a_knob_none_of_its_optimizers_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tune = ["tune", "--preset", "quick", "--seeds", "0", "--tune-steps", "1", "--out", str(tmp_path), *SMALL]
    assert main([*tune, "--optimizers", "adamw,soap", "--knob", "momentum=0,0.9"]) == 2
    assert "--momentum 0,0.9" in capsys.readouterr().err and not (tmp_path / "grid").exists()
