"""Tests for the built-in images, ``rainsweep preview`` and ``rainsweep bench`` (harness, CLI, JSON). Fast: tiny
patches and counts; no timed asserts (speed belongs to bench/)."""
from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.bench import core as B
from engine.bench import timing as T
from engine.data.builtin_images import builtin_patches, procedural_patches
from engine.cli import main
from engine.rain import PRESETS, RainSpec

# ---- built-in images -----------------------------------------------------------------------------------------------


def test_builtin_patches_shape_dtype_determinism():
    a = builtin_patches(5, 32, seed=3)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, builtin_patches(5, 32, seed=3))
    # patch i does not depend on how many were asked for
    np.testing.assert_array_equal(a[:2], builtin_patches(2, 32, seed=3))
    assert not np.array_equal(a, builtin_patches(5, 32, seed=4))
    assert builtin_patches(0, 32).shape == (0, 32, 32, 3)


def test_builtin_patches_are_crops_of_the_skimage_pictures():
    skimage_data = pytest.importorskip("skimage.data")
    # Patch 0 comes from the astronaut picture (512 x 512, rescaled so its short side is 3 * size = 96 here): an
    # independent check that the patch is an exact crop of that picture, rescaled with PIL's BOX filter.
    size = 32
    astro = np.asarray(Image.fromarray(skimage_data.astronaut()).resize((96, 96), Image.Resampling.BOX))
    p = builtin_patches(1, size, seed=0)[0]
    windows = np.lib.stride_tricks.sliding_window_view(astro, (size, size, 3))[..., 0, :, :, :]
    assert (windows == p).all(axis=(-3, -2, -1)).any()


def test_builtin_patches_differ_and_are_textured():
    a = builtin_patches(6, 64)
    assert len({x.tobytes() for x in a}) == 6
    assert all(x.std() > 3 for x in a)


def test_procedural_fallback(monkeypatch):
    from engine.data import builtin_images

    monkeypatch.setattr(builtin_images, "skimage_pictures", lambda size: ())
    with pytest.warns(RuntimeWarning, match="procedural"):
        a = builtin_images.builtin_patches(3, 24, seed=1)
    np.testing.assert_array_equal(a, procedural_patches(3, 24, seed=1))
    with pytest.raises(RuntimeError, match="skimage"):
        builtin_images.builtin_patches(3, 24, source="skimage")
    p = procedural_patches(4, 24)
    assert p.dtype == np.uint8 and p.shape == (4, 24, 24, 3)
    assert len({x.tobytes() for x in p}) == 4 and all(x.std() > 3 for x in p)


@pytest.mark.parametrize("kwargs, match", [({"n": -1}, "n:"), ({"n": 2, "size": 4}, "size:"),
                                            ({"n": 2, "source": "web"}, "source:")])
def test_builtin_patches_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        builtin_patches(**kwargs)


# ---- preview -------------------------------------------------------------------------------------------------------

def _tile(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]


