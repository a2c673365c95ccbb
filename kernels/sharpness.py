"""Sharpness: variance of the 4-neighbour Laplacian of BT.601 gray, per patch.

Definition: ``gray = 0.299 R + 0.587 G + 0.114 B`` in float64 on the 0..255 scale (not rounded), Laplacian
kernel ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` with reflect-101 borders (OpenCV's default, numpy's ``"reflect"``), and
the population variance over all H * W Laplacian values: what ``cv2.Laplacian(gray, cv2.CV_64F).var()`` computes.

How the kernels compute it: ``gray`` is scaled by ``GRAY_SCALE = 1000`` to the exact integer
``Y = 299 R + 587 G + 114 B``, so its Laplacian ``L`` is an exact int32 (|L| <= 1.02e6). A kernel accumulates two
exact int64 sums per patch, ``S1 = sum L`` and ``S2 = sum L^2``, and ``finish`` (shared by all backends, on the host)
turns them into the variance with a few roundings at the very end (see its docstring). There is no cancellation and
no dependence on summation order: CPU and GPU results are bit-identical, and agree with OpenCV (which rounds every
gray value and Laplacian term) to about 1e-15 relative on real images. Exactness bounds: ``H * W <= MAX_PIXELS``
and ``W <= MAX_WIDTH`` (checked; larger images raise a ValueError).

Kernels: CPU (numba, parallel over patches) computes ``Y`` of a patch into a scratch plane with a stride-1 loop, then
the Laplacian row by row with a branch-free, vectorized interior. GPU (numba.cuda, one block per patch): the
``columns`` kernel gives each thread a column and walks down the rows with the three gray rows in registers (each
pixel loaded and converted once, uint8 loads coalesced across a warp, horizontal neighbours through shared memory);
the ``strided`` kernel (any width) lets threads stride over pixels. Both end in a shared-memory tree reduction.

Inputs: uint8 NHWC [N, H, W, 3] RGB, 0..255. Outputs: float64 [N].
"""
from __future__ import annotations

import numpy as np
from numba import cuda, njit, prange

#: BT.601 weights times GRAY_SCALE: integers, so the scaled gray and its Laplacian are exact.
WI_R, WI_G, WI_B = 299, 587, 114
GRAY_SCALE = 1000

#: S2 <= n * (1.02e6)**2 must fit int64.
MAX_PIXELS = 8_000_000
#: The CPU kernel sums a row of squares (each < 2**40) in float64, exact while the row sum stays below 2**53.
MAX_WIDTH = 8192

#: Number of raw sums per patch: S1, S2.
NSUMS = 2


# ---- plain numpy reference (slow and obvious) --------------------------------------------------------------------

def sharpness_reference(x: np.ndarray) -> np.ndarray:
    """float64 [N] sharpness of uint8 NHWC RGB patches (0..255), straight from the definition, one patch at a time."""
    out = np.empty(len(x), dtype=np.float64)
    for i, patch in enumerate(np.asarray(x)):
        p = patch.astype(np.float64)
        gray = 0.299 * p[..., 0] + 0.587 * p[..., 1] + 0.114 * p[..., 2]
        g = np.pad(gray, 1, mode="reflect")  # numpy's "reflect" is reflect-101 (edge not repeated)
        lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * gray
        out[i] = np.var(lap)  # numpy's var is two-pass: mean first, then squared deviations
    return out


# ---- shared finishing step (host, numpy) -------------------------------------------------------------------------

def finish(sums: np.ndarray, npix: int) -> np.ndarray:
    """Variance from the int64 [N, 2] raw sums ``(S1, S2)`` of ``npix`` scaled Laplacian values per patch.

    With ``q = round(S1 / n)`` and ``r = S1 - q n`` (|r| <= n / 2), ``n^2 Var = n T - r^2`` where
    ``T = S2 - q S1 - q r`` is an exact int64; so ``Var = T / n - (r / n)^2`` loses at most a few ulps (the second
    term is at most the first), whatever the mean. Divided by ``GRAY_SCALE**2`` for the 0..255 gray scale.
    """
    sums = np.asarray(sums, dtype=np.int64)
    if len(sums) == 0 or npix == 0:
        return np.zeros(len(sums), dtype=np.float64)
    s1, s2 = sums[:, 0], sums[:, 1]
    q = np.rint(s1 / npix).astype(np.int64)
    r = s1 - q * npix
    t = s2 - q * s1 - q * r
    var = t / npix - (r / npix) ** 2
    return np.maximum(var, 0.0) / float(GRAY_SCALE) ** 2


def check_size(h: int, w: int) -> None:
    """Raise a ValueError unless an H x W patch keeps the int64 sums exact."""
    if h * w > MAX_PIXELS or w > MAX_WIDTH:
        raise ValueError(f"x: sharpness supports patches of at most {MAX_PIXELS} pixels (H * W) and width "
                         f"{MAX_WIDTH}, got {h} x {w}")


