"""``rainsweep demo``: two models trained on few and on many backgrounds, their held-out metrics side by side and a
labeled comparison sheet; the labeled image grids (engine.experiments.figures) behind it, samples.png and the
sweep's sample sheet."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli.train import demo
from engine.experiments import demo as dm
from engine.experiments import figures as fg
from engine.experiments.train_command import ROOT


# ---- figures ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, factor", [(32, 4), (48, 3), (64, 2), (100, 2), (128, 1), (200, 1), (1, 128)])
def test_upscale_factor_is_the_smallest_whole_factor_reaching_128(patch: int, factor: int) -> None:
    assert fg.upscale_factor(patch) == factor


def test_upscale_repeats_each_pixel() -> None:
    a = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)
    big = fg.upscale(a, 3)
    assert big.shape == (1, 6, 6, 3)
    for y in range(6):
        for x in range(6):
            assert (big[0, y, x] == a[0, y // 3, x // 3]).all()


def tiles_of(rows: int, cols: int, patch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, cols, patch, patch, 3), dtype=np.uint8)


def test_grid_places_each_upscaled_patch_under_its_title(tmp_path: Path) -> None:
    tiles = tiles_of(2, 3, 16)
    path = tmp_path / "g.png"
    layout = fg.write_grid(path, tiles, ["rainy input", "output", "clean"])
    img = np.asarray(Image.open(path).convert("RGB"))
    assert layout.scale == 8 and layout.tile == 128
    assert img.shape == (layout.height, layout.width, 3)
    # Hand-computed geometry: short titles leave every column one tile wide.
    assert layout.width == 2 * fg.PAD + 3 * 128 + 2 * fg.COL_GAP
    assert layout.header == fg.PAD + fg.LINE + fg.GAP
    assert layout.height == layout.header + 2 * 128 + fg.GAP + fg.PAD
    for r in range(2):
        for c in range(3):
            y, x = layout.row_y(r), layout.col_x[c]
            want = np.repeat(np.repeat(tiles[r, c], 8, axis=0), 8, axis=1)
            assert (img[y:y + 128, x:x + 128] == want).all()
    assert (img[: layout.header] < 128).any()  # the titles: dark text on white
    assert fg.read_layout(path) == layout


def test_grid_widens_a_column_for_a_long_title() -> None:
    _, layout = fg.grid_image(tiles_of(1, 2, 8), ["a", "a title much longer than one sixty-four pixel tile"], 8)
    assert layout.tile == 64
    left, right = layout.col_x
    assert right - left > 64 + fg.COL_GAP  # the second column is wider than its tile
    assert layout.width > 2 * fg.PAD + 2 * 64 + fg.COL_GAP


def test_grid_titles_can_have_two_lines() -> None:
    _, one = fg.grid_image(tiles_of(1, 2, 8), ["a", "b"])
    _, two = fg.grid_image(tiles_of(1, 2, 8), ["a", "b\nE_R 1.0"])
    assert two.header - one.header == fg.LINE


def test_grid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one per column"):
        fg.grid_image(tiles_of(1, 3, 8), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[rows, cols, P, P, 3\]"):
        fg.grid_image(np.zeros((3, 8, 8, 3), np.uint8), ["a", "b", "c"])


def test_read_grid_rows_cuts_titles_and_first_rows(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    layout = fg.write_grid(path, tiles_of(4, 3, 32), ["rainy input", "output", "clean"])
    full = np.asarray(Image.open(path).convert("RGB"))
    first = fg.read_grid_rows(path, rows=1)
    assert (first == full[: layout.header + layout.tile]).all()
    assert (fg.read_grid_rows(path, rows=9) == full[: layout.height - fg.PAD]).all()


def test_read_grid_rows_of_an_untitled_png(tmp_path: Path) -> None:
    img = np.random.default_rng(1).integers(0, 256, (4 * 16, 3 * 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "old.png")
    assert fg.read_layout(tmp_path / "old.png") is None
    assert (fg.read_grid_rows(tmp_path / "old.png", rows=2) == img[:32]).all()


def test_visible_patches_prefer_structure_over_flat_tiles() -> None:
    rng = np.random.default_rng(2)
    flat = np.full((6, 16, 16, 3), 120, np.uint8)
    flat[1] = 121  # nearly flat
    flat[4, :8] = 100  # one soft edge
    textured = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    patches = np.concatenate([flat[:3], textured[:1], flat[3:], textured[1:]])  # textured at 3 and 7
    assert list(fg.visible_patches(patches, 2)) == [3, 7]
    assert list(fg.visible_patches(patches, 3)) == [3, 5, 7]  # the edge patch (flat[4]) comes next
    assert list(fg.visible_patches(patches, 20)) == list(range(8))


# ---- the table and the verdict ---------------------------------------------------------------------------------------

def metrics_of(er: float, eb: float, step: int = 10) -> dict:
    return {"E_R": er, "E_B": eb, "PSNR": 20.0, "E_R_ceiling": 90.0, "step": step, "model": "resnet-s",
            "heldout": {"count": 64, "policy": "disjoint-sources"}}


RUNS = [dm.DemoRun(8, Path("a")), dm.DemoRun(512, Path("b"))]


def test_verdict_names_the_gap_when_few_backgrounds_remove_more_rain() -> None:
    line = dm.verdict(RUNS, [metrics_of(95.36, 13.7), metrics_of(82.58, 9.23)])
    assert line.startswith("look at E_R: the model trained on 8 backgrounds removes more of the unseen rain")
    assert "(E_R 95.4 vs 82.6, ceiling 90.0)" in line and "E_B 13.7 vs 9.2" in line


def test_verdict_says_when_the_runs_do_not_show_it() -> None:
    line = dm.verdict(RUNS, [metrics_of(30.0, 10.0), metrics_of(31.0, 10.0)])
    assert "does not remove more" in line and "(E_R 30.0 vs 31.0" in line and "removes more" not in line


def test_summary_has_one_row_per_model_and_the_ceiling() -> None:
    lines = dm.summary_lines(RUNS, [metrics_of(95.364, 13.7), metrics_of(82.58, 9.234)], "heldout-layered")
    assert "64 patches cut from pictures no run trained on" in lines[0] and "after 10 steps each" in lines[0]
    rows = {ln.split(",")[1].split("  ")[0].strip(): ln.split()[-3:] for ln in lines if ln.startswith("  resnet-s")}
    assert rows == {"8 backgrounds": ["95.36", "13.70", "20.00"], "512 backgrounds": ["82.58", "9.23", "20.00"]}
    assert any(ln.startswith("  clean background (ceiling)") and "90.00" in ln for ln in lines)


# ---- the command -----------------------------------------------------------------------------------------------------

def test_demo_rejects_unknown_model(tmp_path: Path) -> None:
    res = CliRunner().invoke(demo, ["--out", str(tmp_path / "d"), "--model", "big"])
    assert res.exit_code == 2 and "resnet-s" in res.output
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("counts", ["8", "8,8", "8,x", "0,8"])
def test_demo_needs_two_different_counts(tmp_path: Path, counts: str) -> None:
    res = CliRunner().invoke(demo, ["--out", str(tmp_path / "d"), "--counts", counts])
    assert res.exit_code == 2 and "--counts" in res.output
    assert not (tmp_path / "d").exists()


def table_rows(output: str) -> dict[str, list[float]]:
    """The printed table's model rows: label -> [E_R, E_B, PSNR]."""
    rows = {}
    for m in re.finditer(r"^  resnet-s, (\d+ backgrounds)\s+(\S+)\s+(\S+)\s+(\S+)$", output, re.M):
        rows[m.group(1)] = [float(m.group(i)) for i in (2, 3, 4)]
    return rows


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CI machine is small and shared
    # The real demo path (built-in pictures -> store -> two train.py subprocesses -> held-out metrics -> sheet),
    # cut to 3 steps on 2 and 4 backgrounds.
    args = ["--out", str(tmp_path / "d"), "--iters", "3", "--counts", "4,2"]
    res = CliRunner().invoke(demo, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "d"
    runs = {c: out / "runs" / f"resnet-s_p32_i3_n{c}" for c in (2, 4)}
    # Both models' progress lines streamed, prefixed by their run.
    for c in (2, 4):
        assert re.search(rf"^  n{c} +\| step 3/3 ", res.output, re.M), res.output
    # The table shows exactly each run's metrics.json.
    rows = table_rows(res.output)
    assert set(rows) == {"2 backgrounds", "4 backgrounds"}
    held = set()
    for c, run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        assert m["step"] == 3 and m["train_patches"] == c
        assert rows[f"{c} backgrounds"] == [round(m[k], 2) for k in ("E_R", "E_B", "PSNR")]
        held.add(m["heldout"]["indices_sha256"])
    assert len(held) == 1  # both scored on the same held-out patches
    assert "look at E_R:" in res.output
    # comparison.png: rainy input | 2 backgrounds | 4 backgrounds | clean, dm.SHOW rows, 32-pixel patches drawn at
    # 128 pixels.
    sheet = out / "comparison.png"
    assert str(sheet) in res.output
    layout = fg.read_layout(sheet)
    assert (layout.rows, layout.cols, layout.tile, layout.scale) == (dm.SHOW, 4, 128, 4)
    img = np.asarray(Image.open(sheet).convert("RGB"))
    assert img.shape[:2] == (layout.height, layout.width)
    assert img.shape[0] >= dm.SHOW * 128 + layout.header and img.shape[1] >= 4 * 128
    # Every clean tile is a 4x upscaled store patch that no run trained on, with visible content.
    from engine.data.select import select
    from engine.data.store import open_store

    store = open_store(out / "store-32")
    patches = np.asarray(store.read_all())
    trained = set(select(store, 4, sharpness=dm.SHARPNESS, seed=0).indices.tolist())
    for r in range(layout.rows):
        y, x = layout.row_y(r), layout.col_x[3]
        tile = img[y:y + 128, x:x + 128]
        small = tile[::4, ::4]
        assert (np.repeat(np.repeat(small, 4, axis=0), 4, axis=1) == tile).all()
        matches = np.flatnonzero((patches == small).all(axis=(1, 2, 3)))
        assert len(matches) and any(int(i) not in trained for i in matches)
        assert small.astype(np.float64).std() > 2
    # samples.png of each run: titled columns rainy input | output | clean, patches at 128 pixels.
    for run in runs.values():
        s = fg.read_layout(run / "samples.png")
        assert (s.rows, s.cols, s.tile) == (4, 3, 128)
    again = CliRunner().invoke(demo, args)
    assert again.exit_code == 0 and again.output.count("reusing the finished run") == 2
    assert table_rows(again.output) == rows
    assert not (ROOT / "d").exists()
