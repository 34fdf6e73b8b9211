"""Golden trajectories: short fixed-seed runs of every optimizer and variant, recorded once.

The renovation of issue 16 moves code without changing numbers. Before any code moved, each
case below was run and its record written to ``tests/golden/trajectories.json``:

- ``losses``: the training loss at every step (float32 values, stored exactly);
- ``params``: a SHA-256 of every entry of ``model.state_dict()`` after the last step;
- ``factors`` / ``eigen``: SHA-256 of the preconditioner's averaged factors and current
  decompositions (``pre.factors()``, ``pre.eigenpairs()``), for the K-FACs;
- ``norms``: the float64 norm of every parameter, for the tolerance check below.

``tests/test_golden.py`` reruns every case. On a machine kind with a record (same torch
version, CPU vendor and capability, and thread count: :func:`fingerprint`) it asserts bitwise equality of
all four. A kind's record after the first (``trajectories-<kind>.json``) is written by running
``--write`` at a commit whose numbers match the first record on its own kind, so it extends the
same numbers to that kind. Elsewhere, BLAS kernels may sum in another order, so it asserts losses
and norms to a relative 1e-4 instead and says so in the test output.

Record again (only on purpose, after a change that is meant to alter numbers)::

    .venv/bin/python tests/golden.py --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rkfac
from rkfac.experiments.config import OPTIMIZERS
from rkfac.experiments.datasets import synthetic_dataset
from rkfac.experiments.models import build_model
from rkfac.experiments.optimizers import build_optimizer
from rkfac.experiments.presets import resolve_config

RECORDS = Path(__file__).parent / "golden"
RECORD = RECORDS / "trajectories.json"  # the first record (issue 16's, before any code moved)


def cpu_vendor() -> str:
    """The CPU's vendor string (``vendor_id`` of /proc/cpuinfo; "unknown" where there is none).

    Part of the fingerprint because the BLAS picks its kernels by vendor as well as by vector
    width: an Intel Xeon and an AMD EPYC, both AVX512, differ from step 3 of ``small/sgd``.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def fingerprint() -> dict[str, Any]:
    """What decides whether two machines give bitwise equal floats for the same program."""
    return {
        "torch": torch.__version__,
        "cpu_vendor": cpu_vendor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def _digest(tensors: list[tuple[str, Tensor]]) -> str:
    sha = hashlib.sha256()
    for name, tensor in tensors:
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def _preconditioner_digests(optimizer: Any) -> dict[str, str]:
    pre = getattr(optimizer, "preconditioner", None)
    if not isinstance(pre, rkfac.KFACPreconditioner):
        return {}
    factors = [(f"{name}/{i}", t) for name, pair in sorted(pre.factors().items()) for i, t in enumerate(pair)]
    eigen = [
        (f"{name}/{i}", t)
        for name, pairs in sorted(pre.eigenpairs().items())
        for i, p in enumerate(pairs)
        for t in (p.vectors, p.values, torch.tensor([p.trace, p.top], dtype=torch.float64))
    ]
    return {"factors": _digest(factors), "eigen": _digest(eigen)}


def _record(model: nn.Module, optimizer: Any, losses: list[float]) -> dict[str, Any]:
    state = sorted(model.state_dict().items())
    return {
        "losses": losses,
        "params": _digest(state),
        **_preconditioner_digests(optimizer),
        "norms": [float(t.double().norm()) for _, t in state if t.is_floating_point()],
    }


def _train(
    model: nn.Module, optimizer: Any, images: Tensor, labels: Tensor, steps: int, batch: int, mc: bool = False
) -> list[float]:
    losses = []
    for step in range(steps):
        first = step * batch % (len(images) - batch)
        x, y = images[first : first + batch], labels[first : first + batch]
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        if mc:
            optimizer.preconditioner.sample_fisher(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if getattr(optimizer, "adaptive", None) is not None:  # the adaptive step measures on the batch
            optimizer.step(inputs=x, targets=y)
        else:
            optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass(frozen=True)
class ConfigCase:
    """A run built like the CLI builds it: ``resolve_config(optimizer, preset, overrides)``."""

    optimizer: str
    preset: str | None
    overrides: dict[str, Any]
    steps: int

    def run(self) -> dict[str, Any]:
        config = resolve_config(self.optimizer, self.preset, {"dataset": "synthetic", **self.overrides})
        data = synthetic_dataset(train=max(512, 2 * config.batch_size), test=16, seed=0)
        shape, images, labels = data.input_shape, data.train_images, data.train_labels
        if config.model == "vgg16_bn":  # the paper's model wants 3×32×32 images
            generator = torch.Generator().manual_seed(0)
            shape = (3, 32, 32)
            images = torch.randn(4 * config.batch_size, *shape, generator=generator)
            labels = torch.randint(0, 10, (len(images),), generator=generator)
        torch.manual_seed(0)
        model = build_model(config.model, shape, 10, width_scale=config.width_scale, widths=config.widths)
        optimizer = build_optimizer(config, model, steps_per_epoch=len(images) // config.batch_size)
        losses = _train(model, optimizer, images, labels, self.steps, config.batch_size, mc=config.fisher == "mc")
        return _record(model, optimizer, losses)


class Shared(nn.Module):
    """One Linear called twice per forward (weight sharing), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(784, 32)
        self.shared = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.embed(x.flatten(1)))
        h = torch.relu(self.shared(torch.relu(self.shared(h))))
        return self.head(h)


@dataclass(frozen=True)
class TrainCase:
    """A run of the CLI's trainer (``rkfac train``) into a temporary run directory."""

    optimizer: str
    overrides: dict[str, Any]

    def run(self) -> dict[str, Any]:
        from rkfac.experiments.train import Trainer

        config = resolve_config(self.optimizer, None, {"dataset": "synthetic", "checkpoint_every": 0, **self.overrides})
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(config, out, quiet=True)
            trainer.run()
            losses = [record["loss"] for record in trainer.run_dir.metrics("step")]
            accuracies = [record["test_acc"] for record in trainer.run_dir.metrics("eval")]
        return {**_record(trainer.net, trainer.optimizer, losses), "test_acc": accuracies}


@dataclass(frozen=True)
class LibraryCase:
    """A run of the library API directly (options the CLI does not reach)."""

    build: Callable[[nn.Module], Any]
    steps: int = 30
    model: Callable[[], nn.Module] = lambda: build_model("mlp", (1, 28, 28), 10, widths=[48, 40])

    def run(self) -> dict[str, Any]:
        data = synthetic_dataset(train=512, test=16, seed=0)
        torch.manual_seed(0)
        model = self.model()
        optimizer = self.build(model)
        return _record(model, optimizer, _train(model, optimizer, data.train_images, data.train_labels, self.steps, 32))


SMALL = {"model": "mlp", "widths": [48, 40], "batch_size": 32, "rank": 16, "oversample": 4, "factor_every": 2, "inverse_every": 5}
WIDE_SMALL = {**SMALL, "widths": [160, 144], "rank": 40}
CONV_SMALL = {**SMALL, "model": "cnn", "width_scale": 0.25, "widths": None}
SENG_SMALL = {**SMALL, "update_freq": 7, "sketch_threshold": 2000.0, "col_sample_size": 24}
PRESET = {"batch_size": 64}

CASES: dict[str, ConfigCase | LibraryCase] = {
    # soap is a third-party package (not pinned): its numbers are not ours to keep
    **{f"small/{name}": ConfigCase(name, None, SMALL, 30) for name in OPTIMIZERS if name not in ("seng", "soap")},
    "small/seng": ConfigCase("seng", None, SENG_SMALL, 30),
    "small/seng-exact": ConfigCase("seng", None, {**SENG_SMALL, "sketch_threshold": 7e5}, 30),
    "small/sre-kfac-adaptive": ConfigCase("sre-kfac-adaptive", None, {**SMALL, "min_rank": 4}, 30),
    "small/sre-kfac-bf16": ConfigCase("sre-kfac-bf16", None, WIDE_SMALL, 30),
    "small/sre-warm": ConfigCase("sre-kfac", None, {**SMALL, "warm_start": True, "warm_power_iters": 2}, 30),
    "small/sre-pi-kl": ConfigCase("sre-kfac", None, {**SMALL, "damping_mode": "pi", "clip": "kl", "clip_value": 0.01}, 30),
    "small/sre-mc-momentum": ConfigCase(
        "sre-kfac", None, {**SMALL, "fisher": "mc", "momentum": 0.9, "weight_decay": 1e-3, "weight_decay_start": 10}, 30
    ),
    "small/rs-kfac-schedule": ConfigCase("rs-kfac", None, {**SMALL, "lr": {1: 0.1}, "rank": {1: 8}, "inverse_every": {1: 3}}, 30),
    "small/b-r-kfac-refresh": ConfigCase("b-r-kfac", None, {**SMALL, "refresh_every": 6}, 30),
    "conv/kfac": ConfigCase("kfac", None, CONV_SMALL, 20),
    "conv/sre-kfac": ConfigCase("sre-kfac", None, CONV_SMALL, 20),
    "conv/b-kfac": ConfigCase("b-kfac", None, CONV_SMALL, 20),
    "conv/seng": ConfigCase("seng", None, {**CONV_SMALL, "update_freq": 7, "sketch_threshold": 2000.0}, 20),
    "library/b-kfac-c": LibraryCase(
        lambda m: rkfac.KFAC(
            m,
            lr=0.1,
            decomposition=rkfac.BrandUpdate(rank=12, reproject_every=4, reproject_count=4),
            factor_every=1,
            inverse_every=5,
        )
    ),
    "library/shared-layer-kfac": LibraryCase(
        lambda m: rkfac.KFAC(m, lr=0.1, decomposition=rkfac.SymmetricRandomizedEVD(rank=8), factor_every=1, inverse_every=4),
        model=Shared,
    ),
    "library/sum-loss-skip": LibraryCase(
        lambda m: rkfac.KFAC(m, lr=0.02, loss_reduction="sum", skip=["2"], damping_mode="pi", factor_every=3, inverse_every=6)
    ),
    **{
        f"{preset}/{name}": ConfigCase(name, preset, PRESET, 12)
        for preset in ("quick", "fashion-mlp-wide", "fashion-cnn")
        for name in ("sre-kfac", "kfac", "seng", "sgd")
    },
    "train/sre-kfac": TrainCase("sre-kfac", {**SMALL, "epochs": 2, "evals_per_epoch": 2}),
    "train/seng": TrainCase("seng", {**SENG_SMALL, "max_steps": 20}),
    "train/sgd": TrainCase("sgd", {**SMALL, "max_steps": 20}),
    "paper-vgg16-cifar10/sre-kfac": ConfigCase("sre-kfac", "paper-vgg16-cifar10", {"batch_size": 8, "dataset": "synthetic"}, 3),
}


def run(name: str) -> dict[str, Any]:
    return CASES[name].run()


def record_path(print_: dict[str, Any]) -> Path:
    """Where the record of a machine kind lives: the first record's file if it is that kind's,
    else one file per kind (so that each kind is checked bitwise against its own record)."""
    if RECORD.exists() and json.loads(RECORD.read_text())["fingerprint"] == print_:
        return RECORD
    kind = f"torch{print_['torch']}-{print_['cpu_vendor']}-{print_['cpu_capability']}-{print_['threads']}threads"
    return RECORDS / f"trajectories-{kind}.json"


def load() -> dict[str, Any]:
    """This machine kind's record if there is one, else the first record."""
    own = record_path(fingerprint())
    return json.loads((own if own.exists() else RECORD).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="record every case into this machine kind's file in tests/golden/")
    parser.add_argument("cases", nargs="*", help="only these cases (default: all)")
    args = parser.parse_args()
    names = args.cases or list(CASES)
    target = record_path(fingerprint())
    records = json.loads(target.read_text())["cases"] if target.exists() and args.cases else {}
    for name in names:
        records[name] = run(name)
        print(name, records[name]["losses"][-1], file=sys.stderr)
    if args.write:
        RECORDS.mkdir(exist_ok=True)
        target.write_text(json.dumps({"fingerprint": fingerprint(), "cases": records}, indent=1) + "\n")
        print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
