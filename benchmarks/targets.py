"""Issue 9's targets, met or missed, from one ``rkfac bench`` directory (no training here).

For every SRE-KFAC row of the bench (the paper's settings and named variants such as
``sre-kfac-adaptive``) it prints the measured ratio of each target next to the target:

- exact s/epoch ÷ SRE s/epoch (≥ 2.5 on fashion-cnn, ≥ 4 on fashion-mlp-wide);
- exact time to target ÷ SRE time to target (≥ 3.3), per target accuracy;
- SRE s/epoch ÷ SGD s/epoch (≤ 1.3 on fashion-cnn, ≤ 2 on fashion-mlp-wide);
- whether SRE reaches each target sooner than SGD, Adam and SENG (an optimizer that never
  reaches it in some seed counts as later);
- final test accuracy of SRE minus exact K-FAC's (≥ −0.3 points).

Ratios are of the bench's medians over seeds (final accuracy: means); the per-seed table
below shows the spread the medians hide.

    python benchmarks/targets.py runs/bench9b-cnn
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PER_EPOCH_TARGET = {"fashion-cnn": 2.5, "fashion-mlp-wide": 4.0}
OVER_SGD_LIMIT = {"fashion-cnn": 1.3, "fashion-mlp-wide": 2.0}
TIME_TO_TARGET = 3.3
ACCURACY_GAP = 0.3
RIVALS = ("sgd", "adam", "seng")


def _verdict(value: float | None, target: float, *, at_least: bool) -> str:
    if value is None:
        return "— (not reached)"
    met = value >= target if at_least else value <= target
    return f"{value:.2f} {'met' if met else 'missed'}"


def target_rows(bench: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, SRE row, measured and verdict) for every SRE-KFAC row of a bench."""
    preset = bench["preset"]
    rows = {row["optimizer"]: row for row in bench["rows"]}
    exact, sgd = rows.get("kfac"), rows.get("sgd")
    keys = [key.removeprefix("time_to_") for key in bench["rows"][0] if key.startswith("time_to_")]
    lines = []
    for name, row in rows.items():
        if row.get("family", name) != "sre-kfac":
            continue
        if exact is not None:
            # the bench already holds exact ÷ this, per epoch and per target
            per_epoch = row.get("exact_over_this_per_epoch")
            lines.append(
                (
                    f"exact/SRE s/epoch ≥ {PER_EPOCH_TARGET.get(preset, 2.5)}",
                    name,
                    _verdict(per_epoch, PER_EPOCH_TARGET.get(preset, 2.5), at_least=True),
                )
            )
            for key in keys:
                ratio = row.get(f"exact_over_this_time_to_{key}")
                lines.append(
                    (
                        f"exact/SRE time to {float(key):.0%} ≥ {TIME_TO_TARGET}",
                        name,
                        _verdict(ratio, TIME_TO_TARGET, at_least=True),
                    )
                )
        if sgd is not None and sgd["seconds_per_epoch"] and row["seconds_per_epoch"]:
            limit = OVER_SGD_LIMIT.get(preset, 1.3)
            over_sgd = row["seconds_per_epoch"] / sgd["seconds_per_epoch"]
            lines.append((f"SRE/SGD s/epoch ≤ {limit}", name, _verdict(over_sgd, limit, at_least=False)))
        for key in keys:
            mine = row[f"time_to_{key}"]
            rivals = {rival: rows[rival][f"time_to_{key}"] for rival in RIVALS if rival in rows}
            later = [rival for rival, theirs in rivals.items() if mine is None or (theirs is not None and theirs <= mine)]
            shown = ", ".join(f"{rival} {'never' if t is None else f'{t:.1f}'}" for rival, t in rivals.items())
            verdict = "missed" if later else "met"
            lines.append(
                (
                    f"sooner than {'/'.join(rivals)} to {float(key):.0%}",
                    name,
                    f"{'never' if mine is None else f'{mine:.1f}'} s vs {shown}: {verdict}",
                )
            )
        if exact is not None and exact["final_test_acc"] is not None and row["final_test_acc"] is not None:
            gap = 100 * (row["final_test_acc"] - exact["final_test_acc"])
            lines.append(
                (f"final acc − exact ≥ −{ACCURACY_GAP}", name, f"{gap:+.2f} {'met' if gap >= -ACCURACY_GAP else 'missed'}")
            )
    return lines


def per_seed_rows(bench_dir: Path, bench: dict[str, Any]) -> list[list[str]]:
    """Per optimizer and seed: s/epoch, time to each target, final accuracy."""
    table = []
    for run in map(Path, bench["runs"]):
        run = run if run.is_absolute() or run.exists() else bench_dir / run.name
        summary, config = (json.loads((run / name).read_text()) for name in ("summary.json", "config.json"))
        times = [f"{hit['time']:.1f} ({hit['epoch']:.2f})" if hit else "never" for hit in summary["targets"].values()]
        table.append(
            [
                run.name.rsplit("-seed", 1)[0],
                str(config["seed"]),
                "—" if summary["seconds_per_epoch"] is None else f"{summary['seconds_per_epoch']:.1f}",
                *times,
                f"{100 * summary['final_test_acc']:.2f}",
            ]
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="an rkfac bench directory (holds bench.json)")
    args = parser.parse_args()
    bench = json.loads((args.bench / "bench.json").read_text())
    print(f"## Targets, {bench['preset']}, seeds {bench['seeds']} ({args.bench})\n")
    print("| target | SRE-KFAC | measured |\n|---|---|---|")
    for target, name, verdict in target_rows(bench):
        print(f"| {target} | {name} | {verdict} |")
    table = per_seed_rows(args.bench, bench)
    targets = [key.removeprefix("time_to_") for key in bench["rows"][0] if key.startswith("time_to_")]
    print("\nPer seed: s/epoch, time to target in s (epochs), final test accuracy %\n")
    print("| run | seed | s/epoch | " + " | ".join(f"to {float(t):.0%}" for t in targets) + " | final % |")
    print("|" + "---|" * (4 + len(targets)))
    for line in sorted(table, key=lambda cells: (cells[0], cells[1])):
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