def test_preview_grid_content(tmp_path):
    synth = pytest.importorskip("engine.synth")
    from engine.experiments.preview import COLUMNS, GAP, write_preview

    size, count, seed = 32, 2, 5
    out = tmp_path / "grid.png"
    layout = write_preview(out, rain="small,large", size=size, count=count, seed=seed, backend="cpu")
    img = np.asarray(Image.open(out))
    assert img.shape == (layout.height, layout.width, 3) and img.dtype == np.uint8
    assert layout.width == 4 * size + 5 * GAP
    assert layout.height > 2 * count * size  # two specs of `count` rows each, plus labels
    assert len(layout.tiles) == 2 * count * 4 and len(layout.labels) == 2
    # tiles: size x size, inside the image, not overlapping one another or the label bands
    boxes = list(layout.tiles.values()) + list(layout.labels.values())
    for x0, y0, x1, y1 in layout.tiles.values():
        assert x1 - x0 == size and y1 - y0 == size and 0 <= x0 and x1 <= layout.width and y1 <= layout.height
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)

    # Every tile holds exactly what synthesize makes for the same backgrounds, seed and keys (PNG is lossless).
    bg = builtin_patches(count, size, seed=seed)
    for s, name in enumerate(("small", "large")):
        ref = synth.synthesize(bg, RainSpec.preset(name), seed=seed, keys=np.arange(count), backend="cpu")
        for r in range(count):
            tiles = {c: _tile(img, layout.tiles[(s, r, c)]) for c in COLUMNS}
            np.testing.assert_array_equal(tiles["background"], bg[r])
            np.testing.assert_array_equal(tiles["rain"], np.repeat(np.asarray(ref.rain[r])[..., None], 3, 2))
            np.testing.assert_array_equal(tiles["rainy"], np.asarray(ref.rainy[r]))
            expected_mask = np.asarray(ref.rain[r]) > RainSpec.preset(name).threshold
            np.testing.assert_array_equal(tiles["mask"], np.repeat(expected_mask[..., None], 3, 2) * 255)
            # not blank: there is rain, and the rainy image differs from its background
            assert tiles["rain"].max() > 0 and (tiles["rainy"] != tiles["background"]).any()
    # small and large rain differ on the same backgrounds
    assert not np.array_equal(_tile(img, layout.tiles[(0, 0, "rain")]), _tile(img, layout.tiles[(1, 0, "rain")]))
    # label bands carry text (pixels other than the backdrop)
    label = _tile(img, layout.labels[0])
    assert (label != label[0, 0]).any()


def test_preview_cli_all_presets(tmp_path):
    pytest.importorskip("engine.synth")
    from engine.experiments.preview import GAP

    out = tmp_path / "sub" / "preview.png"
    res = CliRunner().invoke(main, ["preview", "--out", str(out), "--size", "16", "--count", "1", "--seed", "2"])
    assert res.exit_code == 0, res.output
    img = Image.open(out)
    img.load()
    assert img.format == "PNG" and img.mode == "RGB"
    assert img.size[0] == 4 * 16 + 5 * GAP
    assert img.size[1] > len(PRESETS) * 16  # one row per preset plus labels
    # written atomically: nothing but the PNG is left in its folder
    assert os.listdir(out.parent) == ["preview.png"]


def test_preview_rain_spec_resolution():
    from engine.experiments.preview import resolve_rain

    assert [s.name for s in resolve_rain("all")] == list(PRESETS)
    assert [s.name for s in resolve_rain("small, large")] == ["small", "large"]
    custom = resolve_rain("medium,width=9")
    assert len(custom) == 1 and custom[0].width == (9,)


def test_preview_bad_preset_lists_valid_ones(tmp_path):
    out = tmp_path / "p.png"
    res = CliRunner().invoke(main, ["preview", "--rain", "drizzle", "--out", str(out)])
    assert res.exit_code != 0
    assert "drizzle" in res.output and "valid presets" in res.output
    assert all(name in res.output for name in PRESETS)
    assert not out.exists()


# ---- benchmark harness ---------------------------------------------------------------------------------------------

