"""``rkfac spectrum`` on synthetic data: records, plots, widths, and --from a run's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from rkfac.experiments.cli import main
from rkfac.experiments.rundir import RunDirectory
from rkfac.spectrum import factor_spectrum
from tests.experiments.flags import read_by

SMALL = [
    "--dataset",
    "synthetic",
    "--synthetic-train",
    "128",
    "--synthetic-test",
    "64",
    "--model",
    "mlp",
    "--widths",
    "24",
    "--batch-size",
    "32",
    "--rank",
    "6",
    "--oversample",
    "2",
    "--factor-every",
    "1",
    "--epochs",
    "2",
    "--quiet",
]


def test_spectrum_records_during_training_and_compares_widths(tmp_path: Path) -> None:
    out = tmp_path / "spec"
    assert main(["spectrum", *SMALL, "--record-every", "2", "--ranks", "3,10", "--width-scales", "0.5,1", "--out", str(out)]) == 0
    summary = json.loads((out / "spectrum.json").read_text())
    assert set(summary["widths"]) == {"0.5", "1"}
    assert (out / "widths.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "width-1" / "spectrum.json").read_text())
    assert [r["step"] for r in run["records"]] == [2, 4, 6, 7]  # step 0 has no factors yet; 8 steps, the last recorded
    layer = run["records"][-1]["layers"]["1"]  # Linear(784, 24): A is 785 wide, G 24
    assert layer["A"]["dim"] == 785 and layer["G"]["dim"] == 24
    assert 1 <= layer["G"]["modes_above"] <= 24 and abs(layer["A"]["normalized"][0] - 1.0) < 1e-12
    assert set(layer["gradient_error"]) == {"3", "10"} and layer["gradient_error"]["10"] <= layer["gradient_error"]["3"]
    assert summary["widths"]["0.5"]["layers"]["1"]["G"]["dim"] == 12
    assert (out / "width-1" / "spectrum.png").exists() and (out / "width-1" / "metrics.jsonl").exists()


def test_spectrum_from_a_saved_run_uses_its_factors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--optimizer", "kfac", *read_by("kfac", SMALL), "--out", str(run)]) == 0
    assert main(["spectrum", "--from", str(run), "--ranks", "5", "--out", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "spectrum.json").read_text())
    saved = RunDirectory(run).load_checkpoint()["optimizer"]["preconditioner"]["layers"]["3"]
    expected = factor_spectrum(saved["A"]["factor"].double(), (5,))
    assert summary["widths"]["1"]["layers"]["3"]["A"] == {"dim": expected.dim, "modes_above": expected.modes_above}
    assert (tmp_path / "s" / "spectrum.png").exists()


def test_spectrum_refuses_non_kfac_runs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    assert main(["train", "--optimizer", "sgd", *read_by("sgd", SMALL), "--out", str(run)]) == 0
    assert main(["spectrum", "--from", str(run)]) == 2
    assert "not trained with a K-FAC optimizer" in capsys.readouterr().err
