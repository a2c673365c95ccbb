"""``rainsweep reproduce``: run a recipe of the paper's experiments (engine.experiments.recipes) end to end.

Layout of ``OUT`` (every path absolute, every file written atomically):

- ``store/``: the training patch store, built from the scale's built-in sources unless ``--store`` names one;
- ``test-store/``: the held-out backgrounds (the scale's test sources, scikit-image's pictures, cut at the store's
  patch size) unless ``--test-store`` names a store (the paper, too, tests on another data set's backgrounds);
- ``sweeps/<key>/``: the runs of each ``sweep()`` call (``runs/<name>/{config.json, log.jsonl, metrics.json,
  samples.png}``); finished runs are skipped on a rerun, so an interrupted recipe continues where it stopped;
- ``<recipe>/``: ``results.csv``, ``results.json``, ``figures/*.png`` and ``report.md`` (engine.experiments.report);
- ``reproduce.json``: the scale and stores ``OUT`` was made with; another scale or store needs another ``OUT``;
- ``prior/``: fig18 / fig19's content prior (``rainsweep prior``: prior.pt, log.jsonl, metrics.json), trained once
  and reused, unless ``--prior`` names a checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from engine.atomic import atomic_write_json
from engine.experiments import recipes as R
from engine.experiments import report as rep
from engine.experiments import report_prior as rep_prior


@dataclass(frozen=True)
class Stores:
    """The stores a recipe trains and tests on: absolute paths, patch count and size, sharpness band sizes, whether
    each was built here, and fingerprints."""

    store: str
    count: int
    patch: int
    bands: dict
    test_store: str
    built: bool
    test_built: bool
    fingerprint: str
    test_fingerprint: str


def ensure_store(path: Path, sources: tuple[str, ...], patch: int, stride: int,
                 echo: Callable[[str], None]) -> Path:
    """Build the store at ``path`` from ``sources`` (or finish or reuse it); RecipeError when ``path`` holds a store
    made with other arguments."""
    from engine.data.precompute import PrecomputeError, precompute

    try:
        summary = precompute(list(sources), path, patch=patch, stride=stride, progress=False)
    except PrecomputeError as err:
        raise R.RecipeError(f"{path}: {err}") from None
    if summary.already_complete:
        echo(f"store: reusing {path} ({summary.patches} patches)")
    else:
        echo(f"store: {summary.patches} patches of {patch} x {patch} from {summary.images} pictures "
             f"({', '.join(sources)}) -> {path} in {summary.seconds:.0f} s")
    return path


def band_sizes(store) -> dict[str, int]:
    """Patches of ``store`` in each of fig6's sharpness bands."""
    from engine.data.select import select

    return {b: select(store, None, sharpness=b).matched for b in R.BANDS}


def pictures(store) -> set[str]:
    """sha256 digests of the source pictures a store was cut from (empty when the store does not record them)."""
    return {str(s["sha256"]) for s in store.attrs.get("sources") or [] if isinstance(s, dict) and s.get("sha256")}


def prepare_stores(out: Path, scale: R.Scale, store: str | None, test_store: str | None,
                   echo: Callable[[str], None]) -> Stores:
    """Open the training and test stores, building either from built-in pictures when not given.

    Raises RecipeError when their patch sizes differ or they share a source picture (held-out backgrounds would
    then be training backgrounds)."""
    from engine.data.store import open_store

    built, test_built = store is None, test_store is None
    path = ensure_store(out / "store", scale.sources, scale.patch, scale.stride, echo) if built \
        else Path(store).resolve()
    st = open_store(path)
    test_path = ensure_store(out / "test-store", scale.test_sources, st.patch_size, st.patch_size, echo) if test_built \
        else Path(test_store).resolve()
    ts = open_store(test_path)
    if ts.patch_size != st.patch_size:
        raise R.RecipeError(f"--test-store {test_path}: patches of {ts.patch_size} pixels, the store's are "
                            f"{st.patch_size}")
    shared = pictures(st) & pictures(ts)
    if shared:
        raise R.RecipeError(f"the store {path} and the test store {test_path} share {len(shared)} source picture(s): "
                            f"held-out backgrounds must be unseen; pass a --test-store made from other pictures")
    return Stores(str(path), int(st.count), int(st.patch_size), band_sizes(st), str(test_path), built, test_built,
                  str(st.fingerprint), str(ts.fingerprint))


