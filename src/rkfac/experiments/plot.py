"""Plots from run directories only (config.json and metrics.jsonl), never from live objects.

A line is labelled by the name its run was run under and its seed (``sre-kfac (seed 0)``);
where two runs would share a label, each of them is labelled by its run directory too, as
few of the path's last parts as tell it from the others (``a/run: sre-kfac (seed 0)``).

:func:`plot_runs` draws four panels: the evaluation a run is judged on (test accuracy; for a reconstruction, the loss on
the fixed training subset) against training time and against epochs, and the training loss of
every step, smoothed, against training time and against steps. The smoothing is a causal
exponential average with bias correction, ``m_t = β m_{t−1} + (1 − β) loss_t``, shown as
``m_t / (1 − β^t)``, β = :data:`SMOOTHING` (about a 20-step window): the batch losses are too
noisy to read, and a causal average lags the same for every optimizer.

:func:`plot_adaptive` draws what the adaptive step (kfac-auto, sre-kfac-auto) chose at every step:
α, μ, λ and ρ, from the step records' ``lr``, ``mu``, ``damping`` and ``rho``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from rkfac.experiments.presets import variant_name
from rkfac.experiments.rundir import RunDirectory

SMOOTHING = 0.95


def smoothed_steps(run: RunDirectory) -> tuple[list[float], list[int], list[float]]:
    """(training time at the end of each step, step number from 1, smoothed loss) of a run's
    step records; a non-finite loss (a diverging step) ends the curve."""
    seconds, steps, losses = [], [], []
    elapsed, average = 0.0, 0.0
    for count, record in enumerate(run.metrics("step"), start=1):
        if not math.isfinite(record["loss"]):
            break
        elapsed += sum(record["time"].values())
        average = SMOOTHING * average + (1 - SMOOTHING) * record["loss"]
        seconds.append(elapsed)
        steps.append(record["step"] + 1)
        losses.append(average / (1 - SMOOTHING**count))
    return seconds, steps, losses


def _judged_on(evals: list[dict[str, Any]]) -> tuple[str, float, str]:
    """The evaluation value to plot: (record key, scale, axis label)."""
    if any("test_acc" in record for record in evals):
        return "test_acc", 100.0, "test accuracy (%)"
    return "train_eval_loss", 1.0, "training loss (fixed subset)"


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
    """The four panels of the module docstring, one line per run, to a PNG."""
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
        # the judged value at every evaluation (epoch ends and, with --evals-per-epoch, inside epochs)
        evals = sorted([*epochs, *run.metrics("eval")], key=lambda record: record["step"])
        key, scale, judged = _judged_on(evals)
        evals = [record for record in evals if key in record]
        axes[0, 0].plot([r["train_time"] for r in evals], [scale * r[key] for r in evals], marker=".", label=label)
        axes[0, 1].plot([r["epoch"] for r in evals], [scale * r[key] for r in evals], marker=".", label=label)
        seconds, steps, losses = smoothed_steps(run)
        axes[1, 0].plot(seconds, losses, label=label)
        axes[1, 1].plot(steps, losses, label=label)
    if not plotted:
        raise ValueError(f"no completed epoch in {[str(p) for p in paths]}: nothing to plot")
    titles = [
        ("training time (s)", judged),
        ("epoch", judged),
        ("training time (s)", f"training loss, smoothed (β = {SMOOTHING})"),
        ("step", f"training loss, smoothed (β = {SMOOTHING})"),
    ]
    for axis in (axes[1, 0], axes[1, 1], *((axes[0, 0], axes[0, 1]) if key != "test_acc" else ())):
        axis.set_yscale("log")
    for axis, (xlabel, ylabel) in zip(axes.flat, titles, strict=True):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    _save(figure, axes[0, 0], out)


def median_curve(paths: list[Path]) -> tuple[list[float], list[int], list[float]]:
    """(median training time, step, median smoothed loss) at each step, over the runs in
    ``paths``, up to the step where the shortest of them stops."""
    curves = [smoothed_steps(RunDirectory(path)) for path in paths]
    length = min((len(steps) for _, steps, _ in curves), default=0)
    seconds = [statistics.median(curve[0][i] for curve in curves) for i in range(length)]
    losses = [statistics.median(curve[2][i] for curve in curves) for i in range(length)]
    return seconds, (curves[0][1][:length] if curves else []), losses


def plot_median_curves(groups: dict[str, list[Path]], out: Path) -> None:
    """Per name (an optimizer and its seeds' run directories), the median over the runs of the
    smoothed step loss, against the median training time at each step and against steps: the
    bench's "loss against time and against steps in one plot". A curve stops at the step where
    its shortest run stops (a diverged seed shortens it; the label counts the runs). Nothing is
    written when no run has a step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for name, paths in groups.items():
        runs = [path for path in paths if (path / "metrics.jsonl").exists()]
        seconds, steps, losses = median_curve(runs)
        if steps:
            curves[f"{name} (median of {len(runs)})"] = seconds, steps, losses
    if not curves:  # no run took a step yet: no plot (and not an earlier bench's)
        out.unlink(missing_ok=True)
        return
    figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (seconds, steps, losses) in curves.items():
        by_time.plot(seconds, losses, label=label)
        by_step.plot(steps, losses, label=label)
    for axis, xlabel in ((by_time, "training time (s)"), (by_step, "step")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"training loss, smoothed (β = {SMOOTHING})")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def adaptive_runs(paths: list[Path]) -> list[Path]:
    """The runs among ``paths`` whose step records carry the adaptive step's choices."""
    return [path for path in paths if any("mu" in record for record in RunDirectory(path, writer=False).metrics("step"))]


def plot_adaptive(paths: list[Path], out: Path) -> bool:
    """α, μ, λ (log scales) and ρ against the step, one line per adaptive run among ``paths``, to
    a PNG; False (and nothing written) when none of them is adaptive."""
    runs = adaptive_runs(paths)
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directories = [RunDirectory(path, writer=False) for path in runs]
    panels = (("lr", "α (learning rate)", True), ("mu", "μ (momentum)", False), ("damping", "λ (damping)", True))
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for run, label in zip(directories, run_labels(directories), strict=True):
        records = [r for r in run.metrics("step") if "mu" in r]
        for axis, (key, _, _) in zip(axes.flat, panels, strict=False):
            axis.plot([r["step"] for r in records], [r[key] for r in records], label=label, linewidth=0.8)
        measured = [r for r in records if r["rho"] is not None and math.isfinite(r["rho"])]
        axes[1, 1].plot([r["step"] for r in measured], [r["rho"] for r in measured], ".", label=label, markersize=3)
    for axis, (_, ylabel, log) in zip(axes.flat, panels, strict=False):
        axis.set_ylabel(ylabel)
        if log:
            axis.set_yscale("log")
    axes[1, 1].set_ylabel("ρ (reduction ratio; λ shrinks above 3/4, grows below 1/4)")
    for level in (0.25, 0.75):
        axes[1, 1].axhline(level, color="grey", linewidth=0.5)
    for axis in axes.flat:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    _save(figure, axes[0, 0], out)
    return True


def _save(figure: Any, legend_axis: Any, out: Path) -> None:
    """The legend on ``legend_axis``, then ``figure`` written to the PNG ``out`` and closed."""
    import matplotlib.pyplot as plt

    legend_axis.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
