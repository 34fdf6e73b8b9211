"""One schema for a training run, shared by the CLI, the presets and the run directory.

:class:`RunConfig` is flat (one field per setting, ``config.json`` one key per field) and its
fields are of two kinds, both declared with :func:`rkfac.schema.option` metadata (default,
help, bounds, choices), from which :mod:`rkfac.experiments.cli` generates the flags and
:meth:`RunConfig.validate` its checks:

- the library's options (lr, damping, rank, update_freq, ...): :func:`library_option` takes
  the default, help, bounds and choices of the library's own field (in
  :class:`rkfac.KFACOptions`, :class:`rkfac.SENGOptions`, :class:`rkfac.UpdateOptions` or a
  decomposition), so each default is written once, there;
- the experiment's own (model, dataset, epochs, device, ...), declared here with
  :func:`run_option`.

A value that the paper schedules by epoch (lr, damping, rank, factor_every, inverse_every; and the
adaptive step's step_scale) is
either a number or an epoch schedule ``{first_epoch: value, ...}`` (epochs counted from 1,
each value holding from its epoch until the next key), written on the command line as
``1:0.3,2:0.2,3:0.1``; every value of a schedule is checked like the number it stands for.
Settings resolve in this order, later ones winning: the defaults here, the optimizer family's
(:data:`rkfac.experiments.presets.FAMILY_DEFAULTS`), the preset's common settings, the preset's
settings for the chosen optimizer, the flags given on the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch

from rkfac.adaptive import AdaptiveOptions
from rkfac.decompositions import BrandUpdate, SymmetricRandomizedEVD
from rkfac.experiments.datasets import DATASETS
from rkfac.experiments.models import MODELS
from rkfac.experiments.tasks import RECONSTRUCTING_MODELS, Target
from rkfac.kfac.eigenvalue_correction import EKFAC_CARRY
from rkfac.options import KFACOptions, SENGOptions, SOAPOptions, UpdateOptions
from rkfac.schedules import check_int
from rkfac.schema import check_field, option

# The command line's names for KFACOptions.apply_dtype: float32 is None, the factors' own dtype.
APPLY_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}

EpochSchedule: TypeAlias = float | dict[int, float]

# the adaptive step (rkfac.adaptive): lr, momentum and damping chosen each step; the fixed-step
# settings (lr, momentum, damping) are not read
ADAPTIVE_OPTIMIZERS = ("kfac-auto", "sre-kfac-auto")
# sre-ekfac: SRE-KFAC with its per-mode scales measured from the gradients (rkfac.LowRankEKFAC)
EIGENVALUE_CORRECTED = ("sre-ekfac",)
FIXED_STEP_KFAC = ("kfac", "rs-kfac", "sre-kfac", "b-kfac", "b-r-kfac", *EIGENVALUE_CORRECTED)
# Adam in K-FAC's low-rank eigenbasis (rkfac.LowRankSOAP): K-FAC's factors, no damping or clip
EIGENBASIS_ADAM = ("sre-soap",)
OPTIMIZERS = ("sgd", "adam", "adamw", "muon", "soap", *FIXED_STEP_KFAC, "seng", *ADAPTIVE_OPTIMIZERS, *EIGENBASIS_ADAM)
KFAC_OPTIMIZERS = (*FIXED_STEP_KFAC, *ADAPTIVE_OPTIMIZERS)
KFAC_FACTORS = (*KFAC_OPTIMIZERS, *EIGENBASIS_ADAM)  # optimizers that build K-FAC's factors
PRECONDITIONED = (*KFAC_FACTORS, "seng")  # optimizers with a preconditioner (and a phase timer)
PEERS = tuple(name for name in OPTIMIZERS if name not in PRECONDITIONED)  # what users would pick instead

# The optimizers that read each setting not every optimizer reads (a setting absent here is read
# by all: lr but for the adaptive step, weight_decay, seed, the model's, the data's, the run's).
# build_optimizer passes a setting only to these; the CLI refuses a flag that none of a run's
# optimizers reads (see unread_settings) rather than drop it silently.
# the optimizers with an RS/SRE decomposition
_RANDOMIZED = ("rs-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "sre-kfac-auto", *EIGENBASIS_ADAM, *EIGENVALUE_CORRECTED)
_SENG_SETTINGS = ("update_freq", "col_sample_size", "sketch_threshold", "sketch_rank")
_ADAPTIVE_SETTINGS = (
    "initial_damping",
    "min_relative_damping",
    "damping_every",
    "curvature_samples",
    "curvature_sampling",
    "model_every",
    "step_scale",
)
_FACTOR_SETTINGS = ("weight_decay_start", "factor_decay", "factor_every", "inverse_every", "fisher", "kfac_approx")
_DECOMPOSITION_SETTINGS = ("rank", "oversample", "power_iters", "warm_start", "warm_power_iters", "adaptive_rank", "min_rank")
READERS: dict[str, tuple[str, ...]] = {
    "lr": tuple(name for name in OPTIMIZERS if name not in ADAPTIVE_OPTIMIZERS),
    "momentum": ("sgd", *FIXED_STEP_KFAC, "seng"),
    "damping": (*FIXED_STEP_KFAC, "seng"),
    "damping_mode": KFAC_OPTIMIZERS,
    "clip": KFAC_OPTIMIZERS,
    "clip_value": KFAC_OPTIMIZERS,
    "apply_dtype": tuple(name for name in KFAC_OPTIMIZERS if name not in EIGENVALUE_CORRECTED),  # the damped solve's
    "statistics_samples": KFAC_FACTORS,
    "skip": KFAC_FACTORS,
    "refresh_every": ("b-r-kfac",),
    "carry": EIGENBASIS_ADAM,
    "ekfac_carry": EIGENVALUE_CORRECTED,
    **dict.fromkeys(_FACTOR_SETTINGS, KFAC_FACTORS),
    **dict.fromkeys(_DECOMPOSITION_SETTINGS, _RANDOMIZED),
    **dict.fromkeys(_ADAPTIVE_SETTINGS, ADAPTIVE_OPTIMIZERS),
    **dict.fromkeys(_SENG_SETTINGS, ("seng",)),
}


def unread_settings(optimizers: list[str], settings: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The ``settings`` that none of ``optimizers`` (base names, not variants) reads, each with
    the optimizers that would read it: a flag the run would drop."""
    return {
        name: READERS[name]
        for name in settings
        if name in READERS and not any(optimizer in READERS[name] for optimizer in optimizers)
    }


