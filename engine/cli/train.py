"""``rainsweep sweep`` and ``rainsweep demo``: click front ends of engine.experiments.sweep and engine.experiments.demo."""
from __future__ import annotations

import click

# light (standard library only): the demo's defaults show in --help
from engine.experiments import demo as demo_defaults


def _check_models(names: list[str]) -> None:
    import models

    bad = [n for n in names if n not in models.NAMES]
    if bad:
        raise click.BadParameter(f"unknown model {bad[0]!r}; valid models: {', '.join(models.NAMES)}",
                                 param_hint="--model")


def _check_rains(names: list[str], option: str) -> None:
    from engine.rain import RainSpec

    for n in names:
        try:
            RainSpec.parse(n)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint=option) from None


def _fuse_option(text: str | None) -> int | str | None:
    """``--fuse``: None, "auto" or a group size >= 1."""
    if text is None or text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise click.BadParameter(f"{text!r}: expected a group size K >= 1 or 'auto'", param_hint="--fuse")
    return k


@click.command(context_settings={"show_default": True})
@click.option("--store", type=click.Path(exists=True), help="Patch store (rainsweep precompute). Required to run.")
@click.option("--counts", default="8,16,32,64,128,256,512,1024", help="Training background counts.")
@click.option("--rain", "rains", default="small,medium,large", help="Training rain presets (comma-separated).")
@click.option("--model", "model_names", default="resnet", help="Model name(s), comma-separated.")
@click.option("--iters", default=10_000, type=click.IntRange(1), help="Training steps per run.")
@click.option("--out", type=click.Path(file_okay=False), help="Sweep directory. Required to run.")
@click.option("--seeds", default="0", help="Training seeds, comma-separated (one run each).")
@click.option("--batch", default=16, type=click.IntRange(1), help="Batch size.")
@click.option("--test-rain", default="heldout-layered", help="Held-out rain preset or spec.")
@click.option("--test-store", type=click.Path(exists=True), help="Separate store for held-out backgrounds.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--jobs", default=1, type=click.IntRange(1),
              help="Runs at once with --executor local (they share the device).")
@click.option("--train-arg", "train_args", multiple=True, help="Extra train.py argument (repeatable), e.g. --lr=1e-4.")
@click.option("--executor", default="local", type=click.Choice(["local", "ray"]),
              help="local: subprocesses of this machine; ray: one Ray task per run on a Ray cluster (OUT and the "
                   "stores on storage every node sees).")
@click.option("--address", default=None,
              help="With --executor ray: auto, HOST:PORT or ray://HOST:PORT of the cluster [default: RAY_ADDRESS, "
                   "else a new one-machine cluster].")
@click.option("--gpus-per-run", type=click.FloatRange(0), default=None,
              help="With --executor ray: GPUs per run, fractions share a GPU [default: 1 with --device cuda, else 0].")
@click.option("--cpus-per-run", type=click.FloatRange(0), default=1.0, help="With --executor ray: CPUs per run.")
@click.option("--max-retries", type=click.IntRange(0), default=3,
              help="With --executor ray: restarts of a run whose worker or node died (it resumes from its checkpoint).")
@click.option("--view-every", type=click.FloatRange(0), default=30.0,
              help="Seconds between live views of the sweep (0: none).")
@click.option("--status", "status_of", type=click.Path(exists=True, file_okay=False),
              help="Print where the sweep in this folder stands, run nothing.")
@click.option("--fuse", default=None, metavar="K|auto",
              help="Train up to K runs of one model together as one fused model (python -m train_fused; same "
                   "results files); 'auto' times the device and picks K per model.")