def check_out(out: Path, scale: R.Scale, stores: Stores) -> None:
    """Record (or check) what ``out`` is made with, so runs trained for another scale or store are never reused."""
    record = {"scale": scale.name, "store": stores.store, "store_fingerprint": stores.fingerprint,
              "test_store": stores.test_store, "test_store_fingerprint": stores.test_fingerprint,
              "iters": scale.iters, "batch": scale.batch}
    path = out / "reproduce.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in record if old.get(k) != record[k]]
        if diff:
            raise R.RecipeError(f"--out {out} holds runs made with another {', '.join(diff)} "
                                f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); choose another --out")
        return
    atomic_write_json(path, record, indent=2)


@contextlib.contextmanager
def run_threads(threads: int) -> Iterator[None]:
    """Limit the numba threads of the training processes started inside (their torch threads are train.py's
    ``--threads``). numba's OpenMP launches reset the OpenMP thread count that torch's convolutions then use, so a
    ``--threads 1`` run still ran its convolutions on two threads: with two runs on two cores every step waited on
    descheduled threads (measured 13x slower steps). A value the user set wins."""
    if not threads or "NUMBA_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        os.environ.pop("NUMBA_NUM_THREADS", None)


def sweep_specs(recipe: str, scale: R.Scale, model_names: tuple[str, ...], stores: Stores,
                device: str | None) -> list[R.SweepSpec]:
    """The sweep calls of a deraining recipe."""
    if recipe == "fig4":
        return R.fig4_sweeps(scale, model_names, stores.count, stores.test_store, device)
    if recipe == "table3":
        return R.table3_sweeps(scale, model_names, stores.count, stores.test_store, device)
    if recipe == "fig6":
        return R.fig6_sweeps(scale, model_names, stores.bands, stores.test_store, device)
    raise R.RecipeError(f"recipe {recipe!r} trains no deraining models")


def plan_lines(specs: list[R.SweepSpec], stores: Stores, scale: R.Scale, out: Path,
               python: str = sys.executable) -> list[str]:
    """One line per run: the train.py command ``sweep()`` starts for it (the grid point, then ``extra``)."""
    from engine.experiments.sweep import plan

    lines = []
    for spec in specs:
        for cfg in plan(spec.models, spec.rains, spec.counts):
            run_dir = out / "sweeps" / spec.key / "runs" / cfg.name
            cmd = [python, "-m", "train", "--store", stores.store, "--count", str(cfg.count), "--rain", cfg.rain,
                   "--model", cfg.model, "--iters", str(scale.iters), "--seed", str(cfg.seed), "--out", str(run_dir),
                   *spec.extra]
            lines.append(shlex.join(cmd))
    return lines


def ensure_prior(out: Path, prior_scale: R.PriorScale, scale: R.Scale, stores: Stores, device: str | None,
                 jobs: int, echo: Callable[[str], None]) -> tuple[str, dict]:
    """Train fig18 / fig19's prior on the training store's clean patches into ``out/prior`` (or reuse it); returns
    the path of ``prior.pt`` and its metrics."""
    from engine.experiments.prior import PRIOR, PriorConfig, PriorTrainingError, train_prior

    cfg = PriorConfig(store=stores.store, out=str(out / "prior"), count=prior_scale.prior_count,
                      config=prior_scale.config, iters=prior_scale.prior_iters, batch=prior_scale.prior_batch,
                      lr=prior_scale.prior_lr, seed=0, device=device or scale.device,
                      threads=scale.threads * jobs if scale.threads else 0)
    try:
        metrics = train_prior(cfg, echo=echo)
    except PriorTrainingError as err:
        raise R.RecipeError(f"the prior: {err}") from None
    return str(out / "prior" / PRIOR), metrics


def rescore_rows(rows: list[dict], echo: Callable[[str], None]) -> list[dict]:
    """Each finished fig18 / fig19 row with its scores on the degradation it trained on (``*_seen`` fields)."""
    from engine.experiments.rescore import RescoreError, score_run

    out = []
    for r in rows:
        r = dict(r)
        if r.get("E_R") is not None:
            try:
                seen = score_run(r["run_dir"], r["rain"])
            except RescoreError as err:
                echo(f"rescore: {err}")
            else:
                r.update({f"{k}_seen": v for k, v in seen.items() if k not in ("rain", "count")})
        out.append(r)
    return out


