"""The streak renderer (the authors' generator, kernels/streak/): CPU kernels and the CUDA kernels (numba's
simulator) equal the numpy reference exactly; its tables and streak kernel match OpenCV's construction."""
import numpy as np
import pytest

from engine.rain import RainSpec
from kernels import params as P
from kernels import rng
from kernels.composite import composite_reference
from kernels.simd import BLOCK
from kernels.streak import cpu as sc
from kernels.streak import gpu as sg
from kernels.streak import kernel
from kernels.streak import reference as ref
from kernels.streak import tables as tb
from kernels.streak.bank import pad_rows

build_kernel = kernel.cpu.build_kernel

cv2 = pytest.importorskip("cv2")


def _states(seed: int, n: int, first: int = 0) -> np.ndarray:
    return rng.patch_state_np(seed, np.arange(first, first + n))


def _render_both(spec: RainSpec, seed: int, n: int, h: int, w: int, active=None):
    p = spec.to_vector()
    st = _states(seed, n)
    act = np.ones(n, np.uint8) if active is None else np.asarray(active, np.uint8)
    fast = np.full((n, h, w), 7, np.uint8)     # not zeros: the renderer must write every pixel
    slow = np.full((n, h, w), 9, np.uint8)
    sc.render_cpu(p, st, act, fast)
    ref.render_reference(p, st, act, slow)
    return fast, slow


# ---- tables and the streak kernel against OpenCV -------------------------------------------------------------------

@pytest.mark.parametrize("width", list(range(1, 32, 2)))
def test_gaussian_weights_match_opencv(width):
    expected = cv2.getGaussianKernel(width, 0, ktype=cv2.CV_64F).ravel()
    np.testing.assert_allclose(tb.opencv_gaussian_weights(width), expected, rtol=1e-12, atol=1e-15)
    # the integer table is the rounded float weights
    assert np.array_equal(tb.GAUSS[width // 2, :width], np.round(expected * 2 ** tb.GAUSS_BITS).astype(np.int64))


def test_trig_table():
    deg = np.array([-180, -135, -90, -45, -1, 0, 1, 30, 45, 90, 180])
    got = tb.TRIG[deg + tb.TRIG_OFFSET] / 2.0 ** tb.TRIG_BITS
    np.testing.assert_allclose(got[:, 0], np.cos(np.deg2rad(deg)), atol=2 ** -tb.TRIG_BITS)
    np.testing.assert_allclose(got[:, 1], np.sin(np.deg2rad(deg)), atol=2 ** -tb.TRIG_BITS)


def _opencv_folded_kernel(length, angle, width):
    """The authors' kernel (warpAffine of the diagonal, GaussianBlur) convolved with the 3x3 seed filter."""
    trans = cv2.getRotationMatrix2D((length / 2, length / 2), angle - 45, 1)
    k = cv2.GaussianBlur(cv2.warpAffine(np.diag(np.ones(length)), trans, (length, length)), (width, width), 0)
    f = np.array([[0, .1, 0], [.1, 8, .1], [0, .1, 0]])
    full = np.zeros((length + 2, length + 2))
    for dy in range(3):
        for dx in range(3):
            full[dy:dy + length, dx:dx + length] += f[dy, dx] * k
    return full


@pytest.mark.parametrize("length,angle,width", [(40, 0, 5), (41, 17, 3), (55, -60, 9), (30, 8, 1), (45, -30, 7),
                                                (25, 10, 3), (36, 29, 5), (50, 60, 9), (13, -89, 11)])
def test_streak_kernel_matches_opencv(length, angle, width):
    k3, shift = ref.streak_kernel(length, angle, width)
    # units: bilinear 1/1024, two Gaussian passes 2**-12 each, seed filter x10
    ours = k3 * 2.0 ** shift / (10 * 1024 * 4096 * 4096)
    cv = _opencv_folded_kernel(length, angle, width)
    # OpenCV rounds the rotated coordinates with its own fixed-point order (AB_BITS = 10 before INTER_BITS = 5), we
    # round once from a 2**-16 table: a source point that lands on a rounding tie moves by 1/32 px, changing a few
    # taps by up to ~1/32 of the peak (1.1 % observed); the kernel's mass agrees to 0.2 %.
    assert np.abs(ours - cv).max() <= 0.035 * cv.max()
    assert abs(ours.sum() - cv.sum()) <= 0.002 * cv.sum()


def test_streak_kernel_direction():
    """Positive angles put the lower end of the streak to the right (x grows with y), like the authors' kernel."""
    k3, _ = ref.streak_kernel(41, 30, 1)
    ys, xs = np.nonzero(k3 > k3.max() * 0.3)
    assert np.corrcoef(ys, xs)[0, 1] > 0.9
    k3, _ = ref.streak_kernel(41, -30, 1)
    ys, xs = np.nonzero(k3 > k3.max() * 0.3)
    assert np.corrcoef(ys, xs)[0, 1] < -0.9


@pytest.mark.slow
def test_fast_kernel_build_equals_dense_reference():
    """The banded integer kernel of the CPU renderer equals the whole-grid numpy construction."""
    from numba import njit

    @njit
    def build_dense(length, angle, width, trig, gauss, ks):
        kb = np.zeros((4, ks, ks), dtype=np.int64)
        ext = np.zeros((7, ks), dtype=np.int64)
        rows = np.zeros((4, ks), dtype=np.int64)
        vals = np.zeros(ks * ks, dtype=np.int64)
        n_rows, _, _, _, _ = build_kernel(length, angle, width, trig, gauss, kb, ext, rows, vals)
        a = length // 2 + 1
        dense = np.zeros((length + 2, length + 2), dtype=np.int64)
        for r in range(n_rows):
            for j in range(rows[2, r]):
                # scatter offset (dy, dx) = anchor - index
                dense[a - rows[0, r], a - (rows[1, r] + j)] = vals[rows[3, r] + j]
        return dense

    for length, angle, width in [(1, 0, 1), (2, 45, 3), (7, 90, 5), (35, -10, 1), (44, 33, 7), (60, -75, 31),
                                 (128, 5, 9)]:
        expected, _ = ref.streak_kernel(length, angle, width)
        got = build_dense(length, angle, width, tb.TRIG, tb.GAUSS, length + 2)
        assert np.array_equal(got, expected), (length, angle, width)


# ---- CPU renderer == numpy reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["small", "medium", "large", "random", "table1-small", "table1-medium",
                                  "table1-large"])
