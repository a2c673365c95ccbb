"""Scoring finished runs on test stores after training (``rainsweep evaluate``), so one sweep can be scored on
several test sets: paired stores (Rain100L and the like, ``rainsweep precompute-pairs``) and synthetic ones.

A target is a run's ``model.pt``, a run folder holding one, or a sweep folder (every ``runs/<name>/model.pt``). A
test store is either

- a paired store: every stored rainy image is scored as it is, with the mask of its rain layer estimate
  (``engine.experiments.heldout.build_paired_heldout``); or
- a patch store: ``count`` of its patches (chosen by ``seed``, as train.py's ``--test-store``) with held-out rain
  ``rain`` synthesized on the fly (``build_heldout``).

Each test set has a name (default: the store's folder name without ``.zarr``, plus ``-<rain>`` for a patch store).
Per run and test set, ``<run>/eval/<name>.json`` holds the metrics (E_R, E_B, rain residual, PSNR: means over
images, as train.py's metrics.json; E_R ceiling), what identifies the test set and the sha256 of the model file, and
``<run>/eval/<name>.png`` a sample sheet (rainy input | output | clean). A rerun reuses a result whose model file
and test set are unchanged. In a sweep folder, ``results.json`` and ``results.csv`` gain the columns
``<name>.E_R``, ``<name>.E_B``, ``<name>.rain_residual``, ``<name>.PSNR`` and ``<name>.E_R_ceiling``, one group per
test set scored so far (a later ``rainsweep sweep`` rewrites both files without them; run evaluate again: its results
are kept per run, so that is quick).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine.atomic import atomic_write_json
from engine.experiments.heldout import DEFAULT_COUNT, HeldOut, HeldOutError, build_heldout, build_paired_heldout
from engine.experiments.sweep import METRICS, write_results

#: Folder of a run that holds its evaluations.
EVAL_DIR = "eval"
#: Defaults of a synthetic test set: train.py's.
DEFAULT_RAIN, DEFAULT_SEED = "heldout-layered", 1000


class EvaluateError(ValueError):
    """A target that holds no model, a store that cannot be used, or a name already taken by another test set."""


@dataclass(frozen=True)
class TestSet:
    """A named held-out set to score runs on.

    Attributes
    ----------
    name : str
        Column prefix and file name (``<run>/eval/<name>.json``).
    held : HeldOut
        The images (``engine.experiments.heldout``).
    identity : dict
        What identifies the set: ``kind`` ("paired" or "synthetic"), the store's path and fingerprint, and the
        threshold (paired) or the rain, count and seed (synthetic).
    """

    name: str
    held: HeldOut
    identity: dict

    def __post_init__(self) -> None:
        # as it reads back from <run>/eval/<name>.json (tuples become lists), so a rerun recognizes the set
        object.__setattr__(self, "identity", json.loads(json.dumps(self.identity)))


@dataclass(frozen=True)
class RunModel:
    """A finished run: its name, its ``model.pt`` and its folder."""

    name: str
    model: Path
    run_dir: Path


def default_name(store: str | os.PathLike, rain: str | None = None) -> str:
    """The test set name of ``store``: its folder name without ``.zarr``, with ``-<rain>`` for a synthetic set;
    characters other than letters, digits, ``-``, ``_`` and ``.`` become ``-``."""
    name = Path(store).resolve().name
    name = name[:-5] if name.lower().endswith(".zarr") else name
    if rain:
        name = f"{name}-{rain}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name) or "test"


def load_test_set(store: str | os.PathLike, name: str | None = None, rain: str = DEFAULT_RAIN,
                  count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> TestSet:
    """The test set of ``store``: a paired store as it is, or a patch store with synthesized held-out rain.

    Parameters
    ----------
    store : str or os.PathLike
        A paired store or a patch store.
    name : str, optional
        The set's name (default ``default_name``).
    rain, count, seed
        Held-out rain (preset or spec), number of patches and seed of a patch store (ignored for a paired store).

    Raises
    ------
    EvaluateError
        The store cannot be opened, or the rain spec does not parse.
    """
    from engine.data.paired_store import is_paired_store
    from engine.data.store import StoreError, open_store
    from engine.rain import RainSpec

    path = Path(store).resolve()
    try:
        if is_paired_store(path):
            held = build_paired_heldout(path)
            identity = {"kind": "paired", "store": str(path), "fingerprint": held.paired["fingerprint"],
                        "threshold": held.paired["threshold"]}
            return TestSet(name or default_name(path), held, identity)
        spec = RainSpec.parse(rain)
        patches = open_store(path)
        held = build_heldout(patches, np.empty(0, np.int64), spec, count=count, seed=seed, test_store=patches)
    except (HeldOutError, StoreError, ValueError) as err:
        raise EvaluateError(f"--store {store}: {err}") from None
    identity = {"kind": "synthetic", "store": str(path), "fingerprint": patches.fingerprint,
                "rain": held.rain.describe(), "count": int(len(held.indices)), "seed": int(seed)}
    return TestSet(name or default_name(path, spec.name), held, identity)


def find_runs(target: str | os.PathLike) -> tuple[list[RunModel], Path | None]:
    """The finished runs of ``target`` and, for a sweep folder, the folder.

    Parameters
    ----------
    target : str or os.PathLike
        A ``model.pt`` file, a run folder holding one, or a sweep folder (``runs/<name>/model.pt``).

    Returns
    -------
    runs : list of RunModel
        Sorted by name (a sweep's runs without a model.pt, unfinished, are left out).
    sweep_dir : Path or None
        The sweep folder, when ``target`` is one.

    Raises
    ------
    EvaluateError
        ``target`` holds no model.
    """
    p = Path(target).resolve()
    if p.is_file():
        return [RunModel(p.parent.name, p, p.parent)], None
    if (p / "model.pt").is_file():
        return [RunModel(p.name, p / "model.pt", p)], None
    if (p / "runs").is_dir():
        runs = [RunModel(d.name, d / "model.pt", d) for d in sorted((p / "runs").iterdir())
                if (d / "model.pt").is_file()]
        if not runs:
            raise EvaluateError(f"{target}: a sweep folder, but none of its runs has finished (no runs/*/model.pt)")
        return runs, p
    raise EvaluateError(f"{target}: expected a model.pt file, a run folder holding model.pt or a sweep folder "
                        f"holding runs/*/model.pt")


def load_model(path: Path, device):
    """The network of a run's ``model.pt`` (train.py's final EMA weights) on ``device``, in eval mode; and the
    file's contents without the weights (``model`` name, ``step``)."""
    import torch

    import models

    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        net = models.build(saved["model"])
        net.load_state_dict(saved["ema"])
    except Exception as err:  # a damaged or foreign file: name it, whatever torch raised
        raise EvaluateError(f"{path}: not a rainsweep model.pt ({type(err).__name__}: {err})") from None
    return net.to(device).eval(), {k: v for k, v in saved.items() if k != "ema"}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def score_run(run: RunModel, test: TestSet, device, batch: int, overwrite: bool = False) -> tuple[dict, bool]:
    """Score one run on one test set, or reuse its earlier result.

    Returns
    -------
    result : dict
        The metrics (``METRICS``), ``name``, ``test`` (the set's identity), ``heldout`` (``HeldOut.describe``),
        ``model``, ``step`` and ``model_sha256``; also in ``<run>/eval/<name>.json``.
    reused : bool
        True when an earlier result for the same model file and test set was returned.

    Raises
    ------
    EvaluateError
        ``<run>/eval/<name>.json`` holds a result for another test set and ``overwrite`` is False.
    """
    from engine.experiments.scoring import rain_ceiling, save_samples, score

    path = run.run_dir / EVAL_DIR / f"{test.name}.json"
    sha = file_sha256(run.model)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("test") == test.identity and old.get("model_sha256") == sha:
            return old, True
        if old.get("test") != test.identity and not overwrite:
            raise EvaluateError(f"{path} holds a result named {test.name!r} for another test set "
                                f"({old.get('test', {}).get('store')}); pass another --name, or --overwrite")
    net, saved = load_model(run.model, device)
    metrics, output = score(net, test.held, device, batch)
    result = {**metrics, "E_R_ceiling": rain_ceiling(test.held), "name": test.name, "test": test.identity,
              "heldout": test.held.describe(), "model": saved.get("model"), "step": saved.get("step"),
              "model_sha256": sha}
    save_samples(path.with_suffix(".png"), test.held, output)
    atomic_write_json(path, result, indent=2)
    return result, False


