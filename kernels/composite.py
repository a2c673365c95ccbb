"""Compositing and masks in exact integer arithmetic, on CPU (numba) and GPU (numba.cuda).

``rainy = min(255, (1024 * B + beta_q * R) >> 10)`` per channel and ``mask = R > t``, with ``B`` the uint8 NHWC
background (0..255), ``R`` the uint8 NHW rain layer before beta (0..255), ``beta_q`` the int64 per-patch beta in
1/1024 steps (``kernels.rng.BETA_SCALE``) and ``t`` the mask threshold on the 0..255 scale. Integers only, so the
CPU, GPU and numpy reference (``composite_reference``) agree exactly.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, njit, prange

from kernels.gpu_launch import array_module_and_stream
from kernels.jit import run_chunks
from kernels.rng import BETA_SCALE


def check_composite_inputs(backgrounds, rain, beta_q, n: int | None = None) -> None:
    """Shapes and dtypes of the inputs (numpy or CuPy arrays); raises ValueError naming the argument and the
    expected layout. ``n``: patches in the batch when it is not ``backgrounds.shape[0]`` (backgrounds picked by
    row, see ``kernels.finish``)."""
    if backgrounds.ndim != 4 or backgrounds.shape[3] != 3 or backgrounds.dtype != np.uint8:
        raise ValueError(f"backgrounds: expected uint8 NHWC [N, H, W, 3], got {backgrounds.dtype}"
                         f"{tuple(backgrounds.shape)}")
    _, h, w, _ = backgrounds.shape
    n = backgrounds.shape[0] if n is None else n
    if tuple(rain.shape) != (n, h, w) or rain.dtype != np.uint8:
        raise ValueError(f"rain: expected uint8 NHW [{n}, {h}, {w}], got {rain.dtype}{tuple(rain.shape)}")
    if tuple(beta_q.shape) != (n,) or beta_q.dtype != np.int64:
        raise ValueError(f"beta_q: expected int64[{n}] (beta in 1/1024), got {beta_q.dtype}{tuple(beta_q.shape)}")


def check_composite_args(backgrounds, rain, beta_q, rainy, mask) -> None:
    """Shapes and dtypes of inputs and outputs (numpy or CuPy arrays); raises ValueError naming the argument."""
    check_composite_inputs(backgrounds, rain, beta_q)
    n, h, w, _ = backgrounds.shape
    if tuple(rainy.shape) != (n, h, w, 3) or rainy.dtype != np.uint8:
        raise ValueError(f"rainy: expected uint8 NHWC [{n}, {h}, {w}, 3], got {rainy.dtype}{tuple(rainy.shape)}")
    if tuple(mask.shape) != (n, h, w) or mask.dtype != np.bool_:
        raise ValueError(f"mask: expected bool NHW [{n}, {h}, {w}], got {mask.dtype}{tuple(mask.shape)}")


@njit(cache=True)
def composite_patch_cpu(b, r, q, threshold, o, m, tt):
    """One patch on flat views: ``b`` uint8 [3 HW] (background, HWC order), ``r`` uint8 [HW] (rain layer),
    ``q`` int32 beta in 1/1024, ``o`` uint8 [3 HW] (rainy, written), ``m`` bool [HW] (mask, written), ``tt`` uint8
    [>= HW] scratch.

    ``(1024 B + q R) >> 10 = B + ((q R) >> 10)`` (the first term is a multiple of 1024 and both are >= 0), so the
    rainy value is the saturating uint8 sum of ``B`` and ``t = min(255, (q R) >> 10)``. The saturation is written
    with masks (``s | -(s < t)``): numba types ``min`` and conditional expressions on small integers in a way LLVM
    does not vectorize, the mask form it does.
    """
    hw = r.size
    for p in range(hw):
        rv = np.int32(r[p])
        m[p] = rv > threshold
        t = (q * rv) >> 10
        tt[p] = np.uint8(t) | np.uint8(0 - np.int32(t > 255))       # min(t, 255): t <= 4096 * 255 >> 10
    for p in range(hw):
        t = tt[p]
        s0 = np.uint8(b[3 * p] + t)
        s1 = np.uint8(b[3 * p + 1] + t)
        s2 = np.uint8(b[3 * p + 2] + t)
        o[3 * p] = s0 | np.uint8(0 - np.uint8(s0 < t))                # wrapped sum -> 255
        o[3 * p + 1] = s1 | np.uint8(0 - np.uint8(s1 < t))
        o[3 * p + 2] = s2 | np.uint8(0 - np.uint8(s2 < t))


@njit(cache=True)
def _composite_chunk(backgrounds, rain, beta_q, threshold, rainy, mask, c, n_chunks):
    """Patches c, c + n_chunks, ... with one scratch buffer."""
    n, h, w, _ = backgrounds.shape
    hw = h * w
    tt = np.empty(hw, dtype=np.uint8)
    for i in range(c, n, n_chunks):
        composite_patch_cpu(backgrounds[i].reshape(hw * 3), rain[i].reshape(hw), np.int32(beta_q[i]), threshold,
                            rainy[i].reshape(hw * 3), mask[i].reshape(hw), tt)


@njit(parallel=True, cache=True)
def _composite_cpu_kernel(backgrounds, rain, beta_q, threshold, rainy, mask, n_chunks):
    for c in prange(n_chunks):
        _composite_chunk(backgrounds, rain, beta_q, threshold, rainy, mask, c, n_chunks)


def composite_cpu(backgrounds: np.ndarray, rain: np.ndarray, beta_q: np.ndarray, threshold: int,
                  rainy: np.ndarray, mask: np.ndarray) -> None:
    """Write ``rainy`` (uint8 NHWC) and ``mask`` (bool NHW) from numpy inputs; numba, parallel over patches."""
    check_composite_args(backgrounds, rain, beta_q, rainy, mask)
    if not (rainy.flags.c_contiguous and mask.flags.c_contiguous):
        raise ValueError("rainy, mask: expected C-contiguous output arrays")
    n = backgrounds.shape[0]
    if n:
        run_chunks(_composite_chunk, _composite_cpu_kernel, n, np.ascontiguousarray(backgrounds),
                   np.ascontiguousarray(rain), beta_q, np.int32(threshold), rainy, mask)


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
    xp, stream = array_module_and_stream(rainy)
    if xp is np:
        threads, blocks = 32, min((total + 31) // 32, 8)   # the simulator runs threads as Python threads
    else:
        threads, blocks = 256, min((total + 255) // 256, 65535)
    _composite_gpu_kernel[blocks, threads, stream](backgrounds, rain, beta_q, np.int32(threshold), rainy, mask)


def composite_reference(backgrounds: np.ndarray, rain: np.ndarray, beta_q: np.ndarray, threshold: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy reference: (rainy uint8 NHWC, mask bool NHW) with ``rainy = min(255, (1024 B + beta_q R) >> 10)``
    and ``mask = R > threshold``.

    ``backgrounds`` uint8 NHWC 0..255, ``rain`` uint8 NHW 0..255, ``beta_q`` int64 [N] (beta in 1/1024).
    """
    b = backgrounds.astype(np.int64)
    r = rain.astype(np.int64)[..., None]
    q = np.asarray(beta_q, dtype=np.int64)[:, None, None, None]
    rainy = np.minimum(255, (BETA_SCALE * b + q * r) >> 10).astype(np.uint8)
    return rainy, rain > threshold
