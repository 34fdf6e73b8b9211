"""``rkfac spectrum``: record the factors' spectra while training, plot them, compare widths.

For each width scale, one K-FAC run (any ``rkfac train`` settings) records, every
``record_every`` steps and at its last step, after the backward (raw gradients in ``.grad``),
once factors exist (from the step after the first factor step), per layer and factor:
the normalised eigenvalues, the modes above ``threshold``·λ_max, the rank-r truncation errors,
and the preconditioned-gradient error with rank-r factors (:mod:`rkfac.spectrum`). Recording
time is excluded from training time. Output, per width, ``<out>/width-<scale>/`` (a run
directory plus ``spectrum.json`` and ``spectrum.png``), and ``<out>/spectrum.json`` with the
final counts per width and ``<out>/widths.png`` (modes above threshold against width).

``--from RUN_DIR`` skips training: it reads the factors saved in the run's checkpoint.
A run that ends before any factors exist (one step) is refused: there is nothing to record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rkfac.experiments.config import RunConfig
from rkfac.experiments.optimizers import damping_at
from rkfac.experiments.rundir import RunDirectory
from rkfac.experiments.train import Trainer
from rkfac.kfac import KFACPreconditioner
from rkfac.kfac.state import saved_factors
from rkfac.schedules import check_int
from rkfac.spectrum import FactorSpectrum, LayerSpectrum, factor_spectrum, layer_spectra

# The optimizers whose preconditioner keeps dense factors (B-KFAC's online factors keep none).
DENSE_FACTORS = ("kfac", "rs-kfac", "sre-kfac")


def _factor_json(spectrum: FactorSpectrum) -> dict[str, Any]:
    return {
        "dim": spectrum.dim,
        "modes_above": spectrum.modes_above,
        "truncation_error": {str(r): e for r, e in spectrum.truncation_error.items()},
        "normalized": [float(v) for v in spectrum.normalized],
    }


def _layer_json(spectrum: LayerSpectrum) -> dict[str, Any]:
    return {
        "A": _factor_json(spectrum.a),
        "G": _factor_json(spectrum.g),
        "gradient_error": {str(r): e for r, e in spectrum.gradient_error.items()},
    }


def record_run(
    config: RunConfig, out: Path, *, record_every: int, ranks: list[int], threshold: float, quiet: bool
) -> dict[str, Any]:
    """Train one run into ``out`` and return (and write) its spectrum records."""
    if config.optimizer not in DENSE_FACTORS:
        raise ValueError(f"rkfac spectrum needs a K-FAC optimizer ({', '.join(DENSE_FACTORS)}), got {config.optimizer!r}")
    check_int(record_every, "record_every", low=1)
    check_ranks(ranks)
    trainer = Trainer(config, out, quiet=quiet)
    pre = trainer.preconditioner
    assert isinstance(pre, KFACPreconditioner)  # the K-FAC optimizers checked above build one
    records: list[dict[str, Any]] = []
    last = trainer.total_steps - 1

    def record(step: int) -> None:
        if (step % record_every == 0 or step == last) and pre.factors():
            damping = damping_at(config, step, trainer.steps_per_epoch) or 0.1
            report = layer_spectra(pre, ranks, threshold, damping)
            records.append({"step": step, "layers": {name: _layer_json(spectrum) for name, spectrum in report.items()}})

    trainer.after_backward = record
    trainer.run()
    if not records:
        raise ValueError(
            f"nothing to record: the run's {trainer.total_steps} step(s) ended before any factors existed "
            "(they are recorded after a backward, from the step after the first factor step); "
            "train at least 2 steps (--epochs, --max-steps)"
        )
    result = {"width_scale": config.width_scale, "threshold": threshold, "ranks": ranks, "records": records}
    RunDirectory(out).write_json("spectrum.json", result)
    if records:
        plot_spectra(result, out / "spectrum.png")
    return result


def from_run(run_dir: Path, *, ranks: list[int], threshold: float) -> dict[str, Any]:
    """Spectra of the factors saved in a run's checkpoint (no gradients there: no gradient error)."""
    check_ranks(ranks)
    state = RunDirectory(run_dir).load_checkpoint()
    saved = state["optimizer"].get("preconditioner")
    if saved is None:
        raise ValueError(f"{run_dir} was not trained with a K-FAC optimizer: its checkpoint has no factors")
    layers = {}
    for name, (a, g) in saved_factors(saved).items():
        layers[name] = {
            "A": _factor_json(factor_spectrum(a.to(torch.float64), ranks, threshold)),
            "G": _factor_json(factor_spectrum(g.to(torch.float64), ranks, threshold)),
        }
    width = state.get("config", {}).get("width_scale", 1.0)
    return {"width_scale": width, "threshold": threshold, "ranks": ranks, "records": [{"step": saved["steps"], "layers": layers}]}


