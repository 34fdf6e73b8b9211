"""The ``rkfac`` command: ``train``, ``bench`` and ``plot``.

Flags that are not given take the preset's value (``--preset``), else the optimizer family's
default (rkfac.experiments.presets), else RunConfig's. Schedulable values (lr, damping, rank,
factor-every, inverse-every) take a number or ``epoch:value`` pairs: ``--lr 1:0.3,2:0.2,3:0.1``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rkfac.experiments.config import RunConfig, parse_schedule
from rkfac.experiments.presets import PRESETS, RUNNABLE, resolve_config


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "0") else int(text)


def _clip(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item]


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def _strings(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


# (flag, RunConfig field, parser, help). Every field is reachable from the command line.
RUN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "mlp | cnn | vgg16_bn"),
    ("--widths", "widths", _ints, "MLP hidden widths, e.g. 2048,2048"),
    ("--width-scale", "width_scale", float, "multiply every hidden width"),
    ("--dataset", "dataset", str, "fashion-mnist | cifar10 | synthetic"),
    ("--data-dir", "data_dir", str, "where the dataset files are (else $RKFAC_DATA, system paths, download)"),
    ("--synthetic-train", "synthetic_train", int, "synthetic training set size"),
    ("--synthetic-test", "synthetic_test", int, "synthetic test set size"),
    ("--epochs", "epochs", int, "epochs to train"),
    ("--max-steps", "max_steps", _optional_int, "stop after this many optimizer steps in total"),
    ("--batch-size", "batch_size", int, "samples per step"),
    ("--lr", "lr", parse_schedule, "learning rate or epoch:value schedule"),
    ("--momentum", "momentum", float, "momentum"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--weight-decay-start", "weight_decay_start", int, "K-FAC: first step with weight decay"),
    ("--damping", "damping", parse_schedule, "K-FAC damping δ (SENG λ) or schedule"),
    ("--damping-mode", "damping_mode", str, "relative | pi"),
    ("--rank", "rank", parse_schedule, "RS/SRE target rank or schedule"),
    ("--oversample", "oversample", int, "RS/SRE oversampling p"),
    ("--power-iters", "power_iters", int, "RS/SRE power iterations q"),
    ("--warm-start", "warm_start", bool, "RS/SRE: start the range finder from the previous eigenvectors"),
    ("--warm-power-iters", "warm_power_iters", int, "RS/SRE: power iterations of a warm start"),
    ("--adaptive-rank", "adaptive_rank", bool, "RS/SRE: rank follows the spectrum (smallest kept ≈ 10^-1.5 λ_max)"),
    ("--refresh-every", "refresh_every", int, "b-r-kfac: steps between refreshes of (U, D) from the dense factor"),
    ("--min-rank", "min_rank", int, "RS/SRE: the smallest adaptive rank (--rank is the largest)"),
    ("--factor-decay", "factor_decay", float, "exponential average ρ of the factors"),
    ("--factor-every", "factor_every", parse_schedule, "steps between factor updates"),
    ("--inverse-every", "inverse_every", parse_schedule, "steps between decompositions"),
    ("--clip", "clip", _clip, "rms | kl | none"),
    ("--clip-value", "clip_value", float, "κ of the clip"),
    ("--fisher", "fisher", str, "empirical | mc"),
    ("--update-freq", "update_freq", int, "SENG: steps between curvature rebuilds"),
    ("--col-sample-size", "col_sample_size", int, "SENG: rows sampled per side of large layers"),
    ("--sketch-threshold", "sketch_threshold", float, "SENG: sketch layers with more weights than this"),
    ("--sketch-rank", "sketch_rank", int, "SENG: rank of compressed conv output-gradient maps"),
    ("--apply-dtype", "apply_dtype", str, "K-FAC: dtype of the per-step solve's large products: float32 | bfloat16"),
    ("--skip", "skip", _strings, "layer name patterns K-FAC leaves alone, comma-separated"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--target-acc", "target_acc", _floats, "test accuracies to time, e.g. 0.86,0.88"),
    ("--evals-per-epoch", "evals_per_epoch", int, "test-set evaluations per epoch (targets are timed at these)"),
    ("--checkpoint-every", "checkpoint_every", int, "epochs between checkpoints (0: none)"),
]


def _add_run_flags(parser: argparse.ArgumentParser, *, with_seed: bool = True) -> None:
    for flag, dest, kind, text in RUN_FLAGS:
        if kind is bool:  # a switch: given means True
            parser.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=text)
    if with_seed:
        parser.add_argument("--seed", dest="seed", type=int, default=argparse.SUPPRESS, help="seed of init, data order, sketches")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="start from a named preset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {dest for _, dest, _, _ in RUN_FLAGS} | {"seed"}
    return {name: value for name, value in vars(args).items() if name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkfac", description="Train, benchmark and plot K-FAC with randomized decompositions.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="one training run into a run directory")
    train.add_argument("--optimizer", default=None, choices=RUNNABLE, help="default: sre-kfac")
    train.add_argument("--out", default=None, help="run directory (default runs/<preset or model>-<optimizer>-seed<seed>)")
    train.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its checkpoint")
    _add_run_flags(train)

    bench = commands.add_parser("bench", help="several optimizers on one preset, side by side")
    bench.add_argument(
        "--optimizers", type=_strings, default=None, help=f"comma-separated from {', '.join(RUNNABLE)}; default: the preset's"
    )
    bench.add_argument("--seeds", type=_ints, default=None, help="comma-separated; default: the preset's")
    bench.add_argument("--out", default=None, help="bench directory (default runs/bench-<preset>)")
    bench.add_argument(
        "--resume", action="store_true", help="continue an interrupted bench in --out: reuse finished runs, resume cut-off ones"
    )
    _add_run_flags(bench, with_seed=False)

    spectrum = commands.add_parser("spectrum", help="record the factors' spectra while training (or from a run's checkpoint)")
    spectrum.add_argument("--optimizer", default=None, choices=("kfac", "rs-kfac", "sre-kfac"), help="default: sre-kfac")
    spectrum.add_argument("--out", default=None, help="output directory (default runs/spectrum-<preset or model>)")
    spectrum.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR", help="use the factors saved in RUN_DIR")
    spectrum.add_argument("--record-every", type=int, default=50, help="steps between recordings")
    spectrum.add_argument("--ranks", type=_ints, default=[50, 100, 220], help="ranks for the truncation errors")
    spectrum.add_argument("--threshold", type=float, default=10**-1.5, help="count modes above this fraction of λ_max")
    spectrum.add_argument("--width-scales", type=_floats, default=None, help="repeat for these width scales, e.g. 1,1.5,2")
    _add_run_flags(spectrum)

    plot = commands.add_parser("plot", help="accuracy and loss against time and epochs, from run directories")
    plot.add_argument("runs", nargs="+", help="run directories")
    plot.add_argument("--out", default=None, help="PNG file (default: plot.png in the first run directory)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "spectrum":
            return _spectrum(args)
        return _plot(args)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"rkfac {args.command}: error: {error}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from rkfac.experiments.distributed import placement_from_environment
    from rkfac.experiments.rundir import RunDirectory
    from rkfac.experiments.train import train

    if args.resume:
        saved = RunConfig.from_json(RunDirectory(args.resume).read_json("config.json"))
        config = saved.updated(**_overrides(args)).validate()
        summary = train(config, args.resume, resume=True, quiet=args.quiet)
        out = args.resume
    else:
        name = args.optimizer or "sre-kfac"
        config = resolve_config(name, args.preset, _overrides(args))
        out = args.out or f"runs/{config.preset or config.model}-{name}-seed{config.seed}"
        summary = train(config, out, quiet=args.quiet)
    if placement_from_environment().is_main:  # under torchrun, one line from rank 0 (which evaluates)
        print(
            f"{config.optimizer}: {summary['status']}, {summary['steps']} steps, train time {summary['train_time']:.1f} s, "
            f"final test acc {100 * summary['final_test_acc']:.2f}% -> {out}"
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from rkfac.experiments.bench import run_bench

    preset = args.preset or "quick"
    out = Path(args.out or f"runs/bench-{preset}")
    run_bench(
        preset,
        out,
        optimizers=args.optimizers,
        seeds=args.seeds,
        overrides=_overrides(args),
        quiet=args.quiet,
        resume=args.resume,
    )
    return 0


def _spectrum(args: argparse.Namespace) -> int:
    from rkfac.experiments import spectra

    if args.from_run:
        result = spectra.from_run(Path(args.from_run), ranks=args.ranks, threshold=args.threshold)
        out = Path(args.out or Path(args.from_run) / "spectrum")
        summary = spectra.write_summary([result], out)
    else:
        config = resolve_config(args.optimizer or "sre-kfac", args.preset, _overrides(args))
        out = Path(args.out or f"runs/spectrum-{config.preset or config.model}")
        scales = args.width_scales or [config.width_scale]
        summary = spectra.run_spectrum(
            config,
            out,
            width_scales=scales,
            record_every=args.record_every,
            ranks=args.ranks,
            threshold=args.threshold,
            quiet=args.quiet,
        )
    for width, entry in summary["widths"].items():
        counts = ", ".join(
            f"{name}: A {layer['A']['modes_above']}/{layer['A']['dim']}, G {layer['G']['modes_above']}/{layer['G']['dim']}"
            for name, layer in entry["layers"].items()
        )
        print(f"width {width}, step {entry['step']}: modes above threshold {counts}")
    print(f"wrote {out / 'spectrum.json'}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from rkfac.experiments.plot import plot_runs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "plot.png"
    plot_runs([Path(run) for run in args.runs], out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
