"""``rainsweep demo``: the paper's finding in a few CPU minutes.

A deraining network trained on few backgrounds learns what a background looks like and removes rain of a kind it
never saw; one trained on many backgrounds learns the training rain and leaves new rain in place (X. Hu et al.,
*Revisiting the Generalization Problem of Low-level Vision Models Through the Lens of Image Deraining*, extending
arXiv:2305.14709). The demo

1. builds a store of 32 x 32 patches from scikit-image's bundled pictures (``builtin:skimage``; procedural
   textures when those are missing),
2. trains one small model (``resnet-s``) per background count (8 and 512 by default) on medium rain, all runs at
   once with one CPU thread each, every run choosing its backgrounds from the same nested selection of patches with
   visible structure (sharpness ``SHARPNESS``),
3. scores each on the same held-out patches (none of them in any run's selection) with held-out
   ``heldout-layered`` rain,
4. prints E_R / E_B side by side with one line saying what to look at, and writes ``comparison.png``: rainy input,
   each model's output and the clean background for a few held-out patches with visible content.

Training runs ``python -P -m train`` in subprocesses (``engine.experiments.train_command``), as sweeps do, and their
output lines show as they arrive, prefixed by the run's name. Rerunning reuses the store and finished runs (an
interrupted one resumes).
"""
from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from engine.experiments.logged_run import run_logged
from engine.experiments.train_command import TrainRun, absolute, train_argv, train_env

#: Defaults sized for at most 5 minutes on 2 CPU cores (both runs together).
PATCH = 32
COUNTS = (8, 512)
ITERS = 2000
MODEL = "resnet-s"
#: Short runs need a faster start than the paper's recipe (lr 2e-4, EMA 0.999, which averages over ~1000 steps and
#: would still hold much of the initial network after 2000 steps).
LR = 1e-3
EMA = 0.99
BATCH = 16
#: Training backgrounds come only from patches with this sharpness (0..255-scale Laplacian variance): flat patches
#: (dark sky, empty microscope fields) teach a network nothing about backgrounds and make a few-background run
#: depend on which flat patches it drew.
SHARPNESS = "100:"
#: Held-out patches scored, and how many of them (the most visible) comparison.png shows.
TEST_COUNT = 64
SHOW = 4


class DemoError(RuntimeError):
    """A demo step failed; the message says which and where its log is."""


@dataclass(frozen=True)
class DemoRun:
    """One model of the demo.

    Attributes
    ----------
    count : int
        Training background patches.
    out : Path
        Its train.py output folder.
    """

    count: int
    out: Path

    @property
    def name(self) -> str:
        """Short name used as the prefix of its output lines."""
        return f"n{self.count}"

    @property
    def label(self) -> str:
        """What the run was trained on, for tables and figure titles."""
        return f"{self.count} backgrounds"


def build_store(path: Path, patch: int = PATCH, echo: Callable[[str], None] = print) -> Path:
    """Build (or reuse, or finish building) a store of ``patch`` x ``patch`` patches from the built-in pictures.

    Parameters
    ----------
    path : Path
        Store folder.
    patch : int
        Patch side in pixels (also the grid stride); used only when the store is created.
    echo : callable
        Gets one line saying what happened.

    Returns
    -------
    Path
        ``path``.
    """
    from engine.data.precompute import precompute
    from engine.data.store import open_store

    if path.exists():
        try:
            if open_store(path).complete:
                echo(f"store: reusing {path}")
                return path
        except ValueError:
            pass  # incomplete or not a store: precompute finishes it or explains
    try:
        summary = precompute("builtin:skimage", path, patch=patch, stride=patch, progress=False)
    except Exception as err:  # no usable pictures: fall back to the procedural textures
        echo(f"store: builtin:skimage failed ({err}); using builtin:procedural")
        summary = precompute("builtin:procedural", path, patch=patch, stride=patch, progress=False)
    echo(f"store: {summary.patches} patches of {patch} x {patch} from {summary.images} pictures -> {path}")
    return path


