"""Where a sweep stands: the live view while it runs, and ``rainsweep sweep --status OUT`` afterwards or from another
terminal.

While a sweep runs, ``SweepTracker`` keeps every cell's state (queued, running, done, failed) and writes it to
``OUT/sweep_state.json`` (atomically, at every change and every view interval) with the driver's host, pid and the
time. Progress comes from the run folders themselves: a cell's step and patches/s are the last training record of
its ``log.jsonl``, and a cell whose ``metrics.json`` exists is done, whoever trained it. So ``load_status`` reads the
same picture without running anything, on any machine that sees the sweep folder; a cell recorded as running by a
driver that is gone is reported as interrupted (rerunning the sweep command resumes it from its checkpoint).

The ETA assumes the running cells keep their pace and the sweep keeps as many cells running: the steps left in every
unfinished cell divided by the summed steps/s of the running ones.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from engine.atomic import atomic_write_json
from engine.experiments.executors.base import CHECKPOINT

#: The state file in a sweep folder.
STATE_FILE = "sweep_state.json"
#: Cell states, in the order the summary counts them.
STATES = ("done", "running", "failed", "queued", "interrupted")
#: Bytes read from the end of a log.jsonl to find its last training record.
TAIL_BYTES = 16384
#: Seconds between saves of the state file (the driver's heartbeat) when no live view is shown.
HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class CellView:
    """One cell as the views show it.

    Attributes
    ----------
    name : str
        The run's name (its folder under ``OUT/runs``).
    state : str
        One of ``STATES``.
    iters : int
        Training steps the cell runs to.
    step : int or None
        Last logged step (None: nothing logged yet).
    patches_per_s, steps_per_s : float or None
        Training speed over the last logged window.
    where : str
        Where it runs or ran ("" for this machine, else a Ray node's address).
    attempts : int
        Times it was started in this sweep.
    error : str or None
        Why it failed.
    checkpoint : bool
        Whether its run folder holds a checkpoint (a rerun resumes from it).
    """

    name: str
    state: str
    iters: int
    step: int | None = None
    patches_per_s: float | None = None
    steps_per_s: float | None = None
    where: str = ""
    attempts: int = 0
    error: str | None = None
    checkpoint: bool = False


def last_progress(run_dir: Path) -> dict | None:
    """The last training record (one with ``patches_per_s``) of ``run_dir/log.jsonl``, or None."""
    path = Path(run_dir) / "log.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the tail window or being written
        if isinstance(rec, dict) and "patches_per_s" in rec:
            return rec
    return None


def cell_view(out_dir: Path, name: str, iters: int, state: str, where: str = "", attempts: int = 0,
              error: str | None = None) -> CellView:
    """A cell's view: ``state`` as recorded, except that a finished run folder (``metrics.json``) means done."""
    run_dir = Path(out_dir) / "runs" / name
    if (run_dir / "metrics.json").exists():
        state, error = "done", None
    rec = last_progress(run_dir)
    step = None if rec is None else int(rec["step"])
    if state == "done":
        step = iters
    return CellView(name, state, iters, step, None if rec is None else rec.get("patches_per_s"),
                    None if rec is None else rec.get("steps_per_s"), where, attempts, error,
                    (run_dir / CHECKPOINT).exists())


class SweepTracker:
    """The states of a running sweep's cells, thread-safe, saved to ``OUT/sweep_state.json``.

    Parameters
    ----------
    out_dir : Path
        The sweep folder.
    cells : sequence of (str, int)
        Every cell's name and training steps, in sweep order.
    executor : str
        The executor's name, recorded in the state file.
    view_every : float
        Seconds between the live view's updates, and so between saves of the state file (0: no view, saves every
        ``HEARTBEAT_S``); recorded: ``load_status`` judges a silent driver by it.
    """

    def __init__(self, out_dir: Path, cells: Sequence[tuple[str, int]], executor: str, view_every: float) -> None:
        self.out_dir, self.executor, self.view_every = Path(out_dir), executor, view_every
        self.iters = dict(cells)
        self.cells = {name: {"state": "queued", "where": "", "attempts": 0, "error": None} for name, _ in cells}
        self.started_at = time.time()
        self.lock = threading.Lock()

    def started(self, name: str, where: str = "") -> None:
        """``name`` started (again) on ``where``."""
        with self.lock:
            c = self.cells[name]
            c.update(state="running", where=where, attempts=c["attempts"] + 1)
        self.save()

    def finished(self, name: str, failed: bool, error: str | None = None) -> None:
        """``name`` ended: done, or failed with ``error``."""
        with self.lock:
            self.cells[name].update(state="failed" if failed else "done", error=error if failed else None)
        self.save()

    def views(self) -> list[CellView]:
        """Every cell's view, in sweep order."""
        with self.lock:
            cells = {k: dict(v) for k, v in self.cells.items()}
        return [cell_view(self.out_dir, name, self.iters[name], c["state"], c["where"], c["attempts"], c["error"])
                for name, c in cells.items()]

    def save(self, finished: bool = False) -> None:
        """Write ``OUT/sweep_state.json`` (``finished``: the driver is done with the sweep)."""
        with self.lock:
            state = {"executor": self.executor, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": self.started_at, "updated": time.time(), "finished": finished,
                     "view_every": self.view_every,
                     "cells": [{"name": k, "iters": self.iters[k], **v} for k, v in self.cells.items()]}
            atomic_write_json(self.out_dir / STATE_FILE, state, indent=1)


class LiveView:
    """While the ``with`` block runs: every ``every`` seconds, save the tracker's state file (the driver's heartbeat)
    and hand ``live_lines`` to ``echo``; at its end, save the state file as finished.

    Parameters
    ----------
    tracker : SweepTracker
        The sweep's cell states.
    every : float
        Seconds between views (0: no view; the state file is still saved every ``HEARTBEAT_S``).
    echo : callable
        Gets each line of the view.
    active : bool
        False: no thread (nothing runs), only the final save.
    """

    def __init__(self, tracker: SweepTracker, every: float, echo: Callable[[str], None], active: bool = True) -> None:
        self.tracker, self.every, self.echo = tracker, every, echo
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="sweep-view", daemon=True) if active else None

    def loop(self) -> None:
        while not self.stop.wait(self.every or HEARTBEAT_S):
            self.tracker.save()
            if self.every:
                for line in live_lines(self.tracker.views()):
                    self.echo(line)

    def __enter__(self) -> "LiveView":
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.tracker.save(finished=True)


