"""Metric kernels against independent references: OpenCV, plain numpy formulas, hand-computed cases, properties.

CUDA kernels run through numba's CUDA simulator here (conftest), on 2-3 tiny patches; ``gpu``-marked tests repeat
the comparison with CuPy arrays on a real GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import metrics
from kernels import complexity as kcx
from kernels import decoupled as kdc
from kernels import sharpness as ksh

cv2 = pytest.importorskip("cv2")


# ---- inputs ------------------------------------------------------------------------------------------------------

def _skimage_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled real images that load offline, as uint8 RGB [H, W, 3]."""
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "camera", "rocket", "brick", "grass", "gravel", "moon",
                 "hubble_deep_field", "immunohistochemistry", "retina", "text", "page", "clock"):
        try:
            img = getattr(data, name)()
        except Exception:  # some need a download: use the ones that load
            continue
        img = np.asarray(img)
        if img.dtype != np.uint8:
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        if img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        if img.ndim == 3 and img.shape[-1] == 3:
            out[name] = np.ascontiguousarray(img)
    return out


IMAGES = _skimage_images()


def _real_patches(size: int = 128, per_image: int = 2) -> np.ndarray:
    """128 x 128 crops of the real images (top-left and centre)."""
    out = []
    for img in IMAGES.values():
        h, w = img.shape[:2]
        if h < size or w < size:
            continue
        out.append(img[:size, :size])
        if per_image > 1:
            y, x = (h - size) // 2, (w - size) // 2
            out.append(img[y:y + size, x:x + size])
    return np.ascontiguousarray(np.stack(out))


def _cv2_sharpness(img: np.ndarray) -> float:
    g = img.astype(np.float64)
    gray = 0.299 * g[..., 0] + 0.587 * g[..., 1] + 0.114 * g[..., 2]
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def test_some_real_images_load():
    assert len(IMAGES) >= 4, f"only {sorted(IMAGES)} loaded"


# ---- sharpness ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(IMAGES))
def test_sharpness_equals_opencv_on_real_images(name):
    img = IMAGES[name]
    expected = _cv2_sharpness(img)
    got = metrics.sharpness(img[None])
    assert got.dtype == np.float64 and got.shape == (1,)
    np.testing.assert_allclose(got[0], expected, rtol=1e-9)
    np.testing.assert_allclose(metrics.sharpness(img[None], backend="reference")[0], expected, rtol=1e-9)


def test_sharpness_equals_opencv_on_patches_and_odd_shapes(rng):
    patches = _real_patches()
    np.testing.assert_allclose(metrics.sharpness(patches), [_cv2_sharpness(p) for p in patches], rtol=1e-9)
    for shape in ((1, 7), (7, 1), (2, 3), (3, 2), (5, 5), (17, 33)):
        x = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
        np.testing.assert_allclose(metrics.sharpness(x), [_cv2_sharpness(p) for p in x], rtol=1e-9, atol=1e-12,
                                   err_msg=str(shape))


def test_sharpness_cpu_equals_reference(rng):
    x = np.concatenate([rng.integers(0, 256, (6, 128, 128, 3), dtype=np.uint8), _real_patches()[:6]])
    np.testing.assert_allclose(ksh.sharpness_cpu(x), ksh.sharpness_reference(x), rtol=1e-6)
    np.testing.assert_allclose(ksh.sharpness_cpu(x), ksh.sharpness_reference(x), rtol=1e-12)
    y = rng.integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    np.testing.assert_allclose(metrics.sharpness(y, backend="cpu"), metrics.sharpness(y, backend="reference"),
                               rtol=1e-12)


