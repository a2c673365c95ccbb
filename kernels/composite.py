"""Compositing and masks in exact integer arithmetic, on CPU (numba) and GPU (numba.cuda).

``rainy = min(255, (1024 * B + beta_q * R) >> 10)`` per channel and ``mask = R > t``, with ``B`` the uint8 NHWC
background (0..255), ``R`` the uint8 NHW rain layer before beta (0..255), ``beta_q`` the int64 per-patch beta in
1/1024 steps (``kernels.rng.BETA_SCALE``) and ``t`` the mask threshold on the 0..255 scale. Integers only, so the
CPU, GPU and numpy reference (``kernels.reference_rain.composite_reference``) agree exactly.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, njit, prange


def check_composite_args(backgrounds, rain, beta_q, rainy, mask) -> None:
    """Shapes and dtypes (numpy or CuPy arrays); raises ValueError naming the argument and the expected layout."""
    if backgrounds.ndim != 4 or backgrounds.shape[3] != 3 or backgrounds.dtype != np.uint8:
        raise ValueError(f"backgrounds: expected uint8 NHWC [N, H, W, 3], got {backgrounds.dtype}"
                         f"{tuple(backgrounds.shape)}")
    n, h, w, _ = backgrounds.shape
    if tuple(rain.shape) != (n, h, w) or rain.dtype != np.uint8:
        raise ValueError(f"rain: expected uint8 NHW [{n}, {h}, {w}], got {rain.dtype}{tuple(rain.shape)}")
    if tuple(beta_q.shape) != (n,) or beta_q.dtype != np.int64:
        raise ValueError(f"beta_q: expected int64[{n}] (beta in 1/1024), got {beta_q.dtype}{tuple(beta_q.shape)}")
    if tuple(rainy.shape) != (n, h, w, 3) or rainy.dtype != np.uint8:
        raise ValueError(f"rainy: expected uint8 NHWC [{n}, {h}, {w}, 3], got {rainy.dtype}{tuple(rainy.shape)}")
    if tuple(mask.shape) != (n, h, w) or mask.dtype != np.bool_:
        raise ValueError(f"mask: expected bool NHW [{n}, {h}, {w}], got {mask.dtype}{tuple(mask.shape)}")


@njit(cache=True)
def _composite_patch(backgrounds, rain, beta_q, threshold, rainy, mask, i):
    """Patch ``i``: flat views with the three channels written out, a loop LLVM can vectorize (no channel loop)."""
    n, h, w, c = backgrounds.shape
    hw = h * w
    q = np.int32(beta_q[i])
    b = backgrounds[i].reshape(hw * 3)
    r = rain[i].reshape(hw)
    o = rainy[i].reshape(hw * 3)
    m = mask[i].reshape(hw)
    for p in range(hw):
        rv = np.int32(r[p])
        t = q * rv
        m[p] = rv > threshold
        v0 = (np.int32(b[3 * p]) * 1024 + t) >> 10
        v1 = (np.int32(b[3 * p + 1]) * 1024 + t) >> 10
        v2 = (np.int32(b[3 * p + 2]) * 1024 + t) >> 10
        o[3 * p] = v0 if v0 < 255 else 255
        o[3 * p + 1] = v1 if v1 < 255 else 255
        o[3 * p + 2] = v2 if v2 < 255 else 255


@njit(parallel=True, cache=True)
def _composite_cpu_kernel(backgrounds, rain, beta_q, threshold, rainy, mask):
    for i in prange(backgrounds.shape[0]):
        _composite_patch(backgrounds, rain, beta_q, threshold, rainy, mask, i)


@njit(cache=True)
def _composite_cpu_serial(backgrounds, rain, beta_q, threshold, rainy, mask):
    for i in range(backgrounds.shape[0]):
        _composite_patch(backgrounds, rain, beta_q, threshold, rainy, mask, i)


def composite_cpu(backgrounds: np.ndarray, rain: np.ndarray, beta_q: np.ndarray, threshold: int,
                  rainy: np.ndarray, mask: np.ndarray) -> None:
    """Write ``rainy`` (uint8 NHWC) and ``mask`` (bool NHW) from numpy inputs; numba, parallel over patches."""
    check_composite_args(backgrounds, rain, beta_q, rainy, mask)
    if not (rainy.flags.c_contiguous and mask.flags.c_contiguous):
        raise ValueError("rainy, mask: expected C-contiguous output arrays")
    if backgrounds.shape[0]:
        backgrounds = np.ascontiguousarray(backgrounds)
        rain = np.ascontiguousarray(rain)
        import numba

        # no parallel region for one thread or tiny batches: waking the thread pool costs more than they take
        kernel = _composite_cpu_serial if numba.get_num_threads() == 1 or backgrounds.shape[0] <= 2 \
            else _composite_cpu_kernel
        kernel(backgrounds, rain, beta_q, np.int32(threshold), rainy, mask)


@cuda.jit
def _composite_gpu_kernel(backgrounds, rain, beta_q, threshold, rainy, mask):
    """One thread per pixel (all three channels): grid-stride over N * H * W."""
    n, h, w, c = backgrounds.shape
    total = n * h * w
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for p in range(start, total, stride):
        i = p // (h * w)
        rem = p - i * h * w
        y = rem // w
        x = rem - y * w
        r = np.int32(rain[i, y, x])
        q = np.int32(beta_q[i])
        mask[i, y, x] = r > threshold
        for k in range(c):
            v = (np.int32(backgrounds[i, y, x, k]) * 1024 + q * r) >> 10
            rainy[i, y, x, k] = v if v < 255 else 255  # builtin min() does not compile for CUDA (numba #10753)


def composite_gpu(backgrounds, rain, beta_q, threshold: int, rainy, mask) -> None:
    """``composite_cpu`` on device arrays (CuPy; numpy under the CUDA simulator)."""
    check_composite_args(backgrounds, rain, beta_q, rainy, mask)
    n, h, w, _ = backgrounds.shape
    total = n * h * w
    if total == 0:
        return
    if type(rainy).__module__.split(".")[0] == "cupy":
        import cupy

        stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
        threads, blocks = 256, min((total + 255) // 256, 65535)
    else:
        stream = 0
        threads, blocks = 32, min((total + 31) // 32, 8)   # the simulator runs threads as Python threads
    _composite_gpu_kernel[blocks, threads, stream](backgrounds, rain, beta_q, np.int32(threshold), rainy, mask)
