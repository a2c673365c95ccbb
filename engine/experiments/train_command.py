"""How sweeps and the demo start ``train.py``: the interpreter, its module path and the run's paths.

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
        ``environ`` with ``ROOT`` prepended to ``PYTHONPATH`` when the child would not otherwise import the
        ``train.py`` that belongs to this engine.
    """
    env = dict(os.environ if environ is None else environ)
    pythonpath = env.get("PYTHONPATH", "")
    if not finds_own_train(python, pythonpath):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), pythonpath]))
    return env


__all__ = ["PATH_OPTIONS", "ROOT", "absolute", "absolute_path_options", "finds_own_train", "train_env",
           "train_module_argv"]