def test_sharpness_hand_cases():
    const = np.full((2, 9, 11, 3), 77, dtype=np.uint8)
    assert np.all(metrics.sharpness(const) == 0.0)
    # one white pixel in the middle of a black 5 x 5 patch: Laplacian -4g there, g at its 4 neighbours, 0 elsewhere
    x = np.zeros((1, 5, 5, 3), dtype=np.uint8)
    x[0, 2, 2] = 255
    g = 0.299 * 255 + 0.587 * 255 + 0.114 * 255
    np.testing.assert_allclose(metrics.sharpness(x)[0], (16 * g * g + 4 * g * g) / 25, rtol=1e-12)
    # only the red channel: the weight enters squared
    x[0, 2, 2] = (200, 0, 0)
    g = 0.299 * 200
    np.testing.assert_allclose(metrics.sharpness(x)[0], 20 * g * g / 25, rtol=1e-12)


def test_sharpness_bands_order_blur_below_sharp():
    img = IMAGES.get("astronaut", next(iter(IMAGES.values())))
    blurred = cv2.GaussianBlur(img, (9, 9), 3)
    s_sharp, s_blur = metrics.sharpness(np.stack([img, blurred]))
    assert s_blur < s_sharp / 5


# ---- complexity --------------------------------------------------------------------------------------------------

def test_complexity_cpu_equals_reference(rng):
    x = np.concatenate([rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8), _real_patches()[:6]])
    np.testing.assert_allclose(kcx.complexity_cpu(x), kcx.complexity_reference(x), rtol=1e-6)
    np.testing.assert_allclose(kcx.complexity_cpu(x), kcx.complexity_reference(x), rtol=1e-12)
    for shape in ((16, 24), (17, 33), (5, 9), (2, 2), (40, 8), (1, 7), (9, 1), (3, 3)):
        y = rng.integers(0, 256, (3, *shape, 3), dtype=np.uint8)
        np.testing.assert_allclose(metrics.complexity(y), metrics.complexity(y, backend="reference"),
                                   rtol=1e-12, atol=1e-15, err_msg=str(shape))


def test_complexity_hand_cases():
    assert np.all(metrics.complexity(np.full((2, 32, 32, 3), 200, dtype=np.uint8)) == 0.0)
    # 2 x 2 checkerboard of 0 and 1 per channel: O_00 = 1/2, O_01 = O_11 = 1/4 -> |1/4 - 3/8| = 1/8 per channel
    cb = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    x = np.repeat(cb[None, :, :, None], 3, axis=-1)
    np.testing.assert_allclose(metrics.complexity(x), [3 / 8], rtol=1e-12)
    only_red = np.zeros_like(x)
    only_red[..., 0] = cb
    np.testing.assert_allclose(metrics.complexity(only_red), [1 / 8], rtol=1e-12)
    # the same checkerboard one pixel per square at 4 x 4 (all at level 0) or 2 x 2 pixels per square (level 1)
    fine = np.repeat(np.tile(cb, (2, 2))[None, :, :, None], 3, axis=-1)
    coarse = np.repeat(np.kron(cb, np.ones((2, 2), dtype=np.uint8))[None, :, :, None], 3, axis=-1)
    np.testing.assert_allclose(metrics.complexity(np.concatenate([fine, coarse])), [3 / 8, 3 / 8], rtol=1e-12)
    # an odd last row / column is dropped: a 3 x 3 patch is the 2 x 2 checkerboard plus an ignored border
    odd = np.full((1, 3, 3, 3), 255, dtype=np.uint8)
    odd[0, :2, :2] = x[0]
    np.testing.assert_allclose(metrics.complexity(odd), [3 / 8], rtol=1e-12)


def test_complexity_is_half_the_variance_for_power_of_two_squares(rng):
    """With 2 x 2 averaging the terms telescope to (mean |f|^2 - |mean f|^2) / 2 (independent closed form)."""
    x = np.concatenate([rng.integers(0, 256, (3, 128, 128, 3), dtype=np.uint8), _real_patches()[:4]])
    f = x.astype(np.float64) / 255
    expected = f.reshape(len(f), -1, 3).var(axis=1).sum(axis=1) / 2
    np.testing.assert_allclose(metrics.complexity(x), expected, rtol=1e-9)