def test_cpu_equals_reference_presets(name):
    fast, slow = _render_both(RainSpec.preset(name), seed=11, n=3, h=40, w=56)
    assert np.array_equal(fast, slow)
    assert fast.max() == 255 and fast.min() == 0   # min-max normalized


@pytest.mark.parametrize("spec,h,w", [
    (RainSpec.preset("medium", canvas_pad=12), 33, 47),          # padded canvas, centre crop
    (RainSpec.preset("large"), 128, 128),                        # the training size
    (RainSpec.parse("amount=0.05:0.1,width=1|3,length=3:9,angle=-90:90"), 17, 9),   # dense, short, any angle
    (RainSpec.parse("amount=0.01:0.02,width=5|31,length=60:128,angle=-45:45"), 6, 5),  # kernel >> canvas
    (RainSpec.parse("amount=0.3:0.5,width=1,length=1:2,angle=0:0"), 2, 2),       # smallest canvas
])
def test_cpu_equals_reference_shapes(spec, h, w):
    fast, slow = _render_both(spec, seed=5, n=2, h=h, w=w)
    assert np.array_equal(fast, slow)


def test_inactive_patches_are_zero():
    fast, slow = _render_both(RainSpec.preset("medium"), seed=2, n=4, h=24, w=24, active=[1, 0, 1, 0])
    assert np.array_equal(fast, slow)
    assert not fast[1].any() and not fast[3].any() and fast[0].any() and fast[2].any()


def test_reference_seed_density_and_strength():
    """Seeds form a Bernoulli(amount) field with strengths in [256 (1 - amount), 256) (1/16 units)."""
    aq = int(0.01 * 2 ** 24)
    seeds = np.concatenate([ref.seed_image(int(s), aq, 64, 64).ravel() for s in _states(3, 40)])
    on = seeds > 0
    p = on.mean()
    se = np.sqrt(0.01 * 0.99 / on.size)
    assert abs(p - 0.01) < 5 * se
    v = seeds[on] / 16.0
    assert v.min() >= 256 * (1 - 0.01) - 1 / 16 and v.max() < 256


def test_render_argument_errors():
    p = RainSpec.preset("medium").to_vector()
    st = _states(0, 2)
    act = np.ones(2, np.uint8)
    with pytest.raises(ValueError, match="params"):
        sc.render_cpu(p[:-1], st, act, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="out: expected uint8"):
        sc.render_cpu(p, st, act, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="states"):
        sc.render_cpu(p, st[:1], act, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="active"):
        sc.render_cpu(p, st, act.astype(bool), np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="at least 2 x 2"):
        sc.render_cpu(p, st, act, np.zeros((2, 1, 8), np.uint8))
    with pytest.raises(ValueError, match="not a streak spec"):
        sc.render_cpu(RainSpec.preset("heldout-sparse").to_vector(), st, act, np.zeros((2, 8, 8), np.uint8))


