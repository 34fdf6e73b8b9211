"""``rkfac tune``: the same small grid for every optimizer, chosen on seed 0, then every seed.

The protocol (issue 19: "every optimizer, rkfac's included, gets the same small grid"):

1. **The grid.** Learning-rate *multipliers* (default ×0.1, ×0.3, ×1, ×3) of each optimizer's
   own resolved lr: its family default, then the preset's value, then ``--lr`` if given. The
   multipliers are the same for every optimizer, so each family is searched around its own
   default on the same relative scale (SGD's 0.05, Adam's 1e-3 and K-FAC's 0.1 each get
   ×0.1 … ×3); one absolute grid would either be too wide to be small or favour the family it
   was centred on. A schedule lr (``{epoch: value}``, SENG's, the paper preset's K-FAC) is
   scaled value by value: its shape stays, its height is searched. At most one more knob,
   ``FIELD=v1,v2,...`` (any RunConfig field but lr, seed, optimizer, preset, epochs, max_steps;
   values read as that field's flag reads them, ``;`` separating values that hold commas, such
   as ``widths=32,32;64,64``), is crossed with the lr values. Every optimizer runs the whole
   grid, even one that ignores the knob (Adam and ``momentum``): the same grid for all, at the
   cost of repeated identical runs, whose tie the rule below breaks towards the first value.
   A knob that none of the optimizers reads is refused by the CLI (``rkfac tune``).

2. **Selection, on seed 0 and short.** Every optimizer and grid point runs seed 0 for one
   epoch (``epochs=1``) or, with ``tune_steps`` (``--tune-steps N``), for N steps
   (``max_steps=N``, the preset's epochs kept). Nothing in a run depends on its length but
   where it stops, so a grid run is the first steps of the full run with that setting: the
   selection ranks settings by early progress, which is what the bench's time-to-target
   rewards, at the cost of a few short runs instead of seeds × full runs per point. Selecting
   on seed 0, which the bench then reports among its seeds, is an optimistic bias, small and
   the same for every optimizer.

3. **The score** is :func:`objective`, lower is better: the summary's ``objective`` where the
   task writes one, else ``1 - final_test_acc``. A run that diverged (or scored NaN or ±inf)
   is kept and scores +inf, worst: it never wins, and an optimizer whose every point diverged
   has no winner and is left out of phase 2 (tune.json and tune.md say so). Ties go to the
   smaller lr (a larger lr that does no better only sits nearer divergence), then to the knob
   value given first. A tie is a score within :data:`TIE_TOLERANCE` (relative) of the best:
   K-FAC's KL clip can make two lrs take nearly the same steps, and on fashion-autoencoder
   SRE-KFAC's lr ×1 and ×3 ended at 16.744967 and 16.744965, a "win" of 1e-7 relative that is
   float noise. For a test accuracy (1e-4 per image of 10,000) the tolerance is below one image,
   so there only equal scores tie.

4. **Phase 2.** Each optimizer's winner runs every seed of the bench (the preset's, or
   ``seeds``) at the preset's full length, through :func:`rkfac.experiments.bench.run_bench`
   with the winner's settings as that optimizer's own overrides; the bench table's "setting"
   column names the winning grid point.

All runs are kept::

    out/grid/<optimizer>/<label>-seed0   phase 1, one per grid point (label: lr-x0.3_momentum-0.9)
    out/<optimizer>-seed<s>              phase 2, as rkfac bench writes them
    out/tune.json                        the grid, every grid run (label, settings, objective,
                                         status, run directory), the winner per optimizer
    out/tune.md                          a table per optimizer, the winner marked **
    out/bench.json, bench.csv, bench.md, bench.png   phase 2's tables (run_bench)

With ``resume`` an interrupted tune continues in ``out`` as a bench does: finished runs are read
back, cut-off runs continue from their checkpoints, a run directory holding other settings (a
changed flag, ``--tune-steps`` or base lr) is refused. Without it, as ``rkfac bench`` without
``--resume``, every run is trained afresh, replacing the directories it writes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rkfac.experiments.bench import run_bench, run_or_reuse
from rkfac.experiments.cli import parse_setting
from rkfac.experiments.config import EpochSchedule, RunConfig, setting_text
from rkfac.experiments.presets import PRESETS, resolve_config
from rkfac.experiments.rundir import RunDirectory
from rkfac.experiments.train import TrainingDivergedError

DEFAULT_LR_FACTORS = (0.1, 0.3, 1.0, 3.0)
# Fields that cannot be the extra knob: the grid's own axis, and what the protocol sets itself.
NOT_KNOBS = {
    "lr": "the learning rate is the grid's own axis: give its multipliers with --lr-factors",
    "seed": "the grid runs seed 0 and phase 2 the bench's seeds (--seeds)",
    "optimizer": "every optimizer runs the same grid: choose them with --optimizers",
    "preset": "a tune runs one preset",
    "max_steps": "the grid runs' length is --tune-steps, phase 2's the preset's",
    "epochs": "the grid runs one epoch (or --tune-steps steps), phase 2 the preset's epochs",
}
TUNE_SEED = 0
TIE_TOLERANCE = 1e-4  # relative: scores this close to the best tie (module docstring, point 3)


@dataclass(frozen=True)
class Knob:
    """The one extra setting of a grid: a RunConfig field and the values it takes."""

    field: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> Knob:
        """``"momentum=0,0.9"`` → Knob("momentum", (0.0, 0.9)); values read by the field's flag
        reader, separated by ``;`` where the text has one (list or schedule values), else by ``,``."""
        name, equals, values_text = text.partition("=")
        name = name.strip().replace("-", "_")
        if not equals or not name:
            raise ValueError(f"bad knob {text!r}: write FIELD=v1,v2,... such as momentum=0,0.9")
        if name in NOT_KNOBS:
            raise ValueError(f"bad knob {text!r}: {name} cannot be the knob ({NOT_KNOBS[name]})")
        separator = ";" if ";" in values_text else ","
        items = [item.strip() for item in values_text.split(separator) if item.strip()]
        if not items:
            raise ValueError(f"bad knob {text!r}: it gives {name} no values; write {name}=v1,v2,...")
        values = tuple(parse_setting(name, item) for item in items)
        labels = [setting_text(value) for value in values]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"bad knob {text!r}: {name} value {', '.join(repeated)} is given twice; give each once")
        return cls(name, values)


@dataclass(frozen=True)
class GridPoint:
    """One setting of the grid for one optimizer: its label, lr multiplier, knob value's
    position (0 without a knob) and the settings it overrides (lr, and the knob's field)."""

    label: str
    factor: float
    knob_index: int
    settings: dict[str, Any]


@dataclass(frozen=True)
class Grid:
    """Learning-rate multipliers, crossed with at most one :class:`Knob`."""

    lr_factors: tuple[float, ...] = DEFAULT_LR_FACTORS
    knob: Knob | None = None

    def __post_init__(self) -> None:
        if not self.lr_factors:
            raise ValueError(
                f"empty grid: lr factors {list(self.lr_factors)} give no learning rate; give 3–4 such as 0.1,0.3,1,3"
            )
        for factor in self.lr_factors:
            if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
                raise ValueError(f"lr factor {factor!r} must be a finite number > 0 (a multiplier of each optimizer's lr)")
        labels = [f"{factor:g}" for factor in self.lr_factors]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"lr factor {', '.join(repeated)} is given twice; give each once")

    @classmethod
    def parse(cls, lr_factors: Sequence[float] | None = None, knobs: Sequence[str] = ()) -> Grid:
        """The grid of the command line: ``--lr-factors`` (None: the default) and the ``--knob`` texts (at most one)."""
        if len(knobs) > 1:
            raise ValueError(
                f"at most one knob besides the learning rate, got {len(knobs)}: {', '.join(knobs)}; "
                "a grid of two more knobs is not small"
            )
        factors = DEFAULT_LR_FACTORS if lr_factors is None else tuple(lr_factors)
        return cls(factors, Knob.parse(knobs[0]) if knobs else None)

    @property
    def size(self) -> int:
        """Grid points per optimizer."""
        return len(self.lr_factors) * (len(self.knob.values) if self.knob else 1)

    def points(self, base_lr: EpochSchedule) -> list[GridPoint]:
        """The grid around an optimizer whose resolved lr is ``base_lr``: lr factor-major, knob values inside."""
        knob_values: list[tuple[int, Any]] = list(enumerate(self.knob.values)) if self.knob else [(0, None)]
        points = []
        for factor, (index, value) in itertools.product(self.lr_factors, knob_values):
            settings: dict[str, Any] = {"lr": scale_lr(base_lr, factor)}
            label = f"lr-x{factor:g}"
            if self.knob is not None:
                settings[self.knob.field] = value
                label += f"_{self.knob.field}-{setting_text(value)}"
            points.append(GridPoint(_safe(label), factor, index, settings))
        return points

    def to_json(self) -> dict[str, Any]:
        knob = None if self.knob is None else {"field": self.knob.field, "values": list(self.knob.values)}
        return {"lr_factors": list(self.lr_factors), "knob": knob}


