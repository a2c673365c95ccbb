"""Held-out rain families "layered" and "sparse": exactness across backends, determinism, statistics, properties.

References: each module's plain numpy ``render_reference`` (every streak evaluated on the whole canvas, no support
culling), numba's CUDA simulator for the GPU kernels, and the authors' generator / the streak renderer for the
training presets the held-out families must differ from. Rain layers are uint8 NHW on the 0..255 scale.
"""
from __future__ import annotations

import dataclasses
import importlib
import os

import numpy as np
import pytest

from engine.rain import PRESETS, TRAINING_PRESETS, RainSpec
from engine.bench.machine import gpu_available as real_gpu_available
from kernels import rng as R
from kernels.families import family as rain_family

FAMILIES = {"layered": rain_family("layered"), "sparse": rain_family("sparse")}
HELDOUT = {"layered": "heldout-layered", "sparse": "heldout-sparse"}

#: Specs that push the renderers off the presets: every direction (horizontal streaks exercise the zero-slope
#: branch of the row culling), wide and very short/long streaks, denser rain.
WILD = {
    "layered": RainSpec(family="layered", amount=(0.001, 0.004), width=(1, 9, 15), width_prob=(0.3, 0.4, 0.3),
                        length=(1, 128), angle=(-90, 90)),
    "sparse": RainSpec(family="sparse", amount=(0.001, 0.003), width=(1, 3, 7), width_prob=(0.5, 0.25, 0.25),
                       length=(2, 128), angle=(-90, 90)),
}


def render(family: str, spec: RainSpec, keys, h: int, w: int, active=None, seed: int = 11,
           how: str = "cpu") -> np.ndarray:
    """Rain layers (uint8 [N, h, w]) of ``keys`` with ``render_<how>`` of ``family``; out starts as garbage."""
    keys = np.asarray(keys, dtype=np.int64)
    states = R.patch_state_np(seed, keys)
    act = np.ones(len(keys), np.uint8) if active is None else np.asarray(active, np.uint8)
    out = np.full((len(keys), h, w), 77, np.uint8)
    getattr(FAMILIES[family], f"render_{how}")(spec.to_vector(), states, act, out)
    return out


# ---- exactness ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["preset", "preset-pad", "wild", "wild-pad"])
def test_cpu_equals_numpy_reference(family, case):
    spec = RainSpec.preset(HELDOUT[family]) if case.startswith("preset") else WILD[family]
    if case.endswith("pad"):
        spec = RainSpec.preset(HELDOUT[family], canvas_pad=9) if case.startswith("preset") else \
            dataclasses.replace(WILD[family], canvas_pad=9)
    keys, active = [0, 1, 2, 3], [1, 1, 0, 1]
    cpu = render(family, spec, keys, 56, 72, active)
    ref = render(family, spec, keys, 56, 72, active, how="reference")
    np.testing.assert_array_equal(cpu, ref)
    assert cpu[[0, 1, 3]].max() > 50, "active patches should hold visible rain"


