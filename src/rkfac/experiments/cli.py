"""The ``rkfac`` command: ``train``, ``bench``, ``tune``, ``spectrum`` and ``plot``.

The run flags are generated from :class:`rkfac.experiments.config.RunConfig`'s fields (the
flag ``--refresh-every`` for the field ``refresh_every``, its help and reading from the field's
metadata) and checked by ``RunConfig.validate``. Flags that are not given take the preset's
value (``--preset``), else the optimizer family's default (rkfac.experiments.presets), else
RunConfig's, which for the library's options is the library's. Schedulable values (lr, damping,
rank, factor-every, inverse-every) take a number or ``epoch:value`` pairs:
``--lr 1:0.3,2:0.2,3:0.1``. Lists are comma-separated; ``none`` is None where None is a value
(``--max-steps none``; 0 is no spelling of None, and is refused where the bound is 1).

``train --resume DIR`` continues the run in DIR with its own settings: a flag given with it
must repeat the run's value, except ``--epochs`` and ``--max-steps``, which may extend the run
(see :mod:`rkfac.experiments.resume`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rkfac.experiments.config import RunConfig, parse_schedule, setting_text, unread_settings
from rkfac.experiments.presets import PRESETS, RUNNABLE, VARIANTS, resolve_config, variant_name
from rkfac.spectrum import DEFAULT_THRESHOLD


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _optional_int(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer or none, got {text!r}") from None


def _optional_choice(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers like 0.5,0.9, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item]
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 8,4, got {text!r}") from None


def _argument(reader: Callable[[str], Any]) -> Callable[[str], Any]:
    """``reader`` for argparse, which shows an ArgumentTypeError's message (a ValueError's it
    replaces by "invalid <function name> value")."""

    def read(text: str) -> Any:
        try:
            return reader(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    read.__name__ = reader.__name__
    return read


def _strings(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


_LISTS: dict[str, Callable[[str], Any]] = {"int": _ints, "float": _floats, "str": _strings}
_SCALARS: dict[str, Callable[[str], Any]] = {"int": _int, "float": _float}
# RunConfig fields with flags of their own, per command (--optimizer's choices differ, bench
# takes --seeds for --seed); every other field is a flag of train, bench and spectrum.
_OWN_FLAGS = ("optimizer", "seed", "preset")


def _parser(field: dataclasses.Field[Any]) -> Any:
    """How the flag of a RunConfig field reads its text: from the field's kind, whether it is a
    list or an epoch schedule, and whether None is a value (written ``none``)."""
    meta = field.metadata
    kind = meta["kind"]
    if meta["epochs"]:
        return parse_schedule
    if meta["items"]:
        return _LISTS[kind]
    if kind == "bool":
        return bool
    if kind == "choice":
        return _optional_choice if None in meta["choices"] else str
    if kind == "int" and meta.get("optional", field.default is None):
        return _optional_int
    return _SCALARS.get(kind, str)


def _help(field: dataclasses.Field[Any]) -> str:
    meta = field.metadata
    text = meta["help"]
    names = ["none" if choice is None else str(choice) for choice in meta["choices"] or ()]
    if names and not all(name in text.lower() for name in names):  # unless the help names them
        text += ": " + " | ".join(names)
    if meta["epochs"]:
        text += "; a number or epoch:value pairs (1:0.3,13:0.03)"
    return text.replace("%", "%%")  # argparse formats help with %


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# (flag, RunConfig field, parser, help), generated from RunConfig's field metadata: every field
# is reachable from the command line, and its checks are RunConfig.validate's.
RUN_FLAGS: list[tuple[str, str, Any, str]] = [
    (_flag(field.name), field.name, _parser(field), _help(field))
    for field in dataclasses.fields(RunConfig)
    if field.name not in _OWN_FLAGS
]
_FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}
DEFAULT_OPTIMIZER = str(_FIELDS["optimizer"].default)


def parse_setting(name: str, text: str) -> Any:
    """The value of RunConfig field ``name`` written as ``text``, read as its flag reads it
    (for scripts that take settings as text, such as ``benchmarks/phase_profile.py``)."""
    if name not in _FIELDS:
        raise ValueError(f"unknown setting {name!r}; the settings are {sorted(_FIELDS)}")
    reader = _parser(_FIELDS[name])
    return text.lower() in ("1", "true") if reader is bool else reader(text)


def _add_run_flags(parser: argparse.ArgumentParser, *, with_seed: bool = True) -> None:
    for flag, dest, kind, text in RUN_FLAGS:
        if kind is bool:  # a switch: given means True
            parser.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, dest=dest, type=_argument(kind), default=argparse.SUPPRESS, help=text)
    if with_seed:
        parser.add_argument("--seed", dest="seed", type=_argument(_int), default=argparse.SUPPRESS, help=_help(_FIELDS["seed"]))
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help=_help(_FIELDS["preset"]))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {dest for _, dest, _, _ in RUN_FLAGS} | {"seed"}
    return {name: value for name, value in vars(args).items() if name in names}


def _read_flags(optimizers: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides``, once every flag in it is read by one of ``optimizers`` at least (a variant
    counts as its optimizer). A flag none reads is refused, naming its value and its readers,
    rather than dropped; one only some read is noted on stderr with those that run without it."""
    bases = {name: VARIANTS.get(name, (name, {}))[0] for name in optimizers}
    unread = unread_settings(list(bases.values()), overrides)
    if unread:
        named = "; ".join(
            f"{_flag(name)} {setting_text(overrides[name])} (read by {', '.join(readers)})" for name, readers in unread.items()
        )
        raise ValueError(f"{', '.join(optimizers)} would ignore {named}: drop it, or run an optimizer that reads it")
    for name in overrides:
        ignoring = [given for given, base in bases.items() if unread_settings([base], {name: None})]
        if ignoring:
            print(f"rkfac: note: {', '.join(ignoring)} run without {_flag(name)} (they do not read it)", file=sys.stderr)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkfac", description="Train, benchmark and plot K-FAC with randomized decompositions.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="one training run into a run directory")
    train.add_argument("--optimizer", default=None, choices=RUNNABLE, help=f"default: {DEFAULT_OPTIMIZER}")
    train.add_argument("--out", default=None, help="run directory (default runs/<preset or model>-<optimizer>-seed<seed>)")
    train.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its checkpoint, with its settings (--epochs, --max-steps may extend it)",
    )
    _add_run_flags(train)

    bench = commands.add_parser("bench", help="several optimizers on one preset, side by side")
    bench.add_argument(
        "--optimizers",
        type=_argument(_strings),
        default=None,
        help=f"comma-separated from {', '.join(RUNNABLE)}; default: the preset's",
    )
    bench.add_argument("--seeds", type=_argument(_ints), default=None, help="comma-separated; default: the preset's")
    bench.add_argument("--out", default=None, help="bench directory (default runs/bench-<preset>)")
    bench.add_argument(
        "--resume", action="store_true", help="continue an interrupted bench in --out: reuse finished runs, resume cut-off ones"
    )
    _add_run_flags(bench, with_seed=False)

    tune = commands.add_parser(
        "tune", help="the same lr grid (and one knob) for every optimizer on seed 0, then each winner on every seed"
    )
    tune.add_argument(
        "--optimizers",
        type=_argument(_strings),
        default=None,
        help=f"comma-separated from {', '.join(RUNNABLE)}; default: the preset's",
    )
    tune.add_argument(
        "--seeds", type=_argument(_ints), default=None, help="phase 2's seeds, comma-separated; default: the preset's"
    )
    tune.add_argument(
        "--lr-factors",
        type=_argument(_floats),
        default=None,
        help="multipliers of each optimizer's own lr, the same for all (default 0.1,0.3,1,3)",
    )
    tune.add_argument(
        "--knob",
        action="append",
        default=None,
        metavar="FIELD=V1,V2",
        help="at most one more setting, crossed with the lr values, e.g. momentum=0,0.9 (';' separates values with commas)",
    )
    tune.add_argument("--tune-steps", type=_argument(_int), default=None, help="steps of each grid run (default: one epoch)")
    tune.add_argument("--out", default=None, help="tune directory (default runs/tune-<preset>)")
    tune.add_argument(
        "--resume", action="store_true", help="continue an interrupted tune in --out: reuse finished runs, resume cut-off ones"
    )
    _add_run_flags(tune, with_seed=False)

    spectrum = commands.add_parser("spectrum", help="record the factors' spectra while training (or from a run's checkpoint)")
    spectrum.add_argument(
        "--optimizer", default=None, choices=("kfac", "rs-kfac", "sre-kfac"), help=f"default: {DEFAULT_OPTIMIZER}"
    )
    spectrum.add_argument("--out", default=None, help="output directory (default runs/spectrum-<preset or model>)")
    spectrum.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR", help="use the factors saved in RUN_DIR")
    spectrum.add_argument(
        "--record-every", type=_argument(_int), default=50, help="steps between recordings (and the run's last step)"
    )
    spectrum.add_argument("--ranks", type=_argument(_ints), default=[50, 100, 220], help="ranks for the truncation errors")
    spectrum.add_argument(
        "--threshold",
        type=_argument(_float),
        default=DEFAULT_THRESHOLD,
        help="count modes above this fraction of λ_max (default: the paper's cut, 10^-1.5)",
    )
    spectrum.add_argument(
        "--width-scales", type=_argument(_floats), default=None, help="repeat for these width scales, e.g. 1,1.5,2"
    )
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
        if args.command == "tune":
            return _tune(args)
        if args.command == "spectrum":
            return _spectrum(args)
        return _plot(args)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"rkfac {args.command}: error: {error}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from rkfac.experiments.bench import final_result
    from rkfac.experiments.distributed import placement_from_environment
    from rkfac.experiments.train import train

    if args.resume:
        config = _resumed_config(args)
        summary = train(config, args.resume, resume=True, quiet=args.quiet)
        out = args.resume
    else:
        name = args.optimizer or DEFAULT_OPTIMIZER
        config = resolve_config(name, args.preset, _read_flags([name], _overrides(args)))
        out = args.out or f"runs/{config.preset or config.model}-{name}-seed{config.seed}"
        summary = train(config, out, quiet=args.quiet)
    if placement_from_environment().is_main:  # under torchrun, one line from rank 0 (which evaluates)
        print(
            f"{config.optimizer}: {summary['status']}, {summary['steps']} steps, train time {summary['train_time']:.1f} s, "
            f"{final_result(summary)} -> {out}"
        )
    return 0


