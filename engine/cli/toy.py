"""``rainsweep toy``: the analogous experiment (paper section V), cosine-curve denoising with a 1-D CNN."""
from __future__ import annotations

from pathlib import Path

import click

# only light imports at module level: torch loads when the command runs
from engine.experiments.toy_config import LOSSES, ToyConfig, receptive_field
from engine.experiments.toy_data import SEGMENT_LEN, Noise

#: the defaults every option below shows and uses
DEFAULTS = ToyConfig()


class OrderList(click.ParamType):
    """Comma-separated cosine orders, each an integer >= 1: ``1,4,8``."""

    name = "ORDERS"

    def convert(self, value, param, ctx) -> list[int]:
        if isinstance(value, list):
            return value
        items = [s.strip() for s in str(value).split(",")]
        if not items or any(not s for s in items):
            self.fail(f"expected comma-separated integers >= 1 (e.g. 1,4,8), got {value!r}", param, ctx)
        orders = []
        for s in items:
            try:
                o = int(s)
            except ValueError:
                self.fail(f"expected comma-separated integers >= 1 (e.g. 1,4,8), {s!r} is not an integer", param, ctx)
            if o < 1:
                self.fail(f"cosine orders must be >= 1, got {o}", param, ctx)
            orders.append(o)
        if len(set(orders)) != len(orders):
            self.fail(f"orders must not repeat, got {value!r}", param, ctx)
        return orders


class NoiseList(click.ParamType):
    """Comma-separated Gaussian noises ``MU:SIGMA`` (y units, sigma >= 0): ``0:1,0:2,10:5``."""

    name = "MU:SIGMA,..."

    def convert(self, value, param, ctx) -> list[Noise]:
        if isinstance(value, list):
            return value
        items = [s.strip() for s in str(value).split(",")]
        noises = []
        for s in items:
            try:
                noises.append(Noise.parse(s))
            except ValueError as e:
                self.fail(f"{e} (a list looks like 0:1,0:2,10:5)", param, ctx)
        if len(set(noises)) != len(noises):
            self.fail(f"noises must not repeat, got {value!r}", param, ctx)
        return noises


@click.command()
@click.option("--train-order", type=OrderList(), default="1,4,8", show_default=True,
              help="Cosine orders O of the training curves y = 10 cos(O pi x / 10); one network per order x noise.")
@click.option("--train-noise", type=NoiseList(), default="0:1", show_default=True,
              help="Training noises N(mu, sigma) as MU:SIGMA, comma-separated (y units).")
@click.option("--test-order", type=OrderList(), default="1,4,8", show_default=True, help="Test curve orders.")
@click.option("--test-noise", type=NoiseList(), default="0:1,0:2,10:5", show_default=True,
              help="Test noises as MU:SIGMA, comma-separated.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: results.json, results.csv, config.json, one PNG per training setting, mse.png.")
@click.option("--iters", type=click.IntRange(min=1), default=DEFAULTS.iters, show_default=True,
              help="Optimizer steps per network.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Train this many passes over the segments instead (overrides --iters).")
@click.option("--batch", type=click.IntRange(min=1), default=DEFAULTS.batch, show_default=True,
              help="Segments per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True,
              help="Adam learning rate (cosine-decayed to 0).")
@click.option("--segments", type=click.IntRange(min=1), default=DEFAULTS.segments, show_default=True,
              help="Training segments per network.")
@click.option("--points", type=click.IntRange(min=SEGMENT_LEN), default=DEFAULTS.points, show_default=True,
              help="Points sampled on [-10, 10] per curve (test curve length; segments are cut from such curves).")
@click.option("--width", type=click.IntRange(min=1), default=DEFAULTS.width, show_default=True,
              help="Channels of the hidden conv layers (163 with kernel 5: about 402k parameters).")
@click.option("--kernel", type=click.IntRange(min=1), default=DEFAULTS.kernel, show_default=True,
              help="Odd kernel size of every conv layer (receptive field 5 * (kernel - 1) + 1 points).")
@click.option("--x-in-scale", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.x_in_scale,
              show_default=True, help="The network divides the x input by this.")
@click.option("--y-in-scale", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.y_in_scale,
              show_default=True, help="The network divides the noisy y input by this.")
@click.option("--test-curves", type=click.IntRange(min=1), default=DEFAULTS.test_curves, show_default=True,
              help="Independent noisy test curves per test cell; a cell's MSE is over all of them, with its "
                   "standard error (figures show the first). Cells of one noise share x and noise across orders.")
@click.option("--loss", type=click.Choice(LOSSES), default=DEFAULTS.loss, show_default=True, help="Training loss.")
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS.seed, show_default=True,
              help="Seed of data, weights and test curves.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=DEFAULTS.device, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="CPU: networks trained at once, one worker process each (default: one per network, at most "
                   "two per CPU core, so that a grid of a few more networks than cores keeps every core busy to "
                   "the end instead of training its last networks in a round of their own). CUDA: always 1.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads per network (default: 1 with several jobs, all cores with one). A network "
                   "is reproducible for a fixed thread count.")
