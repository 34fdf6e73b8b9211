"""The rkfac command refuses what it cannot honour (issue 17, CLI): a resume with other settings,
a data directory it would have to replace, run directories and values it cannot read; and it
always shows something (spectrum's last step, distinct plot labels). On synthetic data, a second
a run; each test failed before the fix."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from rkfac.experiments import datasets
from rkfac.experiments.cli import main
from rkfac.experiments.presets import resolve_config
from rkfac.experiments.train import train

SMALL = [
    "--dataset",
    "synthetic",
    "--synthetic-train",
    "64",
    "--synthetic-test",
    "32",
    "--batch-size",
    "16",
    "--widths",
    "8",
    "--epochs",
    "1",
    "--quiet",
]  # fmt: skip  (4 steps an epoch)
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
needs_debian = pytest.mark.skipif(not all((DEBIAN / name).is_file() for name in FILES), reason=f"Fashion-MNIST not in {DEBIAN}")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step sre-kfac run (copied by :func:`run` for each test)."""
    run = tmp_path_factory.mktemp("template") / "run"
    assert main(["train", *SMALL, "--max-steps", "2", "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


# ---------------------------------------------------------------- 1. resume with other settings


def test_a_resume_with_other_settings_is_refused_listing_every_difference(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {name: (run / name).read_bytes() for name in ("config.json", "env.json", "metrics.jsonl", "checkpoint.pt")}
    other = run.parent / "elsewhere"
    argv = ["--lr", "0.5", "--seed", "5", "--widths", "128", "--optimizer", "adam", "--out", str(other), "--epochs", "1"]
    assert main(["train", "--resume", str(run), *argv, "--quiet"]) == 2
    error = _error(capsys)
    for line in (
        "--lr: the run's 0.1, given 0.5",
        "--seed: the run's 0, given 5",
        "--widths: the run's 8, given 128",
        "--optimizer: the run's sre-kfac, given adam",
        f"--out: the run's {run}, given {other}",
    ):
        assert line in error, error
    assert "--epochs:" not in error  # the same value is no difference
    assert error.splitlines()[-1].startswith("only --epochs and --max-steps may change on a resume")
    assert {name: (run / name).read_bytes() for name in before} == before and not other.exists()
    assert not (run / "resumes.json").exists()


@pytest.mark.parametrize(
    "argv",
    [["--lr", "0.5"], ["--seed", "5"], ["--optimizer", "adam"], ["--epochs", "1", "--max-steps", "1"], ["--preset", "quick"]],
)
def test_each_changed_setting_alone_is_refused(run: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    config = (run / "config.json").read_bytes()
    assert main(["train", "--resume", str(run), *argv, "--quiet"]) == 2
    assert "cannot resume" in _error(capsys)
    assert (run / "config.json").read_bytes() == config


def test_other_widths_are_refused_before_any_model_is_built(run: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rkfac", "train", "--resume", str(run), "--widths", "128", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--widths: the run's 8, given 128" in done.stderr and "size mismatch" not in done.stderr
    assert "Traceback" not in done.stderr


def test_the_same_values_resume(run: Path) -> None:
    assert main(["train", "--resume", str(run), "--lr", "0.1", "--seed", "0", "--widths", "8", "--out", str(run), "--quiet"]) == 0
    assert main(["train", "--resume", str(run), "--optimizer", "sre-kfac", "--rank", "1:220", "--quiet"]) == 0


def test_extending_the_run_is_recorded_and_config_json_is_never_rewritten(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = (run / "config.json").read_bytes()
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--quiet"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--max-steps", "none", "--quiet"]) == 0
    assert (run / "config.json").read_bytes() == config
    resumes = json.loads((run / "resumes.json").read_text())
    assert [(entry["step"], entry["changes"]) for entry in resumes] == [
        (2, {"max_steps": {"run": 2, "given": 3}}),
        (3, {"epochs": {"run": 1, "given": 2}, "max_steps": {"run": 3, "given": None}}),
    ]
    assert all(entry["env"]["data_files"] == [] for entry in resumes)
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    # the run's settings now are config.json with its resumes: a smaller value is refused
    assert main(["train", "--resume", str(run), "--epochs", "1", "--quiet"]) == 2
    assert "--epochs: the run's 2, given 1 (only a larger value extends the run)" in _error(capsys)
    assert main(["train", "--resume", str(run), "--max-steps", "5", "--quiet"]) == 2
    assert "--max-steps: the run's none, given 5" in _error(capsys)


def test_the_python_resume_refuses_other_settings_too(run: Path) -> None:
    config = resolve_config("sre-kfac", None, {"dataset": "synthetic", "synthetic_train": 64, "synthetic_test": 32})
    with pytest.raises(ValueError, match=r"cannot resume .* other settings than the run's(.|\n)*lr: the run's 0.1, given 0.5"):
        train(config.updated(batch_size=16, widths=[8], max_steps=2, lr=0.5), run, resume=True, quiet=True)


# ---------------------------------------------------------------- 2. an explicit --data-dir


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on: no download can succeed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("RKFAC_FASHION_MNIST_URL", f"http://127.0.0.1:{port}/")


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("present", [(), FILES[1::2]], ids=["empty", "labels only"])
def test_an_explicit_data_dir_that_lacks_files_is_refused_not_replaced(
    tmp_path: Path, present: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / "data"
    given.mkdir()
    for name in present:
        (given / name).write_bytes(b"present")  # only looked for: the directory is refused before any file is read
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(given), "--max-steps", "1", "--batch-size", "16", "--widths", "8"]
    assert main(["train", *argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = _error(capsys)
    missing = [name for name in FILES if name not in present]
    assert f"the data directory {given} (--data-dir): it lacks " in error, error
    lacking = error.split(" lacks ", 1)[1].split(";")[0]
    assert all(name in lacking for name in missing) and not any(name in lacking for name in present), error
    assert str(DEBIAN) not in error and not (tmp_path / "run" / "metrics.jsonl").exists()


@needs_debian
def test_env_json_records_the_files_read_with_their_sha256(tmp_path: Path) -> None:
    given = tmp_path / "data"
    given.mkdir()
    for name in FILES:
        (given / name).symlink_to(DEBIAN / name)
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(given), "--max-steps", "1", "--batch-size", "16", "--widths", "8"]
    assert main(["train", *argv, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    files = json.loads((tmp_path / "run" / "env.json").read_text())["data_files"]
    assert [entry["path"] for entry in files] == [str(given / name) for name in FILES]
    for entry in files:
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()


def test_the_synthetic_set_reads_no_files(run: Path) -> None:
    assert json.loads((run / "env.json").read_text())["data_files"] == []
    assert datasets.load_dataset("synthetic", synthetic_train=4, synthetic_test=2).files == ()


@pytest.mark.usefixtures("offline")
def test_an_explicit_cifar_dir_is_not_replaced_by_rkfac_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "env" / "cifar-10-batches-py").mkdir(parents=True)
    monkeypatch.setenv("RKFAC_DATA", str(tmp_path / "env"))
    assert datasets.cifar10_candidates(str(tmp_path / "given")) == [
        tmp_path / "given",
        tmp_path / "given" / "cifar-10-batches-py",
    ]


# ---------------------------------------------------------------- 3. directories and values it cannot read


def test_resuming_what_is_not_a_run_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 2
    error = _error(capsys)
    assert f"{tmp_path} is not a run directory" in error and "no config.json" in error and "checkpoint.pt" in error, error
    assert main(["train", "--resume", str(tmp_path / "absent"), "--quiet"]) == 2
    assert f"{tmp_path / 'absent'} is not a run directory: it does not exist" in _error(capsys)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("{", "is not valid JSON"), ('{"lr": 0.1, "colour": 3}', "'colour'"), ('{"rank": -5}', "rank must be >= 1, got -5")],
)
def test_an_invalid_config_json_is_named(run: Path, text: str, reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "config.json").write_text(text)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    error = _error(capsys)
    assert str(run / "config.json") in error and reason in error, error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "abc"], "argument --lr: bad schedule 'abc': give a number or epoch:value pairs like 1:0.3,13:0.03"),
        (["--lr", "1:0.1,1:0.2"], "argument --lr: bad schedule '1:0.1,1:0.2': epoch 1 is given twice"),
        (["--damping", "1:0.1,3:0.1,3:0.2"], "epoch 3 is given twice"),
        (["--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
    ],
)
def test_unreadable_values_say_what_is_expected(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", *argv, *SMALL])
    assert message in _error(capsys)


def test_max_steps_zero_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *SMALL, "--max-steps", "0", "--out", str(tmp_path / "run")]) == 2
    assert "max_steps must be >= 1, got 0" in _error(capsys) and not (tmp_path / "run").exists()
    assert main(["train", *SMALL, "--optimizer", "b-r-kfac", "--refresh-every", "0", "--out", str(tmp_path / "b")]) == 2
    assert "refresh_every must be >= 1, got 0" in _error(capsys)


@pytest.mark.parametrize(("command", "flag"), [("train", "--rank"), ("spectrum", "--ranks")])
def test_a_rank_of_minus_five_and_of_zero_give_the_same_bound(
    tmp_path: Path, command: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = flag.removeprefix("--")
    for value in ("-5", "0"):
        optimizer = "sre-kfac" if command == "train" else "kfac"  # exact K-FAC reads no --rank
        assert main([command, *SMALL, "--optimizer", optimizer, f"{flag}={value}", "--out", str(tmp_path / value)]) == 2
        assert f"{name} must be >= 1, got {value}" in _error(capsys)


# ---------------------------------------------------------------- 4. spectrum always records the last step


def test_a_spectrum_of_a_run_shorter_than_record_every_records_its_last_step(tmp_path: Path) -> None:
    out = tmp_path / "spec"
    assert main(["spectrum", *SMALL, "--optimizer", "kfac", "--record-every", "50", "--ranks", "3", "--out", str(out)]) == 0
    records = json.loads((out / "width-1" / "spectrum.json").read_text())["records"]
    assert [record["step"] for record in records] == [3]  # steps 0..3; step 0 has no factors yet
    assert json.loads((out / "spectrum.json").read_text())["widths"]["1"]["step"] == 3
    assert (out / "width-1" / "spectrum.png").exists() and (out / "spectrum.png").exists()


def test_a_spectrum_of_a_run_with_no_factors_to_record_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spec"
    assert main(["spectrum", *SMALL, "--optimizer", "kfac", "--max-steps", "1", "--out", str(out)]) == 2
    assert "nothing to record" in _error(capsys) and not (out / "spectrum.json").exists()


# ---------------------------------------------------------------- 5. plot labels


def test_plot_labels_runs_by_directory_where_labels_would_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["train", *SMALL, "--out", str(tmp_path / "a" / "run")]) == 0  # a completed epoch to plot
    runs = [tmp_path / "a" / "run", shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")]
    runs.append(shutil.copytree(tmp_path / "a" / "run", tmp_path / "c"))
    assert main(["train", *SMALL, "--optimizer", "sgd", "--out", str(tmp_path / "sgd")]) == 0
    legends: list[list[str]] = []
    savefig = Figure.savefig

    def spy(figure: Figure, *args: object, **kwargs: object) -> None:
        legends.append([text.get_text() for text in figure.axes[0].get_legend().get_texts()])
        savefig(figure, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Figure, "savefig", spy)
    assert main(["plot", *map(str, runs), str(tmp_path / "sgd"), "--out", str(tmp_path / "p.png")]) == 0
    assert legends == [["a/run: sre-kfac (seed 0)", "b/run: sre-kfac (seed 0)", "c: sre-kfac (seed 0)", "sgd (seed 0)"]]