def scale_lr(lr: EpochSchedule, factor: float) -> EpochSchedule:
    """``factor`` × ``lr``, a schedule value by value (rounded to 12 significant digits, so that
    0.3 × 0.05 is written 0.015)."""
    if isinstance(lr, dict):
        return {epoch: _round(factor * value) for epoch, value in lr.items()}
    return _round(factor * lr)


def _round(value: float) -> float:
    return float(f"{value:.12g}")


def _safe(label: str) -> str:
    """A file-system-safe label: letters, digits and ``.-_+`` (``,`` and ``:`` of lists and schedules become ``+``)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "+", label)


def objective(summary: dict[str, Any]) -> float:
    """The score of a run, lower is better: ``summary["objective"]`` where the summary has one,
    else ``1 - final_test_acc``; +inf for a diverged run or a score that is not finite."""
    if summary.get("status") == "diverged":
        return math.inf
    value = summary["objective"] if "objective" in summary else 1.0 - summary["final_test_acc"]  # older summaries
    if value is None or not math.isfinite(value):
        return math.inf
    return float(value)


def choose(scored: Sequence[tuple[GridPoint, float]]) -> GridPoint | None:
    """The winner among (point, objective) pairs: the lowest objective, ties (within
    :data:`TIE_TOLERANCE` of it, relative) to the smaller lr factor, then to the knob value given
    first; None when every point scored +inf (diverged)."""
    finite = [(point, score) for point, score in scored if math.isfinite(score)]
    if not finite:
        return None
    best = min(score for _, score in finite)
    tied = [point for point, score in finite if score <= best + TIE_TOLERANCE * abs(best)]
    return min(tied, key=lambda point: (point.factor, point.knob_index))


def grid_overrides(overrides: dict[str, Any] | None, tune_steps: int | None) -> dict[str, Any]:
    """The settings of every grid run beyond its point's: the shared ones, its length (one
    epoch, or ``tune_steps`` steps) and seed 0."""
    if tune_steps is not None and (isinstance(tune_steps, bool) or not isinstance(tune_steps, int) or tune_steps < 1):
        raise ValueError(f"tune steps must be an integer >= 1 (steps of each grid run), got {tune_steps!r}")
    length: dict[str, Any] = {"epochs": 1} if tune_steps is None else {"max_steps": tune_steps}
    return {**(overrides or {}), **length, "seed": TUNE_SEED}


def run_grid(
    preset: str,
    out: Path,
    *,
    grid: Grid,
    optimizers: list[str],
    tune_steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> dict[str, dict[str, Any]]:
    """Phase 1: every optimizer on every grid point, seed 0, short, into ``out/grid``.

    Returns per optimizer its base lr, every grid run (label, factor, settings, objective,
    status, run directory) and the winner (None if every point diverged). Every config is
    resolved before the first run, so a bad knob value fails at once.
    """
    shared = grid_overrides(overrides, tune_steps)
    plans: dict[str, list[tuple[GridPoint, RunConfig]]] = {}
    base_lrs = {name: resolve_config(name, preset, overrides).lr for name in optimizers}
    for name in optimizers:
        points = grid.points(base_lrs[name])
        for point in points:
            resolve_config(name, preset, {**(overrides or {}), **point.settings})  # phase 2's config, checked now
        plans[name] = [(point, resolve_config(name, preset, {**shared, **point.settings})) for point in points]
    scored: dict[str, list[tuple[GridPoint, float, dict[str, Any]]]] = {name: [] for name in optimizers}
    for index in range(grid.size):  # the optimizers interleaved, as a bench interleaves them by seed
        for name in optimizers:
            point, config = plans[name][index]
            run_dir = out / "grid" / name / f"{point.label}-seed{TUNE_SEED}"
            try:
                summary = run_or_reuse(config, run_dir, quiet=quiet, resume=resume)
            except TrainingDivergedError as error:
                print(f"{name} {point.label}: {error}")
                summary = RunDirectory(run_dir).read_json("summary.json")
            score = objective(summary)
            print(f"{name} {point.label}: {summary['status']}, objective {_score_text(score)}", flush=True)
            scored[name].append((point, score, {"status": summary["status"], "run_dir": str(run_dir)}))
    results = {}
    for name in optimizers:
        winner = choose([(point, score) for point, score, _ in scored[name]])
        runs = [
            {
                "label": point.label,
                "factor": point.factor,
                "settings": point.settings,
                "objective": score if math.isfinite(score) else None,  # null: diverged or not finite
                **run,
            }
            for point, score, run in scored[name]
        ]
        results[name] = {"base_lr": base_lrs[name], "runs": runs, "winner": None if winner is None else winner.label}
    return results


def run_tune(
    preset: str,
    out: Path,
    *,
    grid: Grid | None = None,
    optimizers: list[str] | None = None,
    seeds: list[int] | None = None,
    tune_steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Phase 1 (:func:`run_grid`) then phase 2 (the winners on every seed, :func:`run_bench`);
    writes tune.json and tune.md after each phase and returns tune.json's contents."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    grid = grid or Grid()
    chosen = optimizers or list(PRESETS[preset].optimizers)
    seed_list = seeds or list(PRESETS[preset].seeds)
    results = run_grid(
        preset, out, grid=grid, optimizers=chosen, tune_steps=tune_steps, overrides=overrides, quiet=quiet, resume=resume
    )
    tune: dict[str, Any] = {
        "preset": preset,
        "grid": grid.to_json(),
        "tune_seed": TUNE_SEED,
        "tune_steps": tune_steps,  # null: one epoch
        "seeds": seed_list,
        "optimizers": results,
        "winners": {name: _winner(result) for name, result in results.items()},
        "phase2": None,
    }
    table = _write_tune(out, tune)
    print(f"\n## rkfac tune --preset {preset}: the grid on seed {TUNE_SEED}\n\n{table}\n", flush=True)
    tuned = [name for name in chosen if results[name]["winner"] is not None]
    if tuned:
        per_optimizer = {name: tune["winners"][name]["settings"] for name in tuned}
        labels = {name: results[name]["winner"] for name in tuned}
        run_bench(
            preset,
            out,
            optimizers=tuned,
            seeds=seed_list,
            overrides=overrides,
            quiet=quiet,
            resume=resume,
            per_optimizer=per_optimizer,
            setting_labels=labels,
        )
        runs = [str(out / f"{name}-seed{seed}") for seed in seed_list for name in tuned]
        tune["phase2"] = {"optimizers": tuned, "seeds": seed_list, "runs": runs, "bench": str(out / "bench.json")}
        _write_tune(out, tune)
    else:
        print("every grid point of every optimizer diverged: no phase 2")
    print(f"\nwrote {out / 'tune.json'}, tune.md")
    return tune


def _winner(result: dict[str, Any]) -> dict[str, Any] | None:
    run = next((run for run in result["runs"] if run["label"] == result["winner"]), None)
    return None if run is None else {key: run[key] for key in ("label", "settings", "objective", "run_dir")}


def _score_text(score: float | None) -> str:
    return "inf (diverged or not finite)" if score is None or not math.isfinite(score) else f"{score:.4f}"


def format_tune_table(tune: dict[str, Any]) -> str:
    """tune.md: per optimizer, each grid point's settings, status and objective, the winner marked **."""
    knob = tune["grid"]["knob"]
    lines = [
        f"Grid: lr × {', '.join(f'{f:g}' for f in tune['grid']['lr_factors'])} of each optimizer's own lr"
        + (f", crossed with {knob['field']} ∈ {{{', '.join(setting_text(v) for v in knob['values'])}}}" if knob else "")
        + f"; seed {tune['tune_seed']}, "
        + ("one epoch" if tune["tune_steps"] is None else f"{tune['tune_steps']} steps")
        + " per run; objective lower is better (** the winner: lowest, ties within 1e-4 relative to the smaller lr).",
    ]
    for name, result in tune["optimizers"].items():
        header = ["setting", "lr", *([knob["field"]] if knob else []), "status", "objective"]
        lines += ["", f"### {name} (own lr {setting_text(result['base_lr'])})", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for run in result["runs"]:
            won = run["label"] == result["winner"]
            cells = [f"**{run['label']}**" if won else run["label"], setting_text(run["settings"]["lr"])]
            cells += [setting_text(run["settings"][knob["field"]])] if knob else []
            cells += [run["status"], _score_text(run["objective"]) + (" **" if won else "")]
            lines.append("| " + " | ".join(cells) + " |")
        if result["winner"] is None:
            lines += ["", f"{name}: every grid point diverged; no winner, left out of phase 2."]
    return "\n".join(lines)


def _write_tune(out: Path, tune: dict[str, Any]) -> str:
    table = format_tune_table(tune)
    out.mkdir(parents=True, exist_ok=True)
    RunDirectory(out).write_json("tune.json", tune)
    (out / "tune.md").write_text(table + "\n")
    return table