class FakeClock:
    """perf_counter stand-in: time moves only when a fake runner says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_measure_counts_and_rates(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(T.time, "perf_counter", clock)
    durations = iter([5.0, 0.5, 0.25, 1.0, 0.5, 0.5])  # warm-up first (slow: compiling), then repeats
    calls = []

    def run():
        calls.append(1)
        clock.now += next(durations)

    timing = T.measure(run, patches=100, seconds=2.0, min_repeats=3)
    # warm-up is off the clock; repeats continue until 2 s have passed: 0.5 + 0.25 + 1.0 + 0.5 = 2.25
    assert len(calls) == 5 and timing.repeats == 4
    assert timing.rates == [200.0, 400.0, 100.0, 200.0]
    assert timing.median == 200.0 and timing.warmup_s == 5.0


def test_measure_min_repeats_and_bad_patches(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(T.time, "perf_counter", clock)

    def run():
        clock.now += 10.0  # each call alone exceeds `seconds`

    timing = T.measure(run, patches=10, seconds=1.0, min_repeats=3)
    assert timing.repeats == 3 and timing.rates == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="patches"):
        T.measure(run, patches=0)


def _fake_case(name, clock, durations, log, fail_at=None):
    """A case whose runner advances the fake clock by the next duration and logs its name."""
    def build(patches):
        it = iter(durations)

        def run():
            log.append(name)
            if len(log) and log.count(name) == fail_at:
                raise RuntimeError("boom")
            clock.now += next(it)
        return run
    return B.Case(name, "fake", "synthesis", "cpu", build)


@pytest.mark.parametrize("interleave", [True, False])
def test_run_cases_interleaved_and_sequential(monkeypatch, interleave):
    clock = FakeClock()
    monkeypatch.setattr(T.time, "perf_counter", clock)
    log: list[str] = []
    cases = [_fake_case("a", clock, [9.0] + [1.0] * 10, log),
             B.Case("missing", "fake", "synthesis", "cpu", lambda p: None, requires=("no_such_module_xyz",)),
             _fake_case("b", clock, [9.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], log),
             _fake_case("c", clock, [1.0] * 10, log, fail_at=3)]
    patches = np.zeros((4, 2, 2, 3), np.uint8)
    res = B.run_cases(cases, patches, threads=1, seconds=2.0, min_repeats=3, interleave=interleave)
    assert [r.case.name for r in res] == ["a", "missing", "b", "c"]
    a, missing, b, c = res
    assert "not installed: no_such_module_xyz" in missing.skipped and missing.timing is None
    assert "failed: RuntimeError: boom" in c.skipped and c.timing is None
    # warm-up off the clock; a: 3 repeats of 1 s (>= 2 s after the 3rd), b: 4 repeats of 0.5 s
    assert a.timing.rates == [4.0] * 3 and a.timing.warmup_s == 9.0
    assert b.timing.rates == [8.0] * 4 and b.timing.warmup_s == 9.0
    timed = [x for x in log if x in "ab"][2:]  # after the two warm-ups
    if interleave:
        assert log[:3] == ["a", "b", "c"]  # all warmed up first, then timed in turns
        assert timed[:4] == ["a", "b", "a", "b"]
    else:
        assert log[:4] == ["a", "a", "a", "a"]  # warm-up and repeats of one case before the next


def _result(name, impl, task, preset, threads, rate):
    case = B.Case(name, impl, task, "cpu", build=lambda p: (lambda: None), preset=preset)
    return B.Result(case, threads, T.Timing(10, [rate]))


def test_ratios_pair_same_task_threads_and_preset():
    results = [
        _result("synthesize[small]", B.OURS, "synthesis", "small", 1, 1000.0),
        _result("synthesize[medium]", B.OURS, "synthesis", "medium", 1, 600.0),
        _result("authors-opencv[medium]", "authors-opencv", "synthesis", "medium", 1, 100.0),
        _result("albumentations-default", "albumentations", "synthesis", None, 1, 300.0),
        _result("albumentations-default", "albumentations", "synthesis", None, 2, 500.0),
        _result("sharpness", B.OURS, "sharpness", None, 1, 50.0),
        _result("opencv-laplacian-f64", "opencv", "sharpness", None, 1, 25.0),
    ]
    got = {(r["ours"], r["peer"], r["threads"]): r["ratio"] for r in B.ratios(results)}
    assert got == {
        ("synthesize[small]", "albumentations-default", 1): 1000 / 300,
        ("synthesize[medium]", "authors-opencv[medium]", 1): 6.0,
        ("synthesize[medium]", "albumentations-default", 1): 2.0,
        ("sharpness", "opencv-laplacian-f64", 1): 2.0,
    }


def test_parse_threads_and_presets():
    n = T.all_threads()
    assert T.parse_threads("1,all") == ([1] if n == 1 else [1, n])
    assert T.parse_threads("all,1,all") == ([n] if n == 1 else [n, 1])
    for bad in ("0", "x", "", f"{n + 1}"):
        with pytest.raises(ValueError, match="threads"):
            T.parse_threads(bad)
    assert B.check_presets(["medium", " small"]) == ["medium", "small"]
    with pytest.raises(ValueError, match="valid presets: small, medium"):
        B.check_presets(["medium", "monsoon"])


def test_thread_limit_sets_and_restores():
    import numba

    with T.thread_limit(1):
        assert numba.get_num_threads() == 1 and T.current_threads() == 1
    assert numba.get_num_threads() == T.all_threads()


def test_thread_limit_nests_and_restores_torch_opencv_and_environment(monkeypatch):
    import cv2
    import numba
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = (numba.get_num_threads(), cv2.getNumThreads(), torch.get_num_threads())
    with T.thread_limit(2):
        assert os.environ["OMP_NUM_THREADS"] == "2" and T.current_threads() == 2
        assert (cv2.getNumThreads(), torch.get_num_threads()) == (2, 2)
        with T.thread_limit(1):
            assert (numba.get_num_threads(), cv2.getNumThreads(), torch.get_num_threads()) == (1, 1, 1)
            assert os.environ["OMP_NUM_THREADS"] == "1" and T.current_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "2" and T.current_threads() == 2
        assert (cv2.getNumThreads(), torch.get_num_threads()) == (2, 2)
    assert (numba.get_num_threads(), cv2.getNumThreads(), torch.get_num_threads()) == before
    assert os.environ["OMP_NUM_THREADS"] == "7"
    monkeypatch.delenv("OMP_NUM_THREADS")
    with T.thread_limit(1):
        pass
    assert "OMP_NUM_THREADS" not in os.environ
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            T.apply_threads(bad)


def test_measure_counting_runner_with_cleanup_off_the_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(T.time, "perf_counter", clock)
    counts = iter([7, 10, 30, 20])  # warm-up first
    cleaned = []

    def run():
        clock.now += 0.5
        return next(counts)

    def cleanup():
        cleaned.append(1)
        clock.now += 100.0  # slow, but not timed

    timing = T.measure(run, None, seconds=1.0, min_repeats=3, max_repeats=None, cleanup=cleanup)
    assert timing.rates == [20.0, 60.0, 40.0] and timing.median == 40.0
    assert timing.counted == 60 and timing.timed_s == 1.5 and timing.warmup_s == 0.5
    assert len(cleaned) == 4  # after the warm-up and after every repeat
    with pytest.raises(ValueError, match="number of patches"):
        T.measure(lambda: "done", None, seconds=0.0)


def test_time_interleaved_drops_a_failing_runner(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(T.time, "perf_counter", clock)
    order = []

    def runner(name, fail_at=None):
        def run():
            order.append(name)
            if order.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
            clock.now += 1.0
        return run

    timings = [T.Timing(4), T.Timing(4)]
    errors = T.time_interleaved([runner("a"), runner("b", fail_at=2)], timings, seconds=3.0, min_repeats=2,
                                max_repeats=None)
    assert order == ["a", "b", "a", "b", "a"]
    assert errors[0] is None and str(errors[1]) == "b broke"
    assert timings[0].rates == [4.0] * 3 and timings[1].rates == [4.0]
    with pytest.raises(ValueError, match="timings"):
        T.time_interleaved([runner("c")], [], seconds=1.0)


def test_suite_settings_from_environment():
    s = B.suite_settings({"RAINSWEEP_BENCH_PATCHES": "64", "RAINSWEEP_BENCH_PRESETS": "large,small"})
    assert s.patches == 64 and s.presets == ("large", "small") and s.rounds == B.SuiteSettings().rounds
    with pytest.raises(ValueError, match="RAINSWEEP_BENCH_ROUNDS"):
        B.suite_settings({"RAINSWEEP_BENCH_ROUNDS": "0"})
    with pytest.raises(ValueError, match="valid presets"):
        B.suite_settings({"RAINSWEEP_BENCH_PRESETS": "hail"})


def test_tile_patches():
    p = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    t = B.tile_patches(p, 7)
    assert t.shape == (7, 2, 2, 3)
    np.testing.assert_array_equal(t[[0, 3, 6]], p[[0, 0, 0]])
    np.testing.assert_array_equal(t[5], p[2])


# ---- bench CLI -----------------------------------------------------------------------------------------------------

RESULT_KEYS = {"case", "impl", "task", "device", "preset", "threads", "outputs", "note", "patches", "repeats",
               "patches_per_s", "patches_per_s_min", "patches_per_s_max", "warmup_s", "skipped"}


def test_bench_cli_table_and_json(tmp_path):
    pytest.importorskip("engine.synth")
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--patches", "64", "--seconds", "0.2", "--no-gpu", "--presets",
                                    "medium", "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "patches/s" in res.output and "synthesize[medium]" in res.output and "complexity" in res.output
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine", "settings", "results", "ratios", "loader"}
    assert doc["machine"]["cpu_count"] >= 1 and "numba" in doc["machine"]["versions"]
    assert doc["settings"]["patches"] == 64 and doc["settings"]["threads"] == [1]
    assert doc["settings"]["gpu"] is False and doc["loader"] is None
    by_case = {r["case"]: r for r in doc["results"]}
    for r in doc["results"]:
        assert set(r) == RESULT_KEYS
        if r["skipped"] is None:
            assert r["patches_per_s"] > 0 and r["repeats"] >= 3 and r["patches"] == 64
            assert r["patches_per_s_min"] <= r["patches_per_s"] <= r["patches_per_s_max"]
    for ours in ("synthesize[medium]", "sharpness", "complexity"):
        assert by_case[ours]["skipped"] is None and by_case[ours]["device"] == "cpu"
    # peers installed in this environment run beside ours; the rainy-only ones say so
    for peer in ("albumentations-default", "albumentations-torrential", "kornia-b64"):
        if peer in by_case and by_case[peer]["skipped"] is None:
            assert "no rain layer" in by_case[peer]["note"]
    if by_case.get("opencv-laplacian-f64", {}).get("skipped", "x") is None:
        ratio = [r for r in doc["ratios"] if r["ours"] == "sharpness" and r["peer"] == "opencv-laplacian-f64"]
        assert len(ratio) == 1
        assert ratio[0]["ratio"] == pytest.approx(by_case["sharpness"]["patches_per_s"]
                                                  / by_case["opencv-laplacian-f64"]["patches_per_s"])
    assert not [f for f in os.listdir(tmp_path) if f != "bench.json"]  # no temporary file left behind


def test_bench_cli_bad_preset_lists_valid_ones():
    res = CliRunner().invoke(main, ["bench", "--presets", "medium,monsoon", "--no-gpu"])
    assert res.exit_code != 0
    assert "monsoon" in res.output and "valid presets" in res.output
    assert all(name in res.output for name in PRESETS)


def test_bench_cli_gpu_requested_without_gpu():
    res = CliRunner().invoke(main, ["bench", "--gpu", "--patches", "8"])
    assert res.exit_code != 0 and "no CUDA GPU" in res.output


def test_bench_cli_loader_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "engine.bench.loader", None)  # makes the module unimportable
    res = CliRunner().invoke(main, ["bench", "--loader", "--no-gpu", "--patches", "8"])
    assert res.exit_code != 0 and "loader_bench" in res.output


def test_bench_cli_loader_rows(monkeypatch, tmp_path):
    seen = {}

    def run_loader_bench(seconds, threads, batch_size=256):  # no `gpu` parameter: it must not be passed
        seen.update(seconds=seconds, threads=threads)
        return [{"case": "fake-loader", "patches_per_s": 1234.5}]

    fake = types.ModuleType("engine.bench.loader")
    fake.__spec__ = importlib.machinery.ModuleSpec("engine.bench.loader", None)  # find_spec reads it
    fake.run_loader_bench = run_loader_bench
    monkeypatch.setitem(sys.modules, "engine.bench.loader", fake)
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", "--loader", "--no-gpu", "--no-peers", "--patches", "8", "--threads",
                                    "1", "--seconds", "0", "--presets", "small", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert seen == {"seconds": 0.0, "threads": [1]}
    assert "fake-loader" in res.output
    assert json.loads(out.read_text())["loader"] == [{"case": "fake-loader", "patches_per_s": 1234.5}]

