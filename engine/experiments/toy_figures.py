"""Figures of the analogous experiment (``rainsweep toy``): one panel grid per training setting and an MSE map.

Matplotlib is imported inside the functions and only through ``matplotlib.figure.Figure`` (no pyplot: no global
state, no GUI backend), so importing this module costs nothing. PNGs go through ``engine.atomic``.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.atomic import atomic_write
from engine.experiments.toy import SettingResult
from engine.experiments.toy_data import Noise

#: relative luminance at which black and white text contrast equally (WCAG contrast ratio (L1 + 0.05) / (L2 + 0.05));
#: a lighter cell gets black text, a darker one white
TEXT_LUMINANCE_SPLIT = (1.05 * 0.05) ** 0.5 - 0.05


def figure_name(order: int, noise: Noise) -> str:
    """File name of one training setting's figure, e.g. ``train_order4_noise0_1.png``."""
    return f"train_order{order}_noise{noise.mu:g}_{noise.sigma:g}.png"


def _save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, buf.getvalue())


def relative_luminance(rgba: np.ndarray) -> np.ndarray:
    """WCAG relative luminance (0 black .. 1 white) of sRGB colours, float ``(..., 3 or 4)`` in 0..1."""
    c = np.asarray(rgba, dtype=np.float64)[..., :3]
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return lin @ np.array([0.2126, 0.7152, 0.0722])


def text_colors(rgba: np.ndarray) -> np.ndarray:
    """Black or white text per background colour (float ``(..., 3 or 4)`` in 0..1), whichever has the higher
    WCAG contrast ratio on it; a ``str`` array of the background's shape without the colour axis."""
    return np.where(relative_luminance(rgba) > TEXT_LUMINANCE_SPLIT, "black", "white")


def setting_figure(res: SettingResult):
    """The figure of one training setting, laid out like the paper's Figs. 11-14: rows = test order, columns = test
    noise. Each panel shows the noisy test points, the ground truth, the network's prediction and, on curves of
    another order, the curve the network was trained on (what a network that learned its background draws); every
    panel has axis labels and a title with its cell and MSE, and one legend names the lines. Returns a
    ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure

    from engine.experiments.toy_data import ground_truth

    orders = sorted({o for o, _ in res.cells})
    noises = list(dict.fromkeys(n for _, n in res.cells))
    fig = Figure(figsize=(3.8 * len(noises), 2.9 * len(orders)), layout="constrained")
    axes = fig.subplots(len(orders), len(noises), squeeze=False, sharex=True)
    handles = {}
    for r, order in enumerate(orders):
        for c, noise in enumerate(noises):
            ax = axes[r][c]
            cell = res.cells.get((order, noise))
            if cell is None:
                ax.set_axis_off()
                continue
            handles["noisy input"] = ax.scatter(cell.x, cell.noisy, s=1.5, color="0.6", rasterized=True)
            if order != res.train_order:
                x64 = cell.x.astype(np.float64)
                (handles[f"training curve (O={res.train_order})"],) = ax.plot(
                    cell.x, ground_truth(x64, res.train_order), color="tab:blue", lw=0.8, ls="--")
            (handles["ground truth"],) = ax.plot(cell.x, cell.truth, color="tab:green", lw=1.2)
            (handles["prediction"],) = ax.plot(cell.x, cell.pred, color="tab:red", lw=1.0)
            seen = order == res.train_order and noise == res.train_noise
            ax.set_title(
                f"test O={order}, {noise.label()}{' (training setting)' if seen else ''}\n"
                f"mse {cell.mse:.3g} (noisy input {cell.mse_input:.3g})",
                fontsize=8,
            )
            ax.tick_params(labelsize=7)
            ax.set_xlabel("x", fontsize=8)
            ax.set_ylabel("y", fontsize=8)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles), fontsize=7,
               markerscale=4)
    fig.suptitle(f"network trained on order {res.train_order}, noise {res.train_noise.label()}: the first test curve "
                 "of each cell; mse over all of the cell's test curves", fontsize=10)
    return fig


def write_setting_figure(out: Path, res: SettingResult) -> Path:
    """Write ``setting_figure(res)`` as ``out / figure_name(...)`` (PNG, atomically) and return its path."""
    return _save_figure(setting_figure(res), out / figure_name(res.train_order, res.train_noise))


def mse_figure(results: Sequence[SettingResult]):
    """A heat map of MSE (log colour scale), rows = training settings, columns = test cells; every cell carries
    its value in black or white, whichever stands out on the cell's colour. Returns a
    ``matplotlib.figure.Figure``."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    cells = list(results[0].cells)
    mse = np.array([[res.cells[c].mse for c in cells] for res in results])
    cmap = colormaps["viridis"]
    norm = LogNorm(vmin=max(mse.min(), 1e-6), vmax=max(mse.max(), 1e-5))
    fig = Figure(figsize=(1.6 + 0.95 * len(cells), 1.4 + 0.55 * len(results)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(mse, norm=norm, cmap=cmap)
    colors = text_colors(cmap(norm(mse)))
    for i in range(mse.shape[0]):
        for j in range(mse.shape[1]):
            ax.text(j, i, f"{mse[i, j]:.3g}", ha="center", va="center", fontsize=7, color=colors[i, j])
    ax.set_xticks(range(len(cells)), [f"O={o}\n{n.label()}" for o, n in cells], fontsize=7)
    ax.set_yticks(range(len(results)), [f"O={r.train_order} {r.train_noise.label()}" for r in results], fontsize=7)
    ax.set_xlabel("test cell (order, noise)")
    ax.set_ylabel("training setting")
    ax.set_title("mse of the denoised y against the clean curve", fontsize=9)
    fig.colorbar(im, ax=ax, label="mse (y units²)")
    return fig


def write_mse_figure(out: Path, results: Sequence[SettingResult]) -> Path:
    """Write ``mse_figure(results)`` as ``out / "mse.png"`` (atomically) and return its path."""
    return _save_figure(mse_figure(results), out / "mse.png")
