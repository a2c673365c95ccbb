"""The thread limiter and the timing loop shared by every rainsweep benchmark.

``thread_limit(n)`` gives numba, OpenCV and torch ``n`` threads (and ``OMP_NUM_THREADS=n`` to child processes started
inside the block) and restores each setting on exit, so "1 thread" means one thread for ours and for every peer.

``measure`` and ``time_interleaved`` time zero-argument runners. A runner processes a batch of patches once per call
and returns only when the work is finished (GPU runners synchronize). Each call's rate is ``patches / seconds`` by
the wall clock (``time.perf_counter``) and by this process's CPU time (``time.process_time``, all its threads); a
benchmark reports the median over its repeats. Interleaved timing runs the runners in turns, one repeat each per
round, so load from other processes on a shared machine falls on all of them alike and their ratios stay fair.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import engine  # noqa: F401 - engine.runtime sets OMP_WAIT_POLICY before thread_limit first starts numba's thread pool

#: A benchmark body: processes a batch once per call. ``measure`` takes the patch count from ``patches`` or, when
#: that is None, from the runner's return value.
Runner = Callable[[], Any]

#: Environment variables ``thread_limit`` sets for child processes (worker processes read them at start-up).
THREAD_ENV = ("OMP_NUM_THREADS",)

_current_threads: int | None = None


# ---- threads -------------------------------------------------------------------------------------------------------

def all_threads() -> int:
    """The thread count "all" means.

    Returns
    -------
    int
        numba's thread pool size (``NUMBA_NUM_THREADS``: the CPUs this process may use unless the user set it).
    """
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def parse_threads(text: str) -> list[int]:
    """Parse a thread list such as ``"1,all"``.

    Parameters
    ----------
    text : str
        Comma-separated positive integers or ``all`` (``all_threads()``).

    Returns
    -------
    list of int
        The counts in the given order, duplicates removed.

    Raises
    ------
    ValueError
        For an empty list, a part that is neither an integer nor ``all``, or a count outside ``1..all_threads()``.
    """
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            n = all_threads()
        else:
            try:
                n = int(part)
            except ValueError:
                raise ValueError(f"threads: {part!r} is not a positive integer or 'all' (e.g. '1,all')") from None
            if not 1 <= n <= all_threads():
                raise ValueError(f"threads: {n} is outside 1..{all_threads()} (numba's thread pool size)")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"threads: expected a comma-separated list like '1,all', got {text!r}")
    return out


def _cv2() -> Any:
    """OpenCV when it is installed, else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def apply_threads(n: int) -> None:
    """Set the thread counts of numba, OpenCV, torch and child processes to ``n``, without restoring them.

    Parameters
    ----------
    n : int
        Threads, at least 1. numba gets ``min(n, all_threads())`` (its pool cannot grow); torch is set only when it
        is already imported (importing it only to set its threads would cost seconds).

    Raises
    ------
    ValueError
        When ``n`` is not a positive integer.
    """
    global _current_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads: expected a positive integer, got {n!r}")
    import numba

    numba.set_num_threads(min(n, all_threads()))
    cv2 = _cv2()
    if cv2 is not None:
        cv2.setNumThreads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    for var in THREAD_ENV:
        os.environ[var] = str(n)
    _current_threads = n


def current_threads() -> int:
    """The count set by the innermost active ``thread_limit`` / ``apply_threads``; ``all_threads()`` when none."""
    return _current_threads if _current_threads is not None else all_threads()


@contextlib.contextmanager
def thread_limit(n: int) -> Iterator[int]:
    """Run the block with ``n`` threads for numba, OpenCV, torch and child processes (see ``apply_threads``).

    Every setting is restored on exit: numba's, OpenCV's and torch's counts, the ``THREAD_ENV`` variables and
    ``current_threads()``. torch imported inside the block goes back to ``all_threads()``.

    Parameters
    ----------
    n : int
        Threads, at least 1.

    Yields
    ------
    int
        ``n``.
    """
    global _current_threads
    import numba

    cv2 = _cv2()
    torch = sys.modules.get("torch")
    saved_numba = numba.get_num_threads()
    saved_cv2 = cv2.getNumThreads() if cv2 is not None else None
    saved_torch = torch.get_num_threads() if torch is not None else None
    saved_env = {var: os.environ.get(var) for var in THREAD_ENV}
    saved_current = _current_threads
    apply_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(saved_numba)
        if cv2 is not None:
            cv2.setNumThreads(saved_cv2)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(saved_torch if saved_torch is not None else all_threads())
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        _current_threads = saved_current


