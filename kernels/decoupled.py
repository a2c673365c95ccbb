"""Decoupled deraining metrics per patch: E_R (rain removal), E_B (background error), rain residual, PSNR.

Definitions (after Hu, You, Gu, Zhu, Xue, Dong, "Revisiting the Generalization Problem of Low-level Vision Models
Through the Lens of Image Deraining", the journal extension of Gu et al., NeurIPS 2023, arXiv:2305.14709), all on
the 0..255 scale, sums over pixels and all three channels (the mask M [H, W] applies to every channel of a pixel):

- ``E_R = sqrt( sum M (O - I)^2 / sum M )``: how much the output O changed the rainy input I inside the rain.
- ``E_B = sqrt( sum (1 - M) (O - B)^2 / sum (1 - M) )``: background error outside the rain.
- ``rain_residual = sum M (O - B)^2 / sum M``: squared error against the ground truth inside the rain (no root,
  as the authors log it).
- ``PSNR = 10 log10(255^2 / mean (O - B)^2)`` over all pixels and channels.

Here ``sum M`` counts mask values over the three channels (3 per masked pixel), so E_R is a root mean square per
channel value. Empty mask -> E_R and rain_residual NaN; full mask -> E_B NaN; O == B -> PSNR inf.

The kernels reduce each patch to five float64 sums (``SUMS``); ``finish`` (host, numpy, shared by all backends)
turns them into the metrics. For uint8 outputs every sum is an exact integer (below 2**53 for patches up to
2**35 pixels), so CPU and GPU agree bit for bit; float outputs agree to rounding.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, njit, prange

#: Per-patch sums: masked pixel count, sum M (O-I)^2, sum (1-M) (O-B)^2, sum M (O-B)^2, sum (O-B)^2.
SUMS = ("mask_pixels", "rain_change", "bg_error", "rain_residual", "total_error")
NSUMS = len(SUMS)
KEYS = ("E_R", "E_B", "rain_residual", "PSNR")


# ---- plain numpy reference (slow and obvious) --------------------------------------------------------------------

def decoupled_reference(output: np.ndarray, rainy: np.ndarray, background: np.ndarray,
                        mask: np.ndarray) -> dict[str, np.ndarray]:
    """The formulas of the module docstring on numpy arrays, one patch at a time: output / rainy / background NHWC
    (0..255, any numeric dtype), mask bool NHW -> dict of float64 [N]."""
    n = len(output)
    res = {k: np.empty(n, dtype=np.float64) for k in KEYS}
    for i in range(n):
        o = np.asarray(output[i], dtype=np.float64)
        r = np.asarray(rainy[i], dtype=np.float64)
        b = np.asarray(background[i], dtype=np.float64)
        m = np.repeat(np.asarray(mask[i], dtype=np.float64)[..., None], o.shape[-1], axis=-1)  # M on every channel
        with np.errstate(divide="ignore", invalid="ignore"):
            res["E_R"][i] = np.sqrt(np.sum(m * (o - r) ** 2) / np.sum(m))
            res["E_B"][i] = np.sqrt(np.sum((1 - m) * (o - b) ** 2) / np.sum(1 - m))
            res["rain_residual"][i] = np.sum(m * (o - b) ** 2) / np.sum(m)
            res["PSNR"][i] = 10 * np.log10(255.0 ** 2 / np.mean((o - b) ** 2))
    return res


# ---- shared finishing step (host, numpy) -------------------------------------------------------------------------

def finish(sums: np.ndarray, h: int, w: int, c: int = 3) -> dict[str, np.ndarray]:
    """Metrics from the float64 [N, 5] sums of H x W x c patches -> dict of float64 [N] (see module docstring)."""
    sums = np.asarray(sums, dtype=np.float64)
    m = sums[:, 0] * c  # mask values over all channels
    not_m = (h * w - sums[:, 0]) * c
    with np.errstate(divide="ignore", invalid="ignore"):
        e_r = np.where(m > 0, np.sqrt(sums[:, 1] / np.where(m > 0, m, 1)), np.nan)
        e_b = np.where(not_m > 0, np.sqrt(sums[:, 2] / np.where(not_m > 0, not_m, 1)), np.nan)
        resid = np.where(m > 0, sums[:, 3] / np.where(m > 0, m, 1), np.nan)
        mse = sums[:, 4] / float(h * w * c)
        psnr = np.where(mse > 0, 10.0 * np.log10(255.0 ** 2 / np.where(mse > 0, mse, 1)), np.inf)
    return {"E_R": e_r, "E_B": e_b, "rain_residual": resid, "PSNR": psnr}


# ---- CPU kernel (numba, parallel over patches) -------------------------------------------------------------------

@njit(cache=True, parallel=True, fastmath={"reassoc"})
def _sums_cpu3(output, rainy, background, mask):
    """Row by row over the flat channel-interleaved values (stride 1, so LLVM vectorizes it), with the row's mask
    expanded to one 0 / 1 factor per value. ``reassoc`` lets the float sums be split across vector lanes: exact for
    uint8 outputs (integer terms), a different rounding order for float outputs."""
    n, h, w, ch = output.shape
    m3 = w * ch
    out = np.zeros((n, NSUMS), dtype=np.float64)
    for p in prange(n):
        mrow = np.empty(m3, dtype=np.float64)
        cnt = 0.0
        s_rain = 0.0
        s_bg = 0.0
        s_res = 0.0
        for y in range(h):
            o = output[p, y].reshape(-1)
            r = rainy[p, y].reshape(-1)
            b = background[p, y].reshape(-1)
            mk = mask[p, y]
            for xx in range(w):
                mv = np.float64(mk[xx])
                cnt += mv
                for c in range(ch):
                    mrow[xx * ch + c] = mv
            for j in range(m3):
                ov = np.float64(o[j])
                di = ov - np.float64(r[j])
                dg = ov - np.float64(b[j])
                mv = mrow[j]
                s_rain += mv * (di * di)
                s_res += mv * (dg * dg)
                s_bg += (1.0 - mv) * (dg * dg)
        out[p, 0] = cnt
        out[p, 1] = s_rain
        out[p, 2] = s_bg
        out[p, 3] = s_res
        out[p, 4] = s_bg + s_res
    return out


def sums_cpu(output: np.ndarray, rainy: np.ndarray, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 [N, 5] sums; ``output`` uint8 / float32 / float64 NHWC [N, H, W, 3], ``rainy`` and ``background``
    uint8 NHWC, ``mask`` bool NHW, numpy arrays. Parallel over patches."""
    c = np.ascontiguousarray
    return _sums_cpu3(c(output), c(rainy), c(background), c(mask).view(np.uint8))


