"""RS-KFAC and SRE-KFAC against the options beyond the paper, same preset, same seed, side by side.

Variants: rs-kfac, sre-kfac, sre-kfac with --warm-start, sre-kfac with --adaptive-rank,
b-kfac, b-r-kfac. For each: seconds per epoch, the decomposition phase (factor averaging,
decompositions, Brand updates) per epoch, the memory of the factors and eigenpairs the
preconditioner holds at the end, time to each target test accuracy, and the final accuracy.
Runs go one after the other (variant order rotated per seed); run directories land in --out.

    python benchmarks/beyond_the_paper.py --preset fashion-mlp-wide --epochs 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rkfac.experiments.presets import resolve_config
from rkfac.experiments.train import Trainer

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rs-kfac": ("rs-kfac", {}),
    "sre-kfac": ("sre-kfac", {}),
    "sre-kfac warm (q=1)": ("sre-kfac", {"warm_start": True, "warm_power_iters": 1}),
    "sre-kfac adaptive": ("sre-kfac", {"adaptive_rank": True}),
    "b-kfac": ("b-kfac", {}),
    "b-r-kfac": ("b-r-kfac", {}),
}


def factor_memory(optimizer: Any) -> int:
    """Bytes of the dense factors and the eigenpairs the preconditioner keeps."""
    pre = optimizer.preconditioner
    total = 0
    for layer in pre.layers:
        for factor in (layer.a, layer.g):
            if factor.factor is not None:
                total += factor.factor.numel() * factor.factor.element_size()
            if factor.pairs is not None:
                total += factor.pairs.vectors.numel() * factor.pairs.vectors.element_size() + factor.pairs.values.numel() * 4
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-mlp-wide")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"runs/beyond-{args.preset}")
    names = args.variants.split(",")
    rows = []
    for seed_index, seed in enumerate(int(s) for s in args.seeds.split(",")):
        order = names[seed_index % len(names) :] + names[: seed_index % len(names)]
        for name in order:
            optimizer, overrides = VARIANTS[name]
            config = resolve_config(optimizer, args.preset, {**overrides, "epochs": args.epochs, "seed": seed})
            trainer = Trainer(config, out / f"{name.replace(' ', '_')}-seed{seed}", quiet=True)
            summary = trainer.run()
            epochs = summary["epochs"]
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "seconds_per_epoch": summary["seconds_per_epoch"],
                    "decomposition_per_epoch": summary["phase_seconds"].get("decomposition", 0.0) / epochs,
                    "factor_mib": factor_memory(trainer.optimizer) / 2**20,
                    "targets": summary["targets"],
                    "final_test_acc": summary["final_test_acc"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    targets = sorted({key for row in rows for key in row["targets"]})
    print(f"\n{args.preset}, {args.epochs} epochs, seeds {args.seeds}")
    header = ["variant", "s/epoch", "decomposition s/epoch", "factors MiB", *[f"time to {t}" for t in targets], "final acc %"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        hits = [row["targets"].get(t) for t in targets]
        cells = [
            f"{row['variant']} (seed {row['seed']})",
            f"{row['seconds_per_epoch']:.1f}",
            f"{row['decomposition_per_epoch']:.1f}",
            f"{row['factor_mib']:.1f}",
            *[f"{hit['time']:.1f}" if hit else "—" for hit in hits],
            f"{100 * row['final_test_acc']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