def columns(name: str) -> list[str]:
    """The results columns of test set ``name``: ``<name>.<metric>`` for each of ``METRICS``."""
    return [f"{name}.{k}" for k in METRICS]


def add_columns(sweep_dir: Path, scored: dict[str, dict[str, dict]]) -> list[dict]:
    """Add the scores to the sweep's results.json / results.csv (rows matched by ``run``; runs without a row get
    one) and rewrite both; returns the rows.

    Parameters
    ----------
    sweep_dir : Path
        The sweep folder.
    scored : dict
        Run name -> test set name -> result (``score_run``).
    """
    path = sweep_dir / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    by_run = {r.get("run"): r for r in rows}
    for run, results in scored.items():
        row = by_run.get(run)
        if row is None:
            row = by_run[run] = {"run": run}
            rows.append(row)
        for name, result in results.items():
            row.update({col: result.get(k) for col, k in zip(columns(name), METRICS)})
    extra = list(dict.fromkeys(k for r in rows for k in r if k.rpartition(".")[2] in METRICS and "." in k))
    write_results(sweep_dir, rows, extra)
    return rows


def resolve_device(name: str):
    """``auto`` (CUDA when available), ``cpu`` or ``cuda`` as a torch device."""
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise EvaluateError(f"--device {name!r}: expected auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def evaluate(targets: Sequence[str | os.PathLike], stores: Sequence[str | os.PathLike], name: str | None = None,
             rain: str = DEFAULT_RAIN, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, device: str = "auto",
             batch: int = 16, overwrite: bool = False, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Score every finished run of ``targets`` on every test set of ``stores``.

    Parameters
    ----------
    targets : sequence of str or os.PathLike
        ``model.pt`` files, run folders or sweep folders (``find_runs``).
    stores : sequence of str or os.PathLike
        Paired or patch stores (``load_test_set``).
    name : str, optional
        The test set's name (only with one store).
    rain, count, seed
        Held-out rain, count and seed for patch stores.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    batch : int
        Images per forward pass (whole images: mind the memory of large models).
    overwrite : bool
        Replace results of the same name made on another test set.
    echo : callable
        Gets one line per run and test set.

    Returns
    -------
    dict
        Run folder (str) -> test set name -> result (``score_run``).
    """
    if not stores:
        raise EvaluateError("--store: expected at least one test store")
    if name is not None and len(stores) > 1:
        raise EvaluateError("--name names one test set: give it with a single --store")
    if batch < 1:
        raise EvaluateError(f"--batch: expected >= 1, got {batch}")
    found = [find_runs(t) for t in targets]
    dev = resolve_device(device)
    tests = [load_test_set(s, name, rain, count, seed) for s in stores]
    names = [t.name for t in tests]
    if len(set(names)) < len(names):
        raise EvaluateError(f"two test stores share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                            f"score them in separate calls with --name")
    everything: dict[str, dict] = {}
    for runs, sweep_dir in found:
        scored: dict[str, dict[str, dict]] = {}
        for run in runs:
            for test in tests:
                result, reused = score_run(run, test, dev, batch, overwrite)
                scored.setdefault(run.name, {})[test.name] = result
                everything.setdefault(str(run.run_dir), {})[test.name] = result
                echo(f"{run.name} on {test.name}: E_R {result['E_R']:.2f}  E_B {result['E_B']:.2f}  "
                     f"PSNR {result['PSNR']:.2f} dB  (E_R ceiling {result['E_R_ceiling']:.2f}; "
                     f"{test.held.describe()['count']} images{', reused' if reused else ''})")
        if sweep_dir is not None:
            add_columns(sweep_dir, scored)
            echo(f"{sweep_dir}/results.csv: columns " + ", ".join(f"{n}.*" for n in names))
    return everything


__all__ = ["DEFAULT_RAIN", "DEFAULT_SEED", "EVAL_DIR", "EvaluateError", "RunModel", "TestSet", "add_columns",
           "columns", "default_name", "evaluate", "file_sha256", "find_runs", "load_model", "load_test_set",
           "resolve_device", "score_run"]
