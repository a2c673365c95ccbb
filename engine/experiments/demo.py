"""``rainsweep demo``: the whole pipeline in a few CPU minutes.

1. builds a small store of 64 x 64 patches from scikit-image's bundled pictures (``builtin:skimage``; procedural
   textures when those are missing), 2. trains a small model (``resnet-s``) on a subset of them with medium rain,
3. evaluates its EMA weights on held-out patches (from source pictures the subset did not use, where possible)
   with held-out ``heldout-layered`` rain, 4. prints the metrics and where the preview image is.

Training runs ``python -P -m train`` in a subprocess (``engine.experiments.train_command``), as sweeps do, and its
output lines show as they arrive. Rerunning reuses the store and a finished run (an interrupted one resumes).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from engine.experiments.logged_run import run_logged
from engine.experiments.train_command import TrainRun, absolute, train_argv, train_env

#: Defaults sized for about 3-5 minutes on 2 CPU cores.
PATCH = 64
COUNT = 32
ITERS = 600
MODEL = "resnet-s"


class DemoError(RuntimeError):
    """A demo step failed; the message says which and where its log is."""


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


def run_demo(out: str | os.PathLike = "rainsweep-demo", iters: int = ITERS, model: str = MODEL, count: int = COUNT,
             patch: int = PATCH, rain: str = "medium", test_rain: str = "heldout-layered",
             python: str = sys.executable, echo: Callable[[str], None] = print) -> dict:
    """Build a small store, train a small model on the CPU and score it on held-out rain, all under ``out``.

    Parameters
    ----------
    out : str or os.PathLike
        Demo folder (created), relative to the current working directory: ``store/`` and ``run/`` go in it.
    iters : int
        Training steps.
    model : str
        A name in ``models.NAMES``.
    count : int
        Training background patches.
    patch : int
        Patch side in pixels of a new store.
    rain : str
        Training rain preset or spec.
    test_rain : str
        Held-out rain preset or spec.
    python : str
        Interpreter that runs ``-m train``.
    echo : callable
        Gets every message: the store's, each training output line (indented) as it arrives, and the summary.

    Returns
    -------
    dict
        The held-out metrics (E_R, E_B, PSNR on the 0..255 scale, ...), as in ``out/run/metrics.json``.

    Raises
    ------
    DemoError
        When training fails or ends without metrics; the message names its log and ends with its last lines.
    """
    out = absolute(out)
    out.mkdir(parents=True, exist_ok=True)
    store = build_store(out / "store", patch, echo)
    run = out / "run"
    if not (run / "metrics.json").exists():
        extra = ("--batch", "16", "--device", "cpu", "--log-every", "25", "--ckpt-every", "100", "--test-count", "32")
        cmd = train_argv(TrainRun(store=store, out=run, model=model, rain=rain, iters=iters, count=count,
                                  test_rain=test_rain, extra=extra, resume=(run / "ckpt.pt").exists()), python)
        echo(f"training {model} for {iters} steps on {count} backgrounds with {rain} rain (CPU) ...")
        done = run_logged(cmd, run / "train.out", env=train_env(python), on_line=lambda line: echo(f"  {line}"))
        if done.returncode != 0:
            raise DemoError(f"training failed (exit {done.returncode}); log: {run / 'train.out'}\n"
                            + "\n".join(done.tail))
        if not (run / "metrics.json").exists():
            raise DemoError(f"training exited 0 but wrote no {run / 'metrics.json'}; log: {run / 'train.out'}\n"
                            + "\n".join(done.tail))
    else:
        echo(f"run: reusing the finished run in {run}")
    metrics = json.loads((run / "metrics.json").read_text())
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    speed = [x["steps_per_s"] for x in log if "steps_per_s" in x]
    echo("")
    echo(f"held-out rain {test_rain!r} on {metrics['heldout']['count']} unseen patches, after {metrics['step']} steps:")
    echo(f"  E_R  {metrics['E_R']:7.2f}   rain removal (higher is better; ceiling {metrics['E_R_ceiling']:.2f})")
    echo(f"  E_B  {metrics['E_B']:7.2f}   background error (lower is better)")
    echo(f"  PSNR {metrics['PSNR']:7.2f}   dB against the clean background")
    if speed:
        echo(f"  speed {speed[-1]:.2f} steps/s (batch 16, {patch} x {patch}, CPU)")
    echo("")
    echo(f"metrics: {run / 'metrics.json'}")
    echo(f"preview: {run / 'samples.png'}  (rows: rainy input | output | ground truth)")
    echo(f"log:     {run / 'log.jsonl'}")
    return metrics
