"""Error of the bfloat16 Kronecker solve against the float32 one, on real factors while training.

SRE-KFAC trains a preset's model in float32 for ``--steps`` steps; every ``--every`` steps,
each preconditioned layer's gradient is solved twice with the eigenpairs in use, in float32 and
with ``compute_dtype=torch.bfloat16``, and the relative error ‖V_bf16 − V_f32‖_F / ‖V_f32‖_F is
recorded (layers narrower than ``LOW_PRECISION_MIN_DIM`` on a side are never solved in
bfloat16 and are not listed). Reported per layer: median and max over the recorded steps, and
the time of each solve.

    python benchmarks/apply_precision.py --preset fashion-mlp-wide --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from preset_runs import batch_at, model_and_optimizer
from rkfac.damping import factor_dampings
from rkfac.experiments.datasets import load_dataset
from rkfac.experiments.presets import resolve_config
from rkfac.kfac import LOW_PRECISION_MIN_DIM
from rkfac.lowrank import kronecker_solve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fashion-mlp-wide")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    data = load_dataset("fashion-mnist")
    config = resolve_config("sre-kfac", args.preset)
    model, optimizer = model_and_optimizer(config, data)
    pre = optimizer.preconditioner  # type: ignore[attr-defined]
    errors: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    batch = config.batch_size
    for step in range(args.steps):
        images, labels = batch_at(data, step, batch)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        if step >= 1 and step % args.every == 0:  # eigenpairs exist from step 0 on
            for layer in pre.layers:
                grad = layer.kind.grad_matrix()
                if grad is None or min(grad.shape) < LOW_PRECISION_MIN_DIM or layer.a.pairs is None or layer.g.pairs is None:
                    continue
                a_pairs, g_pairs = layer.a.pairs, layer.g.pairs
                a_damping, g_damping = factor_dampings(pre.options.damping_mode, config.damping, a_pairs, g_pairs)  # type: ignore[arg-type]
                timings = []
                results = []
                for dtype in (None, torch.bfloat16):
                    start = time.perf_counter()
                    results.append(kronecker_solve(grad, g_pairs, g_damping, a_pairs, a_damping, dtype))
                    timings.append(time.perf_counter() - start)
                reference, low = results
                errors.setdefault(layer.name, []).append(float((low - reference).norm() / reference.norm()))
                seconds.setdefault(layer.name, []).extend(timings)
        optimizer.step()
    print(f"{args.preset}: bfloat16 vs float32 Kronecker solve, SRE-KFAC steps 1–{args.steps - 1} every {args.every}")
    print("| layer | d_G × d_A | median rel. error | max | float32 ms | bfloat16 ms |")
    print("|---|---|---|---|---|---|")
    for name, values in errors.items():
        grad = next(layer.kind.grad_matrix() for layer in pre.layers if layer.name == name)
        shape = "—" if grad is None else f"{grad.shape[0]} × {grad.shape[1]}"
        f32, bf16 = (1000 * statistics.median(seconds[name][i::2]) for i in (0, 1))
        print(f"| {name} | {shape} | {statistics.median(values):.2%} | {max(values):.2%} | {f32:.1f} | {bf16:.1f} |")


if __name__ == "__main__":
    main()