@click.option("--figures/--no-figures", default=True, show_default=True, help="Write the PNG figures.")
def toy(train_order, train_noise, test_order, test_noise, out, iters, epochs, batch, lr, segments, points, width,
        kernel, x_in_scale, y_in_scale, test_curves, loss, seed, device, jobs, threads, figures) -> None:
    """Cosine-curve denoising, the paper's analogous experiment (section V).

    Trains one 1-D CNN per training setting (order x noise) on 128-point segments of
    y = 10 cos(O pi x / 10) + N(mu, sigma), x in [-10, 10], then denoises the whole noisy curve of every test cell
    and records the MSE of the prediction against the clean curve. Networks trained on simple (low-order) curves
    learn the curve and remove unseen noise too; on complex curves they learn the noise.
    """
    import os
    import time

    # torch's OpenMP threads spin while waiting for each other; on a shared or oversubscribed machine that costs
    # up to 10x (measured: 3.7 s vs 0.36 s per step with 2 threads at load 10 on 2 cores). Passive waiting only
    # takes effect before torch (libgomp) loads, which is why torch is imported after this line; worker
    # processes inherit the setting.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from engine.experiments import toy as T
    from engine.experiments.toy_figures import write_mse_figure, write_setting_figure
    from engine.experiments.toy_ordering import own_cell_ordering

    if kernel % 2 == 0:
        raise click.BadParameter(f"the kernel size must be odd, got {kernel}", param_hint="--kernel")
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    n_nets = len(train_order) * len(train_noise)
    if device == "cuda":
        if jobs not in (None, 1):
            raise click.BadParameter("with --device cuda networks train one after another; use --jobs 1",
                                     param_hint="--jobs")
        jobs = 1
    else:
        jobs = min(n_nets, jobs) if jobs else T.default_jobs(n_nets)
    if threads is not None and jobs == 1:
        torch.set_num_threads(threads)
    if epochs is not None:
        steps_per_epoch = max(1, segments // min(batch, segments))
        iters = epochs * steps_per_epoch
    cfg = T.ToyConfig(iters=iters, batch=batch, lr=lr, segments=segments, points=points, seg_len=SEGMENT_LEN,
                      width=width, kernel=kernel, x_in_scale=x_in_scale, y_in_scale=y_in_scale,
                      test_curves=test_curves, loss=loss, seed=seed, device=device)
    threads_per_net = (threads or 1) if jobs > 1 else torch.get_num_threads()
    config = T.config_record(cfg, train_order, train_noise, test_order, test_noise, threads_per_net)
    config["jobs"] = jobs
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    done: list = []

    def on_setting(res) -> None:
        # results so far are on disk after every network, so a long run can be inspected (or killed) midway
        records.extend(res.records())
        done.append(res)
        T.write_results(out, records, config)
        if figures:
            write_setting_figure(out, res)

    click.echo(f"toy: {n_nets} network(s) x {len(test_order) * len(test_noise)} test cells, "
               f"{config['parameters']:,} parameters, {iters} steps of {batch}, {loss}, {device}, {jobs} job(s) "
               f"of {threads_per_net} thread(s) -> {out}")
    started = time.perf_counter()
    T.run_grid(train_order, train_noise, test_order, test_noise, cfg, log=click.echo, on_setting=on_setting,
               jobs=jobs, threads=threads)
    if figures:
        write_mse_figure(out, done)
    click.echo(format_table(records))
    click.echo(format_table(records, "mse_train_curve", "mse against the training order's curve"))
    ordering = own_cell_ordering(records, field=receptive_field(kernel), points=points)
    if ordering is not None:
        click.echo(ordering.text())
    click.echo(f"toy: {n_nets} network(s) trained and tested in {time.perf_counter() - started:.1f} s on {device}")


def format_table(records: list[dict], field: str = "mse", title: str = "mse") -> str:
    """``field`` of every record as text (y units squared): one row per training setting, one column per test
    cell, under ``title``."""
    def key(o, n):
        return f"O={o} N({n[0]:g},{n[1]:g})"

    cols = list(dict.fromkeys(key(r["test_order"], r["test_noise"]) for r in records))
    rows = list(dict.fromkeys(key(r["train_order"], r["train_noise"]) for r in records))
    cell = {(key(r["train_order"], r["train_noise"]), key(r["test_order"], r["test_noise"])): r[field]
            for r in records}
    w0 = max(len("train \\ test"), *(len(r) for r in rows))
    w = max(9, *(len(c) for c in cols))
    lines = [f"{title} (y units squared)", "train \\ test".ljust(w0) + "".join(c.rjust(w + 2) for c in cols)]
    for r in rows:
        lines.append(r.ljust(w0) + "".join(f"{cell.get((r, c), float('nan')):.4g}".rjust(w + 2) for c in cols))
    return "\n".join(lines)
