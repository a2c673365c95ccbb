"""What an executor runs and how it reports back: a ``Unit`` of work, its ``Outcome``, the ``Events`` it fires, and
the ``Executor`` interface that the local and the Ray executors implement.

A unit is a command line (``argv[0]`` is a Python interpreter) that writes one or more run folders: one training
run of a sweep, or a group of runs that one process trains together. Its output goes to its ``log`` file (appended
to, so every attempt's lines stay). It resumes on its own: the command gets ``resume_flag`` when, at the moment it
starts, one of its run folders holds a checkpoint, so a unit retried after its process died continues from the
checkpoint the previous attempt left, and a sweep rerun after an interruption resumes wherever it stopped, whichever
executor ran it before.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

#: The checkpoint file of a run folder (train.py's ``ckpt.pt``); its presence means "resume".
CHECKPOINT = "ckpt.pt"


class ExecutorError(RuntimeError):
    """An executor cannot run the sweep at all (no cluster, a path a node cannot see, resources no node offers)."""


@dataclass(frozen=True)
class Resources:
    """What one unit asks of the machine that runs it.

    Attributes
    ----------
    cpus : float
        CPU cores (a Ray resource request; fractions allowed).
    gpus : float
        GPUs; a fraction lets several units share one GPU (e.g. 0.25: four small runs per GPU).
    """

    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"resources: cpus and gpus must be >= 0, got cpus={self.cpus}, gpus={self.gpus}")


@dataclass(frozen=True)
class Unit:
    """One unit of work: a command that writes one or more run folders.

    Attributes
    ----------
    name : str
        Shown in progress lines (a run's name, or a group's).
    argv : tuple of str
        The command; ``argv[0]`` is the Python interpreter (a remote executor substitutes its worker's own when
        this is the driver's). Paths in it are absolute.
    run_dirs : tuple of Path
        The run folders the command writes (absolute).
    log : Path
        File that gets the command's merged stdout and stderr, appended to.
    resources : Resources
        What the unit asks for.
    resume_flag : str or None
        Appended to ``argv`` when a run folder holds a checkpoint as the unit starts (None: never).
    """

    name: str
    argv: tuple[str, ...]
    run_dirs: tuple[Path, ...]
    log: Path
    resources: Resources = field(default_factory=Resources)
    resume_flag: str | None = "--resume"

    def resumes(self) -> bool:
        """Whether the unit, started now, would resume (one of its run folders holds a checkpoint)."""
        return self.resume_flag is not None and any((d / CHECKPOINT).exists() for d in self.run_dirs)

    def command(self, python: str | None = None) -> list[str]:
        """The command to start now: ``argv`` (with ``python`` in place of ``argv[0]`` when given), plus
        ``resume_flag`` when ``resumes()``."""
        argv = [python or self.argv[0], *self.argv[1:]]
        return argv + [self.resume_flag] if self.resumes() else argv


@dataclass(frozen=True)
class Outcome:
    """How a unit ended.

    Attributes
    ----------
    returncode : int or None
        The command's exit status (negative: killed by that signal); None when the executor lost the unit
        (its worker died more often than retries allow, or it could not be run at all).
    tail : tuple of str
        The command's last output lines.
    error : str or None
        Why the executor lost the unit (with ``returncode`` None).
    attempts : int
        How many times the command was started.
    where : str
        Where it ran last ("" on this machine; a Ray node's address).
    """

    returncode: int | None
    tail: tuple[str, ...] = ()
    error: str | None = None
    attempts: int = 1
    where: str = ""


def _ignore(*args: object) -> None:
    return None


@dataclass(frozen=True)
class Events:
    """Callbacks an executor fires while it runs units (indices into the list it was given). They may be called
    from several threads at once.

    Attributes
    ----------
    started : callable
        ``started(i, where)``: unit ``i`` started (again, on a retry) on ``where`` ("" for this machine).
    line : callable
        ``line(i, text)``: an output line of unit ``i``, without its line end.
    finished : callable
        ``finished(i, outcome)``: unit ``i`` ended; called once per unit.
    """

    started: Callable[[int, str], None] = _ignore
    line: Callable[[int, str], None] = _ignore
    finished: Callable[[int, Outcome], None] = _ignore


class Executor(ABC):
    """Runs units of work somewhere: this machine's processes (``LocalExecutor``) or a Ray cluster
    (``RayExecutor``). Use as a context manager, or call ``close``."""

    #: Short name, as ``--executor`` spells it.
    name: str = ""
    #: What a unit asks for unless it says otherwise.
    resources: Resources = Resources()

    def check_visible(self, out_dir: Path, inputs: Mapping[str, Path]) -> None:
        """Make sure whatever runs the units sees ``out_dir`` (and can write there) and every path of ``inputs``
        (option name -> path). The local executor runs where the caller is: nothing to check.

        Raises
        ------
        ExecutorError
            Naming the path and the place that cannot see it.
        """

    @abstractmethod
    def run(self, units: Sequence[Unit], events: Events) -> None:
        """Run every unit to its end, firing ``events``; returns when all have finished."""

    def close(self) -> None:
        """Release what the executor holds (a cluster connection)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def visible_token_path(out_dir: Path) -> Path:
    """The file through which a remote executor checks that a node sees ``out_dir``."""
    return Path(out_dir) / ".rainsweep-visible"


def path_problem(label: str, path: Path, token: str | None = None) -> str | None:
    """Why this process cannot use ``path`` (None when it can). With ``token``, ``path`` is a sweep folder that must
    hold the token file written by the driver with that content, and be writable; otherwise it must exist.

    Parameters
    ----------
    label : str
        The option that named the path (``--out``, ``--store``), for the message.
    path : Path
        The path as the driver spells it (absolute).
    token : str, optional
        The token the driver wrote to ``visible_token_path(path)``.

    Returns
    -------
    str or None
        A message naming the option and the path, or None.
    """
    path = Path(path)
    if token is None:
        return None if path.exists() else f"{label} {path}: does not exist here"
    marker = visible_token_path(path)
    try:
        seen = marker.read_text()
    except OSError as err:
        return f"{label} {path}: cannot read {marker.name} that the driver wrote there ({err.strerror or err})"
    if seen != token:
        return f"{label} {path}: a different folder of that name is mounted here (its {marker.name} differs)"
    probe = path / f".rainsweep-write-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"{label} {path}: not writable here ({err.strerror or err})"
    return None


__all__ = ["CHECKPOINT", "Events", "Executor", "ExecutorError", "Outcome", "Resources", "Unit", "path_problem",
           "visible_token_path"]