def prior_recipe(recipe: str, sc: R.Scale, out: Path, stores: Stores, scratch: tuple[str, ...],
                 device: str | None, jobs: int, prior: str | None, plan_only: bool, echo: Callable[[str], None],
                 t0: float, noise: bool | None = None) -> Path | list[str]:
    """fig18 / fig19: the prior (``prior`` or stage 1 here), the sweeps, the seen-degradation scores, the report."""
    ps = R.get_prior_scale(sc.name)
    run_scale = dataclasses.replace(sc, iters=ps.iters, why=ps.why)
    prior_path = str(Path(prior).resolve()) if prior else str(out / "prior" / "prior.pt")
    available = R.noise_available()
    noise = available if noise is None else noise and available
    specs = R.prior_sweeps(recipe, sc, ps, scratch, stores.count, stores.test_store, prior_path, device, noise)
    if plan_only:
        stage1 = [] if prior else [f"rainsweep prior --store {stores.store} --config {ps.config} --iters "
                                   f"{ps.prior_iters} --batch {ps.prior_batch} --lr {ps.prior_lr} --out {out / 'prior'}"]
        return stage1 + plan_lines(specs, stores, run_scale, out)
    prior_metrics = None
    if not prior:
        prior_path, prior_metrics = ensure_prior(out, ps, sc, stores, device, jobs, echo)
    if recipe == "fig19" and not noise:
        why = "left out on request" if available else "the noise degradations are not available"
        echo(f"fig19: denoising half ({R.NOISE_TRAIN} -> {R.NOISE_TEST}) {why}")
    rows, failed = run_specs(specs, stores, run_scale, out, jobs, echo)
    rows = rescore_rows(rows, echo)
    context = rep.Context(recipe=recipe, scale=run_scale, out=out / recipe, store=stores.store,
                          store_count=stores.count, patch=stores.patch, built_store=stores.built,
                          test_store=stores.test_store, built_test_store=stores.test_built,
                          models=tuple(dict.fromkeys(r["model"] for r in rows)),
                          wall_s=time.perf_counter() - t0, bands=stores.bands)
    path = rep_prior.write_prior_recipe(context, ps, rows, prior_path, prior_metrics, noise, available)
    echo(f"report: {path}")
    if failed:
        raise R.RecipeError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their train.out); the report "
                            f"lists the finished ones")
    return path


def run_sweep(spec: R.SweepSpec, stores: Stores, scale: R.Scale, out: Path, jobs: int,
              echo: Callable[[str], None]) -> tuple[list[dict], list[str]]:
    """One sweep call; returns its rows (with ``label``, ``sweep`` and ``run_dir``) and its failed runs' names."""
    from engine.experiments.sweep import SweepError, sweep

    sweep_dir = out / "sweeps" / spec.key
    echo(f"== {spec.label}: {len(spec.models) * len(spec.rains) * len(spec.counts)} run(s) -> {sweep_dir}")
    failed: list[str] = []
    try:
        got = sweep(stores.store, list(spec.counts), list(spec.rains), list(spec.models), scale.iters,
                    str(sweep_dir), extra=list(spec.extra), jobs=jobs, test_rain=spec.test_rain, echo=echo)
    except SweepError as err:
        echo(f"sweep: {err}")
        results = sweep_dir / "results.json"
        got = json.loads(results.read_text()) if results.exists() else []
        failed = [r["run"] for r in got if str(r.get("status", "")).startswith("failed")]
    rows = [{**r, "label": spec.label, "sweep": spec.key, "run_dir": str(sweep_dir / "runs" / r["run"])}
            for r in got]
    return rows, failed


