"""``rkfac bench``: several optimizers on one preset, the same seeds, one table.

Runs are interleaved by seed (every optimizer runs seed 0, then every optimizer runs seed 1,
…) so that slow drifts of the machine touch all optimizers alike. Reported per optimizer,
medians over seeds: training seconds per epoch, training time and epochs to each target (a test
accuracy, or a training-loss level: only when every seed reached it; otherwise how many did),
the final test accuracy (mean) or, for a reconstruction, the final training and test losses
(means), the per-step time split, each K-FAC variant's ratios to exact K-FAC, and each
curvature method's ratio to the best peer (the first-order optimizer, SOAP included, that
reached the target soonest: above 1, the curvature method is faster). Names may be
optimizers or the named variants of :data:`rkfac.experiments.presets.VARIANTS` (e.g.
``sre-kfac-adaptive``), so a setting can be compared with the paper's inside one bench.

With ``resume`` an interrupted bench continues in its directory: a run that finished
(``summary.json``) is read back, a run that was cut off continues from its checkpoint, and the
rest start; a run directory whose saved config differs from the bench's is an error, not a
silent mix of settings.

``per_optimizer`` gives an optimizer settings of its own, applied after the shared
``overrides`` (``rkfac tune`` runs each optimizer's winning grid point so), and
``setting_labels`` names them in a "setting" column of the table.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from rkfac.experiments.config import KFAC_OPTIMIZERS, PEERS, PRECONDITIONED, RunConfig
from rkfac.experiments.metrics import PHASES
from rkfac.experiments.plot import plot_adaptive, plot_median_curves, plot_runs
from rkfac.experiments.presets import PRESETS, resolve_config
from rkfac.experiments.resume import run_config
from rkfac.experiments.rundir import RunDirectory
from rkfac.experiments.tasks import Target
from rkfac.experiments.train import TrainingDivergedError, train


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.mean(known) if known and len(known) == len(values) else None


def summarize(preset: str, results: dict[str, list[dict[str, Any]]], targets: list[Target]) -> list[dict[str, Any]]:
    rows = []
    for optimizer, summaries in results.items():
        done = [s for s in summaries if s["status"] != "diverged"]
        row: dict[str, Any] = {
            "optimizer": optimizer,
            "family": summaries[0]["optimizer"] if summaries else optimizer,
            "seeds": len(summaries),
            "diverged": len(summaries) - len(done),
            "seconds_per_epoch": _median([s["seconds_per_epoch"] for s in done if s["seconds_per_epoch"]]),
            "final_test_acc": _mean([s["final_test_acc"] for s in done]),
            "final_train_eval_loss": _mean([s.get("final_train_eval_loss") for s in done]),
            "final_test_loss": _mean([s.get("final_test_loss") for s in done]),
        }
        for phase in PHASES:
            row[f"{phase}_per_epoch"] = _median([s["phase_seconds"].get(phase, 0.0) / s["epochs"] for s in done if s["epochs"]])
        for target in targets:
            key = target.key
            hits = [s["targets"].get(key) for s in summaries]
            reached = [hit for hit in hits if hit]
            row[f"time_to_{key}"] = _median([hit["time"] for hit in reached]) if len(reached) == len(summaries) else None
            row[f"epochs_to_{key}"] = _median([hit["epoch"] for hit in reached]) if len(reached) == len(summaries) else None
            row[f"reached_{key}"] = f"{len(reached)}/{len(summaries)}"
        rows.append(row)
    exact = next((row for row in rows if row["optimizer"] == "kfac"), None)
    for row in rows:
        if exact is None or row["family"] not in KFAC_OPTIMIZERS:
            continue
        row["exact_over_this_per_epoch"] = _ratio(exact["seconds_per_epoch"], row["seconds_per_epoch"])
        for target in targets:
            key = f"time_to_{target.key}"
            row[f"exact_over_this_{key}"] = _ratio(exact[key], row[key])
    _compare_with_peers(rows, targets)
    return rows


def _compare_with_peers(rows: list[dict[str, Any]], targets: list[Target]) -> None:
    """Give each curvature method's row, per target, the best peer (``best_peer_time_to_*``:
    the peer row with the shortest median time, None when no peer reached it on every seed),
    its time (``best_peer_seconds_to_*``) and ``peer_over_this_time_to_*``: that time over
    this row's."""
    peers = [row for row in rows if row["family"] in PEERS]
    if not peers:
        return
    for row in rows:
        if row["family"] not in PRECONDITIONED:
            continue
        for target in targets:
            key = f"time_to_{target.key}"
            best = min((peer for peer in peers if peer[key]), key=lambda peer: peer[key], default=None)
            row[f"best_peer_{key}"] = None if best is None else best["optimizer"]
            row[f"best_peer_seconds_to_{target.key}"] = None if best is None else best[key]
            row[f"peer_over_this_{key}"] = None if best is None else _ratio(best[key], row[key])