@dataclass(frozen=True)
class SweepStatus:
    """Where a sweep stands (``load_status``).

    Attributes
    ----------
    cells : list of CellView
        Every cell, in sweep order.
    live : bool
        Whether a driver is running the sweep now.
    note : str
        One line about the driver (which executor, whether it is running, when it was last heard from).
    """

    cells: list[CellView]
    live: bool
    note: str


def driver_alive(state: dict, now: float) -> bool:
    """Whether the driver that wrote ``state`` still runs the sweep: its pid exists (same host), or (another host)
    it wrote within three view intervals (at least 60 s)."""
    if state.get("finished"):
        return False
    if state.get("host") == socket.gethostname():
        try:
            os.kill(int(state["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now - float(state.get("updated", 0)) < max(3 * float(state.get("view_every") or HEARTBEAT_S), 60.0)


def load_status(out_dir: str | os.PathLike, now: float | None = None) -> SweepStatus:
    """Read where the sweep in ``out_dir`` stands, from its state file and run folders; runs nothing.

    Parameters
    ----------
    out_dir : str or os.PathLike
        The sweep folder.
    now : float, optional
        The time (seconds since the epoch) to judge the driver's silence by; default: now.

    Returns
    -------
    SweepStatus
        Cells recorded as running by a driver that is gone are ``interrupted``. Without a state file (a sweep
        from before it existed), the cells are the run folders, with failures from ``results.json``.

    Raises
    ------
    FileNotFoundError
        When ``out_dir`` holds neither a state file nor run folders.
    """
    out_dir = Path(out_dir)
    now = time.time() if now is None else now
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        live = driver_alive(state, now)
        cells = []
        for c in state["cells"]:
            recorded = c["state"] if live or c["state"] != "running" else "interrupted"
            cells.append(cell_view(out_dir, c["name"], int(c["iters"]), recorded, c.get("where", ""),
                                   int(c.get("attempts", 0)), c.get("error")))
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(state["updated"])))
        driver = f"pid {state['pid']} on {state['host']}"
        note = (f"running on the {state['executor']} executor ({driver}; last update {when})" if live else
                f"not running (the {state['executor']} executor's driver, {driver}, last wrote at {when})")
        return SweepStatus(cells, live, note)
    runs = sorted(p for p in (out_dir / "runs").glob("*") if p.is_dir()) if (out_dir / "runs").is_dir() else []
    if not runs:
        raise FileNotFoundError(f"{out_dir}: no sweep here (neither {STATE_FILE} nor run folders under runs/)")
    rows = {}
    if (out_dir / "results.json").exists():
        rows = {r["run"]: r for r in json.loads((out_dir / "results.json").read_text())}
    cells = []
    for run in runs:
        row = rows.get(run.name, {})
        failed = str(row.get("status", "")).startswith("failed")
        iters = int(row.get("iters") or _config_iters(run))
        cells.append(cell_view(out_dir, run.name, iters, "failed" if failed else "interrupted",
                               error=row.get("error") if failed else None))
    return SweepStatus(cells, False, f"no {STATE_FILE} (cells are the run folders found)")


def _config_iters(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "config.json").read_text())["iters"])
    except (OSError, ValueError, KeyError):
        return 0