def run_env(python: str, threads: int) -> dict[str, str]:
    """The environment of one training run that gets ``threads`` CPU threads.

    numba's parallel kernels otherwise start one OpenMP thread per core in every run, and OpenMP threads started
    before ``OMP_WAIT_POLICY`` is read spin between kernels: runs side by side would then take the cores their
    partners need. Values the user set win.
    """
    env = train_env(python)
    env.setdefault("NUMBA_NUM_THREADS", str(threads))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def train_all(store: Path, runs: Sequence[DemoRun], iters: int, model: str, rain: str, test_rain: str,
              python: str, echo: Callable[[str], None]) -> None:
    """Train every run that has no ``metrics.json`` yet, all at once, each with its share of the CPU cores.

    Every run selects its backgrounds with the same seed and sharpness band, so a smaller selection lies inside a
    larger one, and keeps the largest selection out of its held-out set: all runs are scored on the same patches.

    Raises
    ------
    DemoError
        Naming each run that failed or wrote no metrics, with its log and last lines.
    """
    todo = [r for r in runs if not (r.out / "metrics.json").exists()]
    for r in runs:
        if r not in todo:
            echo(f"{r.name}: reusing the finished run in {r.out}")
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 2) // len(todo))
    extra = ("--batch", str(BATCH), "--lr", str(LR), "--ema", str(EMA), "--sharpness", SHARPNESS,
             "--heldout-exclude-count", str(max(r.count for r in runs)), "--test-count", str(TEST_COUNT),
             "--device", "cpu", "--threads", str(threads), "--log-every", "100", "--ckpt-every", "500")
    lock = threading.Lock()
    width = max(len(r.name) for r in runs)

    def say(text: str) -> None:
        with lock:
            echo(text)

    def work(r: DemoRun) -> str | None:
        cmd = train_argv(TrainRun(store=store, out=r.out, model=model, rain=rain, iters=iters, count=r.count,
                                  test_rain=test_rain, extra=extra, resume=(r.out / "ckpt.pt").exists()), python)
        done = run_logged(cmd, r.out / "train.out", env=run_env(python, threads),
                          on_line=lambda line: say(f"  {r.name:<{width}} | {line}"))
        if done.returncode != 0:
            return f"{r.name}: training failed (exit {done.returncode}); log: {r.out / 'train.out'}\n" + "\n".join(
                done.tail)
        if not (r.out / "metrics.json").exists():
            return (f"{r.name}: training exited 0 but wrote no {r.out / 'metrics.json'}; log: {r.out / 'train.out'}"
                    "\n" + "\n".join(done.tail))
        return None

    echo(f"training {len(todo)} x {model} for {iters} steps with {rain} rain on "
         f"{', '.join(r.label for r in todo)}, at once ({threads} CPU thread{'s' * (threads > 1)} each) ...")
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        errors = [e for e in pool.map(work, todo) if e]
    if errors:
        raise DemoError("\n".join(errors))


def summary_lines(runs: Sequence[DemoRun], metrics: Sequence[dict], test_rain: str) -> list[str]:
    """The side-by-side table of the runs' held-out metrics and the line that says what to look at.

    Parameters
    ----------
    runs : sequence of DemoRun
        The runs, fewest backgrounds first.
    metrics : sequence of dict
        Their ``metrics.json`` contents, in the same order.
    test_rain : str
        Held-out rain name.

    Returns
    -------
    list of str
        Lines to print; every number appears with two decimals, as in ``metrics.json`` rounded.
    """
    first = metrics[0]
    held = first.get("heldout", {})
    where = {"disjoint-sources": "cut from pictures no run trained on",
             "test-store": "of the separate test store"}.get(held.get("policy"), "no run trained on")
    steps = sorted({m["step"] for m in metrics})
    lines = [f"held-out: {held.get('count', '?')} patches {where}, with {test_rain!r} rain (a kind no run trained "
             f"on), after {' / '.join(map(str, steps))} steps{' each' * (len(steps) == 1)}:",
             f"  {'model':<28} {'E_R':>8} {'E_B':>8} {'PSNR':>8}",
             f"  {'(higher / lower is better)':<28} {'higher':>8} {'lower':>8} {'higher':>8}"]
    for r, m in zip(runs, metrics):
        lines.append(f"  {m.get('model', '?') + ', ' + r.label:<28} {m['E_R']:8.2f} {m['E_B']:8.2f} "
                     f"{m['PSNR']:8.2f}")
    lines.append(f"  {'clean background (ceiling)':<28} {first['E_R_ceiling']:8.2f} {0:8.2f} {'':>8}")
    lines.append("")
    lines.append(verdict(runs, metrics))
    return lines


