"""The Ray executor: every unit is a Ray task that asks for its CPUs and GPUs and runs the unit's command on
whichever node Ray places it, writing its run folders under the sweep folder, which every node must see (shared
storage mounted at the same path).

- **Visibility.** Before any unit runs, the driver writes a token file into the sweep folder and one task per node
  that could run a unit reads it back (and checks the stores exist); a node that cannot see a path stops the sweep
  with a message naming the path and the node. Each task checks again before it starts its command (nodes that
  join later).
- **Faults.** A task whose worker process or node dies is retried by Ray (``max_retries``); the retried command
  resumes from the unit's last checkpoint (``Unit.command``). The command is tied to its worker
  (``PR_SET_PDEATHSIG``), so a killed worker leaves no training process behind to race its retry. A command that
  fails on its own (bad option, NaN loss) is an ordinary outcome, reported and not retried.
- **Output.** The task appends a ``# ray: ...`` line (node, worker pid) and the command's output to the unit's log;
  the driver follows the logs of its running units and hands their new lines to ``Events.line``, so the live view
  and the lines shown are the same as the local executor's.

Ray itself is imported only when an executor is made: the local executor never needs it
(``pip install "rainsweep[ray]"``).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Callable, Mapping, Sequence

from engine.atomic import atomic_write_text
from engine.experiments.executors.base import (Events, Executor, ExecutorError, Outcome, Resources, Unit,
                                               path_problem, visible_token_path)
from engine.experiments.executors.local import run_unit

#: First characters of the line a task writes to a unit's log when it starts an attempt.
HEADER = "# ray: "
#: Linux prctl option: the signal a process gets when its parent thread exits.
PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGKILL the child when its parent dies (None elsewhere). libc's ``prctl``
    is looked up here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def node_address() -> str:
    """This Ray node's IP address (inside a Ray worker)."""
    import ray.util

    return ray.util.get_node_ip_address()


def path_problems(checks: Sequence[tuple[str, str, str | None]]) -> list[str]:
    """What this process cannot use of ``checks``, each ``(label, path, token or None)``
    (``engine.experiments.executors.base.path_problem``)."""
    return [p for label, path, token in checks if (p := path_problem(label, Path(path), token)) is not None]


def check_task(checks: Sequence[tuple[str, str, str | None]]) -> tuple[str, list[str]]:
    """Ray task body: ``(node address, path_problems(checks))``."""
    return node_address(), path_problems(checks)


def unit_task(unit: Unit, driver_python: str, checks: Sequence[tuple[str, str, str | None]]) -> dict:
    """Ray task body: run ``unit`` on this node, as ``run_unit`` would locally.

    The driver's interpreter is replaced by this worker's (nodes may install Python elsewhere). Returns a dict with
    ``returncode`` (None when a path check failed), ``tail``, ``error`` and ``where`` (this node's address).
    """
    where = node_address()
    problems = path_problems(checks)
    if problems:
        return {"returncode": None, "tail": [], "error": f"Ray node {where}: " + "; ".join(problems), "where": where}
    unit.log.parent.mkdir(parents=True, exist_ok=True)
    with open(unit.log, "a", encoding="utf-8") as log:
        log.write(f"{HEADER}node {where}, worker pid {os.getpid()}" + (", resuming" if unit.resumes() else "")
                  + "\n")
    python = sys.executable if unit.argv[0] == driver_python else None
    done = run_unit(unit, python=python, preexec_fn=die_with_parent())
    return {"returncode": done.returncode, "tail": list(done.tail), "error": None, "where": where}


class LogFollower:
    """New complete lines of a growing log file, from a start offset (the size it had when the unit was submitted).

    Parameters
    ----------
    path : Path
        The log file (may not exist yet).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.partial = b""

    def new_lines(self, final: bool = False) -> list[str]:
        """Lines completed since the last call (``final``: the unfinished last one too)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            data = b""
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        return [ln.decode("utf-8", errors="replace") for ln in lines]


