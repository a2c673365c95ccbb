"""kernels.finish and the fused render + finish path: the channel planes equal the numpy composite reference followed
by a table look-up, for every output type, thread count and rain family; bad arguments are named."""
import numba
import numpy as np
import pytest
import torch

from engine import synth
from engine.rain import RainSpec
from kernels import finish
from kernels.composite import composite_reference
from kernels.streak import cpu as sc
from kernels.streak import reference as sr

F32 = np.arange(256, dtype=np.float32) / np.float32(255.0)


def _table(name: str) -> np.ndarray:
    """uint8 value -> plane value of output type ``name`` (16-bit floats as their bit patterns), made by torch."""
    if name == "float32":
        return F32
    if name == "uint8":
        return np.arange(256, dtype=np.uint8)
    t = torch.from_numpy(F32).to(getattr(torch, name))
    return t.view(torch.int16).numpy().view(np.int16 if name == "bfloat16" else np.uint16)


def _outputs(lut, n, h, w, rain_plane=True):
    ob = np.full((n, 3, h, w), 7, dtype=lut.dtype)       # garbage, so unwritten values show
    oy = np.full((n, 3, h, w), 7, dtype=lut.dtype)
    orain = np.full((n, 1, h, w) if rain_plane else (0, 1, 1, 1), 7, dtype=lut.dtype)
    mask = np.ones((n, h, w), dtype=np.bool_)
    return ob, oy, orain, mask


def _expected(bg, rain, beta_q, threshold, lut):
    rainy, mask = composite_reference(bg, rain, beta_q, threshold)
    return lut[bg.transpose(0, 3, 1, 2)], lut[rainy.transpose(0, 3, 1, 2)], lut[rain][:, None], mask


@numba.njit
def _convert_all(out):
    for v in range(256):
        out[v] = finish.convert(np.int32(v), out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "uint8"])
def test_computed_conversion_is_torchs_for_every_value(dtype):
    """The kernels compute each output type (no table look-up): all 256 values must be torch's conversion of the
    float32 quotient v / 255 (round to nearest even for the 16-bit floats), bit for bit."""
    want = _table(dtype)
    got = np.empty(256, dtype=want.dtype)
    _convert_all(got)
    np.testing.assert_array_equal(got, want)
    if dtype in ("bfloat16", "float16"):
        # and the bits decode to the value torch gives for x / 255 (not only to our own table)
        back = torch.from_numpy(got.view(np.int16)).view(getattr(torch, dtype)).float()
        ref = (torch.arange(256, dtype=torch.float32) / 255).to(getattr(torch, dtype)).float()
        assert torch.equal(back, ref)


@pytest.fixture(params=[1, 2])
def threads(request):
    old = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(old)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "uint8"])
@pytest.mark.parametrize("shape", [(5, 7, 9), (3, 16, 16), (1, 1, 3)])
def test_finish_equals_reference(rng, threads, dtype, shape):
    n, h, w = shape
    lut = _table(dtype)
    bg = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    rain = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    bg[0, 0, 0] = 255                                   # saturation at both ends of beta
    rain[0, 0, 0] = 255
    beta_q = rng.integers(0, 4097, n).astype(np.int64)
    beta_q[0] = 4096
    if n > 1:
        beta_q[1] = 0
    ob, oy, orain, mask = _outputs(lut, n, h, w)
    finish.finish_cpu(bg, rain, beta_q, 40, ob, oy, orain, mask)
    for got, want in zip((ob, oy, orain, mask), _expected(bg, rain, beta_q, 40, lut)):
        assert np.array_equal(got, want)


def test_float32_planes_are_the_division(rng):
    # the float32 path computes v / 255 instead of looking it up: every value must equal torch's x.float() / 255
    bg = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    rain = np.zeros((1, 16, 16), dtype=np.uint8)
    ob, oy, orain, mask = _outputs(F32, 1, 16, 16)
    finish.finish_cpu(bg, rain, np.zeros(1, np.int64), 0, ob, oy, orain, mask)
    want = torch.from_numpy(bg).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(torch.from_numpy(ob), want) and torch.equal(torch.from_numpy(oy), want)
    assert not orain.any() and not mask.any()


