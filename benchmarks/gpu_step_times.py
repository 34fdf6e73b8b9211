"""Milliseconds per training step of each preset's model for SGD, AdamW, exact K-FAC and SRE-KFAC
on one device, as one table (issue 19's GPU check; ``benchmarks/gpu_check.sh`` runs it).

Random inputs of the preset's shape and batch size (no dataset needed), the preset's settings for
each optimizer. Optimizers are interleaved round by round (``--rounds``), each round timing
``--steps`` steps after ``--warmup`` steps, with the device synchronised around the timed block;
the table holds the medians and the ratio to SGD. The steps include K-FAC's factor updates and at
least one inverse step (every 50 by default) when ``--steps`` ≥ the preset's ``inverse_every``.

    python benchmarks/gpu_step_times.py --device cuda
    python benchmarks/gpu_step_times.py --device cpu --width-scale 0.125 --batch-size 16 --steps 3 --warmup 1 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from rkfac.experiments.models import build_model
from rkfac.experiments.optimizers import build_optimizer
from rkfac.experiments.presets import resolve_config

PRESETS = ("fashion-mlp-wide", "fashion-cnn", "fashion-vit", "fashion-vgg", "paper-vgg16-cifar10")
OPTIMIZERS = ("sgd", "adamw", "kfac", "sre-kfac")
INPUT_SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One optimizer on one preset's model, stepping on fixed random batches."""

    def __init__(self, preset: str, optimizer: str, device: torch.device, width_scale: float | None, batch: int | None) -> None:
        overrides = {} if width_scale is None else {"width_scale": width_scale}
        config = resolve_config(optimizer, preset, overrides)
        size = batch or config.batch_size
        torch.manual_seed(0)
        shape = INPUT_SHAPES[config.dataset]
        model = build_model(config.model, shape, 10, width_scale=config.width_scale, widths=config.widths)
        self.model: nn.Module = model.to(device)
        self.optimizer = build_optimizer(config, self.model, steps_per_epoch=50_000 // size)
        generator = torch.Generator(device="cpu").manual_seed(1)
        self.x = torch.randn(size, *shape, generator=generator).to(device)
        self.y = torch.randint(0, 10, (size,), generator=generator).to(device)
        self.device = device

    def steps(self, count: int) -> float:
        """Seconds for ``count`` steps."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(count):
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.optimizer.step()
        synchronize(self.device)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width-scale", type=float, default=None, help="shrink every model (a CPU proof run)")
    parser.add_argument("--batch-size", type=int, default=None, help="instead of the presets' batch sizes")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; ms per step, median of {args.rounds} interleaved rounds of {args.steps} steps")
    ratio_columns = [f"{o}/sgd" for o in args.optimizers if o != "sgd"]
    print("| preset | " + " | ".join(args.optimizers) + " | " + " | ".join(ratio_columns) + " |")
    print("|---|" + "---|" * (2 * len(args.optimizers) - ("sgd" in args.optimizers)))
    for preset in args.presets:
        runs = {o: Run(preset, o, device, args.width_scale, args.batch_size) for o in args.optimizers}
        for run in runs.values():
            run.steps(args.warmup)
        times: dict[str, list[float]] = {o: [] for o in runs}
        for _ in range(args.rounds):
            for optimizer, run in runs.items():
                times[optimizer].append(1000 * run.steps(args.steps) / args.steps)
        medians = {o: statistics.median(t) for o, t in times.items()}
        ratios = [f"{medians[o] / medians['sgd']:.2f}" for o in runs if o != "sgd"] if "sgd" in medians else []
        print(f"| {preset} | " + " | ".join(f"{medians[o]:.1f}" for o in runs) + " | " + " | ".join(ratios) + " |", flush=True)
        del runs
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
