"""What a resumed run may change: its length, nothing else.

A run directory's ``config.json`` is written once, when the run starts, and never rewritten.
Resuming (``rkfac train --resume DIR``, ``rkfac bench --resume``, ``train(config, DIR,
resume=True)``) continues that run, so every setting given must equal the run's, except the
two of :data:`EXTENDING`, which may grow: ``epochs``, and ``max_steps`` (``none``, no limit,
is larger than any number). Anything else is refused before a model is built or a file is
written, with every difference listed: the flag, the run's value, the given one.

Each resume appends an entry to ``resumes.json`` in the run directory::

    {"step": 11, "epoch": 1, "changes": {"max_steps": {"run": 11, "given": null}}, "env": {...}}

the step and completed epochs it continued from, what it extended (``{}`` if nothing), and
the environment it ran in (``env.json``'s keys, data files included), since ``env.json``
describes the run's start. The run's settings are ``config.json`` with the ``changes`` of
``resumes.json`` applied in order: :func:`run_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rkfac.experiments.config import RunConfig
from rkfac.experiments.rundir import CHECKPOINT, RunDirectory

EXTENDING = ("epochs", "max_steps")
RESUMES = "resumes.json"
CONFIG = "config.json"
RUN_FILES = (CONFIG, "env.json", "metrics.jsonl", CHECKPOINT)


def flag(name: str) -> str:
    """The command-line flag of RunConfig field ``name``."""
    return "--" + name.replace("_", "-")


def run_config(path: str | Path) -> RunConfig:
    """The settings of the run in ``path``: its config.json, extended by its resumes.json.

    A ValueError says when ``path`` is not a run directory (and which files it lacks), or
    names the file that cannot be read and why.
    """
    path = Path(path)
    if not path.is_dir():
        reason = "it is a file" if path.exists() else "it does not exist"
        raise ValueError(f"{path} is not a run directory: {reason}")
    if not (path / CONFIG).is_file():
        missing = [name for name in RUN_FILES if not (path / name).exists()]
        lacks = "all of them" if len(missing) == len(RUN_FILES) else ", ".join(missing)
        raise ValueError(
            f"{path} is not a run directory: it has no {CONFIG}; a run directory holds {', '.join(RUN_FILES)} "
            f"(written by rkfac train), and {path} lacks {lacks}"
        )
    config = _read_config(path / CONFIG)
    for entry in resumes(path):
        config = config.updated(**{name: change["given"] for name, change in entry["changes"].items()})
    return config


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} cannot be read ({error})") from None


def _read_config(file: Path) -> RunConfig:
    data = _read_json(file)
    try:
        return RunConfig.from_json(data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{file}: {error}") from None


def resumes(path: str | Path) -> list[dict[str, Any]]:
    """The entries of the run's resumes.json (none before its first resume)."""
    file = Path(path) / RESUMES
    if not file.exists():
        return []
    entries = _read_json(file)
    valid = isinstance(entries, list) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("changes"), dict)
        and all(name in EXTENDING and isinstance(change, dict) and "given" in change for name, change in entry["changes"].items())
        for entry in entries
    )
    if not valid:
        raise ValueError(
            f"{file} is not a list of resumes, each with its changes to {' and '.join(EXTENDING)} ({{name: {{run, given}}}})"
        )
    return entries


def check_resume(run: RunConfig, given: dict[str, Any], *, where: str | Path, refused: list[str] | None = None) -> dict[str, Any]:
    """The changes ``given`` (RunConfig field → value) makes to the ``run``'s settings, each
    ``{"run": old, "given": new}``: only extensions (:data:`EXTENDING`). Any other difference,
    and any line in ``refused`` (differences the caller found itself), raises a ValueError
    listing them all, with what a resume may change."""
    lines = list(refused or ())
    changes: dict[str, Any] = {}
    for name, value in given.items():
        current = getattr(run, name)
        if _normal(current) == _normal(value):
            continue
        if name in EXTENDING and _extends(current, value):
            changes[name] = {"run": current, "given": value}
            continue
        hint = " (only a larger value extends the run)" if name in EXTENDING else ""
        lines.append(f"{flag(name)}: the run's {as_text(current)}, given {as_text(value)}{hint}")
    if lines:
        sources = " and ".join(name for name in (CONFIG, RESUMES) if (Path(where) / name).exists()) or CONFIG
        raise ValueError(
            f"cannot resume {where} with other settings than the run's (its {sources}):\n"
            + "".join(f"  {line}\n" for line in lines)
            + f"only {' and '.join(map(flag, EXTENDING))} may change on a resume, and only to extend the run; "
            "for other settings start a new run (rkfac train --out NEW_DIR)"
        )
    return changes


def record_resume(run_dir: RunDirectory, *, step: int, epoch: int, changes: dict[str, Any], env: dict[str, Any]) -> None:
    """Append this resume to the run's resumes.json (see the module docstring)."""
    entries = resumes(run_dir.path)
    run_dir.write_json(RESUMES, [*entries, {"step": step, "epoch": epoch, "changes": changes, "env": env}])


def _extends(current: Any, value: Any) -> bool:
    """Whether ``value`` of an extending setting (epochs, max_steps; None: no limit) is larger."""
    if current is None:
        return False
    return value is None or value > current


def _normal(value: Any) -> Any:
    """``value`` in a form that compares as the setting it stands for: an epoch schedule that
    starts and stays at one value is that value, JSON's lists and tuples alike."""
    if isinstance(value, dict):
        if len(value) == 1 and 1 in value:
            return _normal(value[1])
        return {int(epoch): item for epoch, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(item) for item in value]
    return value


def as_text(value: Any) -> str:
    """A setting as its flag takes it: ``none``, ``true``, ``8,8``, ``1:0.3,13:0.03``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return ",".join(f"{epoch}:{as_text(item)}" for epoch, item in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ",".join(as_text(item) for item in value) or "(empty)"
    return str(value)
