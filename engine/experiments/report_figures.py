"""Figures of ``rainsweep reproduce``, laid out like the paper's: PNG files, metrics on the 0..255 scale.

- ``counts_figure``: one panel per model, a metric against the training background count (log x), one line per
  training rain range (the paper's Figs. 4 and 10);
- ``curves_figure``: E_R and E_B against the training step, one line per sharpness band (the paper's Fig. 6);
- ``table3_figure``: E_R and E_B bars per (rain, count) run (the paper's Table III as a picture).

matplotlib's object API is used (no pyplot): no global state, no GUI backend.
"""
from __future__ import annotations

import io
from pathlib import Path

from engine.atomic import atomic_write

#: Line colours of the training rain ranges and sharpness bands, as in the paper's figures (small/low blue ...).
COLORS = {"small": "tab:blue", "medium": "tab:orange", "large": "tab:green",
          "low": "tab:blue", "high": "tab:green"}
LABELS = {"E_R": "E_R: rain removal (0..255, higher is better)",
          "E_B": "E_B: background error (0..255, lower is better)"}


def rain_order(name: str) -> tuple:
    """Sort key: small, medium, large, then other rain names alphabetically."""
    return ({"small": 0, "medium": 1, "large": 2}.get(name, 9), name)


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write(path, buf.getvalue())


def counts_figure(path: Path, rows: list[dict], metric: str, title: str) -> Path:
    """One panel per model: ``metric`` of each finished run against its background count, a line per rain."""
    from matplotlib.figure import Figure

    models = sorted({r["model"] for r in rows}) or ["(no finished run)"]
    fig = Figure(figsize=(4.6 * len(models), 3.8), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models):
        pts = [r for r in rows if r["model"] == model]
        for rain in sorted({r["rain"] for r in pts}, key=rain_order):
            line = sorted((r for r in pts if r["rain"] == rain), key=lambda r: r["count"])
            ax.plot([r["count"] for r in line], [r[metric] for r in line], marker="o", color=COLORS.get(rain),
                    label=f"{rain} training rain")
        if pts:
            ceiling = sum(r["E_R_ceiling"] for r in pts) / len(pts) if metric == "E_R" else None
            if ceiling is not None:
                ax.axhline(ceiling, color="0.5", ls="--", lw=1, label="E_R ceiling (all rain removed)")
            ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        counts = sorted({r["count"] for r in pts})
        if counts:
            ax.set_xticks(counts, [f"{c:,}" for c in counts], fontsize=8)
            ax.minorticks_off()
        ax.set_xlabel("training background patches (log scale)")
        ax.set_ylabel(LABELS[metric])
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    return save(fig, path)


def curves_figure(path: Path, curves: list[dict]) -> Path:
    """E_R and E_B against the training step, one line per (band, model)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    models = sorted({c["model"] for c in curves})
    for ax, metric in zip(axes, ("E_R", "E_B")):
        for mi, model in enumerate(models):
            for band in ("low", "medium", "high"):
                pts = sorted((c for c in curves if c["model"] == model and c["band"] == band and c.get(metric)
                              is not None), key=lambda c: c["step"])
                if pts:
                    ax.plot([c["step"] for c in pts], [c[metric] for c in pts], marker=".", color=COLORS.get(band),
                            ls=styles[mi % len(styles)], label=f"{band} sharpness" + (f", {model}" if
                                                                                      len(models) > 1 else ""))
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS[metric])
        ax.set_title(f"{metric} along training")
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    fig.suptitle("Fig. 6: training backgrounds of low / medium / high sharpness, held-out rain")
    return save(fig, path)


def table3_figure(path: Path, rows: list[dict]) -> Path:
    """E_R and E_B bars, one bar per (model, rain, count) run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    names = [f"{r['model']}\n{r['rain']}\n{r['count']:,}" for r in rows]
    for ax, metric in zip(axes, ("E_R", "E_B")):
        ax.bar(range(len(rows)), [r[metric] for r in rows], color=[COLORS.get(r["rain"], "0.5") for r in rows])
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_xlabel("model, training rain, background patches")
        ax.set_ylabel(LABELS[metric])
        ax.set_title(metric)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Table III: many against few training backgrounds, held-out rain")
    return save(fig, path)