def _resumed_config(args: argparse.Namespace) -> RunConfig:
    """The run's settings, extended by --epochs / --max-steps; every other flag given must
    repeat the run's value (an --optimizer variant its settings), and --out its directory."""
    from rkfac.experiments.resume import check_resume, run_config

    run = run_config(args.resume)
    given = _overrides(args)
    refused = []
    if args.optimizer is not None:
        optimizer, settings = VARIANTS.get(args.optimizer, (args.optimizer, {}))
        if optimizer != run.optimizer:
            refused.append(f"--optimizer: the run's {variant_name(run.to_json())}, given {args.optimizer}")
        given = {**settings, **given}
    if args.preset is not None:
        given["preset"] = args.preset
    if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        refused.append(f"--out: the run's {args.resume}, given {args.out} (a resumed run continues in its own directory)")
    changes = check_resume(run, given, where=args.resume, refused=refused)
    return run.updated(**{name: change["given"] for name, change in changes.items()})


def _bench(args: argparse.Namespace) -> int:
    from rkfac.experiments.bench import run_bench

    preset = args.preset or "quick"
    out = Path(args.out or f"runs/bench-{preset}")
    run_bench(
        preset,
        out,
        optimizers=args.optimizers,
        seeds=args.seeds,
        overrides=_read_flags(args.optimizers or PRESETS[preset].optimizers, _overrides(args)),
        quiet=args.quiet,
        resume=args.resume,
    )
    return 0