# ---- CPU kernel (numba, parallel over patches) -------------------------------------------------------------------

def _reflect_py(i, n):
    """reflect-101 index for i in [-1, n] (OpenCV's borderInterpolate; a length-1 axis maps to 0)."""
    if n == 1:
        return 0
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - i - 2
    return i


_reflect = njit(cache=True, inline="always")(_reflect_py)


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def sums_cpu(x: np.ndarray) -> np.ndarray:
    """int64 [N, 2] raw sums ``(S1, S2)`` of the scaled Laplacian of uint8 NHWC patches; parallel over patches.

    ``fastmath={"reassoc"}`` only lets LLVM vectorize the per-row float64 sum of squares: its terms are integers
    below 2**40 and a row's sum stays below 2**53, so every order of summation gives the same exact value.
    """
    n, h, w, _ = x.shape
    out = np.zeros((n, NSUMS), dtype=np.int64)
    for p in prange(n):
        g = np.empty((h, w), dtype=np.int32)
        xf = x[p].reshape(-1)
        gf = g.reshape(-1)
        for k in range(h * w):
            gf[k] = WI_R * np.int32(xf[3 * k]) + WI_G * np.int32(xf[3 * k + 1]) + WI_B * np.int32(xf[3 * k + 2])
        s1 = np.int64(0)
        s2 = np.int64(0)
        for y in range(h):
            gu = g[_reflect(y - 1, h)]
            gd = g[_reflect(y + 1, h)]
            gr = g[y]
            row2 = 0.0
            # the two edge columns reflect; the interior loop is branch-free so that it vectorizes
            L = gu[0] + gd[0] + gr[_reflect(-1, w)] + gr[_reflect(1, w)] - 4 * gr[0]
            s1 += L
            row2 += np.float64(L) * np.float64(L)
            if w > 1:
                k = w - 1
                L = gu[k] + gd[k] + gr[_reflect(k - 1, w)] + gr[_reflect(k + 1, w)] - 4 * gr[k]
                s1 += L
                row2 += np.float64(L) * np.float64(L)
            for xx in range(1, w - 1):
                L = gu[xx] + gd[xx] + gr[xx - 1] + gr[xx + 1] - 4 * gr[xx]
                s1 += L
                row2 += np.float64(L) * np.float64(L)
            s2 += np.int64(row2)
        out[p, 0] = s1
        out[p, 1] = s2
    return out


def sharpness_cpu(x: np.ndarray) -> np.ndarray:
    """float64 [N] sharpness of a uint8 NHWC numpy batch (0..255), numba CPU kernel parallel over patches."""
    check_size(x.shape[1], x.shape[2])
    return finish(sums_cpu(np.ascontiguousarray(x)), x.shape[1] * x.shape[2])


# ---- GPU kernel (numba.cuda): one block per patch, block-wide shared-memory reduction -----------------------------

#: Shared-memory reduction arrays are sized for this many threads; launches use a power of two <= this.
MAX_THREADS = 256


_reflect_d = cuda.jit(device=True, inline=True)(_reflect_py)


@cuda.jit(device=True, inline=True)
def _gray_d(x, p, y, xx):
    return WI_R * np.int32(x[p, y, xx, 0]) + WI_G * np.int32(x[p, y, xx, 1]) + WI_B * np.int32(x[p, y, xx, 2])


@cuda.jit(device=True, inline=True)
def _block_patch(x):
    """(patch, thread, threads per block, H, W) of this block: block b sums patch b of the NHWC batch ``x``."""
    return cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x, x.shape[1], x.shape[2]


@cuda.jit(device=True, inline=True)
def _block_reduce_store(acc1, acc2, tid, nt, out, p):
    """Tree-reduce the block's two shared int64 partial sums (``nt`` a power of two) and store them in ``out[p]``."""
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            acc1[tid] += acc1[tid + s]
            acc2[tid] += acc2[tid + s]
        cuda.syncthreads()
        s //= 2
    if tid == 0:
        out[p, 0] = acc1[0]
        out[p, 1] = acc2[0]