class RayExecutor(Executor):
    """Runs units as Ray tasks on a Ray cluster.

    Parameters
    ----------
    address : str, optional
        ``auto`` (the cluster this machine belongs to), ``HOST:PORT`` (a head node's GCS) or
        ``ray://HOST:PORT`` (Ray Client); None: ``RAY_ADDRESS`` if set, else a new single-machine cluster.
    cpus_per_run, gpus_per_run : float
        Resources each unit asks for (fractional GPUs let several units share one).
    max_retries : int
        Times a unit whose worker or node died is started again (it resumes from its last checkpoint).
    python : str
        The driver's interpreter, as the units' ``argv[0]`` names it (replaced by each worker's own).
    poll_s : float
        Seconds between looks at the running units' logs.
    init_options : mapping, optional
        Further ``ray.init`` arguments (e.g. ``{"num_cpus": 2}`` for a new local cluster).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 max_retries: int = 3, python: str = sys.executable, poll_s: float = 0.5,
                 init_options: Mapping | None = None) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {max_retries}")
        try:
            import ray
        except ImportError:
            raise ExecutorError('--executor ray needs Ray: pip install "rainsweep[ray]" (or pip install ray) on '
                                'this machine and on every node of the cluster') from None
        self.resources = Resources(cpus_per_run, gpus_per_run)
        self.max_retries, self.python, self.poll_s = max_retries, python, poll_s
        self.checks: list[tuple[str, str, str | None]] = []
        self.token_file: Path | None = None
        self.owns_connection = not ray.is_initialized()
        if self.owns_connection:
            options = dict(init_options or {})
            options.setdefault("log_to_driver", False)  # the driver follows each unit's log itself
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # a new one-machine cluster: nothing beyond this machine needs to reach it
                options.setdefault("include_dashboard", False)
                options.setdefault("_node_ip_address", "127.0.0.1")
            try:
                ray.init(address=address, **options)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise ExecutorError(f"--address {address}: cannot connect to a Ray cluster ({err})") from None

    def nodes(self) -> list[dict]:
        """The alive nodes that offer at least one unit's resources (``ray.nodes()`` entries)."""
        import ray

        r = self.resources
        return [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0.0) >= r.cpus
                and n["Resources"].get("GPU", 0.0) >= r.gpus]

    def check_visible(self, out_dir: Path, inputs: Mapping[str, Path]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = self.nodes()
        if not nodes:
            have = sorted({(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
                           for n in ray.nodes() if n.get("Alive")})
            raise ExecutorError(f"no Ray node offers {self.resources.cpus:g} CPU and {self.resources.gpus:g} GPU "
                                f"per run (nodes offer CPU, GPU: {have}); lower --cpus-per-run / --gpus-per-run")
        token = uuid.uuid4().hex
        self.token_file = visible_token_path(out_dir)
        atomic_write_text(self.token_file, token, fsync=True)
        self.checks = [("--out", str(out_dir), token), *((k, str(p), None) for k, p in inputs.items())]
        task = ray.remote(check_task)
        refs = [task.options(num_cpus=0, max_retries=1, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(self.checks) for n in nodes]
        try:
            answers = ray.get(refs, timeout=600)
        except ray.exceptions.GetTimeoutError:
            raise ExecutorError("no answer within 600 s from the Ray nodes asked whether they see the sweep's "
                                "paths") from None
        bad = [f"Ray node {where}: {p}" for where, problems in answers for p in problems]
        if bad:
            raise ExecutorError("; ".join(bad) + ". Every node must see the sweep folder and the stores at the same "
                                "path (shared storage such as NFS); pass paths on such storage")

    def run(self, units: Sequence[Unit], events: Events) -> None:
        import ray

        task = ray.remote(unit_task)
        pending: dict = {}
        follow: dict[int, LogFollower] = {}
        attempts = [0] * len(units)
        where = [""] * len(units)
        for i, unit in enumerate(units):
            r = unit.resources
            follow[i] = LogFollower(unit.log)
            ref = task.options(num_cpus=r.cpus, num_gpus=r.gpus, max_retries=self.max_retries, retry_exceptions=False,
                               name=unit.name).remote(unit, self.python, self.checks)
            pending[ref] = i

        def read(i: int, final: bool = False) -> None:
            for line in follow[i].new_lines(final):
                if line.startswith("$ "):
                    continue  # the command itself, as run_logged records it
                if line.startswith(HEADER):
                    attempts[i] += 1
                    where[i] = line[len(HEADER):].split(",")[0].removeprefix("node ")
                    events.started(i, where[i])
                events.line(i, line)

        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.poll_s)
                for i in pending.values():
                    read(i)
                for ref in ready:
                    i = pending.pop(ref)
                    read(i, final=True)
                    events.finished(i, self.outcome(ref, attempts[i], where[i]))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def outcome(self, ref, attempts: int, where: str) -> Outcome:
        """The ``Outcome`` of a finished task (a lost one when Ray gave up on it)."""
        import ray

        try:
            res = ray.get(ref)
        except ray.exceptions.RayError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return Outcome(None, (), f"{type(err).__name__} after {attempts} attempt(s) "
                                     f"(--max-retries {self.max_retries}): {reason}", attempts, where)
        return Outcome(res["returncode"], tuple(res["tail"]), res["error"], max(attempts, 1), res["where"])

    def close(self) -> None:
        import ray

        if self.token_file is not None:
            self.token_file.unlink(missing_ok=True)
            self.token_file = None
        if self.owns_connection and ray.is_initialized():
            ray.shutdown()


__all__ = ["HEADER", "LogFollower", "RayExecutor", "check_task", "die_with_parent", "node_address", "path_problems",
           "unit_task"]
