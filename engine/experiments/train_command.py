"""The one place that builds a ``train.py`` command line: ``TrainRun`` describes a run, ``train_argv`` spells it;
``fused_group_document`` and ``fused_argv`` do the same for a group of runs trained together by ``train_fused``.

A training run is a ``python -P -m train ...`` subprocess that keeps the caller's working directory, and every
path in its command line is absolute (resolved against the caller's working directory), so ``--out sweeps/s1``
means the user's ``sweeps/s1`` wherever the command was typed. ``-P`` (Python >= 3.11) keeps the working directory
off the child's module path: a ``train.py`` of the user's own in that folder never replaces the trainer.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

#: The folder that holds ``engine/`` and ``train.py``: the repository root of a checkout, or site-packages.
ROOT = Path(__file__).resolve().parents[2]
#: train.py options whose value is a file or folder.
PATH_OPTIONS = ("--store", "--subset", "--test-store", "--out")


def absolute(path: str | os.PathLike) -> Path:
    """``path`` resolved against the current working directory (symbolic links followed)."""
    return Path(path).resolve()


def absolute_path_options(args: Sequence[str]) -> list[str]:
    """``args`` with the value of every ``PATH_OPTIONS`` option (``--opt VALUE`` or ``--opt=VALUE``) made absolute.

    Parameters
    ----------
    args : sequence of str
        train.py arguments, e.g. ``["--batch", "16", "--test-store", "held.zarr"]``.

    Returns
    -------
    list of str
        The same arguments; only path values change.
    """
    out: list[str] = []
    take = False
    for a in args:
        if take:
            out.append(str(absolute(a)))
            take = False
            continue
        name, eq, value = a.partition("=")
        if name in PATH_OPTIONS and eq:
            out.append(f"{name}={absolute(value)}")
        else:
            out.append(a)
            take = a in PATH_OPTIONS
    return out


@dataclass(frozen=True)
class TrainRun:
    """One training run of ``train.py``. Paths are made absolute (against the current working directory) here.

    Attributes
    ----------
    store : Path
        Patch store of the training backgrounds (and of the held-out ones without ``test_store``).
    out : Path
        Run folder: config.json, log.jsonl, ckpt.pt, metrics.json, samples.png.
    model : str
        A name in ``models.NAMES``.
    rain : str
        Training rain: a preset name or a ``RainSpec.parse`` string.
    iters : int
        Training steps.
    count : int or None
        Training backgrounds selected from the store (``--count``).
    subset : Path or None
        A subset file (``rainsweep select``) instead of ``count``.
    seed : int
        Seed of initialization, selection and training rain.
    test_rain : str or None
        Held-out rain (None: train.py's default).
    test_store : Path or None
        Separate store of held-out backgrounds.
    extra : tuple of str
        Further train.py arguments, passed through after the ones above (path options in it made absolute).
    resume : bool
        Continue from ``out/ckpt.pt``.
    """

    store: Path
    out: Path
    model: str
    rain: str
    iters: int
    count: int | None = None
    subset: Path | None = None
    seed: int = 0
    test_rain: str | None = None
    test_store: Path | None = None
    extra: tuple[str, ...] = ()
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("store", "out", "subset", "test_store"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, absolute(value))
        object.__setattr__(self, "extra", tuple(absolute_path_options(self.extra)))


def train_argv(run: TrainRun, python: str = sys.executable) -> list[str]:
    """The command line of ``run``: ``python -P -m train --store ... --out ... [extra] [--resume]``.

    Parameters
    ----------
    run : TrainRun
        The run.
    python : str
        The interpreter (default: the one running this code).

    Returns
    -------
    list of str
        argv for ``subprocess``; every path in it is absolute.
    """
    return [*train_module_argv(python), *train_args(run)]


def train_args(run: TrainRun) -> list[str]:
    """train.py's arguments for ``run`` (``train_argv`` without the interpreter): ``--store ... --out ... [extra]
    [--resume]``; every path in them is absolute."""
    cmd = ["--store", str(run.store)]
    if run.subset is not None:
        cmd += ["--subset", str(run.subset)]
    if run.count is not None:
        cmd += ["--count", str(run.count)]
    cmd += ["--rain", run.rain]
    if run.test_rain is not None:
        cmd += ["--test-rain", run.test_rain]
    if run.test_store is not None:
        cmd += ["--test-store", str(run.test_store)]
    cmd += ["--model", run.model, "--iters", str(run.iters), "--seed", str(run.seed), "--out", str(run.out),
            *run.extra]
    return cmd + ["--resume"] if run.resume else cmd


def fused_group_document(runs: Sequence[TrainRun]) -> dict:
    """The group file of ``python -m train_fused`` (see train_fused.py) that trains ``runs`` together.

    Parameters
    ----------
    runs : sequence of TrainRun
        The runs, none of them with ``resume`` (a fused group resumes as a whole: ``fused_argv(..., resume=True)``).

    Returns
    -------
    dict
        ``{"runs": [train.py arguments of each run]}``, ready for ``engine.atomic.atomic_write_json``.

    Raises
    ------
    ValueError
        When ``runs`` is empty or a run has ``resume``.
    """
    if not runs:
        raise ValueError("runs: expected at least one run for a fused group")
    if any(r.resume for r in runs):
        raise ValueError(f"{[str(r.out) for r in runs if r.resume]}: a fused group resumes as a whole "
                         f"(fused_argv(..., resume=True)), not run by run")
    return {"runs": [train_args(r) for r in runs]}


def fused_argv(group_file: str | os.PathLike, out: str | os.PathLike, resume: bool = False,
               python: str = sys.executable) -> list[str]:
    """The command line of a fused group: ``python -P -m train_fused --group FILE --out DIR [--resume]``.

    Parameters
    ----------
    group_file : str or os.PathLike
        The group file (``fused_group_document``).
    out : str or os.PathLike
        The group folder (group checkpoint and config.json; every run writes to its own folder).
    resume : bool
        Continue the group from ``out/ckpt.pt``.
    python : str
        The interpreter.

    Returns
    -------
    list of str
        argv for ``subprocess``; every path in it is absolute. It runs in ``train_env(python)`` like train.py.
    """
    cmd = [python, "-P", "-m", "train_fused", "--group", str(absolute(group_file)), "--out", str(absolute(out))]
    return cmd + ["--resume"] if resume else cmd


def train_module_argv(python: str = sys.executable) -> list[str]:
    """The interpreter part of a training command: ``[python, "-P", "-m", "train"]``."""
    return [python, "-P", "-m", "train"]


@functools.lru_cache(maxsize=8)
def finds_own_train(python: str, pythonpath: str) -> bool:
    """Whether ``python -P`` with ``PYTHONPATH=pythonpath`` imports the ``train.py`` in ``ROOT``.

    It does for an installed package (train is a top-level module beside engine) and for a checkout on
    ``PYTHONPATH``; it does not for a checkout used from its own folder without being installed.
    """
    probe = "import importlib.util as u, sys; s = u.find_spec('train'); sys.stdout.write((s and s.origin) or '')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    try:
        res = subprocess.run([python, "-P", "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    origin = res.stdout.strip()
    return res.returncode == 0 and bool(origin) and Path(origin).resolve() == ROOT / "train.py"


def train_env(python: str = sys.executable, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a training subprocess.

    Parameters
    ----------
    python : str
        The interpreter that will run ``-m train``.
    environ : mapping, optional
        The environment to start from (default: ``os.environ``).

    Returns
    -------
    dict
        ``environ`` with ``PYTHONUNBUFFERED=1`` (the child's lines arrive as it prints them, not when a pipe
        buffer fills) and with ``ROOT`` prepended to ``PYTHONPATH`` when the child would not otherwise import the
        ``train.py`` that belongs to this engine.
    """
    env = dict(os.environ if environ is None else environ)
    env["PYTHONUNBUFFERED"] = "1"
    pythonpath = env.get("PYTHONPATH", "")
    if not finds_own_train(python, pythonpath):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), pythonpath]))
    return env


__all__ = ["PATH_OPTIONS", "ROOT", "TrainRun", "absolute", "absolute_path_options", "finds_own_train",
           "fused_argv", "fused_group_document", "train_args", "train_argv", "train_env", "train_module_argv"]