def sweep(store: str | None, counts: str, rains: str, model_names: str, iters: int, out: str | None, seeds: str,
          batch: int, test_rain: str, test_store: str | None, device: str, jobs: int, train_args: tuple[str, ...],
          executor: str, address: str | None, gpus_per_run: float | None, cpus_per_run: float, max_retries: int,
          view_every: float, status_of: str | None, fuse: str | None) -> None:
    """Train every (count, rain) configuration, skip finished ones, write results.csv/json and figures.

    Relative paths are read against the current folder. Each run's output shows as it runs, prefixed with the
    run's name, and goes to OUT/runs/<name>/train.out. Rerunning the same command skips finished runs and resumes
    interrupted ones, with either executor. `rainsweep sweep --status OUT` shows where a sweep stands."""
    if status_of is not None:
        _print_status(status_of)
        return
    for value, option in ((store, "--store"), (out, "--out")):
        if value is None:
            raise click.UsageError(f"Missing option '{option}' (needed unless --status is given).")
    if executor == "local" and (address is not None or gpus_per_run is not None):
        raise click.UsageError("--address and --gpus-per-run apply to --executor ray only")
    from engine.experiments import sweep as sw

    try:
        count_list = sw.parse_list(counts, "--counts", int, minimum=1)
        rain_list = sw.parse_list(rains, "--rain")
        model_list = sw.parse_list(model_names, "--model")
        seed_list = sw.parse_list(seeds, "--seeds", int)
    except sw.SweepError as err:
        raise click.UsageError(str(err)) from None
    _check_models(model_list)
    _check_rains(rain_list, "--rain")
    _check_rains([test_rain], "--test-rain")
    extra = ["--batch", str(batch), "--device", device, *train_args]
    try:
        runner = None
        if executor == "ray":
            from engine.experiments.executors.base import ExecutorError
            from engine.experiments.executors.ray_executor import RayExecutor

            gpus = (1.0 if device == "cuda" else 0.0) if gpus_per_run is None else gpus_per_run
            try:
                runner = RayExecutor(address, cpus_per_run, gpus, max_retries)
            except ExecutorError as err:
                raise click.ClickException(str(err)) from None
        try:
            rows = sw.sweep(store, count_list, rain_list, model_list, iters, out, seeds=seed_list, extra=extra,
                            jobs=jobs, test_rain=test_rain, test_store=test_store, echo=click.echo,
                            executor=runner, view_every=view_every, fuse=_fuse_option(fuse))
        finally:
            if runner is not None:
                runner.close()
    except sw.SweepError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{len(rows)} runs; results: {out}/results.csv, {out}/results.json; figures: {out}/figures/")


def _print_status(out: str) -> None:
    from engine.experiments.sweep_status import load_status, status_lines

    try:
        status = load_status(out)
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="--status") from None
    for line in status_lines(out, status):
        click.echo(line)


@click.command(context_settings={"show_default": True})
@click.option("--out", default="rainsweep-demo", type=click.Path(file_okay=False), help="Output directory.")
@click.option("--iters", default=demo_defaults.ITERS, type=click.IntRange(1), help="Training steps of each model.")
@click.option("--model", default=demo_defaults.MODEL, help="Model (a small one trains in minutes on a CPU).")
@click.option("--counts", default=",".join(map(str, demo_defaults.COUNTS)),
              help="Training background counts, one model each (at least two).")
@click.option("--patch", default=demo_defaults.PATCH, type=click.IntRange(16),
              help="Patch side in pixels (of a new store).")
def demo(out: str, iters: int, model: str, counts: str, patch: int) -> None:
    """Train small models on few and on many backgrounds (CPU), compare them on held-out rain.

    Builds a store from built-in images, trains one model per count at once, prints their E_R / E_B side by side
    and writes OUT/comparison.png. Relative paths are read against the current folder. The training's output shows
    as it runs."""
    from engine.experiments.demo import DemoError, run_demo
    from engine.experiments.sweep import SweepError, parse_list

    _check_models([model])
    try:
        count_list = parse_list(counts, "--counts", int, minimum=1)
    except SweepError as err:
        raise click.BadParameter(str(err), param_hint="--counts") from None
    if len(set(count_list)) < 2:
        raise click.BadParameter(f"{counts!r}: expected at least two different counts, e.g. 8,512",
                                 param_hint="--counts")
    try:
        run_demo(out, iters=iters, model=model, counts=count_list, patch=patch, echo=click.echo)
    except DemoError as err:
        raise click.ClickException(str(err)) from None
