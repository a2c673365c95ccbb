"""Sweeps: train one model per (background count, training rain) and draw the paper's figures.

Each configuration is a unit of work (``engine.experiments.executors``): a ``python -P -m train ...`` command (the
engine never imports train.py) that writes ``OUT/runs/<model>_<rain>_n<count>_s<seed>/``. An executor runs the
units: the local one as subprocesses of this machine, the Ray one as tasks on a Ray cluster whose nodes share
``OUT``'s storage. A run whose ``metrics.json`` exists is skipped on rerun; one with a checkpoint but no metrics is
resumed (also when a retried unit starts again after its worker died), whichever executor ran it before. While the
units run, ``OUT/sweep_state.json`` records every cell's state and a live view shows it
(``engine.experiments.sweep_status``). Afterwards:

- ``OUT/results.csv`` and ``OUT/results.json``: one row per run (configuration, status, and the held-out E_R, E_B,
  rain residual, PSNR and E_R ceiling);
- ``OUT/figures/er_eb_<model>.png``: E_R (higher is better) and E_B (lower is better) against background count
  (log x), one line per training-rain range;
- ``OUT/samples/<run>.png``: each run's titled rainy input | output | clean rows (copied from the run), and
  ``OUT/figures/samples_<model>.png``: the first sample of every run on one sheet, titled with its E_R / E_B.

Each run's output streams to ``OUT/runs/<name>/train.out`` and, prefixed with the run's name, to the caller's
``echo`` while it trains. Every path reaches train.py absolute (see ``engine.experiments.train_command``), so a
relative ``out`` or store means the same folder wherever the sweep is started.

Several runs on one device: ``jobs`` starts that many train.py processes at once. They share a GPU through the
driver's time slicing (or MPS when it is enabled); small models that leave the GPU idle between kernels gain from
it, large ones do not. Compare the ``patches_per_s`` in the runs' log.jsonl under ``--jobs 1`` and ``--jobs 4`` on
the machine at hand. One process per run keeps checkpoints, resume and the NaN check per run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from engine.atomic import atomic_write, atomic_write_json, atomic_write_text
from engine.experiments.executors.base import Events, Executor, ExecutorError, Outcome, Resources, Unit
from engine.experiments.executors.local import LocalExecutor, run_unit
from engine.experiments.sweep_status import LiveView, SweepTracker
from engine.experiments.train_command import TrainRun, absolute, fused_argv, fused_group_document, train_argv

#: Metric columns of results.csv, in order.
METRICS = ("E_R", "E_B", "rain_residual", "PSNR", "E_R_ceiling")
#: Configuration columns of results.csv, in order.
CONFIG = ("run", "model", "rain", "count", "seed", "iters", "status")


class SweepError(ValueError):
    """Bad sweep arguments or failed runs."""


@dataclass(frozen=True)
class RunConfig:
    """One sweep point: a model trained with one rain on ``count`` backgrounds from one seed.

    Attributes
    ----------
    model : str
        A name in ``models.NAMES``.
    rain : str
        Training rain: a preset name or a ``RainSpec.parse`` string.
    count : int
        Training background patches.
    seed : int
        Training seed.
    """

    model: str
    rain: str
    count: int
    seed: int = 0

    @property
    def name(self) -> str:
        """The run's folder name, ``<model>_<rain>_n<count>_s<seed>`` (rain characters other than letters, digits,
        ``-`` and ``.`` become ``-``)."""
        rain = "".join(c if c.isalnum() or c in "-." else "-" for c in self.rain)
        return f"{self.model}_{rain}_n{self.count}_s{self.seed}"


def parse_list(text: str, name: str, kind: type = str, minimum: int | None = None) -> list:
    """Parse a comma-separated option value: ``"8,16,32"`` -> ``[8, 16, 32]``.

    Parameters
    ----------
    text : str
        The value as typed.
    name : str
        The option's name, for error messages (e.g. ``"--counts"``).
    kind : type
        Converts each item (``str``, ``int``).
    minimum : int, optional
        Smallest allowed value.

    Returns
    -------
    list
        The items, converted.

    Raises
    ------
    SweepError
        Naming the option, when the list is empty, an item does not convert or one is below ``minimum``.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise SweepError(f"{name}: expected a comma-separated list, got {text!r}")
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise SweepError(f"{name}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    if minimum is not None and any(v < minimum for v in values):
        raise SweepError(f"{name}: values must be >= {minimum}, got {text!r}")
    return values


def plan(models: Sequence[str], rains: Sequence[str], counts: Sequence[int], seeds: Sequence[int] = (0,)
         ) -> list[RunConfig]:
    """Every configuration, ordered model -> rain -> count -> seed."""
    return [RunConfig(m, r, c, s) for m in models for r in rains for c in counts for s in seeds]


def cell_unit(cfg: RunConfig, store: str | os.PathLike, out_dir: Path, iters: int, extra: Sequence[str] = (),
              python: str = sys.executable, test_rain: str | None = None,
              test_store: str | os.PathLike | None = None, resources: Resources | None = None) -> Unit:
    """The unit of work that trains one configuration into ``out_dir/runs/<cfg.name>`` (see ``run_one`` for the
    parameters). Its command gets ``--resume`` when the run folder holds a checkpoint as it starts."""
    run_dir = absolute(out_dir) / "runs" / cfg.name
    run = TrainRun(store=store, out=run_dir, model=cfg.model, rain=cfg.rain, iters=iters, count=cfg.count,
                   seed=cfg.seed, test_rain=test_rain, test_store=test_store, extra=tuple(extra))
    return Unit(cfg.name, tuple(train_argv(run, python)), (run_dir,), run_dir / "train.out",
                resources or Resources())


def cell_row(cfg: RunConfig, out_dir: Path, iters: int, outcome: Outcome | None) -> dict:
    """The results row of one configuration after its unit ended with ``outcome`` (None: it was already finished
    and was skipped); copies the run's samples.png to ``out_dir/samples/<cfg.name>.png``. See ``run_one``."""
    out_dir = absolute(out_dir)
    run_dir = out_dir / "runs" / cfg.name
    metrics_path = run_dir / "metrics.json"
    row: dict = {"run": cfg.name, **asdict(cfg), "iters": iters}
    error = None
    if outcome is None:
        row["status"] = "skipped (finished)"
    elif outcome.returncode is None:
        row["status"] = f"failed (lost after {outcome.attempts} attempt(s))"
        error = " | ".join([outcome.error or "", *outcome.tail[-3:]]).strip(" |")
    elif outcome.returncode != 0:
        row["status"] = f"failed (exit {outcome.returncode})"
        error = " | ".join(outcome.tail[-3:])
    elif not metrics_path.exists():
        row["status"] = "failed (exit 0 without metrics.json)"
        error = f"train.py exited 0 but wrote no {metrics_path}; last output: " + " | ".join(outcome.tail[-3:])
    else:
        row["status"] = "trained"
    if metrics_path.exists():
        m = json.loads(metrics_path.read_text())
        row.update({k: m.get(k) for k in METRICS})
        row["iters"] = m.get("step", iters)
        sample = run_dir / "samples.png"
        if sample.exists():
            atomic_write(out_dir / "samples" / f"{cfg.name}.png", sample.read_bytes())
    else:
        row.update({k: None for k in METRICS})
        row["error"] = error
    return row


def finished(cfg: RunConfig, out_dir: Path) -> bool:
    """Whether the configuration's run folder under ``out_dir`` holds its final metrics (a rerun skips it)."""
    return (absolute(out_dir) / "runs" / cfg.name / "metrics.json").exists()


def run_one(cfg: RunConfig, store: str | os.PathLike, out_dir: Path, iters: int, extra: Sequence[str] = (),
            python: str = sys.executable, test_rain: str | None = None,
            test_store: str | os.PathLike | None = None, on_line: Callable[[str], None] | None = None) -> dict:
    """Train one configuration here unless it is finished (a checkpoint without metrics is resumed).

    Parameters
    ----------
    cfg : RunConfig
        The configuration.
    store : str or os.PathLike
        Patch store.
    out_dir : Path
        Sweep folder; the run goes to ``out_dir/runs/<cfg.name>``.
    iters : int
        Training steps.
    extra : sequence of str
        Further train.py arguments.
    python : str
        Interpreter that runs ``-m train``.
    test_rain : str, optional
        Held-out rain (None: train.py's default).
    test_store : str or os.PathLike, optional
        Separate store of held-out backgrounds.
    on_line : callable, optional
        Gets each output line of the run as it arrives (the lines also go to ``runs/<name>/train.out``).

    Returns
    -------
    dict
        The results row: ``CONFIG`` and ``METRICS`` fields (metrics None without ``metrics.json``); a failed run
        also has ``error``, its last output lines. ``status`` is ``trained``, ``skipped (finished)``,
        ``failed (exit N)``, ``failed (exit 0 without metrics.json)`` or, when an executor gave up on the run (its
        worker died more often than retries allow), ``failed (lost after N attempt(s))``.
    """
    if finished(cfg, out_dir):
        return cell_row(cfg, out_dir, iters, None)
    unit = cell_unit(cfg, store, out_dir, iters, extra, python, test_rain, test_store)
    return cell_row(cfg, out_dir, iters, run_unit(unit, on_line=on_line))


# ---- fused groups: runs of one model trained together by train_fused ----------------------------------------------

#: RunConfig fields in which the runs of a fused group may differ (each stream has its own data, rain and seed).
FUSE_VARYING = ("rain", "count", "seed", "subset", "lr")


def fuse_groups(configs: Sequence[RunConfig], k: int) -> list[list[int]]:
    """Indices of ``configs`` in groups of at most ``k`` that can be trained fused: equal in every ``RunConfig``
    field but ``FUSE_VARYING`` (in a sweep, the same model; all other options are the sweep's own).

    Parameters
    ----------
    configs : sequence of RunConfig
        The runs to group.
    k : int
        Largest group (>= 1).

    Returns
    -------
    list of list of int
        Every index once. The runs of one model are cut into ``ceil(n / k)`` groups as even in size as possible
        (10 runs at ``k = 8``: 5 + 5, not 8 + 2: a group takes as long as its size needs), in plan order.
    """
    if k < 1:
        raise SweepError(f"fuse: expected a group size >= 1, got {k}")
    kinds: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        kinds.setdefault(tuple((f, v) for f, v in asdict(cfg).items() if f not in FUSE_VARYING), []).append(i)
    groups = []
    for idx in kinds.values():
        n = -(-len(idx) // k)
        size, bigger = divmod(len(idx), n)
        start = 0
        for g in range(n):
            take = size + (g < bigger)
            groups.append(idx[start:start + take])
            start += take
    return groups


def group_name(configs: Sequence[RunConfig]) -> str:
    """The group folder's name: ``<model>_x<K>_<digest of the run names>`` (the same runs give the same name, so an
    interrupted sweep rerun with the same grouping finds and resumes its groups)."""
    digest = hashlib.sha1("|".join(c.name for c in configs).encode()).hexdigest()[:10]
    return f"{configs[0].model}_x{len(configs)}_{digest}"


def group_command(configs: Sequence[RunConfig], store: str | os.PathLike, out_dir: Path, iters: int,
                  extra: Sequence[str] = (), python: str = sys.executable, test_rain: str | None = None,
                  test_store: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """Write the group file of ``configs`` (from ``fuse_groups``) and return the group's folder and the command
    that trains them together, without ``--resume`` (add it when the group folder holds ``ckpt.pt``).

    The command is one ``python -P -m train_fused`` process that writes each run's folder ``out_dir/runs/<name>``
    as train.py would; the group folder ``out_dir/groups/<group_name>`` gets the group file (``group.json``), the
    group checkpoint and config.json. Parameters are ``run_one``'s.
    """
    out_dir = absolute(out_dir)
    group_dir = out_dir / "groups" / group_name(configs)
    runs = [TrainRun(store=store, out=out_dir / "runs" / c.name, model=c.model, rain=c.rain, iters=iters,
                     count=c.count, seed=c.seed, test_rain=test_rain, test_store=test_store, extra=tuple(extra))
            for c in configs]
    group_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(group_dir / "group.json", fused_group_document(runs), indent=2)
    return group_dir, fused_argv(group_dir / "group.json", group_dir, python=python)


def group_unit(configs: Sequence[RunConfig], store: str | os.PathLike, out_dir: Path, iters: int,
               extra: Sequence[str] = (), python: str = sys.executable, test_rain: str | None = None,
               test_store: str | os.PathLike | None = None, resources: Resources | None = None) -> Unit:
    """The unit of work that trains ``configs`` (from ``fuse_groups``) together as one fused model
    (``group_command``); its command gets ``--resume`` when the group folder holds the group checkpoint as it
    starts (run folders of a fused group never hold one). Output goes to ``<group folder>/train.out``."""
    out_dir = absolute(out_dir)
    group_dir, argv = group_command(configs, store, out_dir, iters, extra, python, test_rain, test_store)
    run_dirs = tuple(out_dir / "runs" / c.name for c in configs)
    return Unit(group_dir.name, tuple(argv), (group_dir, *run_dirs), group_dir / "train.out",
                resources or Resources())


def option_value(args: Sequence[str], name: str, default: str) -> str:
    """The value of the last ``name VALUE`` or ``name=VALUE`` in the train.py arguments ``args``, else ``default``."""
    value = default
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def fused_tasks(configs: Sequence[RunConfig], out_dir: Path, fuse: int | str, store, extra: Sequence[str],
                echo: Callable[[str], None]) -> list[list[int]]:
    """The sweep's work items under ``--fuse``: groups of unfinished runs (``fuse_groups``), one item per other run.

    Finished runs, and runs with a checkpoint of their own (an interrupted unfused run, resumed by train.py), stay
    alone. ``fuse="auto"`` picks the group size per model with ``engine.bench.train.pick_fuse_k`` on the sweep's
    device, batch and patch size, and says what it picked and why through ``echo``.
    """
    alone, pending = [], []
    for i, c in enumerate(configs):
        run_dir = out_dir / "runs" / c.name
        done = (run_dir / "metrics.json").exists() or (run_dir / "ckpt.pt").exists()
        (alone if done else pending).append(i)
    if fuse == "auto":
        from engine.bench.train import pick_fuse_k
        from engine.data.store import open_store

        patch = int(open_store(store).patch_size)
        batch, device = int(option_value(extra, "--batch", "16")), option_value(extra, "--device", "auto")
        ks = {}
        for model in dict.fromkeys(configs[i].model for i in pending):
            n = sum(configs[i].model == model for i in pending)
            ks[model] = pick_fuse_k(model, batch, patch, device, max_k=n, echo=echo) if n > 1 else 1
    else:
        ks = dict.fromkeys((configs[i].model for i in pending), int(fuse))
    tasks = []
    for model, k in ks.items():
        idx = [i for i in pending if configs[i].model == model]
        tasks += [[idx[j] for j in g] for g in fuse_groups([configs[i] for i in idx], k)]
    return tasks + [[i] for i in alone]


def write_results(out_dir: Path, rows: list[dict], extra_columns: Sequence[str] = ()) -> None:
    """Write ``rows`` to ``out_dir/results.json`` (every field) and ``out_dir/results.csv`` (the ``CONFIG``,
    ``METRICS`` and ``extra_columns`` columns; empty cells for missing values), each atomically."""
    atomic_write_json(out_dir / "results.json", rows, indent=2)
    buf = io.StringIO()
    fields = [*CONFIG, *METRICS, *extra_columns]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(out_dir / "results.csv", buf.getvalue())


def _savefig(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def plot_results(out_dir: Path, rows: list[dict], test_rain: str = "") -> list[Path]:
    """Per model, ``out_dir/figures/er_eb_<model>.png``: E_R and E_B (0..255 scale) against background count (log2
    x), one line per training rain (mean over seeds). Rows without metrics are left out; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    (out_dir / "figures").mkdir(exist_ok=True)
    done = [r for r in rows if r.get("E_R") is not None]
    paths = []
    for model in sorted({r["model"] for r in done}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for rain in sorted({r["rain"] for r in done if r["model"] == model}, key=_rain_order):
            pts = [r for r in done if r["model"] == model and r["rain"] == rain]
            counts = sorted({r["count"] for r in pts})
            for ax, key in zip(axes, ("E_R", "E_B")):
                ys = [np.nanmean([float(r[key]) for r in pts if r["count"] == c]) for c in counts]
                ax.plot(counts, ys, marker="o", label=f"{rain} rain")
        for ax, key, note in zip(axes, ("E_R", "E_B"), ("rain removal, higher is better",
                                                         "background error, lower is better")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("training background patches")
            ax.set_ylabel(f"{key} (0..255 scale)")
            ax.set_title(f"{key}: {note}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{model}" + (f", tested on {test_rain} rain" if test_rain else ""))
        path = out_dir / "figures" / f"er_eb_{model}.png"
        _savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def sample_sheet(out_dir: Path, rows: list[dict]) -> list[Path]:
    """Per model, ``out_dir/figures/samples_<model>.png``: for every run with a copied sample in ``out_dir/samples``,
    the column titles and first row of its samples.png (rainy input | output | clean), titled with the run's rain,
    background count and held-out E_R / E_B; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.experiments.figures import read_grid_rows

    paths = []
    for model in sorted({r["model"] for r in rows}):
        runs = [r for r in rows if r["model"] == model and (out_dir / "samples" / f"{r['run']}.png").exists()]
        if not runs:
            continue
        fig, axes = plt.subplots(len(runs), 1, figsize=(6, 2.6 * len(runs)), squeeze=False)
        for ax, r in zip(axes[:, 0], runs):
            ax.imshow(read_grid_rows(out_dir / "samples" / f"{r['run']}.png", rows=1), interpolation="nearest")
            scores = "" if r.get("E_R") is None else f": E_R {r['E_R']:.2f}, E_B {r['E_B']:.2f}"
            ax.set_title(f"{r['rain']} rain, {r['count']} backgrounds, seed {r.get('seed', 0)}{scores}", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{model}: a held-out sample of each run (E_R higher is better, E_B lower is better)",
                     fontsize=9)
        path = out_dir / "figures" / f"samples_{model}.png"
        (out_dir / "figures").mkdir(exist_ok=True)
        _savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _rain_order(name: str) -> tuple:
    order = {"small": 0, "medium": 1, "large": 2, "random": 3}
    return (order.get(name, 9), name)


def sweep(store: str | os.PathLike, counts: Sequence[int], rains: Sequence[str], models: Sequence[str],
          iters: int, out: str | os.PathLike, seeds: Sequence[int] = (0,), extra: Sequence[str] = (),
          jobs: int = 1, test_rain: str = "", test_store: str | os.PathLike | None = None,
          python: str = sys.executable, echo: Callable[[str], None] = print, executor: Executor | None = None,
          resources: Resources | None = None, view_every: float = 30.0, fuse: int | str | None = None
          ) -> list[dict]:
    """Train every configuration (skipping finished ones), then write the results and figures.

    Parameters
    ----------
    store : str or os.PathLike
        Patch store (``rainsweep precompute``); relative paths are read against the current working directory.
    counts : sequence of int
        Training background counts; each must be below the store's patch count (the rest holds the held-out set).
    rains : sequence of str
        Training rain presets or ``RainSpec.parse`` strings.
    models : sequence of str
        Model names (``models.NAMES``).
    iters : int
        Training steps per run.
    out : str or os.PathLike
        Sweep folder (created); relative to the current working directory.
    seeds : sequence of int
        Training seeds, one run per seed.
    extra : sequence of str
        Further train.py arguments (e.g. ``["--batch", "16"]``); path values in them are made absolute.
    jobs : int
        Runs at once with the default (local) executor (see the module docstring).
    test_rain : str
        Held-out rain preset or spec, passed to every run and named in figure titles ("": train.py's default).
    test_store : str or os.PathLike, optional
        Separate store of held-out backgrounds, or a paired store (``rainsweep precompute-pairs``) whose stored
        rainy images every run is scored on. Without it every run is scored on the same held-out patches of
        ``store``: those outside the largest (nested) training selection.
    python : str
        Interpreter that runs ``-m train``.
    echo : callable
        Gets every progress message: each run's output lines as ``<run> | <line>``, one line per finished run,
        the live view (``sweep: ...`` lines every ``view_every`` seconds) and the figure paths.
    executor : Executor, optional
        Where the runs execute (default: ``LocalExecutor(jobs)``, subprocesses of this machine); e.g. a
        ``RayExecutor``. The results are the same whichever runs them. The caller closes it.
    resources : Resources, optional
        What each run asks of the executor (CPUs, GPUs; used by the Ray executor); default: the executor's.
    view_every : float
        Seconds between live views (0: none). ``OUT/sweep_state.json`` records the cells' states for
        ``rainsweep sweep --status`` either way.
    fuse : int or "auto", optional
        Train unfinished runs of one model together, up to ``fuse`` at a time, each group as one fused model (one
        ``python -m train_fused`` unit of work, ``group_command``; results are written as for unfused runs);
        ``"auto"`` measures the device and picks the group size per model (``fused_tasks``). ``jobs`` then counts
        units (groups and single runs).

    Returns
    -------
    list of dict
        One results row per configuration (see ``run_one``), also in ``out/results.json`` and ``results.csv``.

    Raises
    ------
    SweepError
        For a count the store cannot hold, ``jobs < 1`` or a path the executor's workers cannot see (before any
        run), or naming the failed runs (after the results are written).
    """
    from engine.data.paired_store import is_paired_store
    from engine.data.store import open_store

    paired = test_store is not None and is_paired_store(test_store)  # scored on its stored rain: figures say so
    shown_rain = f"paired:{Path(test_store).name}" if paired else test_rain
    store = str(absolute(store))
    st = open_store(store)
    too_big = [c for c in counts if c >= st.count]
    if too_big:
        raise SweepError(f"--counts {','.join(map(str, too_big))}: the store holds only {st.count} patches, and some "
                         f"must stay out of training for the held-out set; use smaller counts or a larger store")
    if jobs < 1:
        raise SweepError(f"jobs: expected >= 1, got {jobs}")
    out_dir = absolute(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = plan(models, rains, counts, seeds)
    # Every run is scored on the same held-out patches: those outside the largest (nested) training selection.
    if test_store is None and not any(str(a).startswith(("--test-store", "--heldout-exclude-count")) for a in extra):
        extra = [*extra, "--heldout-exclude-count", str(max(counts))]
    executor = executor or LocalExecutor(jobs)
    resources = resources or executor.resources
    rows: list[dict | None] = [None] * len(configs)
    # Each unit of work trains the cells (indices into configs) of its group: one cell, or a fused group.
    tasks = fused_tasks(configs, out_dir, fuse, store, extra, echo) if fuse else [[i] for i in range(len(configs))]
    groups = [g for g in tasks if len(g) > 1 or not finished(configs[g[0]], out_dir)]
    units = [cell_unit(configs[g[0]], store, out_dir, iters, extra, python, test_rain or None, test_store, resources)
             if len(g) == 1 else group_unit([configs[i] for i in g], store, out_dir, iters, extra, python,
                                            test_rain or None, test_store, resources)
             for g in groups]
    tracker = SweepTracker(out_dir, [(c.name, iters) for c in configs], executor.name, view_every)
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            echo(text)

    def record(i: int, row: dict) -> None:
        failed = row["status"].startswith("failed")
        tracker.finished(configs[i].name, failed, row.get("error"))
        with lock:
            rows[i] = row
            metrics = "" if row.get("E_R") is None else f"  E_R {row['E_R']:.2f}  E_B {row['E_B']:.2f}"
            echo(f"[{sum(r is not None for r in rows)}/{len(configs)}] {configs[i].name}: {row['status']}{metrics}")
            write_results(out_dir, [r for r in rows if r is not None])

    pending = {i for g in groups for i in g}
    for i in range(len(configs)):
        if i not in pending:
            record(i, cell_row(configs[i], out_dir, iters, None))
    if units:
        inputs = {"--store": Path(store), **({} if test_store is None else {"--test-store": absolute(test_store)})}
        try:
            executor.check_visible(out_dir, inputs)
        except ExecutorError as err:
            raise SweepError(str(err)) from None

    def started(k: int, where: str) -> None:
        if len(groups[k]) > 1:
            say(f"{units[k].name}: training {', '.join(configs[i].name for i in groups[k])} as one fused model")
        for i in groups[k]:
            tracker.started(configs[i].name, where)

    def ended(k: int, outcome: Outcome) -> None:
        for i in groups[k]:
            row = cell_row(configs[i], out_dir, iters, outcome)
            if len(groups[k]) > 1:
                row["group"] = units[k].name
            record(i, row)

    events = Events(started=started, line=lambda k, text: say(f"{units[k].name} | {text}"), finished=ended)
    try:
        with LiveView(tracker, view_every, say, active=bool(units)):
            executor.run(units, events)
    except ExecutorError as err:
        raise SweepError(str(err)) from None
    final = [r for r in rows if r is not None]
    write_results(out_dir, final)
    figs = plot_results(out_dir, final, shown_rain) + sample_sheet(out_dir, final)
    for p in figs:
        echo(f"figure: {p}")
    failed = [r["run"] for r in final if r["status"].startswith("failed")]
    if failed:
        raise SweepError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see runs/<name>/train.out)")
    return final