def _peer_cell(row: dict[str, Any], target: Target) -> str:
    """``2.00 (adamw)``; ``no peer`` where only this row reached the target; ``not reached
    (soap 110.5 s)`` where only the peer did."""
    key = f"time_to_{target.key}"
    if f"best_peer_{key}" not in row:
        return "—"
    best = row[f"best_peer_{key}"]
    if best is None:
        return "no peer" if row[key] else "—"
    if not row[key]:
        return f"not reached ({best} {_cell(row[f'best_peer_seconds_to_{target.key}'])} s)"
    return f"{_cell(row[f'peer_over_this_{key}'], 2)} ({best})"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: list[dict[str, Any]], targets: list[Target]) -> str:
    """The bench's table (markdown). The final-result columns are those the rows have: test
    accuracy for classifiers, training-subset and test loss for a reconstruction."""
    finals = [
        (key, header, scale, digits)
        for key, header, scale, digits in (
            ("final_test_acc", "final acc %", 100.0, 2),
            ("final_train_eval_loss", "final train loss", 1.0, 3),
            ("final_test_loss", "final test loss", 1.0, 3),
        )
        if any(row.get(key) is not None for row in rows) and (key != "final_test_loss" or not _has_accuracy(rows))
    ]
    labelled = any("setting" in row for row in rows)  # a "setting" column only when some row names one
    compared = any(key.startswith("best_peer_") for row in rows for key in row)
    header = [
        "optimizer",
        *(["setting"] if labelled else []),
        "s/epoch",
        *[f"time to {t.label}" for t in targets],
        *[f"epochs to {t.label}" for t in targets],
        *[name for _, name, _, _ in finals],
        "exact/this s/epoch",
        *[f"exact/this time to {t.label}" for t in targets],
        *([f"best peer/this time to {t.label}" for t in targets] if compared else []),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["optimizer"], *([_cell(row.get("setting"))] if labelled else []), _cell(row["seconds_per_epoch"])]
        cells += [
            _cell(row[f"time_to_{t.key}"]) + ("" if row[f"time_to_{t.key}"] else f" ({row[f'reached_{t.key}']})") for t in targets
        ]
        cells += [_cell(row[f"epochs_to_{t.key}"], 2) for t in targets]
        cells += [_cell(scale * row[key] if row.get(key) is not None else None, digits) for key, _, scale, digits in finals]
        cells += [_cell(row.get("exact_over_this_per_epoch"), 2)]
        cells += [_cell(row.get(f"exact_over_this_time_to_{t.key}"), 2) for t in targets]
        cells += [_peer_cell(row, t) for t in targets] if compared else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Time split, seconds per epoch (medians over seeds):",
        "",
        "| optimizer | " + " | ".join(PHASES) + " |",
        "|" + "---|" * (len(PHASES) + 1),
    ]
    for row in rows:
        lines.append(f"| {row['optimizer']} | " + " | ".join(_cell(row[f"{p}_per_epoch"], 2) for p in PHASES) + " |")
    return "\n".join(lines)


def _has_accuracy(rows: list[dict[str, Any]]) -> bool:
    return any(row.get("final_test_acc") is not None for row in rows)