def test_finish_skips_the_rain_plane(rng):
    bg = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    rain = rng.integers(0, 256, (2, 4, 6), dtype=np.uint8)
    beta_q = np.array([1024, 700], dtype=np.int64)
    ob, oy, orain, mask = _outputs(F32, 2, 4, 6, rain_plane=False)
    finish.finish_cpu(bg, rain, beta_q, 50, ob, oy, orain, mask)
    want = _expected(bg, rain, beta_q, 50, F32)
    assert np.array_equal(ob, want[0]) and np.array_equal(oy, want[1]) and np.array_equal(mask, want[3])


def test_finish_argument_errors(rng):
    bg = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    rain = np.zeros((2, 4, 6), dtype=np.uint8)
    bq = np.zeros(2, dtype=np.int64)
    ob, oy, orain, mask = _outputs(F32, 2, 4, 6)
    with pytest.raises(ValueError, match="out_bg: expected one of the plane dtypes"):
        finish.finish_cpu(bg, rain, bq, 0, ob.astype(np.float64), oy, orain, mask)
    with pytest.raises(ValueError, match="out_rainy"):
        finish.finish_cpu(bg, rain, bq, 0, ob.astype(np.uint16), oy, orain, mask)
    with pytest.raises(ValueError, match="out_rainy"):
        finish.finish_cpu(bg, rain, bq, 0, ob, oy.transpose(0, 1, 3, 2).copy(), orain, mask)
    with pytest.raises(ValueError, match="out_rainy"):
        finish.finish_cpu(bg, rain, bq, 0, ob, np.asfortranarray(oy), orain, mask)
    with pytest.raises(ValueError, match="out_rain"):
        finish.finish_cpu(bg, rain, bq, 0, ob, oy, orain[:, :, :2], mask)
    with pytest.raises(ValueError, match="mask"):
        finish.finish_cpu(bg, rain, bq, 0, ob, oy, orain, mask.astype(np.uint8))
    with pytest.raises(ValueError, match="rain"):
        finish.finish_cpu(bg, rain[:, :3], bq, 0, ob, oy, orain, mask)
    with pytest.raises(ValueError, match="beta_q"):
        finish.finish_cpu(bg, rain, bq.astype(np.float64), 0, ob, oy, orain, mask)
    with pytest.raises(ValueError, match="backgrounds"):
        finish.finish_cpu(bg[..., :2], rain, bq, 0, ob, oy, orain, mask)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
@pytest.mark.parametrize("spec", ["medium", "small,prob=0.5", "large,pad=8", "random"])
def test_render_finish_equals_render_then_reference(rng, threads, dtype, spec):
    spec = RainSpec.parse(spec)
    n, h, w = 7, 24, 40
    lut = _table(dtype)
    bg = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    states, active, beta_q = synth.common_draws(spec, 5, np.arange(n, dtype=np.int64))
    params = spec.to_vector()
    want_rain = np.empty((n, h, w), dtype=np.uint8)
    sr.render_reference(params, states, active, want_rain)
    rain = np.empty((n, h, w), dtype=np.uint8)
    ob, oy, orain, mask = _outputs(lut, n, h, w)
    sc.render_finish_cpu(params, states, active, bg, beta_q, spec.threshold, rain, ob, oy, orain, mask)
    assert np.array_equal(rain, want_rain)
    for got, want in zip((ob, oy, orain, mask), _expected(bg, want_rain, beta_q, spec.threshold, lut)):
        assert np.array_equal(got, want)