# Which optimizers read the options of each library class, prefixed to their help.
_SCOPES: dict[type, str] = {
    UpdateOptions: "",
    KFACOptions: "K-FAC: ",
    SymmetricRandomizedEVD: "RS/SRE: ",
    BrandUpdate: "",  # its helps name the variant (B-R-KFAC, B-KFAC-c)
    SENGOptions: "SENG: ",
    AdaptiveOptions: "K-FAC auto: ",
    SOAPOptions: "SRE-SOAP: ",
}


def run_option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    items: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **check: Any,
) -> Any:
    """A field of the experiment's own, declared like a library option (see :func:`rkfac.schema.option`).

    ``items=True``: a list (comma-separated on the command line) whose every item is checked
    against ``check``. ``kind="str"``: a string (checked here; the library has none).
    """
    kind = check.pop("kind", "float")
    base = option(default, help, default_factory=default_factory, kind="any" if kind == "str" else kind, **check)
    metadata = {**base.metadata, "kind": "str" if kind == "str" else base.metadata["kind"]}
    return _field(base.default, base.default_factory, metadata, epochs=False, items=items, source=None)


def library_option(
    owner: type, name: str, *, help: str | None = None, scope: str | None = None, epochs: bool = False, **changes: Any
) -> Any:
    """RunConfig's field for the library option ``owner.name``: the library's default, help,
    bounds and choices. ``epochs=True`` lets it take an epoch schedule; ``help`` and ``scope``
    (the prefix saying which optimizers read it) replace the library's wording where the run
    uses the option more widely (damping is SENG's λ too). A sequence option (``skip``) is a
    list here, ``changes`` override metadata keys (its items' ``kind``)."""
    source = {field.name: field for field in dataclasses.fields(owner)}[name]
    metadata = {**source.metadata, "schedule": False, **changes}
    metadata["help"] = (_SCOPES[owner] if scope is None else scope) + (help or source.metadata["help"])
    origin = f"{owner.__name__}.{name}"
    if isinstance(source.default, tuple):
        default = source.default
        return _field(dataclasses.MISSING, lambda: list(default), metadata, epochs=False, items=True, source=origin)
    return _field(source.default, dataclasses.MISSING, metadata, epochs=epochs, items=False, source=origin)


