"""rainsweep reproduce: recipe plans, reports from hand-made rows, and fig4 / toy end to end at the tiny scale."""
from __future__ import annotations

import csv
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli.reproduce import reproduce as reproduce_cmd
from engine.data.store import open_store, write_store
from engine.experiments import recipes as R
from engine.experiments import report as rep
from engine.experiments.reproduce import check_out, prepare_stores, reproduce, run_threads


def _banded_patches(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """n gray 32 x 32 patches: 128 plus Gaussian noise of ``sigma`` (the same in all channels). The Laplacian of
    i.i.d. noise has variance 20 sigma^2, so sigma 0 / 6 / 40 land in the low / medium / high sharpness band."""
    g = np.clip(128 + rng.normal(0, sigma, size=(n, 32, 32)), 0, 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def banded_store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    patches = np.concatenate([_banded_patches(rng, 100, s) for s in (0.0, 6.0, 40.0)])
    path = tmp_path_factory.mktemp("reproduce") / "banded.zarr"
    write_store(path, patches, source=np.arange(len(patches)) // 10)
    return path


@pytest.fixture(scope="module")
def test_store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(4)
    path = tmp_path_factory.mktemp("reproduce") / "test.zarr"
    write_store(path, rng.integers(0, 256, size=(20, 32, 32, 3)).astype(np.uint8), source=np.arange(20))
    return path


def _args(line: str) -> dict:
    """train.py options of a plan line as {option: value}."""
    words = shlex.split(line)
    i = words.index("train")
    return dict(zip(words[i + 1::2], words[i + 2::2]))


# ---- plans (no training) --------------------------------------------------------------------------------------------

def test_band_sizes_match_the_hand_made_store(banded_store: Path, tmp_path: Path) -> None:
    sharp = np.asarray(open_store(banded_store).sharpness)
    expected = {"low": int((sharp < 50).sum()), "medium": int(((sharp >= 500) & (sharp <= 1000)).sum()),
                "high": int((sharp > 5000).sum())}
    assert expected == {"low": 100, "medium": 100, "high": 100}  # the fixture's construction holds
    stores = prepare_stores(tmp_path, R.SCALES["gpu"], str(banded_store), str(banded_store), lambda s: None)
    assert stores.bands == expected and stores.count == 300 and stores.patch == 32 and not stores.built


def test_gpu_plan_fig4(banded_store: Path, test_store: Path, tmp_path: Path) -> None:
    lines = reproduce("fig4", "gpu", tmp_path / "o", store=banded_store, test_store=test_store, plan_only=True,
                      echo=lambda s: None)
    runs = [_args(x) for x in lines]
    top = 299  # all but one patch (a sweep keeps one out); the held-out backgrounds come from the test store
    counts = [8, 16, 32, 64, 128, 256, top]
    assert len(runs) == 3 * len(counts)
    assert [(a["--rain"], int(a["--count"])) for a in runs] == [(r, c) for r in ("small", "medium", "large")
                                                                for c in counts]
    for a in runs:
        assert a["--model"] == "resnet" and a["--iters"] == "15000" and a["--device"] == "cuda"
        assert a["--batch"] == "16" and a["--test-rain"] == "heldout-layered" and a["--test-count"] == "64"
        assert a["--test-store"] == str(test_store.resolve())  # one held-out set for every run
        assert "--heldout-exclude-count" not in a
        assert a["--store"] == str(banded_store.resolve()) and Path(a["--out"]).is_absolute()
        assert Path(a["--out"]).parent == (tmp_path / "o" / "sweeps" / "counts" / "runs").resolve()
        assert "--threads" not in a


def test_cpu_plan_fig4_uses_small_models_and_one_thread(banded_store: Path, test_store: Path,
                                                         tmp_path: Path) -> None:
    lines = reproduce("fig4", "cpu", tmp_path / "o", store=banded_store, test_store=test_store,
                      model_names=["resnet", "unet"], plan_only=True, echo=lambda s: None)
    runs = [_args(x) for x in lines]
    assert {a["--model"] for a in runs} == {"resnet-s", "unet-s"}
    assert sorted({int(a["--count"]) for a in runs}) == [8, 64, 299]
    assert all(a["--device"] == "cpu" and a["--threads"] == "1" and a["--iters"] == "6000" for a in runs)


def test_plan_table3_and_fig6(banded_store: Path, test_store: Path, tmp_path: Path) -> None:
    t3 = [_args(x) for x in reproduce("table3", "gpu", tmp_path / "o", store=banded_store, test_store=test_store,
                                      plan_only=True, echo=lambda s: None)]
    assert sorted((a["--rain"], int(a["--count"])) for a in t3) == [("large", 128), ("large", 256),
                                                                     ("medium", 64), ("medium", 299)]
    # fig4's folder and arguments: a run fig4 finished is reused
    fig4 = reproduce("fig4", "gpu", tmp_path / "o", store=banded_store, test_store=test_store, plan_only=True,
                     echo=lambda s: None)
    assert {x for x in reproduce("table3", "gpu", tmp_path / "o", store=banded_store, test_store=test_store,
                                 plan_only=True, echo=lambda s: None) if "--count 128 " in x} <= set(fig4)
    f6 = [_args(x) for x in reproduce("fig6", "gpu", tmp_path / "o", store=banded_store, test_store=test_store,
                                      plan_only=True, echo=lambda s: None)]
    assert sorted(a["--sharpness"] for a in f6) == ["high", "low", "medium"]
    assert {a["--count"] for a in f6} == {"100"}  # the scale's 512, capped at the smallest band
    assert {a["--test-store"] for a in f6} == {str(test_store.resolve())}
    assert all("--heldout-exclude-count" not in a and a["--eval-every"] == "1000" for a in f6)
    assert len({a["--out"] for a in f6}) == 3  # one folder per band: run names do not carry the band


def test_names_and_errors(banded_store: Path, tmp_path: Path) -> None:
    assert R.resolve_models(["resnet", "swinir"], R.SCALES["cpu"]) == ("resnet-s", "swinir-s")
    assert R.resolve_models(None, R.SCALES["gpu"]) == ("resnet",)
    assert R.resolve_models(["unet-s"], R.SCALES["gpu"]) == ("unet-s",)
    with pytest.raises(R.RecipeError, match="--model 'vgg'"):
        R.resolve_models(["vgg"], R.SCALES["gpu"])
    with pytest.raises(R.RecipeError, match="--scale 'huge'"):
        R.get_scale("huge")
    with pytest.raises(R.RecipeError, match="recipe 'fig5'"):
        R.check_recipe("fig5")
    with pytest.raises(R.RecipeError, match="medium"):
        R.band_count(R.SCALES["cpu"], {"low": 5, "medium": 0, "high": 9})
    assert R.band_count(R.SCALES["cpu"], {"low": 5000, "medium": 300, "high": 900}) == 300
    assert R.band_count(R.SCALES["cpu"], {"low": 5000, "medium": 3000, "high": 9000}) == 2048
    with pytest.raises(R.RecipeError, match="too few"):
        R.fig4_sweeps(R.SCALES["gpu"], ("resnet",), 1, "/t")
    # an output folder remembers its scale: runs of another scale are never reused
    stores = prepare_stores(tmp_path, R.SCALES["gpu"], str(banded_store), str(banded_store), lambda s: None)
    check_out(tmp_path, R.SCALES["gpu"], stores)
    check_out(tmp_path, R.SCALES["gpu"], stores)
    with pytest.raises(R.RecipeError, match="another scale, iters .scale=.gpu., iters=15000."):
        check_out(tmp_path, R.SCALES["cpu"], stores)


def test_stores_sharing_a_picture_are_refused(tmp_path: Path) -> None:
    from engine.data.precompute import precompute

    for name in ("a", "b"):
        precompute(["builtin:procedural?images=2&size=64"], tmp_path / name, patch=32, stride=32, progress=False)
    with pytest.raises(R.RecipeError, match="share 2 source picture"):
        prepare_stores(tmp_path, R.SCALES["cpu"], str(tmp_path / "a"), str(tmp_path / "b"), lambda s: None)


def test_cli_rejects_bad_scale_and_hides_tiny(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(reproduce_cmd, ["fig4", "--scale", "big", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "expected one of cpu, gpu" in res.output
    res = runner.invoke(reproduce_cmd, ["--help"])
    assert res.exit_code == 0 and "cpu|gpu" in res.output and "tiny" not in res.output


def test_run_threads_sets_numba_threads_for_children_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    with run_threads(1):
        assert os.environ["NUMBA_NUM_THREADS"] == "1"
    assert "NUMBA_NUM_THREADS" not in os.environ
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    with run_threads(1):
        assert os.environ["NUMBA_NUM_THREADS"] == "2"  # the user's setting wins


# ---- reports from hand-made rows ------------------------------------------------------------------------------------

def _row(rain: str, count: int, er: float, eb: float, run_dir: Path, label: str = "background count") -> dict:
    return {"run": f"resnet-s_{rain}_n{count}_s0", "model": "resnet-s", "rain": rain, "count": count, "seed": 0,
            "iters": 10, "status": "trained", "E_R": er, "E_B": eb, "rain_residual": 1.0, "PSNR": 20.0,
            "E_R_ceiling": 99.0, "label": label, "sweep": "counts", "run_dir": str(run_dir)}


def _context(tmp_path: Path, recipe: str) -> rep.Context:
    return rep.Context(recipe=recipe, scale=R.SCALES["cpu"], out=tmp_path / recipe, store="/s", store_count=999,
                       patch=32, built_store=True, test_store="/t", built_test_store=True, models=("resnet-s",),
                       wall_s=75.0)


def test_fig4_report_from_rows(tmp_path: Path) -> None:
    rows = [_row("medium", 8, 90.0, 30.0, tmp_path), _row("medium", 64, 70.5, 20.0, tmp_path),
            _row("medium", 935, 50.25, 15.0, tmp_path), _row("small", 8, 60.0, 20.0, tmp_path),
            _row("small", 935, 60.4, 19.0, tmp_path)]
    path = rep.write_recipe(_context(tmp_path, "fig4"), rows)
    text = path.read_text()
    # the paper's numbers beside ours, ours taken from the nearest count on a log scale
    assert "| ResNet, medium rain, 64 backgrounds | 53.3 | 70.5 (resnet-s, 64 backgrounds) |" in text
    assert "| ResNet, medium rain, 30,000 backgrounds | 31.2 | 50.2 (resnet-s, 935 backgrounds) |" in text
    assert "| resnet-s | medium | 935 | 50.2 | 15.0 | 20.00 | 99.0 |" in text
    assert "shows for 1 of 2 training-rain line(s)" in text  # medium falls by 39.8; small stays within 1
    assert ("resnet-s, medium rain: E_R 90.0, 70.5, 50.2 and E_B 30.0, 20.0, 15.0 at 8, 64, 935 backgrounds (E_R "
            "ceiling 99.0): E_R falls by 39.8 from the fewest to the most.") in text
    assert "small rain: E_R 60.0, 60.4 and E_B 20.0, 19.0 at 8, 935 backgrounds" in text
    assert "E_R changes by less than 1 (+0.4)" in text
    assert "| ratio many / few | 0.59 | 0.71 |" in text
    assert "the fall is weaker than the paper's (ratio 0.71 against 0.59)" in text
    assert "Wall time of this invocation: 1 min 15 s (5 run(s) trained, 0 reused, 0 failed)" in text
    with open(tmp_path / "fig4" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["rain"], int(t["count"])) for t in table] == [("small", 8), ("small", 935), ("medium", 8),
                                                            ("medium", 64), ("medium", 935)]
    assert float(table[4]["E_R"]) == 50.25 and list(table[0])[:3] == ["model", "rain", "count"]


def test_table3_and_fig6_reports_from_rows(tmp_path: Path) -> None:
    rows = [_row("medium", 64, 80.0, 25.0, tmp_path), _row("medium", 935, 55.0, 12.0, tmp_path),
            _row("large", 128, 70.0, 20.0, tmp_path), _row("large", 256, 71.0, 19.0, tmp_path)]
    text = rep.write_recipe(_context(tmp_path, "table3"), rows).read_text()
    assert "| resnet-s | medium | 64 | 80.0 | 25.0 | 20.00 | 53.3 |" in text
    assert "| resnet-s | medium | 935 | 55.0 | 12.0 | 20.00 | 31.2 |" in text
    assert "| resnet-s | large | 256 | 71.0 | 19.0 | 20.00 | see the paper's Table III |" in text
    assert "53.3 at 64 against 31.2 at 30,000) shows on medium rain here" in text
    # fig6: curves come from each run's eval lines
    bands = []
    for band, er in (("low", 90.0), ("medium", 70.0), ("high", 40.0)):
        d = tmp_path / band
        d.mkdir()
        lines = [{"step": 5, "loss": 0.1, "steps_per_s": 5.0}, {"step": 5, "event": "eval", "E_R": er - 10,
                                                                 "E_B": 9.0, "PSNR": 20.0},
                 {"step": 10, "loss": 0.1, "steps_per_s": 2.5}, {"step": 10, "event": "final", "E_R": er,
                                                                  "E_B": 8.0, "PSNR": 21.0}]
        (d / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        bands.append(_row("medium", 100, er, 8.0, d, label=f"sharpness {band}"))
    ctx = _context(tmp_path, "fig6")
    ctx.bands = {"low": 500, "medium": 300, "high": 200}
    text = rep.write_recipe(ctx, bands).read_text()
    assert "| low | resnet-s | 100 | 500 | 90.0 | 8.0 | 20.00 | 99.0 |" in text
    assert "final E_R 90.0 (low) / 70.0 (medium) / 40.0 (high)" in text and ") shows here" in text
    assert "See the paper's Fig. 6" in text
    # training time from the logs: 5 steps at 5/s + 5 steps at 2.5/s = 3 s per run
    assert "summed over the runs (from their log.jsonl): 9 s" in text
    with open(tmp_path / "fig6" / "results.csv") as f:
        curves = list(csv.DictReader(f))
    assert [(c["band"], c["step"], c["event"]) for c in curves[:2]] == [("low", "5", "eval"), ("low", "10", "final")]
    assert len(curves) == 6
    for name in ("fig6/figures/fig6.png", "table3/figures/table3.png"):
        _check_png(tmp_path / name)


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.width >= 400 and im.height >= 300


# ---- end to end at the tiny scale -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_fig4_tiny_end_to_end_and_rerun(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    runner = CliRunner()
    res = runner.invoke(reproduce_cmd, ["fig4", "--scale", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "store: 54 patches of 32 x 32" in res.output  # built from the tiny scale's built-in source
    with open(out / "fig4" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(rep.FIG4_COLUMNS)
    assert [(t["rain"], int(t["count"])) for t in table] == [("small", 4), ("small", 8), ("medium", 4),
                                                            ("medium", 8)]
    text = (out / "fig4" / "report.md").read_text()
    for t in table:
        metrics = json.loads((out / "sweeps" / "counts" / "runs" / t["run"] / "metrics.json").read_text())
        assert float(t["E_R"]) == metrics["E_R"] and t["status"] == "trained"
        assert f"| resnet-s | {t['rain']} | {t['count']} | {metrics['E_R']:.1f} | {metrics['E_B']:.1f} |" in text
    medium8 = next(t for t in table if t["rain"] == "medium" and t["count"] == "8")
    assert f"| ResNet, medium rain, 64 backgrounds | 53.3 | {float(medium8['E_R']):.1f} (resnet-s, 8 backgrounds) |" \
        in text
    for name in ("fig4_E_R.png", "fig10_E_B.png"):
        _check_png(out / "fig4" / "figures" / name)
    # a rerun trains nothing and reuses the store
    res = runner.invoke(reproduce_cmd, ["fig4", "--scale", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "store: reusing" in res.output
    assert "(0 run(s) trained, 4 reused, 0 failed)" in (out / "fig4" / "report.md").read_text()


def test_toy_tiny_end_to_end(tmp_path: Path) -> None:
    res = CliRunner().invoke(reproduce_cmd, ["toy", "--scale", "tiny", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "toy"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * 9  # trained on orders 1, 4, 8; each tested on 3 orders x 3 noises
    text = (out / "report.md").read_text()
    for (tr, te, (mu, sigma)), paper in R.PAPER["toy_mse"].items():
        cell = next(t for t in table if (int(t["train_order"]), int(t["test_order"]), float(t["test_mu"]),
                                         float(t["test_sigma"])) == (tr, te, mu, sigma))
        assert (f"| trained O={tr}, N(0,1) | O={te}, N({mu:g},{sigma:g}) | {paper:.4g} | "
                f"{float(cell['mse']):.4g} | {float(cell['mse_input']):.4g} |") in text
    assert "Direction" in text and ("shows here" in text or "does not show here" in text)
    from engine.experiments.toy_config import receptive_field
    from engine.experiments.toy_ordering import own_cell_ordering

    records = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    ordering = own_cell_ordering(records, field=receptive_field(config["kernel"]), points=config["points"])
    assert ordering.text() in text  # the verdict computed from the written results is the one reported
    _check_png(out / "figures" / "toy_cells.png")


def test_run_specs_splits_jobs_and_collects_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.experiments.sweep as sw
    from engine.experiments.reproduce import Stores, run_specs

    calls = []

    def fake_sweep(store, counts, rains, models, iters, out, *, extra, jobs, test_rain, echo):
        calls.append((Path(out).name, jobs, os.environ.get("NUMBA_NUM_THREADS")))
        rows = [{"run": f"{m}_{r}_n{c}_s0", "model": m, "rain": r, "count": c,
                 "status": "failed (exit 1)" if c == 13 else "trained"} for m in models for r in rains for c in counts]
        if any(r["status"].startswith("failed") for r in rows):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "results.json").write_text(json.dumps(rows))
            raise sw.SweepError("1 run(s) failed")
        return rows

    monkeypatch.setattr(sw, "sweep", fake_sweep)
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    stores = Stores("/s", 100, 32, {}, "/t", False, False, "f", "g")
    bands = [R.SweepSpec(f"sharpness-{b}", (13 if b == "high" else 9,), ("medium",), ("resnet-s",), (), b)
             for b in R.BANDS]
    rows, failed = run_specs(bands, stores, R.SCALES["cpu"], tmp_path, 2, lambda s: None)
    # three folders, two jobs: two sweeps at once with one run each; the runs see one numba thread
    assert sorted(calls) == [("sharpness-high", 1, "1"), ("sharpness-low", 1, "1"), ("sharpness-medium", 1, "1")]
    assert [r["label"] for r in rows] == ["low", "medium", "high"] and failed == ["resnet-s_medium_n13_s0"]
    assert rows[0]["run_dir"] == str(tmp_path / "sweeps" / "sharpness-low" / "runs" / "resnet-s_medium_n9_s0")
    calls.clear()
    same = [R.SweepSpec("counts", (8,), (rain,), ("resnet-s",), (), rain) for rain in ("medium", "large")]
    rows, failed = run_specs(same, stores, R.SCALES["cpu"], tmp_path, 2, lambda s: None)
    assert calls == [("counts", 2, "1"), ("counts", 2, "1")] and not failed  # one folder: one after another
