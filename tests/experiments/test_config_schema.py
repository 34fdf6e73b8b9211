"""One config schema (issue 16): RunConfig's fields, the CLI's flags and their checks come from
the library's option dataclasses, and every default is written once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from rkfac import spectrum
from rkfac.adaptive import AdaptiveOptions
from rkfac.decompositions import MODE_THRESHOLD, BrandUpdate, ExactEigh, RandomizedSVD, SymmetricRandomizedEVD
from rkfac.experiments import cli
from rkfac.experiments.config import SCHEDULED, RunConfig
from rkfac.experiments.optimizers import decomposition_for
from rkfac.experiments.presets import FAMILY_DEFAULTS, resolve_config
from rkfac.options import KFACOptions, SENGOptions, SOAPOptions, UpdateOptions
from rkfac.schema import default_of

LIBRARY: dict[str, type] = {
    cls.__name__: cls
    for cls in (KFACOptions, SENGOptions, UpdateOptions, SymmetricRandomizedEVD, BrandUpdate, AdaptiveOptions, SOAPOptions)
}
RUN_FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}


def _default(field: dataclasses.Field[Any]) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def test_every_library_option_of_the_run_takes_the_librarys_default_help_and_bounds() -> None:
    sourced = {name: field for name, field in RUN_FIELDS.items() if field.metadata["source"]}
    assert len(sourced) >= 25
    for name, field in sourced.items():
        owner, option = field.metadata["source"].split(".")
        library = {f.name: f for f in dataclasses.fields(LIBRARY[owner])}[option]
        run_default = _default(field)
        assert run_default == (list(library.default) if isinstance(library.default, tuple) else library.default), name
        assert field.metadata["bounds"] == library.metadata["bounds"], name
        assert field.metadata["choices"] == library.metadata["choices"], name


def test_no_run_setting_named_like_a_library_option_writes_its_own_default() -> None:
    library_names = {f.name for cls in LIBRARY.values() for f in dataclasses.fields(cls)}
    own = {name for name in RUN_FIELDS.keys() & library_names if not RUN_FIELDS[name].metadata["source"]}
    assert own == {"apply_dtype"}  # the command line's spelling ("float32" for None), see APPLY_DTYPES


def test_run_defaults_build_the_librarys_default_decompositions() -> None:
    assert decomposition_for(RunConfig(), 1) == SymmetricRandomizedEVD()
    assert decomposition_for(RunConfig(optimizer="rs-kfac"), 1) == RandomizedSVD()
    assert decomposition_for(RunConfig(optimizer="b-kfac"), 1) == BrandUpdate()
    assert decomposition_for(RunConfig(optimizer="kfac"), 1) == ExactEigh()


def test_refresh_every_is_none_for_b_kfac_and_a_period_for_b_r_kfac() -> None:
    assert default_of(BrandUpdate, "refresh_every") is None and RunConfig().refresh_every is None
    assert resolve_config("b-kfac").refresh_every is None
    b_r = resolve_config("b-r-kfac")
    assert b_r.refresh_every == FAMILY_DEFAULTS["b-r-kfac"]["refresh_every"] == 50
    decomposition = decomposition_for(b_r, 1)
    assert isinstance(decomposition, BrandUpdate) and decomposition.refresh_every == 50
    given = decomposition_for(resolve_config("b-kfac", None, {"refresh_every": 20}), 1)
    assert isinstance(given, BrandUpdate) and given.refresh_every is None  # b-kfac never refreshes, as before
    with pytest.raises(ValueError, match=r"b-r-kfac refreshes .* every refresh_every steps: give refresh_every >= 1, got None"):
        resolve_config("b-r-kfac", None, {"refresh_every": None})


def test_the_mode_threshold_lives_in_one_place() -> None:
    assert spectrum.DEFAULT_THRESHOLD == MODE_THRESHOLD == 10**-1.5
    assert SymmetricRandomizedEVD().threshold == RandomizedSVD().threshold == MODE_THRESHOLD
    assert cli.build_parser().parse_args(["spectrum"]).threshold == MODE_THRESHOLD


def test_family_defaults_say_only_what_differs_from_the_library() -> None:
    kfac = [FAMILY_DEFAULTS[name] for name in ("kfac", "rs-kfac", "sre-kfac", "b-kfac")]
    assert all(family == {} for family in kfac)
    for family, settings in FAMILY_DEFAULTS.items():
        for name, value in settings.items():
            assert value != _default(RUN_FIELDS[name]), (family, name)
    assert FAMILY_DEFAULTS["seng"]["damping"] == default_of(SENGOptions, "damping")


def test_every_flag_is_generated_from_its_field_with_its_help() -> None:
    flags = {dest: (flag, text) for flag, dest, _, text in cli.RUN_FLAGS}
    assert set(flags) == set(RUN_FIELDS) - {"optimizer", "seed", "preset"}
    for name, (flag, text) in flags.items():
        assert flag == "--" + name.replace("_", "-")
        assert RUN_FIELDS[name].metadata["help"] and text.startswith(RUN_FIELDS[name].metadata["help"].replace("%", "%%"))
    assert set(SCHEDULED) == {"lr", "damping", "rank", "factor_every", "inverse_every", "step_scale"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--refresh-every", "20"], {"refresh_every": 20}),
        (["--refresh-every", "none"], {"refresh_every": None}),
        (["--max-steps", "none"], {"max_steps": None}),  # 0 is refused (max_steps >= 1), not read as none
        (["--clip", "none"], {"clip": None}),
        (["--rank", "1:220,15:230"], {"rank": {1: 220.0, 15: 230.0}}),
        (
            ["--widths", "8,4", "--target-acc", "0.5,0.9", "--skip", "0,fc"],
            {"widths": [8, 4], "target_acc": [0.5, 0.9], "skip": ["0", "fc"]},
        ),
        (["--warm-start", "--seed", "3"], {"warm_start": True, "seed": 3}),
        ([], {}),
    ],
)
def test_flags_read_their_values_by_the_fields_kind(argv: list[str], expected: dict[str, Any]) -> None:
    args = cli.build_parser().parse_args(["train", *argv])
    overrides = cli._overrides(args)
    assert overrides == expected
    resolve_config("sre-kfac", None, overrides)  # and the values pass the checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"momentum": 1.0}, r"momentum must be < 1.0, got 1.0"),
        ({"damping": {1: 0.1, 5: 0.0}}, r"damping must be > 0.0, got 0.0"),
        ({"rank": {1: 0}}, r"rank must be >= 1, got 0"),
        ({"rank": 2.5}, r"rank must be an integer, got 2.5"),
        ({"factor_every": 0.0}, r"factor_every must be >= 1, got 0"),
        ({"lr": {2: 0.1}}, r"lr schedule must start at epoch 1, got \{2: 0.1\}"),
        ({"lr": {0: 0.1, 1: 0.1}}, r"lr schedule epoch must be >= 1, got 0"),
        ({"widths": [8, 0]}, r"widths must be >= 1, got 0"),
        ({"target_acc": [1.5]}, r"target_acc must be <= 1.0, got 1.5"),
        ({"skip": [3]}, r"skip must be a string, got 3"),
        ({"apply_dtype": "float16"}, r"apply_dtype must be one of \('float32', 'bfloat16'\), got 'float16'"),
        ({"warm_start": "yes"}, r"warm_start must be True or False, got 'yes'"),
        ({"refresh_every": 0}, r"refresh_every must be >= 1, got 0"),
        ({"factor_decay": 1.0}, r"factor_decay must be < 1.0, got 1.0"),
        ({"fisher": "exact"}, r"fisher must be one of \('empirical', 'mc'\), got 'exact'"),
        ({"sketch_rank": 0}, r"sketch_rank must be >= 1, got 0"),
        ({"device": "cuda:0"}, r"device must be one of .*got 'cuda:0'"),
        ({"not_a_setting": 1}, r"unknown option\(s\) \['not_a_setting'\]"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_config("sre-kfac", None, overrides)


def test_a_bad_library_option_on_the_command_line_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--optimizer", "kfac", "--momentum", "1", "--out", str(tmp_path), "--quiet"]) == 2
    assert "momentum must be < 1.0, got 1.0" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [SymmetricRandomizedEVD, RandomizedSVD, BrandUpdate, ExactEigh])
def test_decomposition_fields_carry_help_and_checks(cls: type) -> None:
    for field in dataclasses.fields(cls):
        assert field.metadata["help"], (cls.__name__, field.name)
        assert field.metadata["kind"] in ("int", "float", "bool", "any"), (cls.__name__, field.name)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: BrandUpdate(refresh_every=0), "refresh_every must be >= 1, got 0"),
        (lambda: BrandUpdate(reproject_every=-2), "reproject_every must be >= 1, got -2"),
        (lambda: BrandUpdate(reproject_count=0), "reproject_count must be >= 1, got 0"),
        (lambda: BrandUpdate(rank=1.5), r"rank must be an integer, got 1.5"),
        (lambda: BrandUpdate(fallback=BrandUpdate()), "fallback must be a dense rkfac Decomposition"),
        (lambda: SymmetricRandomizedEVD(threshold=0.0), "threshold must be > 0.0, got 0.0"),
        (lambda: RandomizedSVD(adaptive_rank=1), "adaptive_rank must be True or False, got 1"),
        (lambda: ExactEigh(rank=0), "rank must be >= 1, got 0"),
    ],
)
def test_decomposition_checks_name_the_value(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


# config.json as rkfac wrote it at commit 9a09a97 (SENG added; before warm_start, adaptive_rank,
# B-KFAC, apply_dtype and evals_per_epoch existed): resolve_config("sre-kfac",
# "paper-vgg16-cifar10", {"seed": 2}).to_json(), through JSON (schedule keys are strings).
OLD_CONFIG_JSON = """
{"optimizer": "sre-kfac", "model": "vgg16_bn", "widths": null, "width_scale": 1.0, "dataset": "cifar10",
 "data_dir": null, "synthetic_train": 512, "synthetic_test": 256, "epochs": 50, "max_steps": null,
 "batch_size": 256, "lr": {"1": 0.3, "2": 0.2, "3": 0.1, "13": 0.03, "18": 0.01, "27": 0.003, "40": 0.001},
 "momentum": 0.0, "weight_decay": 0.0007, "weight_decay_start": 200, "damping": {"1": 0.1, "25": 0.05, "35": 0.01},
 "damping_mode": "relative", "rank": {"1": 220, "15": 230}, "oversample": 10, "power_iters": 4,
 "factor_decay": 0.95, "factor_every": 10, "inverse_every": {"1": 50, "20": 30}, "clip": "rms", "clip_value": 0.07,
 "fisher": "empirical", "update_freq": 200, "col_sample_size": 128, "sketch_threshold": 700000.0, "sketch_rank": 16,
 "skip": [], "seed": 2, "device": "auto", "target_acc": [0.91, 0.92], "checkpoint_every": 1,
 "preset": "paper-vgg16-cifar10"}