def _device_render(family: str, spec: RainSpec, keys, h: int, w: int, active) -> np.ndarray:
    """render_gpu on numpy arrays under the CUDA simulator, on CuPy arrays on a real GPU; result on the host."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return render(family, spec, keys, h, w, active, how="gpu")
    import cupy

    states = cupy.asarray(R.patch_state_np(11, np.asarray(keys, np.int64)))
    out = cupy.full((len(keys), h, w), 77, dtype=cupy.uint8)
    FAMILIES[family].render_gpu(cupy.asarray(spec.to_vector()), states, cupy.asarray(np.asarray(active, np.uint8)),
                                out)
    return cupy.asnumpy(out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["preset", "wild-pad"])
def test_gpu_kernel_equals_cpu(family, case):
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not real_gpu_available():
        pytest.skip("neither the CUDA simulator nor a real GPU is enabled")
    spec = RainSpec.preset(HELDOUT[family]) if case == "preset" else \
        dataclasses.replace(WILD[family], canvas_pad=3)
    keys, active = [5, 6, 7], [1, 0, 1]   # tiny: the simulator runs every CUDA thread in Python
    gpu = _device_render(family, spec, keys, 24, 32, active)
    np.testing.assert_array_equal(gpu, render(family, spec, keys, 24, 32, active))
    assert gpu[1].max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad", [0, 20])
def test_real_gpu_equals_cpu_on_full_patches(family, pad):
    spec = RainSpec.preset(HELDOUT[family], canvas_pad=pad)
    keys = np.arange(1000, 1512)
    active = (keys % 7 != 0).astype(np.uint8)
    gpu = _device_render(family, spec, keys, 128, 128, active)
    np.testing.assert_array_equal(gpu, render(family, spec, keys, 128, 128, active))


# ---- determinism ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_rain_is_a_function_of_seed_and_key(family):
    spec = RainSpec.preset(HELDOUT[family])
    keys = np.array([3, 17, 42, 1000, 5, 6, 2**40 + 1, -9])
    whole = render(family, spec, keys, 40, 48)
    backwards = render(family, spec, keys[::-1], 40, 48)[::-1]
    np.testing.assert_array_equal(whole, backwards)
    for i in (0, 4, 7):
        np.testing.assert_array_equal(whole[i], render(family, spec, keys[i:i + 1], 40, 48)[0])
    np.testing.assert_array_equal(whole[2:5], render(family, spec, keys[2:5], 40, 48))
    flat = whole.reshape(len(keys), -1)
    assert len({row.tobytes() for row in flat}) == len(keys), "different keys must give different rain"
    other_seed = render(family, spec, keys, 40, 48, seed=12)
    assert all((other_seed[i] != whole[i]).any() for i in range(len(keys)))


@pytest.mark.parametrize("family", FAMILIES)
def test_inactive_patches_are_zero_and_do_not_shift_others(family):
    spec = RainSpec.preset(HELDOUT[family])
    keys = np.arange(6)
    active = np.array([0, 1, 0, 1, 1, 0], np.uint8)
    some = render(family, spec, keys, 32, 32, active)
    every = render(family, spec, keys, 32, 32)
    assert some[active == 0].max() == 0
    np.testing.assert_array_equal(some[active == 1], every[active == 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_arguments_name_the_input(family):
    mod = FAMILIES[family]
    p = RainSpec.preset(HELDOUT[family]).to_vector()
    st = R.patch_state_np(0, np.arange(2))
    act = np.ones(2, np.uint8)
    with pytest.raises(ValueError, match="out: expected uint8"):
        mod.render_cpu(p, st, act, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="states: expected uint64\\[2\\]"):
        mod.render_cpu(p, st[:1], act, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="active: expected uint8\\[2\\]"):
        mod.render_cpu(p, st, act.astype(bool), np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="params: expected float64"):
        mod.render_reference(p[:5], st, act, np.zeros((2, 8, 8), np.uint8))
    empty = np.zeros((0, 8, 8), np.uint8)
    mod.render_cpu(p, st[:0], act[:0], empty)   # an empty batch is fine


# ---- statistics against the training presets ------------------------------------------------------------------------

N_STATS = 300


def _training_rain(source: str, name: str) -> np.ndarray:
    """N_STATS rain layers (uint8 [N, 128, 128]) of training preset ``name`` from ``source``."""
    spec = PRESETS[name]
    if source == "streak-kernel":
        out = np.empty((N_STATS, 128, 128), np.uint8)
        rain_family("streak").render_cpu(spec.to_vector(), R.patch_state_np(5, np.arange(N_STATS)), np.ones(N_STATS, np.uint8), out)
        return out
    try:
        authors = importlib.import_module("kernels.authors_generator")
        importlib.import_module("cv2")
    except ModuleNotFoundError as err:
        pytest.skip(f"the authors' OpenCV generator is unavailable ({err})")
    gen = np.random.default_rng(5)
    return np.stack([authors.rain_layer((128, 128), authors.draw_params(spec, gen), gen) for _ in range(N_STATS)])


def _features(rain: np.ndarray) -> dict[str, np.ndarray]:
    """Per-patch statistics: coverage of rain > 50 and the share of rain pixels (> 0) brighter than 200."""
    lit = np.maximum((rain > 0).sum(axis=(1, 2)), 1)
    return {"coverage50": (rain > 50).mean(axis=(1, 2)), "bright_share": (rain > 200).sum(axis=(1, 2)) / lit}


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    x = np.concatenate([a, b])
    fa = np.searchsorted(np.sort(a), x, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), x, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.fixture(scope="module")
def heldout_features() -> dict[str, dict[str, np.ndarray]]:
    return {fam: _features(render(fam, RainSpec.preset(HELDOUT[fam]), np.arange(N_STATS), 128, 128, seed=5))
            for fam in FAMILIES}


@pytest.mark.parametrize("source", ["authors-opencv", "streak-kernel"])
@pytest.mark.parametrize("preset", TRAINING_PRESETS)
def test_heldout_statistics_differ_from_training_preset(heldout_features, source, preset):
    """Documented separation, over 300 patches of 128 x 128 each:

    - intensity histogram shape: the authors' min-max normalized convolution leaves few pixels above 200 (share of
      rain pixels ~0.4 %), while the held-out families' additive, flat-topped streak cores put several percent
      there. Both held-out families: KS distance of the per-patch bright share >= 0.6 and median >= 3x.
    - sparse is sparse: its coverage of rain > 50 (~3 %) lies below every training patch's distribution
      (KS >= 0.9, median <= 1/2).
    """
    train = _features(_training_rain(source, preset))
    for fam, feats in heldout_features.items():
        ks = _ks(feats["bright_share"], train["bright_share"])
        ratio = np.median(feats["bright_share"]) / max(np.median(train["bright_share"]), 1e-9)
        assert ks >= 0.6 and ratio >= 3, f"{fam} vs {preset} ({source}): bright share KS {ks:.2f}, ratio {ratio:.1f}"
    ks = _ks(heldout_features["sparse"]["coverage50"], train["coverage50"])
    ratio = np.median(heldout_features["sparse"]["coverage50"]) / np.median(train["coverage50"])
    assert ks >= 0.9 and ratio <= 0.5, f"sparse vs {preset} ({source}): coverage KS {ks:.2f}, ratio {ratio:.2f}"


# ---- properties -----------------------------------------------------------------------------------------------------

def _components(mask2d: np.ndarray, rain2d: np.ndarray, min_area: int) -> list[dict]:
    """8-connected components of ``mask2d``: area, principal length and mean width (px), peak rain value."""
    from scipy import ndimage

    labels, n = ndimage.label(mask2d, structure=np.ones((3, 3)))
    comps = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < min_area:
            continue
        pts = np.stack([xs, ys], 1).astype(np.float64)
        pts -= pts.mean(0)
        axis = np.linalg.eigh(pts.T @ pts)[1][:, -1]           # principal direction
        proj = pts @ axis
        length = proj.max() - proj.min() + 1.0
        comps.append({"area": len(ys), "length": length, "width": len(ys) / length,
                      "peak": int(rain2d[ys, xs].max())})
    return comps


def test_sparse_streaks_are_long_and_thin():
    rain = render("sparse", RainSpec.preset("heldout-sparse"), np.arange(60), 128, 128)
    comps = [c for r in rain for c in _components(r > 50, r, min_area=10)]
    lengths = np.array([c["length"] for c in comps])
    widths = np.array([c["width"] for c in comps])
    assert len(comps) >= 100
    # preset lengths 60..100 px; the tapered ends dip below 50 and the patch border cuts streaks, so >= 40 median
    assert np.median(lengths) >= 40, np.median(lengths)
    assert np.percentile(widths, 90) <= 3.0, np.percentile(widths, 90)
    assert np.median([c["peak"] for c in comps]) >= 180   # bright


def test_sparse_streak_ends_are_tapered():
    """One near-vertical streak per patch on a canvas larger than the streak: the rows at either end are much
    dimmer than the streak's middle."""
    spec = RainSpec.preset("heldout-sparse", amount=(1e-6, 1e-6), angle=(0, 0))   # max(1, 0) -> one streak
    rain = render("sparse", spec, np.arange(40), 160, 160)
    checked = 0
    for r in rain:
        rows = np.nonzero(r.max(axis=1))[0]
        cols = np.nonzero(r.max(axis=0))[0]
        if rows[0] == 0 or rows[-1] == r.shape[0] - 1 or cols[0] == 0 or cols[-1] == r.shape[1] - 1:
            continue  # cut by the border: its ends are not visible
        profile = r[rows[0]:rows[-1] + 1].max(axis=1).astype(np.float64)
        k = max(2, len(profile) // 10)
        mid = profile[len(profile) * 2 // 5: len(profile) * 3 // 5].max()
        assert profile[:k].mean() < 0.5 * mid and profile[-k:].mean() < 0.5 * mid, profile
        checked += 1
    assert checked >= 10


def test_layered_far_streaks_are_fainter_thinner_and_longer_than_near_ones():
    """Sparse enough that streaks rarely touch; near layer width 7 (wide components), far layer width 1 (thin)."""
    spec = RainSpec.preset("heldout-layered", amount=(0.0004, 0.0004), width=(7,), width_prob=(1.0,))
    rain = render("layered", spec, np.arange(80), 128, 128)
    comps = [c for r in rain for c in _components(r > 0, r, min_area=6)]
    thin = [c for c in comps if c["width"] <= 3.0]
    wide = [c for c in comps if c["width"] >= 5.5]
    assert len(thin) >= 50 and len(wide) >= 50, (len(thin), len(wide))
    peak_thin, peak_wide = np.median([c["peak"] for c in thin]), np.median([c["peak"] for c in wide])
    assert peak_wide >= peak_thin + 60, (peak_wide, peak_thin)
    assert np.median([c["length"] for c in thin]) > 1.5 * np.median([c["length"] for c in wide])


def test_layered_directions_jitter_within_a_patch():
    """Per-streak angle jitter: with the global direction fixed at 0 degrees the patch still holds streaks of
    several orientations (the authors' generator uses one angle per patch)."""
    spec = RainSpec.preset("heldout-layered", amount=(0.0004, 0.0004), width=(1,), width_prob=(1.0,),
                           length=(50, 60), angle=(0, 0))
    rain = render("layered", spec, np.arange(30), 128, 128)
    from scipy import ndimage

    spreads = []
    for r in rain:
        angles = []
        labels, n = ndimage.label(r > 0, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            if ys.max() - ys.min() < 30:
                continue   # short pieces (near layer, border cuts) give noisy directions
            slope = np.polyfit(ys.astype(float), xs.astype(float), 1)[0]
            angles.append(np.degrees(np.arctan(slope)))
        if len(angles) >= 4:
            spreads.append(np.ptp(angles))
    # Jitter J in 2..6 degrees: the range of fitted angles has a median near 8 degrees (measured ~3 with the
    # jitter switched off, where only merged streaks and pixel quantization spread the fits), and stays within
    # the +-6 degree band around the one direction (median <= 12).
    assert len(spreads) >= 10
    assert 5.0 <= np.median(spreads) <= 12.0, spreads


# ---- integration ----------------------------------------------------------------------------------------------------

def test_synthesize_renders_the_heldout_layered_preset():
    from engine import synth

    gen = np.random.default_rng(0)
    batch = gen.integers(0, 256, size=(3, 32, 40, 3), dtype=np.uint8)
    keys = np.array([4, 5, 6], np.int64)
    res = synth.synthesize(batch, "heldout-layered", seed=3, keys=keys)
    expected = render("layered", RainSpec.preset("heldout-layered"), keys, 32, 40, seed=3)
    np.testing.assert_array_equal(np.asarray(res.rain), expected)
    np.testing.assert_array_equal(np.asarray(res.mask), expected > 50)
    rainy = np.asarray(res.rainy)
    assert rainy.shape == batch.shape and rainy.dtype == np.uint8
    assert (rainy >= batch).all() and (rainy[expected == 0] == batch[expected == 0]).all()
