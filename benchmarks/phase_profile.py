"""Per-phase milliseconds per step of optimizer variants on a preset's model, interleaved.

The phase split of the run metrics (statistics, decomposition, precondition; see
``rkfac.timing``) plus forward/backward and the whole step, averaged over whole K-FAC cycles
(default 100 steps = two inverse cycles, ten factor updates) after ``--warmup`` steps. The
variants run in chunks of ``--chunk`` steps round-robin, so that machine drift touches all
alike; ``--repeats`` repeats the whole measurement and the medians are reported.

A variant is ``optimizer`` or ``label=optimizer:field=value,field=value`` with RunConfig
fields holding plain values (no epoch schedules), e.g. ``sre-bf16=sre-kfac:apply_dtype=bfloat16``
or ``sre-adaptive=sre-kfac:adaptive_rank=1``.

    python benchmarks/phase_profile.py --preset fashion-mlp-wide --variants sgd sre-kfac sre-bf16=sre-kfac:apply_dtype=bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from preset_runs import batch_at, model_and_optimizer
from rkfac.experiments.cli import parse_setting
from rkfac.experiments.datasets import load_dataset
from rkfac.experiments.presets import resolve_config
from rkfac.timing import PhaseTimer

PHASES = ("forward_backward", "statistics", "decomposition", "precondition", "step")


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``label=optimizer:field=value,...`` → (label, optimizer, overrides), each value read as
    its command-line flag reads it."""
    head, _, settings = text.partition(":")
    label, _, optimizer = head.rpartition("=")
    label = label or optimizer
    overrides: dict[str, Any] = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = parse_setting(key, value)
    return label, optimizer, overrides


def measure(preset: str, variants: list[str], steps: int, warmup: int, chunk: int) -> dict[str, dict[str, float]]:
    data = load_dataset("fashion-mnist")
    runs = {}
    for text in variants:
        label, optimizer, overrides = parse_variant(text)
        config = resolve_config(optimizer, preset, overrides)
        timer = PhaseTimer()
        model, opt = model_and_optimizer(config, data, timer)
        runs[label] = {"model": model, "opt": opt, "timer": timer, "done": 0, "fb": 0.0, "step": 0.0, "batch": config.batch_size}
    total = warmup + steps
    while any(run["done"] < total for run in runs.values()):
        for run in runs.values():
            for _ in range(min(chunk, total - run["done"])):
                if run["done"] == warmup:
                    run["timer"].reset()
                    run["fb"] = run["step"] = 0.0
                batch = run["batch"]
                images, labels = batch_at(data, run["done"], batch)
                start = time.perf_counter()
                run["opt"].zero_grad(set_to_none=True)
                F.cross_entropy(run["model"](images), labels).backward()
                middle = time.perf_counter()
                run["opt"].step()
                run["fb"] += middle - start
                run["step"] += time.perf_counter() - start
                run["done"] += 1
    results = {}
    for label, run in runs.items():
        phases = run["timer"].reset()
        # the hooks' statistics run inside forward/backward: report forward/backward without them
        row = {"forward_backward": run["fb"] - phases.get("statistics", 0.0), "step": run["step"]}
        row.update({name: phases.get(name, 0.0) for name in ("statistics", "decomposition", "precondition")})
        results[label] = {name: 1000 * value / steps for name, value in row.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-cnn")
    parser.add_argument("--variants", nargs="+", default=["sgd", "kfac", "sre-kfac"], help="space-separated")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    variants = args.variants
    repeats = [measure(args.preset, variants, args.steps, args.warmup, args.chunk) for _ in range(args.repeats)]
    threads = torch.get_num_threads()
    print(f"{args.preset}: ms per step, median of {args.repeats} interleaved repeats of {args.steps} steps, {threads} threads")
    print("| variant | " + " | ".join(PHASES) + " | × first |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    medians = {label: {p: statistics.median(r[label][p] for r in repeats) for p in PHASES} for label in repeats[0]}
    base = next(iter(medians.values()))["step"]
    for label, row in medians.items():
        print(f"| {label} | " + " | ".join(f"{row[p]:.1f}" for p in PHASES) + f" | {row['step'] / base:.2f} |")


if __name__ == "__main__":
    main()