"""


def test_an_old_config_json_loads_as_the_run_it_was() -> None:
    old = json.loads(OLD_CONFIG_JSON)
    loaded = RunConfig.from_json(old)
    assert loaded == resolve_config("sre-kfac", "paper-vgg16-cifar10", {"seed": 2})  # missing keys: the features were off
    assert loaded.rank == {1: 220, 15: 230} and loaded.evals_per_epoch == 1 and loaded.refresh_every is None
    assert {key: value for key, value in json.loads(json.dumps(loaded.to_json())).items() if key in old} == old


def test_a_b_kfac_config_json_of_the_previous_version_still_loads() -> None:
    # before the one schema, every config.json held refresh_every 50 (read only by b-r-kfac)
    previous = {**json.loads(json.dumps(resolve_config("b-kfac", "fashion-cnn").to_json())), "refresh_every": 50}
    loaded = RunConfig.from_json(previous)
    assert loaded.refresh_every == 50 and loaded.to_json() == previous
    decomposition = decomposition_for(loaded, 1)
    assert isinstance(decomposition, BrandUpdate) and decomposition.refresh_every is None


def test_a_config_json_with_unknown_settings_is_refused_saying_why() -> None:
    data = {**json.loads(OLD_CONFIG_JSON), "sketch_size": 3}
    with pytest.raises(ValueError, match=r"settings \['sketch_size'\] that this version of rkfac does not know: .*newer"):
        RunConfig.from_json(data)
    with pytest.raises(ValueError, match=r"config\.json must hold an object of settings, got list"):
        RunConfig.from_json([])  # type: ignore[arg-type]


def test_a_setting_written_as_text_reads_as_its_flag_does() -> None:
    assert cli.parse_setting("refresh_every", "20") == 20 and cli.parse_setting("refresh_every", "none") is None
    assert cli.parse_setting("lr", "1:0.3,2:0.1") == {1: 0.3, 2: 0.1} and cli.parse_setting("adaptive_rank", "true") is True
    assert cli.parse_setting("apply_dtype", "bfloat16") == "bfloat16" and cli.parse_setting("widths", "8,4") == [8, 4]
    with pytest.raises(ValueError, match="unknown setting 'rnak'"):
        cli.parse_setting("rnak", "3")