def test_complexity_properties(rng):
    x = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    c = metrics.complexity(x)
    for k in (1, 2, 3):
        np.testing.assert_allclose(metrics.complexity(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2)))), c,
                                   rtol=1e-12)
    # smoothing the same noise lowers the complexity
    noise = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    smooth = cv2.GaussianBlur(noise[0], (7, 7), 2.0)[None]
    c_noise, c_smooth = metrics.complexity(np.concatenate([noise, smooth]))
    assert 0 < c_smooth < c_noise / 4
    # but, as the telescoping identity says, a full-range smooth ramp scores like full-range noise (both have
    # per-channel variance ~1/12 on 0..1): this metric measures contrast, not structure (reported to the lead)
    ramp = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, None, :, None], (1, 64, 64, 3))
    c_ramp = metrics.complexity(np.ascontiguousarray(ramp))[0]
    np.testing.assert_allclose(c_ramp, c_noise, rtol=0.05)
    np.testing.assert_allclose(c_noise, 3 * (1 / 12) / 2, rtol=0.05)


# ---- decoupled ---------------------------------------------------------------------------------------------------

def _decoupled_inputs(rng, n=3, h=32, w=24, out_dtype=np.uint8, p_mask=0.3):
    bg = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    rain = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    mask = rain > int(255 * (1 - p_mask))
    rainy = np.clip(bg.astype(np.int32) + (0.8 * rain)[..., None].astype(np.int32), 0, 255).astype(np.uint8)
    if out_dtype == np.uint8:
        out = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    else:
        out = (bg + rng.normal(0, 12, bg.shape)).astype(out_dtype)
    return out, rainy, bg, mask


def _direct(o, i, b, m):
    """The formulas of ``engine.metrics.decoupled`` written out with numpy broadcasting over the batch (independent of
    both kernel and reference)."""
    o, i, b = (a.astype(np.float64) for a in (o, i, b))
    m3 = np.broadcast_to(m[..., None], o.shape).astype(np.float64)
    ax = (1, 2, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "E_R": np.sqrt((m3 * (o - i) ** 2).sum(ax) / m3.sum(ax)),
            "E_B": np.sqrt(((1 - m3) * (o - b) ** 2).sum(ax) / (1 - m3).sum(ax)),
            "rain_residual": (m3 * (o - b) ** 2).sum(ax) / m3.sum(ax),
            "PSNR": 10 * np.log10(255.0 ** 2 / ((o - b) ** 2).mean(ax)),
        }


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_decoupled_equals_direct_formulas(rng, dtype):
    o, i, b, m = _decoupled_inputs(rng, out_dtype=dtype)
    want = _direct(o, i, b, m)
    for backend in ("cpu", "reference", "auto"):
        got = metrics.decoupled(o, i, b, m, backend=backend)
        assert set(got) == {"E_R", "E_B", "rain_residual", "PSNR"}
        for k in want:
            assert got[k].dtype == np.float64 and got[k].shape == (len(o),)
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=f"{backend} {k}")
    np.testing.assert_allclose(kdc.sums_cpu(o, i, b, m)[:, 0], m.sum(axis=(1, 2)))


def test_decoupled_cpu_equals_reference_on_real_patches(rng):
    b = _real_patches()[:4]
    rain = rng.integers(0, 256, b.shape[:3], dtype=np.uint8)
    m = rain > 200
    i = np.clip(b.astype(np.int32) + rain[..., None] // 2, 0, 255).astype(np.uint8)
    o = cv2.GaussianBlur(i.reshape(-1, *i.shape[2:]), (5, 5), 1.5).reshape(i.shape).astype(np.float32)
    got, ref = metrics.decoupled(o, i, b, m), kdc.decoupled_reference(o, i, b, m)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6)