def test_empty_batch():
    """Every backend accepts a batch of no patches, writes nothing and leaves the output's shape and dtype."""
    p = RainSpec.preset("small").to_vector()
    for render in (sc.render_cpu, sg.render_gpu, ref.render_reference):
        out = np.zeros((0, 8, 8), np.uint8)
        assert render(p, _states(0, 0), np.zeros(0, np.uint8), out) is None
        assert out.shape == (0, 8, 8) and out.dtype == np.uint8
    rain, rainy, mask = np.zeros((0, 8, 8), np.uint8), np.zeros((0, 8, 8, 3), np.uint8), np.zeros((0, 8, 8), bool)
    sc.render_composite_cpu(p, _states(0, 0), np.zeros(0, np.uint8), np.zeros((0, 8, 8, 3), np.uint8),
                            np.zeros(0, np.int64), 50, rain, rainy, mask)
    assert rain.shape == (0, 8, 8) and rainy.shape == (0, 8, 8, 3) and mask.shape == (0, 8, 8)
    # the argument checks still apply to an empty batch
    with pytest.raises(ValueError, match="states"):
        sc.render_cpu(p, _states(0, 1), np.zeros(0, np.uint8), np.zeros((0, 8, 8), np.uint8))


# ---- CUDA kernels (numba's simulator in CI, the real device with RAINSWEEP_REAL_GPU=1) --------------------------

@pytest.mark.parametrize("spec", [RainSpec.preset("medium"),
                                  RainSpec.parse("amount=0.02:0.03,width=1|3|7,length=5:9,angle=-70:70,pad=3")])
def test_cuda_equals_cpu(spec):
    p = spec.to_vector()
    st = _states(21, 2)
    act = np.array([1, 1], np.uint8)
    cpu = np.zeros((2, 24, 32), np.uint8)
    sc.render_cpu(p, st, act, cpu)
    gpu = np.full((2, 24, 32), 3, np.uint8)
    sg.render_gpu(p, st, act, gpu)
    assert np.array_equal(gpu, cpu)


def test_cuda_inactive_patch_zero():
    p = RainSpec.preset("small").to_vector()
    gpu = np.full((2, 16, 16), 3, np.uint8)
    sg.render_gpu(p, _states(1, 2), np.array([0, 1], np.uint8), gpu)
    cpu = np.zeros_like(gpu)
    sc.render_cpu(p, _states(1, 2), np.array([0, 1], np.uint8), cpu)
    assert np.array_equal(gpu, cpu) and not gpu[0].any()


# ---- the CPU fast path: fused compositing, aligned tap blocks, argument handling -----------------------------------

@pytest.mark.parametrize("spec,h,w", [
    (RainSpec.preset("large", rain_prob=0.6, threshold=40, beta=(0.5, 4.0)), 32, 48),   # beta > 1 saturates
    (RainSpec.preset("medium", canvas_pad=9), 21, 30),
    (RainSpec.parse("amount=0.2:0.4,width=1|3,length=1:6,angle=-90:90"), 5, 3),
])
def test_render_composite_cpu_equals_references(spec, h, w):
    """The fused CPU pass gives the numpy reference's rain layer and the reference compositing's rainy image and
    mask (inactive patches included: rain 0, rainy = background)."""
    gen = np.random.default_rng(3)
    n = 5
    p = spec.to_vector()
    st = _states(8, n)
    act = (np.arange(n) % 4 != 1).astype(np.uint8)
    bg = gen.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    bq = gen.integers(0, 4097, n).astype(np.int64)
    rain = np.full((n, h, w), 7, np.uint8)          # not zeros: every byte must be written
    rainy = np.full((n, h, w, 3), 9, np.uint8)
    mask = np.ones((n, h, w), bool)
    sc.render_composite_cpu(p, st, act, bg, bq, spec.threshold, rain, rainy, mask)
    exp_rain = np.empty_like(rain)
    ref.render_reference(p, st, act, exp_rain)
    exp_rainy, exp_mask = composite_reference(bg, exp_rain, bq, spec.threshold)
    assert np.array_equal(rain, exp_rain)
    assert np.array_equal(rainy, exp_rainy) and np.array_equal(mask, exp_mask)
    assert np.array_equal(rainy[1], bg[1]) and not rain[1].any()


def test_render_cpu_non_contiguous_out():
    p = RainSpec.preset("small").to_vector()
    st = _states(2, 3)
    act = np.ones(3, np.uint8)
    full = np.zeros((3, 20, 40), np.uint8)
    view = full[:, :, ::2]
    sc.render_cpu(p, st, act, view)
    exp = np.empty((3, 20, 20), np.uint8)
    ref.render_reference(p, st, act, exp)
    assert np.array_equal(view, exp) and not full[:, :, 1::2].any()