def _tune(args: argparse.Namespace) -> int:
    from rkfac.experiments.tune import Grid, run_tune

    preset = args.preset or "quick"
    out = Path(args.out or f"runs/tune-{preset}")
    optimizers = args.optimizers or PRESETS[preset].optimizers
    grid = Grid.parse(args.lr_factors, args.knob or ())
    if grid.knob is not None:  # a knob none of the optimizers reads would only repeat identical runs
        _read_flags(optimizers, {grid.knob.field: list(grid.knob.values)})
    run_tune(
        preset,
        out,
        grid=grid,
        optimizers=args.optimizers,
        seeds=args.seeds,
        tune_steps=args.tune_steps,
        overrides=_read_flags(optimizers, _overrides(args)),
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
        name = args.optimizer or DEFAULT_OPTIMIZER
        config = resolve_config(name, args.preset, _read_flags([name], _overrides(args)))
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
    from rkfac.experiments.plot import plot_adaptive, plot_runs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "plot.png"
    plot_runs([Path(run) for run in args.runs], out)
    print(f"wrote {out}")
    adaptive = out.with_name(f"{out.stem}-adaptive{out.suffix}")
    if plot_adaptive([Path(run) for run in args.runs], adaptive):
        print(f"wrote {adaptive} (what the adaptive step chose: α, μ, λ, ρ)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
