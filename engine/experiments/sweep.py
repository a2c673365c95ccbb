"""Sweeps: train one model per (background count, training rain) and draw the paper's figures.

Each configuration runs ``python -P -m train ...`` as a subprocess (the engine never imports train.py) into
``OUT/runs/<model>_<rain>_n<count>_s<seed>/``. A run whose ``metrics.json`` exists is skipped on rerun; one with a
checkpoint but no metrics is resumed. Afterwards:

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

Fused runs: ``fuse=K`` trains up to K unfinished runs of one model together as one fused model (``python -P -m
train_fused``, grouped convolutions over K streams of data: HFTA, Wang et al., MLSys 2021), which fills a GPU that
one small model leaves idle. Each run still gets its own folder, written as train.py writes it, so results.csv has
the same rows and columns; the group's checkpoint and output are in ``OUT/groups/<group>/``, and a group resumes
as a whole. ``fuse="auto"`` times fused steps on the device and picks the largest K whose step time grows
sub-linearly (``engine.bench.train.pick_fuse_k``); on a CPU that is usually 1 (no fusing).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from engine.atomic import atomic_write, atomic_write_json, atomic_write_text
from engine.experiments.logged_run import Finished, run_logged
from engine.experiments.train_command import (TrainRun, absolute, fused_argv, fused_group_document, train_argv,
                                              train_env)

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


def run_one(cfg: RunConfig, store: str | os.PathLike, out_dir: Path, iters: int, extra: Sequence[str] = (),
            python: str = sys.executable, test_rain: str | None = None,
            test_store: str | os.PathLike | None = None, on_line: Callable[[str], None] | None = None) -> dict:
    """Train one configuration unless it is finished (a checkpoint without metrics is resumed).

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
        ``failed (exit N)`` or ``failed (exit 0 without metrics.json)``.
    """
    out_dir = absolute(out_dir)
    run_dir = out_dir / "runs" / cfg.name
    if (run_dir / "metrics.json").exists():
        return result_row(cfg, out_dir, iters, "skipped (finished)")
    run = TrainRun(store=store, out=run_dir, model=cfg.model, rain=cfg.rain, iters=iters, count=cfg.count,
                   seed=cfg.seed, test_rain=test_rain, test_store=test_store, extra=tuple(extra),
                   resume=(run_dir / "ckpt.pt").exists())
    done = run_logged(train_argv(run, python), run_dir / "train.out", env=train_env(python), on_line=on_line)
    return result_row(cfg, out_dir, iters, *outcome(done, run_dir / "metrics.json", "train.py"))


def outcome(done: Finished, metrics_path: Path, program: str) -> tuple[str, str | None]:
    """``(status, error)`` of a training process that ended as ``done`` and should have written ``metrics_path``."""
    if done.returncode != 0:
        return f"failed (exit {done.returncode})", " | ".join(done.tail[-3:])
    if not metrics_path.exists():
        return "failed (exit 0 without metrics.json)", (f"{program} exited 0 but wrote no {metrics_path}; last "
                                                        f"output: " + " | ".join(done.tail[-3:]))
    return "trained", None


def result_row(cfg: RunConfig, out_dir: Path, iters: int, status: str, error: str | None = None) -> dict:
    """The results row of ``cfg`` (see ``run_one``) from its run folder under ``out_dir`` (absolute); copies its
    samples.png to ``out_dir/samples``. ``error`` is kept only when the run has no ``metrics.json``."""
    run_dir = out_dir / "runs" / cfg.name
    metrics_path = run_dir / "metrics.json"
    row: dict = {"run": cfg.name, **asdict(cfg), "iters": iters, "status": status}
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


def run_group(configs: Sequence[RunConfig], store: str | os.PathLike, out_dir: Path, iters: int,
              extra: Sequence[str] = (), python: str = sys.executable, test_rain: str | None = None,
              test_store: str | os.PathLike | None = None, on_line: Callable[[str], None] | None = None
              ) -> list[dict]:
    """Train ``configs`` (from ``fuse_groups``; none finished) together as one fused model (``group_command``),
    resuming the group when its folder holds a checkpoint; output to ``<group folder>/train.out``. Parameters are
    ``run_one``'s.

    Returns
    -------
    list of dict
        One results row per run, as ``run_one`` returns them, with ``group`` (the group folder's name) added.
    """
    out_dir = absolute(out_dir)
    group_dir, argv = group_command(configs, store, out_dir, iters, extra, python, test_rain, test_store)
    if (group_dir / "ckpt.pt").exists():
        argv.append("--resume")
    done = run_logged(argv, group_dir / "train.out", env=train_env(python), on_line=on_line)
    rows = []
    for c in configs:
        status, error = outcome(done, out_dir / "runs" / c.name / "metrics.json", "train_fused")
        note = None if error is None else f"{error} (fused group: see {group_dir / 'train.out'})"
        rows.append({**result_row(c, out_dir, iters, status, note), "group": group_dir.name})
    return rows


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


def write_results(out_dir: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``out_dir/results.json`` (every field) and ``out_dir/results.csv`` (the ``CONFIG`` and
    ``METRICS`` columns; empty cells for missing metrics), each atomically."""
    atomic_write_json(out_dir / "results.json", rows, indent=2)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*CONFIG, *METRICS], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in (*CONFIG, *METRICS)})
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
          python: str = sys.executable, echo: Callable[[str], None] = print, fuse: int | str | None = None
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
        Runs at once (see the module docstring).
    test_rain : str
        Held-out rain preset or spec, passed to every run and named in figure titles ("": train.py's default).
    test_store : str or os.PathLike, optional
        Separate store of held-out backgrounds. Without it every run is scored on the same held-out patches of
        ``store``: those outside the largest (nested) training selection.
    python : str
        Interpreter that runs ``-m train``.
    echo : callable
        Gets every progress message: each run's output lines as ``<run> | <line>`` (a fused group's as
        ``<group> | <line>``), one line per finished run, and the figure paths.
    fuse : int or "auto", optional
        Train unfinished runs of one model together, up to ``fuse`` at a time, each group as one fused model
        (``run_group``; results are written as for unfused runs); ``"auto"`` measures the device and picks the
        group size per model (``fused_tasks``). ``jobs`` then counts groups.

    Returns
    -------
    list of dict
        One results row per configuration (see ``run_one``), also in ``out/results.json`` and ``results.csv``.

    Raises
    ------
    SweepError
        For a count the store cannot hold or ``jobs < 1`` (before any run), or naming the failed runs (after the
        results are written).
    """
    from engine.data.store import open_store

    store = str(absolute(store))
    st = open_store(store)
    too_big = [c for c in counts if c >= st.count]
    if too_big:
        raise SweepError(f"--counts {','.join(map(str, too_big))}: the store holds only {st.count} patches, and some "
                         f"must stay out of training for the held-out set; use smaller counts or a larger store")
    if jobs < 1:
        raise SweepError(f"jobs: expected >= 1, got {jobs}")
    if fuse is not None and fuse != "auto" and not (isinstance(fuse, int) and fuse >= 1):
        raise SweepError(f"fuse: expected a group size >= 1 or 'auto', got {fuse!r}")
    out_dir = absolute(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = plan(models, rains, counts, seeds)
    # Every run is scored on the same held-out patches: those outside the largest (nested) training selection.
    if test_store is None and not any(str(a).startswith(("--test-store", "--heldout-exclude-count")) for a in extra):
        extra = [*extra, "--heldout-exclude-count", str(max(counts))]
    rows: list[dict | None] = [None] * len(configs)
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            echo(text)

    tasks = fused_tasks(configs, out_dir, fuse, store, extra, echo) if fuse else [[i] for i in range(len(configs))]

    def work(task: list[int]) -> None:
        if len(task) == 1:
            name = configs[task[0]].name
            done = [run_one(configs[task[0]], store, out_dir, iters, extra, python, test_rain or None, test_store,
                            on_line=lambda line: say(f"{name} | {line}"))]
        else:
            group = [configs[i] for i in task]
            name = group_name(group)
            say(f"{name}: training {', '.join(c.name for c in group)} as one fused model")
            done = run_group(group, store, out_dir, iters, extra, python, test_rain or None, test_store,
                             on_line=lambda line: say(f"{name} | {line}"))
        with lock:
            for i, row in zip(task, done):
                rows[i] = row
                metrics = "" if row.get("E_R") is None else f"  E_R {row['E_R']:.2f}  E_B {row['E_B']:.2f}"
                echo(f"[{sum(r is not None for r in rows)}/{len(configs)}] {configs[i].name}: {row['status']}"
                     f"{metrics}")
            write_results(out_dir, [r for r in rows if r is not None])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, tasks))
    final = [r for r in rows if r is not None]
    write_results(out_dir, final)
    figs = plot_results(out_dir, final, test_rain) + sample_sheet(out_dir, final)
    for p in figs:
        echo(f"figure: {p}")
    failed = [r["run"] for r in final if r["status"].startswith("failed")]
    if failed:
        raise SweepError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see runs/<name>/train.out, or "
                         f"groups/<group>/train.out for runs trained fused)")
    return final