@pytest.mark.slow
def test_cpu_padded_tap_rows_read_as_every_phase():
    """Each kernel row, read by the splat at phase s (blocks from ``first - s``), is the row shifted right by s
    zeros and zero-filled to whole blocks; nothing is read outside the written part of ``taps``."""
    from numba import njit

    @njit
    def padded(length, angle, width, trig, gauss, ks):
        kb = np.zeros((4, ks, ks), dtype=np.int64)
        ext = np.zeros((7, ks), dtype=np.int64)
        rows = np.zeros((4, ks), dtype=np.int64)
        vals = np.zeros(ks * ks, dtype=np.int64)
        n_rows = build_kernel(length, angle, width, trig, gauss, kb, ext, rows, vals)[0]
        rinfo = np.full((ks + 3, 4), -1, dtype=np.int64)
        taps = np.full(ks * ks + BLOCK * (ks + 1) + 40, np.nan)
        t_end = pad_rows(rows, vals, n_rows, rinfo, 3, taps, 5)   # at an offset, as in the bank
        return rows, vals, n_rows, rinfo, taps, t_end

    bsz = BLOCK
    for length, angle, width in [(1, 0, 1), (9, 45, 3), (45, -60, 9), (128, 30, 31)]:
        rows, vals, n_rows, rinfo, taps, t_end = padded(length, angle, width, tb.TRIG, tb.GAUSS, length + 2)
        assert n_rows > 0 and not np.isnan(taps[5:t_end]).any() and np.isnan(taps[t_end:]).all()
        assert (rinfo[:3] == -1).all() and (rinfo[3 + n_rows:] == -1).all()
        for r in range(n_rows):
            dy, dx0, n, first = rinfo[3 + r]
            assert (dy, dx0, n) == tuple(rows[:3, r])
            row = vals[rows[3, r]:rows[3, r] + n].astype(np.float64)
            for s in range(bsz):
                cnt = -(-(s + n) // bsz)
                assert first - s >= 5 and first - s + cnt * bsz <= t_end
                blk = taps[first - s:first - s + cnt * bsz]
                assert np.array_equal(blk[s:s + n], row), (length, angle, r, s)
                assert not blk[:s].any() and not blk[s + n:].any()


@pytest.mark.parametrize("hc,wc,pad,step", [(9, 21, 3, 1), (16, 16, 0, 3), (5, 40, 1, 7), (4, 8, 0, 1 << 36),
                                             (7, 13, 2, 0)])
def test_cpu_normalize_is_the_exact_floor(hc, wc, pad, step):
    """``normalize`` (vector blocks and scalar tails) equals floor((a - min) * 255 / (max - min)) in Python
    integers, on canvases whose widths are and are not multiples of 8, and clears the accumulator. Values
    ``min + k * step`` (k = 0..255) make every quotient an integer k; for step 3 or 7 the float estimate falls just
    below some of them (the upward correction matters), the random values in between exercise the rest."""
    gen = np.random.default_rng(hc * wc + step)
    ex, we = 11, (wc + 2 * 11 + 7) // 8 * 8
    acc = np.full(hc * we, -1.0)                             # outside the canvas: never read
    base = 1 << 30
    vals = base + step * gen.integers(0, 256, (hc, wc))
    if step:
        vals.flat[0], vals.flat[-1] = base, base + 255 * step
        some = gen.random((hc, wc)) < 0.3
        vals[some] = base + gen.integers(0, 255 * step + 1, int(some.sum()))
    for y in range(hc):
        acc[y * we + ex:y * we + ex + wc] = vals[y]
    h, w = hc - 2 * pad, wc - 2 * pad
    out = np.full((h, w), 7, np.uint8)
    sc.normalize(acc, hc, wc, we, ex, pad, out)
    mn, mx = int(vals.min()), int(vals.max())
    crop = vals[pad:pad + h, pad:pad + w]
    exp = np.zeros((h, w), np.uint8) if mx == mn else np.array(
        [[(int(a) - mn) * 255 // (mx - mn) for a in row] for row in crop], np.uint8)
    assert np.array_equal(out, exp)
    # and it leaves the accumulator's rows all zeros for the next patch (the splat adds onto them)
    assert not acc[:hc * we].any()


def test_cpu_rejects_overlong_streaks():
    p = RainSpec.preset("small").to_vector()
    p[P.LENGTH_HI] = tb.MAX_LENGTH + 1
    with pytest.raises(ValueError, match="length"):
        sc.render_cpu(p, _states(0, 1), np.ones(1, np.uint8), np.zeros((1, 8, 8), np.uint8))
