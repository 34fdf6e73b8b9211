"""Loss at equal wall time and time to each target, from finished run directories (no training).

Each ``LABEL=DIR[,DIR...]`` groups the seeds of one setting. Per group it prints medians over the
runs of: seconds per epoch, time to each target of the runs' summaries, the final training-eval
loss, the training-eval loss at each ``--at`` time (linear between the evaluation points; a
run that ended before that time counts as missing, "—" when the median is) and, for the
adaptive K-FACs, the share of their adaptive phase against the rest of the training time. It is how
issue 21's loss-at-equal-time curve against the rank is read from ``benchmarks/low_rank_soap.sh
sweep``. ``--metric test_acc`` reads a classifier's test accuracy at those times instead.

    python benchmarks/equal_time.py --at 40,80,150 r64=runs/a-s0,runs/a-s1 r128=runs/b-s0,runs/b-s1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any


def evaluations(run: Path, metric: str = "train_eval_loss") -> list[tuple[float, float]]:
    """(train_time, metric) of every evaluation of a run, in order."""
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "eval" and entry.get(metric) is not None:
            points.append((float(entry["train_time"]), float(entry[metric])))
    return points


def loss_at(points: list[tuple[float, float]], when: float) -> float | None:
    """The loss at ``when`` seconds, linear between evaluations; None outside the run."""
    for (t0, l0), (t1, l1) in itertools.pairwise(points):
        if t0 <= when <= t1:
            return l0 + (l1 - l0) * (when - t0) / (t1 - t0) if t1 > t0 else l1
    return None


def median_or_dash(values: list[float | None], digits: int = 2) -> str:
    """The median, a missing value (target not reached, run already over) counting as later and
    worse than any present one; "—" when the median itself is missing."""
    value = statistics.median([float("inf") if v is None else v for v in values])
    return "—" if value == float("inf") else f"{value:.{digits}f}"


def summarize(runs: list[Path], at: list[float], metric: str = "train_eval_loss") -> dict[str, Any]:
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    curves = [evaluations(run, metric) for run in runs]
    # an accuracy is better high: its median counts a missing value (run over) as the worst
    sign = -1.0 if metric.endswith("acc") else 1.0
    targets = sorted({name for s in summaries for name in (s.get("targets") or {})}, key=lambda n: -float(n.split(":")[-1]))
    return {
        "s/epoch": median_or_dash([s["seconds_per_epoch"] for s in summaries], 1),
        **{
            f"to {name.split(':')[-1]}": median_or_dash([(s["targets"].get(name) or {}).get("time") for s in summaries], 1)
            for name in targets
        },
        **{
            column: median_or_dash([s.get(key) for s in summaries], digits)
            for column, key, digits in (("final", "final_train_eval_loss", 2), ("final acc", "final_test_acc", 4))
            if any(s.get(key) is not None for s in summaries)
        },
        **{f"at {when:g} s": _signed_median([loss_at(c, when) for c in curves], sign) for when in at},
        **_adaptive_share(summaries),
    }


def _adaptive_share(summaries: list[dict[str, Any]]) -> dict[str, str]:
    """The adaptive step's phase over the rest of the training time (issue 20's "≤ 25% of a
    K-FAC step"), the median over runs, for runs that have that phase; nothing otherwise."""
    phases = [s.get("phase_seconds") or {} for s in summaries]
    if not all("adaptive" in p for p in phases):
        return {}
    shares = [p["adaptive"] / (s["train_time"] - p["adaptive"]) for p, s in zip(phases, summaries, strict=True)]
    return {"adaptive / rest": f"{100 * statistics.median(shares):.0f}%"}


def _signed_median(values: list[float | None], sign: float) -> str:
    """:func:`median_or_dash` of ``sign`` × values, shown with their own sign."""
    text = median_or_dash([None if v is None else sign * v for v in values], 4 if sign < 0 else 2)
    return text if text == "—" or sign > 0 else f"{-float(text):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="LABEL=DIR[,DIR...]")
    parser.add_argument("--at", default="", help="comma-separated wall times, seconds")
    parser.add_argument("--metric", default="train_eval_loss", help="the evaluation read at those times (e.g. test_acc)")
    args = parser.parse_args()
    at = [float(t) for t in args.at.split(",") if t]
    rows = {}
    for group in args.groups:
        label, _, dirs = group.partition("=")
        rows[label] = summarize([Path(d) for d in dirs.split(",")], at, args.metric)
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    print("| setting | runs | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for group, (label, row) in zip(args.groups, rows.items(), strict=True):
        count = len(group.partition("=")[2].split(","))
        print(f"| {label} | {count} | " + " | ".join(row.get(c, "—") for c in columns) + " |")


if __name__ == "__main__":
    main()