def verdict(runs: Sequence[DemoRun], metrics: Sequence[dict]) -> str:
    """One line saying what to look at, true to the numbers: the E_R of the fewest against the most backgrounds."""
    few, many = runs[0], runs[-1]
    er_few, er_many = metrics[0]["E_R"], metrics[-1]["E_R"]
    ceiling = metrics[0]["E_R_ceiling"]
    if er_few > er_many:
        eb_few, eb_many = metrics[0]["E_B"], metrics[-1]["E_B"]
        price = (f" The price: it also alters more of the background (E_B {eb_few:.1f} vs {eb_many:.1f})."
                 if eb_few > eb_many else "")
        return (f"look at E_R: the model trained on {few.label} removes more of the unseen rain (E_R {er_few:.1f} "
                f"vs {er_many:.1f}, ceiling {ceiling:.1f}): it learned the background, not the rain; the one trained "
                f"on {many.label} learned the training rain and leaves rain of a new kind in place.{price}")
    return (f"look at E_R: here the model trained on {few.label} does not remove more of the unseen rain than the one "
            f"trained on {many.label} (E_R {er_few:.1f} vs {er_many:.1f}, ceiling {ceiling:.1f}); short runs hide "
            f"the effect (the default is {ITERS} steps).")


def heldout_outputs(store: Path, runs: Sequence[DemoRun], metrics: Sequence[dict], test_rain: str, n: int):
    """The held-out set the runs were scored on, and each run's output on its ``n`` most visible patches.

    The set is rebuilt as train.py built it (the patches outside the largest nested selection, the held-out seed
    and rain of the runs' metrics.json) and checked against the digest of its indices that every run recorded.

    Returns
    -------
    held : HeldOut
        The held-out set (``engine.experiments.heldout``).
    pick : np.ndarray
        int64 [n], positions in ``held`` of the shown patches (``engine.experiments.figures.visible_patches``).
    outputs : list of np.ndarray
        Per run, float32 NHWC [n, P, P, 3] on the 0..255 scale: the EMA weights' output, unclipped.

    Raises
    ------
    DemoError
        When a run has no model.pt or the rebuilt set is not the one a run was scored on.
    """
    import numpy as np
    import torch

    import models
    from engine.data.select import select
    from engine.data.store import open_store
    from engine.experiments.figures import visible_patches
    from engine.experiments.heldout import build_heldout
    from engine.rain import RainSpec

    st = open_store(store)
    largest = max(r.count for r in runs)
    seed = metrics[0].get("heldout", {}).get("seed", 1000)
    excluded = np.asarray(select(st, largest, sharpness=SHARPNESS, seed=0).indices, dtype=np.int64)
    held = build_heldout(st, excluded, RainSpec.parse(test_rain), count=TEST_COUNT, seed=seed)
    digest = held.describe()["indices_sha256"]
    for r, m in zip(runs, metrics):
        if m.get("heldout", {}).get("indices_sha256") != digest:
            raise DemoError(f"{r.name}: {r.out / 'metrics.json'} was scored on another held-out set than the "
                            f"demo's (remove {r.out} and rerun)")
    pick = visible_patches(held.background, n)
    x = torch.from_numpy(np.ascontiguousarray(held.rainy[pick])).permute(0, 3, 1, 2).float().div_(255.0)
    outputs = []
    for r, m in zip(runs, metrics):
        path = r.out / "model.pt"
        if not path.exists():
            raise DemoError(f"{r.name}: no {path} to draw its output")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = models.build(saved["model"])
        net.load_state_dict(saved["ema"])
        net.eval()
        with torch.no_grad():
            outputs.append(net(x).mul_(255.0).permute(0, 2, 3, 1).numpy())
    return held, pick, outputs


