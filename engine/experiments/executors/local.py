"""The local executor: units run as subprocesses of this machine, ``jobs`` at a time (they share its CPUs and GPU).

Each unit's output is appended to its log file and handed to ``Events.line`` as it arrives
(``engine.experiments.logged_run``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from engine.experiments.executors.base import Events, Executor, Outcome, Unit
from engine.experiments.logged_run import run_logged
from engine.experiments.train_command import train_env


def run_unit(unit: Unit, on_line: Callable[[str], None] | None = None, python: str | None = None,
             preexec_fn: Callable[[], None] | None = None) -> Outcome:
    """Run one unit here to its end (resuming when a run folder holds a checkpoint).

    Parameters
    ----------
    unit : Unit
        The unit.
    on_line : callable, optional
        Gets each output line as it arrives (the lines also go to ``unit.log``).
    python : str, optional
        Interpreter to use instead of ``unit.argv[0]``.
    preexec_fn : callable, optional
        Run in the child before the command starts.

    Returns
    -------
    Outcome
        The exit status and the last output lines.
    """
    argv = unit.command(python)
    done = run_logged(argv, unit.log, env=train_env(argv[0]), on_line=on_line, preexec_fn=preexec_fn)
    return Outcome(done.returncode, done.tail)


class LocalExecutor(Executor):
    """Runs units as subprocesses of this machine, ``jobs`` at once.

    Parameters
    ----------
    jobs : int
        Units at once (>= 1).
    """

    name = "local"

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise ValueError(f"jobs: expected >= 1, got {jobs}")
        self.jobs = jobs

    def run(self, units: Sequence[Unit], events: Events) -> None:
        def work(i: int) -> None:
            events.started(i, "")
            events.finished(i, run_unit(units[i], on_line=lambda line: events.line(i, line)))

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(work, range(len(units))))


__all__ = ["LocalExecutor", "run_unit"]
