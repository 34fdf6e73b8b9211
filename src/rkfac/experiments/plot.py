"""Plots from run directories only (config.json and metrics.jsonl), never from live objects.

A line is labelled by the name its run was run under and its seed (``sre-kfac (seed 0)``);
where two runs would share a label, each of them is labelled by its run directory too, as
few of the path's last parts as tell it from the others (``a/run: sre-kfac (seed 0)``).
"""

from __future__ import annotations

from pathlib import Path

from rkfac.experiments.presets import variant_name
from rkfac.experiments.rundir import RunDirectory


def run_label(run: RunDirectory) -> str:
    try:
        config = run.read_json("config.json")
        return f"{variant_name(config)} (seed {config['seed']})"
    except (OSError, KeyError, ValueError):
        return run.path.name


def run_labels(runs: list[RunDirectory]) -> list[str]:
    """One label per run, distinct where the runs' directories are (see the module docstring)."""
    labels = [run_label(run) for run in runs]
    named = []
    for run, label in zip(runs, labels, strict=True):
        twins = [other.path for other, twin in zip(runs, labels, strict=True) if twin == label and other is not run]
        named.append(f"{_distinct_tail(run.path, twins)}: {label}" if twins else label)
    return named


def _distinct_tail(path: Path, others: list[Path]) -> str:
    """The fewest last parts of ``path`` that no other path ends with (all of it if none do)."""
    parts = path.absolute().parts
    other_parts = [other.absolute().parts for other in others]
    for count in range(1, len(parts) + 1):
        if all(other[-count:] != parts[-count:] for other in other_parts):
            return str(Path(*parts[-count:]))
    return str(path)


def plot_runs(paths: list[Path], out: Path) -> None:
    """Test accuracy and loss against training time and epochs, one line per run, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [RunDirectory(path) for path in paths]
    for run in runs:
        if not (run.path / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{run.path} has no metrics.jsonl: is it an rkfac run directory?")
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    plotted = 0
    for run, label in zip(runs, run_labels(runs), strict=True):
        epochs = list(run.metrics("epoch"))
        if not epochs:
            continue
        plotted += 1
        number = [record["epoch"] for record in epochs]
        seconds = [record["train_time"] for record in epochs]
        # accuracy at every evaluation (epoch ends and, with --evals-per-epoch, inside epochs)
        evals = sorted([*epochs, *run.metrics("eval")], key=lambda record: record["step"])
        axes[0, 0].plot([r["train_time"] for r in evals], [100 * r["test_acc"] for r in evals], marker=".", label=label)
        axes[0, 1].plot([r["epoch"] for r in evals], [100 * r["test_acc"] for r in evals], marker=".", label=label)
        axes[1, 0].plot(seconds, [r["train_loss"] for r in epochs], marker="o", label=label)
        axes[1, 1].plot(number, [r["test_loss"] for r in epochs], marker="o", label=label)
    if not plotted:
        raise ValueError(f"no completed epoch in {[str(p) for p in paths]}: nothing to plot")
    titles = [
        ("training time (s)", "test accuracy (%)"),
        ("epoch", "test accuracy (%)"),
        ("training time (s)", "train loss"),
        ("epoch", "test loss"),
    ]
    for axis, (xlabel, ylabel) in zip(axes.flat, titles, strict=True):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
