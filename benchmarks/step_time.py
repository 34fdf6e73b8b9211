"""Time per optimizer step on a preset's model, every optimizer side by side, over whole cycles.

Every optimizer does periodic work (K-FAC: factors every 10 steps, decompositions every 50;
SENG: curvature rebuild every 200), so the honest per-step cost is the mean over a whole
cycle. Each optimizer runs ``--steps`` steps (default 200, one SENG cycle, four K-FAC ones)
on real Fashion-MNIST batches of the preset's size, in chunks of ``--chunk`` steps
interleaved round-robin across optimizers so that machine drift touches all alike.
Reported: mean seconds per step (forward, backward and optimizer step; data indexing
excluded) and the ratio to SGD in the same run, for each width scale asked for. The loss is the
preset's task's (cross-entropy, or the autoencoder's squared error); optimizers with the MC
Fisher include its sampled backward. The adaptive optimizers (``*-auto``) take the batch in
their step (``step(inputs=, targets=)``), as the training loop gives it, so their time includes
the quadratic model's forward-mode passes.

    python benchmarks/step_time.py --preset fashion-cnn --optimizers sgd,sre-kfac,seng --width-scales 1,2

An optimizer may carry settings in brackets, ';'-separated: ``sre-soap[rank=64;factor_every=2]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from preset_runs import batch_at, model_and_optimizer
from rkfac.experiments.config import ADAPTIVE_OPTIMIZERS, KFAC_FACTORS
from rkfac.experiments.datasets import load_dataset
from rkfac.experiments.presets import resolve_config
from rkfac.experiments.tasks import task_for


def parse_spec(spec: str) -> tuple[str, dict[str, int | float | str]]:
    """``name[key=value;...]`` -> (name, overrides); values read as int, then float, else str."""
    name, _, rest = spec.partition("[")
    overrides: dict[str, int | float | str] = {}
    for item in filter(None, rest.rstrip("]").split(";")):
        key, _, text = item.partition("=")
        for kind in (int, float, str):
            try:
                overrides[key] = kind(text)
                break
            except ValueError:
                continue
    return name, overrides


def measure(preset: str, optimizers: list[str], width_scale: float, steps: int, chunk: int) -> dict[str, float]:
    data = load_dataset("fashion-mnist")
    runs = {}
    for name in optimizers:
        optimizer_name, overrides = parse_spec(name)
        config = resolve_config(optimizer_name, preset, {"width_scale": width_scale, **overrides})
        model, optimizer = model_and_optimizer(config, data)
        sampled = config.fisher == "mc" and config.optimizer in KFAC_FACTORS  # the MC Fisher's extra backward
        adaptive = config.optimizer in ADAPTIVE_OPTIMIZERS  # the step measures its model on the batch
        runs[name] = {"model": model, "optimizer": optimizer, "seconds": 0.0, "done": 0, "sampled": sampled, "adaptive": adaptive}
    first = resolve_config(parse_spec(optimizers[0])[0], preset)
    task = task_for(first.model)  # the preset's loss: classification or reconstruction
    batch = first.batch_size
    while any(run["done"] < steps for run in runs.values()):
        for run in runs.values():
            for _ in range(min(chunk, steps - run["done"])):
                inputs, targets = task.batch(*batch_at(data, run["done"], batch))
                start = time.perf_counter()
                run["optimizer"].zero_grad(set_to_none=True)
                outputs = run["model"](inputs)
                if run["sampled"]:
                    run["optimizer"].preconditioner.sample_fisher(outputs)
                task.loss(outputs, targets).backward()
                if run["adaptive"]:
                    run["optimizer"].step(inputs=inputs, targets=targets)
                else:
                    run["optimizer"].step()
                run["seconds"] += time.perf_counter() - start
                run["done"] += 1
    return {name: run["seconds"] / run["done"] for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-cnn")
    parser.add_argument("--optimizers", default="sgd,adam,kfac,rs-kfac,sre-kfac,seng")
    parser.add_argument("--width-scales", default="1")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    optimizers = args.optimizers.split(",")  # a bracketed spec holds no comma
    results = {}
    threads = torch.get_num_threads()
    print(f"{args.preset}, {args.steps} steps per optimizer, chunks of {args.chunk} interleaved, torch threads {threads}")
    print("| width scale | optimizer | ms/step | × SGD |")
    print("|---|---|---|---|")
    for scale in [float(s) for s in args.width_scales.split(",")]:
        seconds = measure(args.preset, optimizers, scale, args.steps, args.chunk)
        results[scale] = seconds
        base = seconds.get("sgd")
        for name, value in seconds.items():
            ratio = f"{value / base:.2f}" if base else "—"
            print(f"| {scale:g} | {name} | {1000 * value:.1f} | {ratio} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