def _field(default: Any, factory: Any, metadata: dict[str, Any], *, epochs: bool, items: bool, source: str | None) -> Any:
    full = {**metadata, "epochs": epochs, "items": items, "source": source}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=full)
    return dataclasses.field(default=default, metadata=full)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run; ``config.json`` in the run directory is this, resolved.

    ``refresh_every`` keeps BrandUpdate's default, None: B-KFAC (``b-kfac``) has no period and
    ignores the field; ``b-r-kfac`` is B-KFAC with a period, which its family defaults give
    (50) and :meth:`validate` requires.
    """

    optimizer: str = run_option("sre-kfac", "the optimizer", choices=OPTIMIZERS)
    model: str = run_option("mlp", "the network", choices=MODELS)
    widths: list[int] | None = run_option(None, "MLP hidden widths, e.g. 2048,2048", kind="int", low=1, items=True)
    width_scale: float = run_option(1.0, "multiply every hidden width", low=0.0, low_inclusive=False)
    dataset: str = run_option("fashion-mnist", "the data", choices=DATASETS)
    data_dir: str | None = run_option(None, "where the dataset files are (else $RKFAC_DATA, system paths, download)", kind="str")
    synthetic_train: int = run_option(512, "synthetic training set size", kind="int", low=1)
    synthetic_test: int = run_option(256, "synthetic test set size", kind="int", low=1)
    epochs: int = run_option(1, "epochs to train", kind="int", low=1)
    max_steps: int | None = run_option(None, "stop after this many optimizer steps in total (none: no limit)", kind="int", low=1)
    batch_size: int = run_option(256, "samples per step", kind="int", low=1)
    lr: EpochSchedule = library_option(UpdateOptions, "lr", epochs=True)
    momentum: float = library_option(UpdateOptions, "momentum")
    weight_decay: float = library_option(UpdateOptions, "weight_decay")
    weight_decay_start: int = library_option(UpdateOptions, "weight_decay_start", scope="K-FAC: ")
    damping: EpochSchedule = library_option(KFACOptions, "damping", epochs=True, scope="", help="K-FAC damping δ > 0 (SENG: λ)")
    damping_mode: str = library_option(KFACOptions, "damping_mode")
    rank: EpochSchedule = library_option(
        SymmetricRandomizedEVD,
        "rank",
        epochs=True,
        help="target rank r, the most with --adaptive-rank (b-kfac: the first epoch's)",
    )
    oversample: int = library_option(SymmetricRandomizedEVD, "oversample")
    power_iters: int = library_option(SymmetricRandomizedEVD, "power_iters")
    warm_start: bool = library_option(SymmetricRandomizedEVD, "warm_start")
    warm_power_iters: int = library_option(SymmetricRandomizedEVD, "warm_power_iters")
    adaptive_rank: bool = library_option(SymmetricRandomizedEVD, "adaptive_rank")
    min_rank: int = library_option(SymmetricRandomizedEVD, "min_rank")
    refresh_every: int | None = library_option(BrandUpdate, "refresh_every")
    factor_decay: float = library_option(KFACOptions, "factor_decay")
    factor_every: EpochSchedule = library_option(KFACOptions, "factor_every", epochs=True)
    inverse_every: EpochSchedule = library_option(KFACOptions, "inverse_every", epochs=True)
    clip: str | None = library_option(KFACOptions, "clip")
    clip_value: float = library_option(KFACOptions, "clip_value")
    fisher: str = library_option(KFACOptions, "fisher")
    kfac_approx: str = library_option(KFACOptions, "kfac_approx")
    statistics_samples: int | None = library_option(KFACOptions, "statistics_samples")
    initial_damping: float = library_option(AdaptiveOptions, "initial_damping")
    min_relative_damping: float = library_option(AdaptiveOptions, "min_relative_damping")
    damping_every: int = library_option(AdaptiveOptions, "damping_every")
    curvature_samples: int | None = library_option(AdaptiveOptions, "curvature_samples")
    curvature_sampling: str | None = library_option(AdaptiveOptions, "curvature_sampling")
    model_every: int = library_option(AdaptiveOptions, "model_every")
    step_scale: EpochSchedule = library_option(AdaptiveOptions, "step_scale", epochs=True)
    carry: str = library_option(SOAPOptions, "carry")
    ekfac_carry: str = run_option(
        "keep", "SRE-EKFAC: what a new basis does to the measured scales (reset: its eigenvalue products)", choices=EKFAC_CARRY
    )
    update_freq: int = library_option(SENGOptions, "update_freq")
    col_sample_size: int = library_option(SENGOptions, "col_sample_size")
    sketch_threshold: float = library_option(SENGOptions, "sketch_threshold")
    sketch_rank: int = library_option(SENGOptions, "sketch_rank")
    apply_dtype: str = run_option(
        "float32", "K-FAC: dtype of the per-step solve's large products (float32: the factors')", choices=tuple(APPLY_DTYPES)
    )
    skip: list[str] = library_option(KFACOptions, "skip", kind="str", help="layer name patterns left alone, comma-separated")
    seed: int = library_option(KFACOptions, "seed", scope="", help="seed of init, data order, sketches and sampled labels")
    device: str = run_option("auto", "where to train", choices=("auto", "cpu", "cuda"))
    target_acc: list[float] = run_option(
        default_factory=list, help="test accuracies to time, e.g. 0.86,0.88", low=0.0, high=1.0, items=True
    )
    target_loss: list[float] = run_option(
        default_factory=list,
        help="training-loss levels to time (on a fixed training subset), e.g. 12,10",
        low=0.0,
        low_inclusive=False,
        items=True,
    )
    evals_per_epoch: int = run_option(1, "evaluations per epoch (targets are timed at these)", kind="int", low=1)
    checkpoint_every: int = run_option(1, "epochs between checkpoints (0: none)", kind="int", low=0)
    preset: str | None = run_option(None, "start from a named preset", kind="str")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> RunConfig:
        """Raise ValueError naming the first bad value (checked against its field's metadata); return self."""
        for field in dataclasses.fields(self):
            check_setting(field, getattr(self, field.name))
        if self.model in RECONSTRUCTING_MODELS and self.target_acc:
            raise ValueError(
                f"the {self.model} reconstructs its input and has no accuracy: give target_loss, not target_acc={self.target_acc}"
            )
        if self.optimizer == "b-r-kfac" and self.refresh_every is None:
            raise ValueError("b-r-kfac refreshes (U, D) every refresh_every steps: give refresh_every >= 1, got None")
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def targets(self) -> list[Target]:
        """The levels the run is timed at: its test accuracies, then its training-loss levels."""
        return [Target("test_acc", level) for level in self.target_acc] + [
            Target("train_eval_loss", level) for level in self.target_loss
        ]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """The config of a run directory's ``config.json``, written by this version or an older one.

        config.json has been flat, one key per field, in every version. Older versions wrote
        fewer keys; a missing key takes its default, which is what the version that wrote it
        did (each later field is a feature off by default: warm_start, adaptive_rank,
        refresh_every, apply_dtype float32, evals_per_epoch 1). A key this version does not
        know is refused: the file comes from a newer version or was edited by hand.
        """
        if not isinstance(data, dict):
            raise ValueError(f"config.json must hold an object of settings, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(
                f"config.json has settings {unknown} that this version of rkfac does not know: it was written by a "
                f"newer version or edited by hand (known: {sorted(fields)})"
            )
        values = dict(data)
        for name, value in data.items():
            if fields[name].metadata["epochs"] and isinstance(value, dict):  # JSON keys are strings
                values[name] = {int(epoch): item for epoch, item in value.items()}
        return cls(**values)

    def updated(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


SCHEDULED = tuple(field.name for field in dataclasses.fields(RunConfig) if field.metadata["epochs"])


def check_setting(field: dataclasses.Field[Any], value: Any) -> None:
    """Check one RunConfig ``value`` against its ``field``: a number, a choice, a list of
    items or an epoch schedule, each item checked by :func:`rkfac.schema.check_field`."""
    meta, name = field.metadata, field.name
    if value is None and meta.get("optional", field.default is None):
        return
    if meta["epochs"] and isinstance(value, dict):
        for epoch, item in value.items():
            check_int(epoch, f"{name} schedule epoch", low=1)
            _check_item(field, item)
        if 1 not in value:
            raise ValueError(f"{name} schedule must start at epoch 1, got {value!r}")
        return
    if meta["items"]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        for item in value:
            _check_item(field, item)
        return
    _check_item(field, value)


def _check_item(field: dataclasses.Field[Any], value: Any) -> None:
    kind = field.metadata["kind"]
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{field.name} must be a string, got {value!r}")
        return
    if kind == "int" and field.metadata["epochs"] and isinstance(value, float) and value.is_integer():
        value = int(value)  # epoch schedules parse as floats; a whole number stands for an int
    check_field(field, value)


def setting_text(value: Any) -> str:
    """A setting's value as short text, as its flag writes it (numbers by ``:g``, lists comma-separated,
    schedules as epoch:value pairs, None as none): for messages, grid labels and tables."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, dict):
        return ",".join(f"{epoch}:{setting_text(item)}" for epoch, item in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(setting_text(item) for item in value)
    return str(value)


def value_at_epoch(schedule: EpochSchedule, epoch: int) -> float:
    """The value of an epoch schedule in (1-based) ``epoch``."""
    if not isinstance(schedule, dict):
        return schedule
    current = None
    for first in sorted(schedule):
        if first <= epoch:
            current = schedule[first]
    if current is None:
        raise ValueError(f"schedule {schedule} has no value for epoch {epoch}: its first key must be 1")
    return current


def step_schedule(schedule: EpochSchedule, steps_per_epoch: int, cast: Callable[[float], Any] = float) -> Any:
    """A number, or a callable of the (0-based) optimizer step for an epoch schedule."""
    if not isinstance(schedule, dict):
        return cast(schedule)
    return lambda step: cast(value_at_epoch(schedule, step // steps_per_epoch + 1))


def parse_schedule(text: str) -> EpochSchedule:
    """``"0.1"`` → 0.1; ``"1:0.3,2:0.2"`` → {1: 0.3, 2: 0.2}; a clear error otherwise (an epoch given twice too)."""
    malformed = f"bad schedule {text!r}: give a number or epoch:value pairs like 1:0.3,13:0.03"
    if ":" not in text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(malformed) from None
    schedule: dict[int, float] = {}
    given: dict[int, str] = {}
    for item in text.split(","):
        try:
            epoch_text, value_text = item.split(":")
            epoch, value = int(epoch_text), float(value_text)
        except ValueError:
            raise ValueError(malformed) from None
        if epoch in schedule:
            raise ValueError(f"bad schedule {text!r}: epoch {epoch} is given twice ({given[epoch]} and {item}); give each once")
        schedule[epoch], given[epoch] = value, item
    return schedule