def test_decoupled_hand_cases(rng):
    _, i, b, m = _decoupled_inputs(rng)
    # output == rainy: nothing removed
    res = metrics.decoupled(i, i, b, m)
    assert np.all(res["E_R"] == 0.0)
    # output == background: perfect; E_R reaches its ceiling, E_B and the residual are 0, PSNR is inf
    res = metrics.decoupled(b, i, b, m)
    assert np.all(res["E_B"] == 0.0) and np.all(res["rain_residual"] == 0.0) and np.all(np.isinf(res["PSNR"]))
    d2 = ((b.astype(np.float64) - i) ** 2).sum(axis=-1)
    ceiling = np.sqrt((m * d2).sum(axis=(1, 2)) / (3 * m.sum(axis=(1, 2))))
    np.testing.assert_allclose(res["E_R"], ceiling, rtol=1e-12)
    # a uniform error of 1 gray level: MSE 1 -> PSNR 20 log10(255)
    o = b.astype(np.float32) + 1.0
    np.testing.assert_allclose(metrics.decoupled(o, i, b, m)["PSNR"], 20 * np.log10(255.0), rtol=1e-12)
    np.testing.assert_allclose(metrics.decoupled(o, i, b, m)["E_B"], 1.0, rtol=1e-12)


def test_decoupled_empty_and_full_masks(rng):
    o, i, b, _ = _decoupled_inputs(rng, n=2)
    empty = np.zeros(o.shape[:3], dtype=bool)
    full = np.ones(o.shape[:3], dtype=bool)
    for backend in ("cpu", "reference"):
        r = metrics.decoupled(o, i, b, empty, backend=backend)
        assert np.all(np.isnan(r["E_R"])) and np.all(np.isnan(r["rain_residual"]))
        assert np.all(np.isfinite(r["E_B"])) and np.all(np.isfinite(r["PSNR"]))
        r = metrics.decoupled(o, i, b, full, backend=backend)
        assert np.all(np.isnan(r["E_B"])) and np.all(np.isfinite(r["E_R"]))


# ---- CUDA kernels (simulator here, real GPU under RAINSWEEP_REAL_GPU=1) ------------------------------------------

@pytest.mark.parametrize("shape", [(16, 16), (16, 24), (7, 5), (1, 6), (5, 1)])
def test_cuda_sharpness_equals_cpu(rng, shape):
    x = rng.integers(0, 256, (3, *shape, 3), dtype=np.uint8)
    cpu = metrics.sharpness(x, backend="cpu")
    # exact integer sums: bit-identical, with either GPU kernel
    np.testing.assert_array_equal(metrics.sharpness(x, backend="cuda"), cpu)
    np.testing.assert_array_equal(ksh.sharpness_cuda(x, threads=64, method="strided"), cpu)


@pytest.mark.parametrize("shape", [(16, 24), (32, 32), (48, 40)])
def test_cuda_complexity_equals_cpu(rng, shape):
    # 32 x 32 and 48 x 40 reach the levels >= 3 coarsened by the whole block (ping-pong scratch)
    x = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    np.testing.assert_allclose(metrics.complexity(x, backend="cuda"), metrics.complexity(x, backend="cpu"),
                               rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_cuda_decoupled_equals_cpu(rng, dtype):
    o, i, b, m = _decoupled_inputs(rng, n=2, h=16, w=24, out_dtype=dtype)
    got, want = metrics.decoupled(o, i, b, m, backend="cuda"), metrics.decoupled(o, i, b, m, backend="cpu")
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)


@pytest.mark.gpu
def test_real_gpu_cupy_inputs_match_cpu(rng):
    import cupy

    x = rng.integers(0, 256, (64, 128, 128, 3), dtype=np.uint8)
    d = cupy.asarray(x)
    np.testing.assert_array_equal(metrics.sharpness(d), metrics.sharpness(x))
    np.testing.assert_allclose(metrics.complexity(d), metrics.complexity(x), rtol=1e-12)
    o, i, b, m = _decoupled_inputs(rng, n=8, h=128, w=128, out_dtype=np.float32)
    got = metrics.decoupled(*(cupy.asarray(a) for a in (o, i, b, m)))
    want = metrics.decoupled(o, i, b, m)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12)