def run_specs(specs: list[R.SweepSpec], stores: Stores, scale: R.Scale, out: Path, jobs: int,
              echo: Callable[[str], None]) -> tuple[list[dict], list[str]]:
    """Run every sweep; returns all rows (in ``specs`` order) and the failed runs' names.

    Sweeps in different folders run side by side when ``jobs`` allows (fig6's three one-run sweeps would otherwise
    leave all but one core idle), splitting ``jobs`` between them; sweeps sharing a folder run one after another, as
    each rewrites its folder's results files."""
    from concurrent.futures import ThreadPoolExecutor

    outer = min(jobs, len(specs)) if len({s.key for s in specs}) == len(specs) else 1
    with run_threads(scale.threads), ThreadPoolExecutor(max_workers=outer) as pool:
        done = list(pool.map(lambda spec: run_sweep(spec, stores, scale, out, max(1, jobs // outer), echo), specs))
    return [r for rows, _ in done for r in rows], [name for _, failed in done for name in failed]


def reproduce(recipe: str, scale: str, out: str | os.PathLike, store: str | os.PathLike | None = None,
              test_store: str | os.PathLike | None = None, model_names: list[str] | None = None,
              device: str | None = None, jobs: int | None = None, plan_only: bool = False,
              echo: Callable[[str], None] = print, prior: str | os.PathLike | None = None,
              noise: bool | None = None) -> Path | list[str]:
    """Run ``recipe`` at ``scale`` into ``out``.

    Parameters
    ----------
    recipe : str
        One of ``recipes.RECIPES``.
    scale : str
        ``cpu``, ``gpu`` (or ``tiny``, for tests); see ``recipes.SCALES``.
    out : str or os.PathLike
        Output folder (see the module docstring); made absolute against the current directory.
    store, test_store : str or os.PathLike, optional
        The user's training store and held-out background store (built from built-in pictures when missing).
    model_names : list of str, optional
        Model families or names (``recipes.resolve_models``); default ResNet.
    device : str, optional
        train.py ``--device`` (default: the scale's).
    jobs : int, optional
        Runs at once (default: the scale's).
    plan_only : bool
        Return the train.py command of every run instead of training (stores are still built: the plan depends on
        their size).
    echo : callable
        Receives every progress line.
    prior : str or os.PathLike, optional
        fig18 / fig19: a prior checkpoint (a taming ``.ckpt`` of the scale's configuration, or a ``prior.pt``) to
        fine-tune instead of training one under ``out/prior``.
    noise : bool, optional
        fig19: run the denoising half (None: whenever the engine has the noise degradations; False: the deraining
        half only).

    Returns
    -------
    Path or list of str
        The report's path, or with ``plan_only`` the command lines.

    Raises
    ------
    RecipeError
        For bad names, a store too small for the recipe, an ``out`` made with another scale or store, or failed
        runs (after the report is written).
    """
    t0 = time.perf_counter()
    R.check_recipe(recipe)
    sc = R.get_scale(scale)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if recipe == "toy":
        from engine.experiments.toy_recipe import run_toy

        if plan_only:
            return [f"toy grid {R.toy_grid()} with ToyConfig overrides {sc.toy or 'none'} -> {out / 'toy'}"]
        return run_toy(sc, out / "toy", device=device, echo=echo, started=t0)
    if recipe == "fig18":  # the ablation's model is fixed by the scale
        model_list = (R.get_prior_scale(sc.name).noquant_model,)
    else:
        model_list = R.resolve_models(model_names or (list(R.FAMILIES) if recipe == "fig19" else None), sc)
    stores = prepare_stores(out, sc, None if store is None else str(store),
                            None if test_store is None else str(test_store), echo)
    check_out(out, sc, stores)
    if recipe in R.PRIOR_RECIPES:
        return prior_recipe(recipe, sc, out, stores, model_list, device, jobs or sc.jobs,
                            None if prior is None else str(prior), plan_only, echo, t0, noise)
    specs = sweep_specs(recipe, sc, model_list, stores, device)
    if plan_only:
        return plan_lines(specs, stores, sc, out)
    rows, failed = run_specs(specs, stores, sc, out, jobs or sc.jobs, echo)
    context = rep.Context(recipe=recipe, scale=sc, out=out / recipe, store=stores.store, store_count=stores.count,
                          patch=stores.patch, built_store=stores.built, test_store=stores.test_store,
                          built_test_store=stores.test_built, models=model_list,
                          wall_s=time.perf_counter() - t0, bands=stores.bands)
    path = rep.write_recipe(context, rows)
    echo(f"report: {path}")
    if failed:
        raise R.RecipeError(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their train.out); the report "
                            f"lists the finished ones")
    return path
