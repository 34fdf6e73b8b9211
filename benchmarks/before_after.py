"""Per-step phase times of two source trees of rkfac, run alternately: a refactor's "same speed" check.

Runs ``benchmarks/phase_profile.py`` of each tree (``--before`` and ``--after``, each a checkout
with ``src/`` and ``benchmarks/``) in a fresh process with that tree's ``src`` first on the path,
alternating before/after ``--rounds`` times so that machine drift touches both alike, and prints
per variant and phase the median over rounds and the after/before ratio.

    python benchmarks/before_after.py --before /work/before --after . --preset fashion-cnn --variants sre-kfac seng
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

PHASES = ("forward_backward", "statistics", "decomposition", "precondition", "step")


def profile(tree: Path, preset: str, variants: list[str], steps: int, warmup: int) -> dict[str, dict[str, float]]:
    """One phase_profile run of ``tree``: {variant: {phase: ms per step}}."""
    command = [sys.executable, str(tree / "benchmarks" / "phase_profile.py"), "--preset", preset, "--repeats", "1"]
    command += ["--steps", str(steps), "--warmup", str(warmup), "--variants", *variants]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == len(PHASES) + 2 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = dict(zip(PHASES, map(float, cells[1:-1]), strict=True))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--preset", default="fashion-cnn")
    parser.add_argument("--variants", nargs="+", default=["sre-kfac", "seng"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, tree in (("before", args.before), ("after", args.after)):
            runs[label].append(profile(tree.resolve(), args.preset, args.variants, args.steps, args.warmup))
    print(f"{args.preset}: ms per step, median of {args.rounds} alternating rounds of {args.steps} steps (before / after, ratio)")
    print("| variant | " + " | ".join(PHASES) + " |")
    print("|---|" + "---|" * len(PHASES))
    for variant in args.variants:
        cells = []
        for phase in PHASES:
            before, after = (statistics.median(run[variant][phase] for run in runs[label]) for label in ("before", "after"))
            ratio = f"{after / before:.2f}" if before > 0 else "—"
            cells.append(f"{before:.1f} / {after:.1f} ({ratio})")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
