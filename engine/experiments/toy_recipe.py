"""The ``toy`` recipe of ``rainsweep reproduce``: the cosine-denoising grid of the paper's section V
(``engine.experiments.toy`` with its default settings), its results, a figure of the cells the paper quotes
(its Figs. 13 and 14) and ``report.md`` with the paper's numbers beside ours. MSE is in squared y units."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

from engine.atomic import atomic_write_text
from engine.experiments import recipes as R
from engine.experiments.report import duration, md_table
from engine.experiments.report_figures import save
from engine.experiments.toy_config import receptive_field
from engine.experiments.toy_ordering import own_cell_ordering


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count for the duration (0: unchanged); results are reproducible for a fixed count."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def paper_cells() -> list[tuple[int, int, tuple[float, float]]]:
    """(train order, test order, test noise) of every cell the paper gives a number for."""
    return list(R.PAPER["toy_mse"])


def cells_figure(path: Path, results) -> Path:
    """Rows: networks trained on order 1 and order 8; columns: the test cells the paper quotes (the same order, with
    N(0, 1) and with N(10, 5)). Each panel: the noisy test points, the clean curve and the prediction."""
    from matplotlib.figure import Figure

    quoted = paper_cells()
    trains = sorted({c[0] for c in quoted})
    noises = list(dict.fromkeys(c[2] for c in quoted))
    fig = Figure(figsize=(4.2 * len(noises), 2.8 * len(trains)), layout="constrained")
    axes = fig.subplots(len(trains), len(noises), squeeze=False)
    by_order = {res.train_order: res for res in results}
    for i, order in enumerate(trains):
        for j, (mu, sigma) in enumerate(noises):
            ax = axes[i][j]
            res = by_order.get(order)
            cell = None if res is None else next((v for (o, n), v in res.cells.items()
                                                  if o == order and (n.mu, n.sigma) == (mu, sigma)), None)
            if cell is None:
                ax.set_axis_off()
                continue
            ax.plot(cell.x, cell.noisy, ".", ms=1.5, color="0.6", label="noisy input")
            ax.plot(cell.x, cell.truth, color="tab:green", lw=1.2, label="clean curve")
            ax.plot(cell.x, cell.pred, color="tab:red", lw=1.0, label="network output")
            ax.set_title(f"trained O={order}, N(0,1); tested O={order}, N({mu:g},{sigma:g})\nmse {cell.mse:.3g}",
                         fontsize=9)
            ax.set_xlabel("x")
            ax.set_ylabel("y")
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Figs. 13 / 14: simple (O=1) against complex (O=8) training curves, seen and unseen noise")
    return save(fig, path)


def cell_of(records: list[dict], train_order: int, test_order: int, noise: tuple[float, float]) -> dict | None:
    """The record of one cell of the grid (network trained with N(0, 1) noise), None when the grid lacks it."""
    for r in records:
        if (r["train_order"] == train_order and r["test_order"] == test_order
                and tuple(r["test_noise"]) == tuple(noise) and tuple(r["train_noise"]) == (0.0, 1.0)):
            return r
    return None


def sig(value: float | None) -> str:
    """Four significant digits ("n/a" when missing): the paper's toy numbers span 0.0009 to 49.77."""
    return "n/a" if value is None else f"{value:.4g}"