# ---- GPU kernel (numba.cuda): one block per patch ----------------------------------------------------------------

MAX_THREADS = 256


@cuda.jit
def _sums_kernel(output, rainy, background, mask, out):
    """Block b reduces patch b: threads stride over pixels (coalesced loads across a warp), five float64 partial
    sums, then a shared-memory tree reduction."""
    p = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    h = output.shape[1]
    w = output.shape[2]
    ch = output.shape[3]
    acc = cuda.shared.array((NSUMS, MAX_THREADS), dtype=np.float64)
    cnt = 0.0
    s_rain = 0.0
    s_bg = 0.0
    s_res = 0.0
    s_tot = 0.0
    for idx in range(tid, h * w, nt):
        y = idx // w
        xx = idx - y * w
        e_in = 0.0
        e_gt = 0.0
        for c in range(ch):
            o = np.float64(output[p, y, xx, c])
            di = o - np.float64(rainy[p, y, xx, c])
            dg = o - np.float64(background[p, y, xx, c])
            e_in += di * di
            e_gt += dg * dg
        s_tot += e_gt
        if mask[p, y, xx]:
            cnt += 1.0
            s_rain += e_in
            s_res += e_gt
        else:
            s_bg += e_gt
    acc[0, tid] = cnt
    acc[1, tid] = s_rain
    acc[2, tid] = s_bg
    acc[3, tid] = s_res
    acc[4, tid] = s_tot
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            for k in range(NSUMS):
                acc[k, tid] += acc[k, tid + s]
        cuda.syncthreads()
        s //= 2
    if tid < NSUMS:
        out[p, tid] = acc[tid, 0]


def _dev(a):
    return cuda.to_device(a) if isinstance(a, np.ndarray) else cuda.as_cuda_array(a)


def sums_cuda(output, rainy, background, mask, threads: int = MAX_THREADS) -> np.ndarray:
    """float64 [N, 5] sums (host numpy) from the numba.cuda kernel; arrays on the device (CuPy / numba) or numpy
    (copied; the CUDA simulator path in tests). A bool mask is passed as uint8 (same bytes)."""
    if threads > MAX_THREADS or threads & (threads - 1):
        raise ValueError(f"threads: expected a power of two <= {MAX_THREADS}, got {threads}")
    n = output.shape[0]
    if isinstance(mask, np.ndarray):
        mask = mask.view(np.uint8)
    else:
        mask = mask.view("u1") if str(mask.dtype) == "bool" else mask
    out = cuda.device_array((n, NSUMS), dtype=np.float64)
    if n:
        _sums_kernel[n, threads](_dev(output), _dev(rainy), _dev(background), _dev(mask), out)
    return out.copy_to_host()