def run_bench(
    preset: str,
    out: Path,
    *,
    optimizers: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
    quiet: bool = False,
    resume: bool = False,
    per_optimizer: dict[str, dict[str, Any]] | None = None,
    setting_labels: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Bench ``optimizers`` (default: the preset's) on ``seeds`` into ``out``; returns the table's rows.

    ``per_optimizer[name]`` is merged over ``overrides`` for that optimizer's runs;
    ``setting_labels[name]`` is shown in the table's "setting" column (and its rows' ``setting``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    chosen = optimizers or list(PRESETS[preset].optimizers)
    own = per_optimizer or {}
    for name in chosen:
        resolve_config(name, preset, {**(overrides or {}), **own.get(name, {})})  # fail on a bad name or value before any run
    seed_list = seeds or list(PRESETS[preset].seeds)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    run_dirs = []
    targets: list[Target] = []
    for seed in seed_list:
        for name in chosen:
            config = resolve_config(name, preset, {**(overrides or {}), **own.get(name, {}), "seed": seed})
            targets = config.targets
            run_dir = out / f"{name}-seed{seed}"
            run_dirs.append(run_dir)
            try:
                summary = run_or_reuse(config, run_dir, quiet=quiet, resume=resume)
            except TrainingDivergedError as error:
                print(f"{name} seed {seed}: {error}")
                summary = RunDirectory(run_dir).read_json("summary.json")
            results[name].append(summary)
            speed = summary["seconds_per_epoch"] or 0.0
            print(f"{name} seed {seed}: {speed:.1f} s/epoch, {final_result(summary)}", flush=True)
        # after every seed, so that an interrupted bench keeps the tables of the seeds it finished
        rows = summarize(preset, results, targets)
        for row in rows:
            if setting_labels and row["optimizer"] in setting_labels:
                row["setting"] = setting_labels[row["optimizer"]]
        table, plotted = _write_tables(out, preset, seed_list[: seed_list.index(seed) + 1], rows, targets, run_dirs)
    print(f"\n## rkfac bench --preset {preset}: seeds {seed_list}\n\n{table}")
    if PRESETS[preset].note:
        print(f"\n{PRESETS[preset].note}")
    print(f"\nwrote {out / 'bench.json'}, bench.csv, bench.md, bench-curves.png" + (", bench.png" if plotted else ""))
    if not plotted:
        print("no run completed an epoch (--max-steps below one epoch): no bench.png, which plots per-epoch records")
    return rows


def final_result(summary: dict[str, Any]) -> str:
    """Where a run ended, in words: its test accuracy, or its training and test losses."""
    if summary.get("final_test_acc") is not None:
        return f"final test acc {100 * summary['final_test_acc']:.2f}%"
    train_loss = summary.get("final_train_eval_loss")
    train = f"final train loss {train_loss:.3f}, " if train_loss is not None else ""
    return f"{train}final test loss {summary['final_test_loss']:.3f}"


def run_or_reuse(config: RunConfig, run_dir: Path, *, quiet: bool, resume: bool) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; with ``resume``, reuse a finished run or continue a cut-off one.

    A run directory holding other settings is refused; a finished run that diverged raises
    TrainingDivergedError again (its summary.json says so), as training it would.
    """
    saved = RunDirectory(run_dir, writer=False)
    started = resume and (run_dir / "config.json").exists()
    if started and _as_json(run_config(run_dir)) != _as_json(config):  # config.json, extended by a resume if any
        raise ValueError(
            f"cannot resume: {run_dir} holds a run with other settings than {config.optimizer} "
            f"seed {config.seed} now asks for; remove that directory or run into another --out"
        )
    if started and (run_dir / "summary.json").exists():
        summary: dict[str, Any] = saved.read_json("summary.json")
        if summary.get("status") == "diverged":
            raise TrainingDivergedError(f"diverged in the earlier run ({run_dir / 'summary.json'})")
        return summary
    return train(config, run_dir, resume=started and (run_dir / "checkpoint.pt").exists(), quiet=quiet)


def _as_json(config: RunConfig) -> Any:
    """``config`` as config.json holds it (tuples as lists, schedule epochs as strings), to compare."""
    return json.loads(json.dumps(config.to_json()))


def _write_tables(
    out: Path, preset: str, seeds: list[int], rows: list[dict[str, Any]], targets: list[Target], run_dirs: list[Path]
) -> tuple[str, bool]:
    """bench.json, bench.csv, bench.md, bench-curves.png (median smoothed step loss per optimizer)
    and bench.png for the seeds done so far; returns the table and whether bench.png was written
    (it plots per-epoch records: not when no run completed an epoch)."""
    table = format_table(rows, targets)
    out.mkdir(parents=True, exist_ok=True)
    RunDirectory(out).write_json(
        "bench.json", {"preset": preset, "seeds": seeds, "rows": rows, "runs": [str(p) for p in run_dirs]}
    )
    with open(out / "bench.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.md").write_text(table + "\n")
    plotted = any(any(True for _ in RunDirectory(path, writer=False).metrics("epoch")) for path in run_dirs)
    groups: dict[str, list[Path]] = {}
    for path in run_dirs:  # <name>-seed<seed>
        groups.setdefault(path.name.rsplit("-seed", 1)[0], []).append(path)
    plot_median_curves(groups, out / "bench-curves.png")
    if plotted:
        plot_runs(run_dirs, out / "bench.png")
    else:
        (out / "bench.png").unlink(missing_ok=True)  # not an earlier bench's plot
    if not plot_adaptive([path for path in run_dirs if (path / "metrics.jsonl").exists()], out / "bench-adaptive.png"):
        (out / "bench-adaptive.png").unlink(missing_ok=True)
    return table, plotted
