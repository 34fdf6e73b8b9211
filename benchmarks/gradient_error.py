"""Preconditioned-gradient error of each decomposition against exact K-FAC, on one trajectory.

Several preconditioners hook the same model; at every step each computes its direction from
the same raw gradient (the gradient is restored between them), and the model steps with the
direction of exact K-FAC decomposed at every factor update (the reference: exact K-FAC of the
current factors; the variants decompose every 50 steps as trained, B-KFAC at every update),
so every variant sees the same batches and the same parameters. Reported
per variant: the relative error ‖V − V_exact‖_F / ‖V_exact‖_F of the whole preconditioned
gradient (all layers), median and max over the measured steps.

    python benchmarks/gradient_error.py --preset fashion-mlp-wide --steps 150
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import rkfac
from preset_runs import batch_at
from rkfac.experiments.datasets import load_dataset
from rkfac.experiments.models import build_model
from rkfac.experiments.presets import resolve_config


def variants(rank: int) -> dict[str, rkfac.Decomposition]:
    return {
        "exact, inverses every 50": rkfac.ExactEigh(),
        "rs-kfac": rkfac.RandomizedSVD(rank=rank),
        "sre-kfac": rkfac.SymmetricRandomizedEVD(rank=rank),
        "sre warm q=1": rkfac.SymmetricRandomizedEVD(rank=rank, warm_start=True, warm_power_iters=1),
        "sre warm q=0": rkfac.SymmetricRandomizedEVD(rank=rank, warm_start=True, warm_power_iters=0),
        "sre adaptive": rkfac.SymmetricRandomizedEVD(rank=rank, adaptive_rank=True),
        "b-kfac": rkfac.BrandUpdate(rank=rank),
        "b-r-kfac (50)": rkfac.BrandUpdate(rank=rank, refresh_every=50),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-mlp-wide")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=220)
    args = parser.parse_args()
    config = resolve_config("kfac", args.preset)
    data = load_dataset(config.dataset)
    torch.manual_seed(0)
    model = build_model(config.model, data.input_shape, data.num_classes, widths=config.widths)
    options = {"factor_every": 10, "inverse_every": 50, "damping": 0.1}  # rms clip 0.07, as trained
    # the reference decomposes at every factor update: exact K-FAC of the current factors
    exact = rkfac.KFACPreconditioner(model, decomposition=rkfac.ExactEigh(), **{**options, "inverse_every": 10})
    others = {name: rkfac.KFACPreconditioner(model, decomposition=d, **options) for name, d in variants(args.rank).items()}
    errors: dict[str, list[float]] = {name: [] for name in others}
    params = [p for p in model.parameters() if p.requires_grad]
    batch = config.batch_size
    for step in range(args.steps):
        images, labels = batch_at(data, step, batch)
        model.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        raw = [p.grad.clone() for p in params]
        directions = {}
        for name, pre in others.items():
            pre.step()
            directions[name] = torch.cat([p.grad.flatten() for p in params])
            for p, g in zip(params, raw, strict=True):
                p.grad.copy_(g)
        exact.step()
        reference = torch.cat([p.grad.flatten() for p in params])
        if step >= 10:  # after the first few factor updates
            for name, direction in directions.items():
                errors[name].append(float((direction - reference).norm() / reference.norm()))
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-0.1)
    print(f"{args.preset}, rank {args.rank}, steps 10–{args.steps - 1}, factors every 10, inverses every 50, δ = 0.1, rms clip")
    print("| variant | median error | max error |\n|---|---|---|")
    for name, values in errors.items():
        print(f"| {name} | {100 * statistics.median(values):.2f}% | {100 * max(values):.2f}% |")


if __name__ == "__main__":
    main()