def report_text(scale: R.Scale, records: list[dict], config: dict, wall_s: float) -> str:
    """report.md of the toy recipe."""
    rows, ours = [], {}
    for (tr, te, noise) in paper_cells():
        cell = cell_of(records, tr, te, noise)
        ours[(tr, te, noise)] = None if cell is None else cell["mse"]
        rows.append([f"trained O={tr}, N(0,1)", f"O={te}, N({noise[0]:g},{noise[1]:g})",
                     sig(R.PAPER["toy_mse"][(tr, te, noise)]), sig(ours[(tr, te, noise)]),
                     sig(None if cell is None else cell["mse_input"])])
    simple, complex_ = ours.get((1, 1, (10.0, 5.0))), ours.get((8, 8, (10.0, 5.0)))
    if simple is None or complex_ is None:
        verdict = "The grid lacks the cells needed to judge the direction."
    else:
        shows = simple < complex_
        verdict = (f"On the unseen noise N(10,5) the network trained on the simple curve (O=1) scores mse "
                   f"{simple:.3g} against {complex_:.3g} for the one trained on the complex curve (O=8): the "
                   f"paper's direction (a simple training curve is learned and the unseen noise removed; a complex one "
                   f"makes the network learn the noise) {'shows' if shows else 'does not show'} here.")
    ordering = own_cell_ordering(records, field=receptive_field(config["kernel"]),
                                 points=config["points"])
    if ordering is not None:
        verdict += "\n\n" + ordering.text()
    settings = ", ".join(f"{k}={v}" for k, v in config.items()
                         if k in ("iters", "batch", "lr", "segments", "points", "width", "kernel", "x_in_scale",
                                  "y_in_scale", "test_curves", "loss", "seed",
                                  "device", "threads", "parameters"))
    sections = [
        "# Section V: the toy (cosine denoising)",
        "A 1-D CNN maps (x, y + noise) to (x, y) for y = 10 cos(O pi x / 10), trained on order O with N(0, 1) noise "
        "and tested on orders 1, 4, 8 with N(0, 1), N(0, 2) and N(10, 5). Results: `results.csv` (every cell), "
        "figures: `figures/toy_cells.png` (the quoted cells, like the paper's Figs. 13 and 14).",
        "## Against the paper (mse, y units squared)\n\n"
        + md_table(["network", "test cell", "paper", "ours", "ours, noisy input (no denoising)"], rows)
        + "\n\nOther cells: see the paper's Figs. 11-14.",
        "## Direction\n\n" + verdict,
        "## Setup\n\n"
        f"- Scale `{scale.name}`: engine.experiments.toy's default settings"
        + (f" with {scale.toy}" if scale.toy else "") + f" ({settings}).\n"
        f"- Wall time of this invocation: {duration(wall_s)}.",
    ]
    return "\n\n".join(sections) + "\n"


def run_toy(scale: R.Scale, out: Path, device: str | None = None, echo: Callable[[str], None] = print,
            started: float | None = None) -> Path:
    """Train and test the toy grid into ``out``; returns the report's path. The grid is retrained on every call
    (it takes seconds to minutes)."""
    import torch

    from engine.experiments import toy as T
    from engine.experiments.toy_data import Noise

    t0 = time.perf_counter() if started is None else started
    grid = R.toy_grid()
    fields = dict(scale.toy)
    if device:
        fields["device"] = device
    if fields.get("device") == "cuda" and not torch.cuda.is_available():
        raise R.RecipeError("--device cuda: CUDA is not available on this machine; use --scale cpu or --device cpu")
    cfg = T.ToyConfig(**fields)
    train_noises = [Noise(*n) for n in grid["train_noises"]]
    test_noises = [Noise(*n) for n in grid["test_noises"]]
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    with torch_threads(scale.threads if cfg.device == "cpu" else 0):
        config = T.config_record(cfg, grid["train_orders"], train_noises, grid["test_orders"], test_noises,
                                 torch.get_num_threads())

        def on_setting(res) -> None:
            records.extend(res.records())
            T.write_results(out, records, config)  # results so far stay on disk if the grid is interrupted

        echo(f"toy: {len(grid['train_orders'])} network(s), {cfg.iters} steps each, on {cfg.device} -> {out}")
        jobs = T.default_jobs(len(grid["train_orders"]) * len(train_noises)) if cfg.device == "cpu" else 1
        results = T.run_grid(grid["train_orders"], train_noises, grid["test_orders"], test_noises, cfg, log=echo,
                             on_setting=on_setting, jobs=jobs, threads=scale.threads or 1)
    cells_figure(out / "figures" / "toy_cells.png", results)
    path = atomic_write_text(out / "report.md", report_text(scale, records, config, time.perf_counter() - t0))
    echo(f"report: {path}")
    return path