def test_render_finish_argument_errors(rng):
    spec = RainSpec.parse("medium")
    bg = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    states, active, beta_q = synth.common_draws(spec, 0, np.arange(2, dtype=np.int64))
    ob, oy, orain, mask = _outputs(F32, 2, 8, 8)
    with pytest.raises(ValueError, match="out_bg"):
        sc.render_finish_cpu(spec.to_vector(), states, active, bg, beta_q, 50, np.empty((2, 8, 8), np.uint8),
                             ob[:1], oy, orain, mask)
    with pytest.raises(ValueError, match="rain: expected a C-contiguous"):
        sc.render_finish_cpu(spec.to_vector(), states, active, bg, beta_q, 50,
                             np.empty((2, 8, 16), np.uint8)[:, :, ::2], ob, oy, orain, mask)


@pytest.mark.parametrize("spec", ["medium", "heldout-layered", "heldout-sparse", None])
def test_synthesize_planes_equals_synthesize(rng, spec):
    # every family (fused streak path, render-then-finish for the others) and no rain at all
    n, h, w = 5, 32, 32
    bg = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    keys = rng.integers(0, 1 << 40, n).astype(np.int64)
    rain = np.full((n, h, w), 9, dtype=np.uint8)
    ob, oy, orain, mask = _outputs(F32, n, h, w)
    beta = synth.synthesize_planes_cpu(bg, spec, 11, keys, rain, ob, oy, orain, mask)
    if spec is None:
        want_rainy, want_rain, want_mask, want_beta = bg, np.zeros((n, h, w), np.uint8), np.zeros((n, h, w), bool), 0
    else:
        ref = synth.synthesize(bg, spec, seed=11, keys=keys, backend="reference")
        want_rainy, want_rain, want_mask, want_beta = ref.rainy, ref.rain, ref.mask, ref.beta
    assert np.array_equal(rain, want_rain)
    assert np.array_equal(ob, F32[bg.transpose(0, 3, 1, 2)])
    assert np.array_equal(oy, F32[want_rainy.transpose(0, 3, 1, 2)])
    assert np.array_equal(orain, F32[want_rain][:, None])
    assert np.array_equal(mask, want_mask)
    assert np.array_equal(beta, np.broadcast_to(want_beta, (n,)))


def test_rows_pick_backgrounds_without_a_copy(rng):
    # rows (with repeats, any order) give exactly what the gathered batch gives, on both finish paths
    src = rng.integers(0, 256, (9, 12, 20, 3), dtype=np.uint8)
    rows = np.array([4, 0, 8, 4, 2], dtype=np.int64)
    keys = np.arange(5, dtype=np.int64) + 100
    for spec in ("medium", "heldout-sparse", None):
        got = _outputs(F32, 5, 12, 20)
        want = _outputs(F32, 5, 12, 20)
        rain_a, rain_b = np.empty((5, 12, 20), np.uint8), np.empty((5, 12, 20), np.uint8)
        synth.synthesize_planes_cpu(src, spec, 3, keys, rain_a, *got, rows=rows)
        synth.synthesize_planes_cpu(src[rows], spec, 3, keys, rain_b, *want)
        assert np.array_equal(rain_a, rain_b)
        for a, b in zip(got, want):
            assert np.array_equal(a, b)


def test_bad_rows_are_named(rng):
    src = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    outs = _outputs(F32, 2, 4, 4)
    rain = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="rows: background rows must lie in 0..2"):
        finish.finish_cpu(src, rain, np.zeros(2, np.int64), 0, *outs, rows=np.array([0, 3]))
    with pytest.raises(ValueError, match="rows: expected a 1-d integer array"):
        finish.finish_cpu(src, rain, np.zeros(2, np.int64), 0, *outs, rows=np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"rain: expected uint8 NHW \[3, 4, 4\]"):  # 3 rows: a batch of 3
        finish.finish_cpu(src, rain, np.zeros(2, np.int64), 0, *outs, rows=np.array([0, 1, 2]))
