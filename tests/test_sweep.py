"""Sweeps (subprocess runs, skip on rerun, results and figures), on tiny stores (the demo: tests/test_demo.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.experiments import sweep as sw
from engine.cli.train import sweep
from engine.data.store import write_store

TINY = ("--test-count", "4", "--log-every", "2", "--device", "cpu", "--batch", "4", "--threads", "1")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, size=(24, 4, 4, 3)).astype(np.float64)
    patches = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2).astype(np.uint8)
    path = tmp_path_factory.mktemp("sweep") / "s.zarr"
    write_store(path, patches, source=np.arange(24) % 6)
    return path


def test_parse_list_and_plan() -> None:
    assert sw.parse_list("8, 16,32", "--counts", int, minimum=1) == [8, 16, 32]
    with pytest.raises(sw.SweepError, match="--counts"):
        sw.parse_list("8,x", "--counts", int)
    with pytest.raises(sw.SweepError, match=">= 1"):
        sw.parse_list("0,8", "--counts", int, minimum=1)
    runs = sw.plan(["resnet"], ["small", "large"], [8, 16])
    assert [(r.rain, r.count) for r in runs] == [("small", 8), ("small", 16), ("large", 8), ("large", 16)]
    assert len({r.name for r in runs}) == 4
    assert sw.RunConfig("unet", "amount=0.1:0.2,width=3", 8).name == "unet_amount-0.1-0.2-width-3_n8_s0"


def test_sweep_runs_skips_and_reports(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sw"
    # jobs=2: both runs at once (exercises the concurrent path and halves the wall time on 2 cores)
    rows = sw.sweep(store, [4, 8], ["medium"], ["resnet-s"], 2, out, extra=TINY, jobs=2, echo=lambda s: None)
    assert [r["status"] for r in rows] == ["trained", "trained"]
    # every count is scored on the same held-out patches (outside the largest, nested training selection)
    held = [json.loads((out / "runs" / r["run"] / "config.json").read_text())["heldout"] for r in rows]
    assert held[0]["indices_sha256"] == held[1]["indices_sha256"]
    for r in rows:
        m = json.loads((out / "runs" / r["run"] / "metrics.json").read_text())
        assert r["E_R"] == m["E_R"] and r["E_B"] == m["E_B"]
        cfg = json.loads((out / "runs" / r["run"] / "config.json").read_text())
        assert cfg["train_patches"] == r["count"] and cfg["rain"] == "medium" and cfg["iters"] == 2
        assert (out / "samples" / f"{r['run']}.png").is_file()
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(t["count"]) for t in table] == [4, 8]
    assert float(table[1]["E_B"]) == pytest.approx(rows[1]["E_B"])
    assert json.loads((out / "results.json").read_text()) == rows
    fig = Image.open(out / "figures" / "er_eb_resnet-s.png")
    assert fig.size[0] > 400 and fig.size[1] > 200
    assert (out / "figures" / "samples_resnet-s.png").is_file()

    mtime = (out / "runs" / rows[0]["run"] / "metrics.json").stat().st_mtime_ns
    again = sw.sweep(store, [4, 8], ["medium"], ["resnet-s"], 2, out, extra=TINY, echo=lambda s: None)
    assert [r["status"] for r in again] == ["skipped (finished)"] * 2
    assert (out / "runs" / rows[0]["run"] / "metrics.json").stat().st_mtime_ns == mtime


def test_failed_runs_are_reported(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    with pytest.raises(sw.SweepError, match="failed"):
        sw.sweep(store, [4], ["medium"], ["resnet-s"], 2, out, extra=(*TINY, "--lr", "not-a-number"),
                 echo=lambda s: None)
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["status"].startswith("failed") and "--lr" in rows[0]["error"]


def test_counts_beyond_the_store_are_rejected(store: Path, tmp_path: Path) -> None:
    with pytest.raises(sw.SweepError, match="only 24 patches"):
        sw.sweep(store, [8, 64], ["medium"], ["resnet-s"], 2, tmp_path / "x", echo=lambda s: None)


@pytest.mark.parametrize("args,names", [
    (["--model", "vgg"], ["resnet", "unet", "swinir"]),
    (["--rain", "small,drizzle"], ["small", "medium", "large"]),
])
def test_sweep_cli_lists_valid_names(store: Path, tmp_path: Path, args: list[str], names: list[str]) -> None:
    res = CliRunner().invoke(sweep, ["--store", str(store), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    for n in names:
        assert n in res.output


def test_plot_draws_one_line_per_rain(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"run": f"r{c}{r}", "model": "resnet", "rain": r, "count": c, "E_R": float(c), "E_B": 1.0 / c}
            for r in ("small", "large") for c in (8, 16, 32)]
    captured = {}
    orig = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig) or None  # keep the figure to inspect it
    try:
        paths = sw.plot_results(tmp_path, rows, "heldout-layered")
    finally:
        plt.close = orig
    assert paths == [tmp_path / "figures" / "er_eb_resnet.png"] and paths[0].is_file()
    ax_er, ax_eb = captured["fig"].axes
    assert ax_er.get_xscale() == "log"
    lines = {ln.get_label(): ln for ln in ax_er.get_lines()}
    assert set(lines) == {"small rain", "large rain"}
    assert list(lines["small rain"].get_xdata()) == [8, 16, 32]
    assert list(lines["small rain"].get_ydata()) == [8.0, 16.0, 32.0]
    assert list(ax_eb.get_lines()[0].get_ydata()) == pytest.approx([1 / 8, 1 / 16, 1 / 32])