@cuda.jit
def _sums_kernel(x, out):
    """Block b sums patch b; each thread strides over pixels (consecutive threads read consecutive pixels, so a
    warp's uint8 loads of a row are coalesced; the neighbours' reloads hit L1), then a tree reduction of the two
    int64 partial sums in shared memory. Integer sums: the result does not depend on the thread count."""
    p, tid, nt, h, w = _block_patch(x)
    acc1 = cuda.shared.array(MAX_THREADS, dtype=np.int64)
    acc2 = cuda.shared.array(MAX_THREADS, dtype=np.int64)
    a1 = np.int64(0)
    a2 = np.int64(0)
    for idx in range(tid, h * w, nt):
        y = idx // w
        xx = idx - y * w
        lap = (_gray_d(x, p, _reflect_d(y - 1, h), xx) + _gray_d(x, p, _reflect_d(y + 1, h), xx)
               + _gray_d(x, p, y, _reflect_d(xx - 1, w)) + _gray_d(x, p, y, _reflect_d(xx + 1, w))
               - 4 * _gray_d(x, p, y, xx))
        a1 += lap
        a2 += np.int64(lap) * np.int64(lap)
    acc1[tid] = a1
    acc2[tid] = a2
    _block_reduce_store(acc1, acc2, tid, nt, out, p)


@cuda.jit
def _sums_columns_kernel(x, out):
    """Block b sums patch b with one thread per column (``blockDim.x >= W``): each thread walks down its column
    keeping the scaled gray of rows y-1, y, y+1 in registers, so every pixel is loaded once (three coalesced uint8
    loads per warp row) and its gray computed once; the horizontal neighbours come from a shared-memory copy of the
    row. Squares are summed per column in float64 (exact: H * 1.04e12 < 2**53 for H <= MAX_COLUMN), converted to
    int64 for the block reduction."""
    p, tid, nt, h, w = _block_patch(x)
    row = cuda.shared.array(MAX_THREADS, dtype=np.int32)
    acc1 = cuda.shared.array(MAX_THREADS, dtype=np.int64)
    acc2 = cuda.shared.array(MAX_THREADS, dtype=np.int64)
    active = tid < w
    a1 = np.int64(0)
    a2 = 0.0
    g_prev = np.int32(0)
    g_cur = np.int32(0)
    g_next = np.int32(0)
    if active:
        g_cur = _gray_d(x, p, 0, tid)
        g_next = _gray_d(x, p, _reflect_d(1, h), tid)
        g_prev = _gray_d(x, p, _reflect_d(-1, h), tid)
    for y in range(h):
        if active:
            row[tid] = g_cur
        cuda.syncthreads()
        if active:
            lap = g_prev + g_next + row[_reflect_d(tid - 1, w)] + row[_reflect_d(tid + 1, w)] - 4 * g_cur
            a1 += lap
            a2 += np.float64(lap) * np.float64(lap)
        cuda.syncthreads()  # the row buffer is overwritten next
        if active and y + 1 < h:
            g_prev = g_cur
            g_cur = g_next
            g_next = _gray_d(x, p, _reflect_d(y + 2, h), tid)
    acc1[tid] = a1
    acc2[tid] = np.int64(a2)
    _block_reduce_store(acc1, acc2, tid, nt, out, p)


#: Longest column the columns kernel sums exactly in float64.
MAX_COLUMN = 8192


def sums_cuda(x, threads: int = MAX_THREADS, method: str = "auto"):
    """int64 [N, 2] raw sums on the GPU; ``x`` is a uint8 NHWC device array (CuPy / numba) or a numpy array (copied
    to the device; the CUDA simulator path in tests). Returns a numba device array.

    ``method``: ``"columns"`` (one thread per column, for W <= MAX_THREADS and H <= MAX_COLUMN; launched with the
    smallest power of two >= max(W, 32) threads), ``"strided"`` (threads stride over pixels, any size, ``threads``
    per block), ``"auto"`` (columns where it applies)."""
    if threads > MAX_THREADS or threads & (threads - 1):
        raise ValueError(f"threads: expected a power of two <= {MAX_THREADS}, got {threads}")
    n, h, w = x.shape[0], x.shape[1], x.shape[2]
    fits = w <= MAX_THREADS and h <= MAX_COLUMN
    if method not in ("auto", "columns", "strided"):
        raise ValueError(f"method: expected 'auto', 'columns' or 'strided', got {method!r}")
    if method == "columns" and not fits:
        raise ValueError(f"method='columns' needs W <= {MAX_THREADS} and H <= {MAX_COLUMN}, got {h} x {w}")
    d_x = cuda.to_device(x) if isinstance(x, np.ndarray) else cuda.as_cuda_array(x)
    out = cuda.device_array((n, NSUMS), dtype=np.int64)
    if n:
        if method != "strided" and fits:
            nt = 32
            while nt < w:
                nt *= 2
            _sums_columns_kernel[n, nt](d_x, out)
        else:
            _sums_kernel[n, threads](d_x, out)
    return out


def sharpness_cuda(x, threads: int = MAX_THREADS, method: str = "auto") -> np.ndarray:
    """float64 [N] sharpness (host numpy) from the numba.cuda kernels; arguments as in ``sums_cuda``."""
    check_size(x.shape[1], x.shape[2])
    return finish(sums_cuda(x, threads, method).copy_to_host(), x.shape[1] * x.shape[2])