# ---- input handling ----------------------------------------------------------------------------------------------

def test_torch_inputs_match_numpy(rng):
    torch = pytest.importorskip("torch")
    x = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(metrics.sharpness(torch.from_numpy(x)), metrics.sharpness(x))
    np.testing.assert_array_equal(metrics.complexity(torch.from_numpy(x)), metrics.complexity(x))
    o, i, b, m = _decoupled_inputs(rng, out_dtype=np.float32)
    got = metrics.decoupled(*(torch.from_numpy(a) for a in (o, i, b, m)))
    want = metrics.decoupled(o, i, b, m)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_non_contiguous_inputs(rng):
    x = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    view = x[:, ::2, 1::2]
    np.testing.assert_array_equal(metrics.sharpness(view), metrics.sharpness(np.ascontiguousarray(view)))
    np.testing.assert_array_equal(metrics.complexity(view), metrics.complexity(np.ascontiguousarray(view)))
    # the trainer's outputs: float32 NHWC views of NCHW tensors (permuted, not contiguous)
    o, i, b, m = _decoupled_inputs(rng, out_dtype=np.float32)
    o_view = np.ascontiguousarray(o.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    assert not o_view.flags.c_contiguous
    got, want = metrics.decoupled(o_view, i, b, m), metrics.decoupled(o, i, b, m)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_empty_batches():
    x = np.zeros((0, 16, 16, 3), dtype=np.uint8)
    for backend in ("auto", "cpu", "cuda", "reference"):
        assert metrics.sharpness(x, backend=backend).shape == (0,)
        assert metrics.complexity(x, backend=backend).shape == (0,)
        res = metrics.decoupled(x, x, x, np.zeros((0, 16, 16), dtype=bool), backend=backend)
        assert all(v.shape == (0,) and v.dtype == np.float64 for v in res.values())


@pytest.mark.parametrize("fn", [metrics.sharpness, metrics.complexity])
def test_per_patch_bad_input(fn):
    with pytest.raises(ValueError, match="uint8"):
        fn(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        fn(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        fn(np.zeros((1, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="backend"):
        fn(np.zeros((1, 8, 8, 3), dtype=np.uint8), backend="gpu")
    with pytest.raises(TypeError, match="numpy"):
        fn([[[[0, 0, 0]]]])


def test_decoupled_bad_input(rng):
    o, i, b, m = _decoupled_inputs(rng)
    with pytest.raises(ValueError, match="output.*uint8 or float32"):
        metrics.decoupled(o.astype(np.int16), i, b, m)
    with pytest.raises(ValueError, match="output.*NCHW"):
        metrics.decoupled(np.ascontiguousarray(o.transpose(0, 3, 1, 2)), i, b, m)
    with pytest.raises(ValueError, match="rainy.*uint8"):
        metrics.decoupled(o, i.astype(np.float32), b, m)
    with pytest.raises(ValueError, match="background: shape"):
        metrics.decoupled(o, i, b[:, :-1], m)
    with pytest.raises(ValueError, match="rainy: shape"):
        metrics.decoupled(o, i[:2], b, m)
    with pytest.raises(ValueError, match="mask.*bool"):
        metrics.decoupled(o, i, b, m.astype(np.uint8))
    with pytest.raises(ValueError, match="mask.*shape"):
        metrics.decoupled(o, i, b, m[:, :, :-1])
    with pytest.raises(ValueError, match="backend"):
        metrics.decoupled(o, i, b, m, backend="gpu")


def test_size_limits_are_checked():
    with pytest.raises(ValueError, match="sharpness supports"):
        ksh.check_size(1, ksh.MAX_WIDTH + 1)
    with pytest.raises(ValueError, match="complexity supports"):
        kcx.check_size(2000, 2000)
