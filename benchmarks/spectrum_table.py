"""Markdown tables from ``rkfac spectrum`` output directories: modes above the threshold per
layer, factor and width at every recorded step, and the rank-r preconditioned-gradient error.

    python benchmarks/spectrum_table.py runs/spectrum-cnn-seed1 runs/spectrum-mlp-seed1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(directory: Path) -> str:
    lines = [
        f"`{directory.name}`: modes above 10^−1.5 λ_max at steps "
        "(A / d_A, G / d_G, each step left to right), and the preconditioned-gradient error with rank-r factors "
        "at the last recorded step (max over steps in brackets)",
        "",
        "| width | layer | steps | A modes | d_A | G modes | d_G | grad err r=50 | r=100 | r=220 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for width_dir in sorted(directory.glob("width-*"), key=lambda p: float(p.name.split("-", 1)[1])):
        spectrum = width_dir / "spectrum.json"
        if not spectrum.exists():
            continue
        data = json.loads(spectrum.read_text())
        records = data["records"]
        steps = ",".join(str(record["step"]) for record in records)
        for layer in records[-1]["layers"]:
            per_step = [record["layers"][layer] for record in records if layer in record["layers"]]
            a_modes = "→".join(str(item["A"]["modes_above"]) for item in per_step)
            g_modes = "→".join(str(item["G"]["modes_above"]) for item in per_step)
            errors = []
            for rank in ("50", "100", "220"):
                last = per_step[-1]["gradient_error"][rank]
                worst = max(item["gradient_error"][rank] for item in per_step)
                errors.append(f"{100 * last:.2f}% ({100 * worst:.2f}%)")
            last = per_step[-1]
            lines.append(
                f"| ×{data['width_scale']:g} | {layer} | {steps} | {a_modes} | {last['A']['dim']} | {g_modes} | "
                f"{last['G']['dim']} | " + " | ".join(errors) + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(Path(arg)) for arg in sys.argv[1:]))