def write_comparison(path: Path, store: Path, runs: Sequence[DemoRun], metrics: Sequence[dict], test_rain: str,
                     n: int = SHOW) -> Path:
    """Write the comparison sheet: per shown held-out patch, rainy input | each run's output | clean.

    Columns are titled with what each shows and, for the models, their E_R / E_B on the whole held-out set;
    patches are nearest-neighbour upscaled to at least ``engine.experiments.figures.MIN_TILE`` pixels.

    Returns
    -------
    Path
        ``path``.
    """
    import numpy as np

    from engine.experiments.figures import write_grid

    held, pick, outputs = heldout_outputs(store, runs, metrics, test_rain, n)
    tiles = np.stack([held.rainy[pick].astype(np.float32), *outputs, held.background[pick].astype(np.float32)],
                     axis=1)
    titles = [f"rainy input\n({test_rain} rain)",
              *(f"trained on {r.label}\nE_R {m['E_R']:.1f}  E_B {m['E_B']:.1f}" for r, m in zip(runs, metrics)),
              f"clean\nE_R ceiling {metrics[0]['E_R_ceiling']:.1f}"]
    write_grid(path, tiles, titles)
    return path


def run_demo(out: str | os.PathLike = "rainsweep-demo", iters: int = ITERS, model: str = MODEL,
             counts: Sequence[int] = COUNTS, patch: int = PATCH, rain: str = "medium",
             test_rain: str = "heldout-layered", python: str = sys.executable,
             echo: Callable[[str], None] = print) -> dict[int, dict]:
    """Build a small store, train one small model per background count on the CPU, compare them on held-out rain.

    Parameters
    ----------
    out : str or os.PathLike
        Demo folder (created), relative to the current working directory: ``store-<patch>/``, ``runs/<run>/`` and
        ``comparison.png`` go in it.
    iters : int
        Training steps of each run.
    model : str
        A name in ``models.NAMES``.
    counts : sequence of int
        Training background patches of each run (at least two distinct counts).
    patch : int
        Patch side in pixels of the store.
    rain : str
        Training rain preset or spec.
    test_rain : str
        Held-out rain preset or spec.
    python : str
        Interpreter that runs ``-m train``.
    echo : callable
        Gets every message: the store's, each training output line (prefixed by its run) as it arrives, the
        table and the paths.

    Returns
    -------
    dict
        Per count, the run's held-out metrics (E_R, E_B, PSNR on the 0..255 scale, ...), as in its metrics.json.

    Raises
    ------
    DemoError
        When training fails or ends without metrics (the message names each failed run's log and ends with its
        last lines), or fewer than two distinct counts are given.
    """
    counts = sorted(set(int(c) for c in counts))
    if len(counts) < 2 or counts[0] < 1:
        raise DemoError(f"counts: expected at least two distinct positive background counts, got {counts}")
    out = absolute(out)
    out.mkdir(parents=True, exist_ok=True)
    store = build_store(out / f"store-{patch}", patch, echo)
    runs = [DemoRun(c, out / "runs" / f"{model}_p{patch}_i{iters}_n{c}") for c in counts]
    train_all(store, runs, iters, model, rain, test_rain, python, echo)
    metrics = [json.loads((r.out / "metrics.json").read_text()) for r in runs]
    echo("")
    for line in summary_lines(runs, metrics, test_rain):
        echo(line)
    echo("")
    try:
        figure = write_comparison(out / "comparison.png", store, runs, metrics, test_rain)
        echo(f"comparison: {figure}  (columns: rainy input | each model's output | clean)")
    except DemoError as err:
        echo(f"comparison: not drawn: {err}")
    for r in runs:
        echo(f"{r.name}: {r.out / 'metrics.json'}, {r.out / 'samples.png'}, {r.out / 'log.jsonl'}")
    return {r.count: m for r, m in zip(runs, metrics)}


__all__ = ["BATCH", "COUNTS", "DemoError", "DemoRun", "EMA", "ITERS", "LR", "MODEL", "PATCH", "SHARPNESS", "SHOW",
           "TEST_COUNT", "build_store", "heldout_outputs", "run_demo", "run_env", "summary_lines", "train_all",
           "verdict", "write_comparison"]