def check_ranks(ranks: list[int]) -> None:
    """Each truncation rank is a positive integer (``--ranks``), with the bound of ``--rank``."""
    for rank in ranks:
        check_int(rank, "ranks", low=1)


def run_spectrum(
    config: RunConfig, out: Path, *, width_scales: list[float], record_every: int, ranks: list[int], threshold: float, quiet: bool
) -> dict[str, Any]:
    results = [
        record_run(
            config.updated(width_scale=scale),
            out / f"width-{scale:g}",
            record_every=record_every,
            ranks=ranks,
            threshold=threshold,
            quiet=quiet,
        )
        for scale in width_scales
    ]
    return write_summary(results, out)


def write_summary(results: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """``spectrum.json`` with the last record's counts per width, and the width plot."""
    summary: dict[str, Any] = {"threshold": results[0]["threshold"], "widths": {}}
    for result in results:
        if not result["records"]:
            continue
        last = result["records"][-1]
        summary["widths"][f"{result['width_scale']:g}"] = {
            "step": last["step"],
            "layers": {
                name: {key: {"dim": layer[key]["dim"], "modes_above": layer[key]["modes_above"]} for key in ("A", "G")}
                | {"gradient_error": layer.get("gradient_error", {})}
                for name, layer in last["layers"].items()
            },
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectrum.json").write_text(json.dumps(summary, indent=2))
    if len(summary["widths"]) > 1:
        plot_widths(summary, out / "widths.png")
    if len(results) == 1 and results[0]["records"]:
        plot_spectra(results[0], out / "spectrum.png")
    return summary


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(result: dict[str, Any], out: Path) -> None:
    """Left: the last record's normalised spectra (log scale). Right: modes above threshold per step."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    last = result["records"][-1]
    for name, layer in last["layers"].items():
        for key in ("A", "G"):
            values = [max(v, 1e-12) for v in layer[key]["normalized"]]
            left.semilogy(range(1, len(values) + 1), values, label=f"{name}.{key} (d={layer[key]['dim']})")
            steps = [record["step"] for record in result["records"]]
            right.plot(
                steps,
                [record["layers"][name][key]["modes_above"] for record in result["records"]],
                marker="o",
                label=f"{name}.{key}",
            )
    left.axhline(result["threshold"], color="gray", linestyle="--", linewidth=1)
    left.set(xlabel="mode", ylabel="eigenvalue / λ_max", title=f"spectra at step {last['step']}", xscale="log")
    right.set(xlabel="step", ylabel=f"modes above {result['threshold']:.3g}·λ_max", title="modes above threshold")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_widths(summary: dict[str, Any], out: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    widths = sorted(summary["widths"], key=float)
    names = list(summary["widths"][widths[0]]["layers"])
    for name in names:
        for key in ("A", "G"):
            counts = [summary["widths"][w]["layers"][name][key]["modes_above"] for w in widths]
            axis.plot([float(w) for w in widths], counts, marker="o", label=f"{name}.{key}")
    axis.set(
        xlabel="width scale", ylabel=f"modes above {summary['threshold']:.3g}·λ_max", title="modes above threshold against width"
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