# ---- timing --------------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Rates of one runner, one entry per timed repeat.

    Attributes
    ----------
    patches : int or None
        Patches per call; None when the runner returns its own count.
    rates : list of float
        Patches per wall-clock second of each repeat.
    warmup_s : float
        Wall-clock seconds of the untimed warm-up calls (numba compilation, caches).
    cpu_rates : list of float
        Patches per CPU second of this process (all its threads) of each repeat: on a shared, oversubscribed
        machine the honest per-core figure.
    timed_s : float
        Wall-clock seconds of all timed repeats together.
    counted : int
        Patches processed by all timed repeats together.
    """

    patches: int | None
    rates: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    cpu_rates: list[float] = field(default_factory=list)
    timed_s: float = 0.0
    counted: int = 0

    @property
    def median(self) -> float:
        """Median patches per wall-clock second (NaN before any repeat)."""
        return statistics.median(self.rates) if self.rates else math.nan

    @property
    def cpu_median(self) -> float:
        """Median patches per CPU second of this process (NaN before any repeat)."""
        return statistics.median(self.cpu_rates) if self.cpu_rates else math.nan

    @property
    def repeats(self) -> int:
        """Number of timed repeats."""
        return len(self.rates)

    def done(self, seconds: float, min_repeats: int, max_repeats: int | None) -> bool:
        """True once ``max_repeats`` were made, or ``min_repeats`` and ``seconds`` of timed work."""
        if max_repeats is not None and self.repeats >= max_repeats:
            return True
        return self.repeats >= min_repeats and self.timed_s >= seconds


def _check_patches(patches: int | None) -> None:
    if patches is not None and patches <= 0:
        raise ValueError(f"patches: expected a positive patch count, got {patches}")


def warm_up(run: Runner, calls: int = 1, cleanup: Callable[[], None] | None = None) -> float:
    """Call ``run`` ``calls`` times off the clock (numba compiles, caches fill, allocators settle).

    Parameters
    ----------
    run : Runner
        The benchmark body.
    calls : int
        Warm-up calls.
    cleanup : callable, optional
        Called after each call (e.g. deleting a written store).

    Returns
    -------
    float
        Wall-clock seconds of the warm-up calls (``cleanup`` excluded).
    """
    spent = 0.0
    for _ in range(calls):
        t0 = time.perf_counter()
        run()
        spent += time.perf_counter() - t0
        if cleanup is not None:
            cleanup()
    return spent


def time_call(run: Runner, timing: Timing) -> None:
    """Time one call of ``run`` and append its wall and CPU rates to ``timing``.

    Parameters
    ----------
    run : Runner
        The benchmark body; returns its patch count when ``timing.patches`` is None.
    timing : Timing
        Where the repeat is recorded.

    Raises
    ------
    ValueError
        When a counting runner returns something other than a non-negative integer.
    """
    t, c = time.perf_counter(), time.process_time()
    out = run()
    dt, dc = time.perf_counter() - t, time.process_time() - c
    if timing.patches is None:
        if isinstance(out, bool) or not isinstance(out, numbers.Integral) or out < 0:
            raise ValueError(f"runner: expected it to return the number of patches it handled, got {out!r}")
        n = int(out)
    else:
        n = timing.patches
    timing.rates.append(n / max(dt, 1e-12))
    timing.cpu_rates.append(n / max(dc, 1e-9))
    timing.timed_s += dt
    timing.counted += n


def time_interleaved(runs: Sequence[Runner], timings: Sequence[Timing], seconds: float, min_repeats: int = 3,
                     max_repeats: int | None = 30, cleanup: Callable[[], None] | None = None
                     ) -> list[BaseException | None]:
    """Time warmed-up runners in turns until each has ``seconds`` of timed work and ``min_repeats`` repeats.

    Each round makes one repeat of every runner not yet done, in the given order; a runner stops at
    ``max_repeats`` repeats (None: no cap). A runner that raises is dropped and its error returned; the others go on.

    Parameters
    ----------
    runs : sequence of Runner
        The benchmark bodies, already warmed up.
    timings : sequence of Timing
        One per runner, filled in place.
    seconds : float
        Minimum timed wall-clock seconds per runner.
    min_repeats, max_repeats : int
        Bounds on the repeats per runner.
    cleanup : callable, optional
        Called after every timed call, off the clock.

    Returns
    -------
    list of BaseException or None
        Per runner, the error it raised, or None.
    """
    if len(runs) != len(timings):
        raise ValueError(f"timings: expected one per runner ({len(runs)}), got {len(timings)}")
    errors: list[BaseException | None] = [None] * len(runs)
    live = [i for i, t in enumerate(timings) if not t.done(seconds, min_repeats, max_repeats)]
    while live:
        for i in list(live):
            try:
                time_call(runs[i], timings[i])
            except Exception as err:  # one broken runner must not lose the other numbers; the error is returned
                errors[i] = err
                live.remove(i)
                continue
            finally:
                if cleanup is not None:
                    cleanup()
            if timings[i].done(seconds, min_repeats, max_repeats):
                live.remove(i)
    return errors


def measure(run: Runner, patches: int | None, seconds: float = 1.0, min_repeats: int = 3,
            max_repeats: int | None = 30, warmup: int = 1, cleanup: Callable[[], None] | None = None) -> Timing:
    """Time one runner: ``warmup`` untimed calls, then repeats until ``seconds`` of timed work and ``min_repeats``.

    Parameters
    ----------
    run : Runner
        The benchmark body.
    patches : int or None
        Patches per call; None when ``run`` returns its own count.
    seconds : float
        Minimum timed wall-clock seconds.
    min_repeats, max_repeats : int
        Bounds on the repeats (``max_repeats`` None: no cap).
    warmup : int
        Untimed calls first.
    cleanup : callable, optional
        Called after every call, off the clock (deleting a written store is not part of writing it).

    Returns
    -------
    Timing
        Every repeat's rates; report ``Timing.median``.

    Raises
    ------
    ValueError
        When ``patches`` is not positive. Errors of ``run`` propagate.
    """
    _check_patches(patches)
    timing = Timing(patches)
    timing.warmup_s = warm_up(run, warmup, cleanup)
    error = time_interleaved([run], [timing], seconds, min_repeats, max_repeats, cleanup)[0]
    if error is not None:
        raise error
    return timing