def eta_seconds(cells: Sequence[CellView]) -> float | None:
    """Seconds until every unfinished cell is done at the running cells' summed pace (None: no pace known)."""
    rate = sum(c.steps_per_s or 0.0 for c in cells if c.state == "running")
    left = sum(c.iters - (c.step or 0) for c in cells if c.state in ("running", "queued", "interrupted"))
    return left / rate if rate > 0 else None


def format_seconds(s: float) -> str:
    """``H:MM:SS``."""
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def summary_line(cells: Sequence[CellView], live: bool = True) -> str:
    """``4 cells: 1 done, 2 running, 0 failed, 1 queued; ETA 0:03:10`` (interrupted counted when any)."""
    counts = {s: sum(c.state == s for c in cells) for s in STATES}
    parts = [f"{counts[s]} {s}" for s in STATES if s != "interrupted" or counts[s]]
    eta = eta_seconds(cells) if live else None
    tail = "" if not live else f"; ETA {'?' if eta is None else format_seconds(eta)}"
    return f"{len(cells)} cells: {', '.join(parts)}{tail}"


def cell_line(c: CellView, width: int) -> str:
    """One cell: name, state, step, patches/s, where, attempts and error."""
    parts = [f"{c.name:<{width}}", f"{c.state:<11}"]
    if c.step is not None:
        parts.append(f"step {c.step}/{c.iters}")
    if c.patches_per_s is not None and c.state in ("running", "interrupted"):
        parts.append(f"{c.patches_per_s:.1f} patches/s")
    if c.where:
        parts.append(f"on {c.where}")
    if c.attempts > 1:
        parts.append(f"attempt {c.attempts}")
    if c.state == "interrupted":
        parts.append("resumes from its checkpoint on rerun" if c.checkpoint else "restarts on rerun")
    if c.error:
        parts.append(f"error: {c.error}")
    return "  ".join(parts).rstrip()


def live_lines(cells: Sequence[CellView]) -> list[str]:
    """The live view: the summary and one line per running cell."""
    running = [c for c in cells if c.state == "running"]
    width = max((len(c.name) for c in running), default=0)
    return [f"sweep: {summary_line(cells)}", *(f"  {cell_line(c, width)}" for c in running)]


def status_lines(out_dir: str | os.PathLike, status: SweepStatus) -> list[str]:
    """``rainsweep sweep --status``: the sweep folder, the driver note, the summary, one line per cell, and what to
    do when the sweep is not running and not finished."""
    width = max((len(c.name) for c in status.cells), default=0)
    lines = [f"sweep {out_dir}: {status.note}", summary_line(status.cells, status.live),
             *(f"  {cell_line(c, width)}" for c in status.cells)]
    if not status.live and any(c.state != "done" for c in status.cells):
        lines.append("rerun the same sweep command to finish it: finished cells are skipped, interrupted ones resume "
                     "from their checkpoints (with either executor)")
    return lines


__all__ = ["CellView", "HEARTBEAT_S", "LiveView", "STATES", "STATE_FILE", "SweepStatus", "SweepTracker", "cell_line", "cell_view",
           "driver_alive", "eta_seconds", "format_seconds", "last_progress", "live_lines", "load_status",
           "status_lines", "summary_line"]
