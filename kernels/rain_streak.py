"""The authors' streak rain (DESIGN 2), rendered fast: seeds by geometric skipping, splatted with a sparse kernel.

The generator this reproduces (``kernels/authors_generator.py`` is the OpenCV version): seed noise (a fraction
``amount`` of the pixels, strength ``U(256 (1 - amount), 256)``), the 3 x 3 seed filter ``[[0,.1,0],[.1,8,.1],
[0,.1,0]]``, a streak kernel (the ``length x length`` diagonal rotated by ``angle - 45`` degrees about
``(length/2, length/2)`` with bilinear ``cv2.warpAffine``, then ``cv2.GaussianBlur`` with odd ``width``, OpenCV's
weights, reflect-101 borders inside the kernel), ``cv2.filter2D`` with reflect-101 borders, and a per-patch min-max
normalization to 0..255 truncated to uint8. ``angle`` is in whole degrees from vertical; a positive angle puts the
lower end of a streak to the right.

How it is computed here (the numpy reference ``kernels/reference_rain.py`` does the same arithmetic the obvious way):

- Per patch (stream 1 of ``kernels.rng``): counter 0: ``amount`` as ``aq / 2**24`` with ``aq`` a uniform integer;
  1: ``length``; 2: ``angle``; 3: width choice (a 53-bit uniform compared with the width CDF).
- Streak kernel in integers: source coordinates of the rotation in 1/32 px (as OpenCV's ``INTER_BITS``) from the
  host-made cos/sin table (``TRIG``, 2**-16), bilinear weights in 1/1024, Gaussian rows/columns with OpenCV's
  weights in 2**-12 (``GAUSS``), reflect-101 inside the kernel, the seed filter folded in (x 10, so ``[1, 80, 1]``),
  then scaled down by a power of two to at most ``2**TAP_BITS`` and stored as rows of taps (scatter offsets).
  Folding is exact: the reflect-101 extension of a seed image filtered by a symmetric 3 x 3 kernel is the same as
  filtering the extended seed image.
- Seeds (stream 2, one sub-stream per canvas row ``y``, draw ``j`` at counter ``2 << 32 | y << 12 | j``): one 64-bit
  hash per seed. Its top 53 bits ``u`` give the gap to the next seed, ``floor(log(1 - u) / log(1 - amount))``
  (geometric: an exact Bernoulli(amount) process per pixel); its low 11 bits ``b`` give the strength
  ``v = 4095 - (aq * b >> 23)`` in 1/16 (``256 (1 - amount u')``, ``u' = b / 2048``).
- Every seed is splatted with all its reflect-101 mirror images that reach the canvas (what ``filter2D``'s border
  does) into an integer accumulator (int64 on the GPU and in the reference, float64 holding exact integers below
  2**47 on the CPU, see the comment above ``_BLOCK``); integer sums do not depend on the order, so atomics on the GPU give
  the CPU's result exactly.
- Min-max normalization over the canvas in integers: ``floor((acc - min) * 255 / (max - min))`` (all equal -> 0),
  then the centre crop when ``canvas_pad > 0``.

CPU (``render_cpu``, numba, parallel over patches; ``render_composite_cpu`` also composites each patch while its
rain layer is in cache, ``render_finish_cpu`` writes its loader batch planes instead, ``kernels.finish``): the
streak kernels come from a per-process bank (``kernels/streak_bank.py``: each
(length, angle, width) is built once, as zero-padded float64 tap rows) or, for specs with too many combinations, are
built per patch into the same layout; seeds are collected per row and expanded into the events of the reflect-101
extension, grouped by alignment phase and sorted by row; for each kernel row and phase the row is staged as
64-byte-aligned blocks of 8 taps, and every event adds them to a column-extended accumulator with one 8-lane vector
multiply-add per block (no clipping; see ``_splat_rows_cpu``); then one min/max pass and one normalization pass,
both explicit 8-lane vector code (``_normalize_cpu``). GPU (``render_gpu``, numba.cuda, one block per patch): the
threads build the kernel pass by pass (rows spread over threads), draw the seeds of one canvas row each and splat
them and their mirror images with int64 atomics into a global scratch accumulator (a 128 x 128 int64 canvas is
128 KB, beyond numba's 48 KB static shared memory), then reduce min/max in shared memory and write the normalized
crop.

Residual float risk (CPU vs GPU vs reference): the gap uses ``log`` (libm on the CPU, libdevice on the GPU, both
within 1 ulp) and one IEEE division; a 1-ulp difference changes ``floor`` only when the quotient lies within ~1e-16
relative of an integer, probability ~1e-15 per seed. Everything else is integer arithmetic or exact float
operations (powers of two, compares).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import cuda, njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels import params as P
from kernels.composite import check_composite_args, composite_patch_cpu
from kernels.finish import background_rows, check_finish_args, finish_patch_cpu
from kernels import rng
from kernels.jit import cpu_jit, cuda_device_jit

# ---- host-made tables -----------------------------------------------------------------------------------------------

#: cos/sin of whole degrees as round(value * 2**TRIG_BITS); row ``d + TRIG_OFFSET`` holds (cos d, sin d).
TRIG_BITS = 16
TRIG_OFFSET = 180
#: Gaussian weights as round(weight * 2**GAUSS_BITS); row ``w // 2`` holds the ``w`` weights of odd width ``w``.
GAUSS_BITS = 12
MAX_WIDTH = 31
#: Amounts are drawn as integers ``aq`` in units of 2**-AMOUNT_BITS.
AMOUNT_BITS = 24
#: Largest tap after scaling (tap precision relative to the kernel's peak).
TAP_BITS = 20
#: Canvas limits: one 12-bit sub-stream index per row (``j < 4096`` draws per row) and >= 2 pixels for reflect-101.
MAX_CANVAS_WIDTH = 4094
MAX_CANVAS_HEIGHT = 1 << 20
#: What ``_render_chunk_cpu`` writes after each patch's rain layer: nothing more, the uint8 rainy image and mask
#: (``render_composite_cpu``), or the batch planes and mask (``render_finish_cpu``).
STAGE_RENDER, STAGE_COMPOSITE, STAGE_FINISH = 0, 1, 2
#: Longest streak: the CPU's float64 accumulator stays exact while 4095 * (length + 2)**2 * 2**TAP_BITS < 2**53.
MAX_LENGTH = 1024

# OpenCV's fixed small Gaussian kernels (``small_gaussian_tab`` in imgproc/src/smooth.dispatch.cpp): used by
# ``getGaussianKernel(ksize, sigma <= 0)`` for ksize 1..9; larger sizes use the sigma rule (checked against cv2 in
# tests/test_rain_streak.py).
_OPENCV_SMALL_GAUSSIAN = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
    9: [0.015625, 0.05078125, 0.1171875, 0.19921875, 0.234375, 0.19921875, 0.1171875, 0.05078125, 0.015625],
}


def opencv_gaussian_weights(width: int) -> np.ndarray:
    """float64 weights of ``cv2.getGaussianKernel(width, 0)`` (sum 1) without importing OpenCV.

    Odd ``width`` <= 9: OpenCV's fixed tables; above: ``sigma = 0.3 * ((width - 1) * 0.5 - 1) + 0.8`` and normalized
    ``exp(-x^2 / (2 sigma^2))``.
    """
    if width < 1 or width % 2 == 0:
        raise ValueError(f"width: expected an odd integer >= 1, got {width}")
    if width in _OPENCV_SMALL_GAUSSIAN:
        return np.asarray(_OPENCV_SMALL_GAUSSIAN[width], dtype=np.float64)
    sigma = 0.3 * ((width - 1) * 0.5 - 1) + 0.8
    x = np.arange(width, dtype=np.float64) - (width - 1) * 0.5
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _make_trig() -> np.ndarray:
    rad = np.deg2rad(np.arange(-TRIG_OFFSET, TRIG_OFFSET + 1, dtype=np.float64))
    scale = float(1 << TRIG_BITS)
    return np.stack([np.round(np.cos(rad) * scale), np.round(np.sin(rad) * scale)], axis=1).astype(np.int64)


def _make_gauss() -> np.ndarray:
    table = np.zeros((MAX_WIDTH // 2 + 1, MAX_WIDTH), dtype=np.int64)
    for w in range(1, MAX_WIDTH + 1, 2):
        table[w // 2, :w] = np.round(opencv_gaussian_weights(w) * (1 << GAUSS_BITS)).astype(np.int64)
    return table


#: int64 [361, 2]: (cos, sin) of degree ``d`` at row ``d + TRIG_OFFSET``, scaled by 2**TRIG_BITS.
TRIG = _make_trig()
#: int64 [16, 31]: Gaussian weights of odd width ``w`` in row ``w // 2``, scaled by 2**GAUSS_BITS.
GAUSS = _make_gauss()


def kernel_size(params: np.ndarray) -> int:
    """Side of the scratch square that holds any streak kernel of ``params`` (length hi + 2 for the seed filter)."""
    return int(params[P.LENGTH_HI]) + 2


# ---- per-patch logic, one source for CPU and GPU ------------------------------------------------------------------

def build(jit, r, add):
    """Define the per-patch helpers with decorator ``jit``, rng helpers ``r`` and accumulator op ``add(acc, i, v)``."""
    bits = r.bits
    counter = r.counter
    randint = r.randint
    uniform = r.uniform

    # Two-argument min/max are written out: numba's CUDA target rejects the builtins (numba issue #10753) while the
    # simulator accepts them, so only tests/test_gpu_compile.py would notice.
    @jit
    def imin(a, b):
        return a if a < b else b

    @jit
    def imax(a, b):
        return a if a > b else b

    @jit
    def refl(i, n):
        """reflect-101 index (OpenCV's BORDER_REFLECT_101, repeated for far indices)."""
        if n == 1:
            return 0
        while i < 0 or i >= n:
            if i < 0:
                i = -i
            else:
                i = 2 * n - 2 - i
        return i

    @jit
    def draw_params(params, state):
        """(aq, length, angle, width) of one patch from stream 1."""
        # x * 2**24 is exact and int() truncates, so lo/hi become the same integers on every backend
        lo = np.int64(params[P.AMOUNT_LO] * 16777216.0 + 0.5)
        hi = np.int64(params[P.AMOUNT_HI] * 16777216.0 + 0.5)
        if lo < 1:
            lo = np.int64(1)
        if hi < lo:
            hi = lo
        aq = randint(state, counter(1, 0), lo, hi)
        length = randint(state, counter(1, 1), np.int64(params[P.LENGTH_LO]), np.int64(params[P.LENGTH_HI]))
        angle = randint(state, counter(1, 2), np.int64(params[P.ANGLE_LO]), np.int64(params[P.ANGLE_HI]))
        u = uniform(state, counter(1, 3))
        n = np.int64(params[P.N_WIDTHS])
        k = 0
        while k < n - 1 and u >= params[P.WIDTH_CDF + k]:
            k += 1
        width = np.int64(params[P.WIDTHS + k])
        return aq, length, angle, width

    @jit
    def line_value(x, y, length, cq, sq):
        """Bilinear sample (1/1024) of the rotated ``length x length`` diagonal at destination pixel (x, y)."""
        # source coordinates in 2**-17 px: c + R^-1 (p - c), c = length / 2, R^-1 = [[cos, -sin], [sin, cos]]
        big_x = length * 65536 + cq * (2 * x - length) - sq * (2 * y - length)
        big_y = length * 65536 + sq * (2 * x - length) + cq * (2 * y - length)
        sx = (big_x + 2048) >> 12          # to 1/32 px, rounding as OpenCV's fixed-point warpAffine
        sy = (big_y + 2048) >> 12
        ix = sx >> 5
        iy = sy >> 5
        fx = sx & 31
        fy = sy & 31
        v = 0
        # the source is 1 on its diagonal (i == j, 0 <= i < length) and 0 elsewhere, 0 outside (BORDER_CONSTANT)
        if ix == iy:
            if 0 <= ix < length:
                v += (32 - fx) * (32 - fy)
            if 0 <= ix + 1 < length:
                v += fx * fy
        elif ix + 1 == iy:
            if 0 <= iy < length:
                v += fx * (32 - fy)
        elif ix == iy + 1:
            if 0 <= ix < length:
                v += (32 - fx) * fy
        return v

    # The streak kernel is built in passes over its rows; within a pass every row is independent, so the GPU
    # kernel spreads the rows of each pass over its threads (barriers between passes) and the CPU runs them in
    # order. Scratch: ``kb`` int64 [4, KS, KS] (line, row blur, column blur, folded), ``ext`` int64 [7, KS] (per-row
    # extents and peaks), ``rows`` int64 [4, KS] (per tap row: dy, dx0, count, offset into ``vals``), ``vals``
    # int64 [KS * KS]; KS >= length + 2.

    @jit
    def kernel_clear_row(kb, y, L):
        for x in range(L + 2):
            kb[0, y, x] = 0
            kb[1, y, x] = 0
            kb[2, y, x] = 0
            kb[3, y, x] = 0

    @jit
    def kernel_line_row(kb, ext, y, L, angle, trig):
        """Pass 1: row y of the rotated line. Only a band of x can lie within 2 px of the diagonal: |sx - sy| < 2 px
        with sx - sy = ((cos - sin)(2x - L) - (cos + sin)(2y - L)) / 2; the band is a superset (exact integers)."""
        phi = angle - 45
        cq = trig[phi + 180, 0]
        sq = trig[phi + 180, 1]
        slope = cq - sq
        if slope == 0:
            xlo = 0
            xhi = L - 1
        else:
            num = (cq + sq) * (2 * y - L)
            xc2 = L + num // slope
            a = slope if slope > 0 else -slope
            hw = (278528 + a - 1) // a + 2        # (2 px + 2 roundings) in 2**-17 px over |slope| per px
            xlo = imax(xc2 // 2 - hw, 0)
            xhi = imin(xc2 // 2 + hw, L - 1)
        lo = L
        hi = -1
        for x in range(xlo, xhi + 1):
            v = line_value(x, y, L, cq, sq)
            if v != 0:
                kb[0, y, x] = v
                if x < lo:
                    lo = x
                hi = x
        ext[0, y] = lo
        ext[1, y] = hi

    @jit
    def kernel_blurx_row(kb, ext, y, L, width, gauss):
        """Pass 2: Gaussian along row y (reflect-101 inside the kernel), outputs within radius of the row's extent."""
        rad = width // 2
        g = gauss[width // 2]
        lo = ext[0, y]
        hi = ext[1, y]
        if hi < lo:
            ext[2, y] = L
            ext[3, y] = -1
            return
        olo = imax(lo - rad, 0)
        ohi = imin(hi + rad, L - 1)
        for x in range(olo, ohi + 1):
            s = 0
            for k in range(width):
                s += g[k] * kb[0, y, refl(x + k - rad, L)]
            kb[1, y, x] = s
        ext[2, y] = olo
        ext[3, y] = ohi

    @jit
    def kernel_blury_row(kb, ext, y, L, width, gauss):
        """Pass 3: Gaussian along columns for output row y (reads rows y - rad .. y + rad; reflections stay within)."""
        rad = width // 2
        g = gauss[width // 2]
        lo = L
        hi = -1
        for j in range(y - rad, y + rad + 1):
            if 0 <= j < L:
                if ext[2, j] < lo:
                    lo = ext[2, j]
                if ext[3, j] > hi:
                    hi = ext[3, j]
        for x in range(lo, hi + 1):
            s = 0
            for k in range(width):
                s += g[k] * kb[1, refl(y + k - rad, L), x]
            kb[2, y, x] = s
        ext[4, y] = lo
        ext[5, y] = hi

    @jit
    def kernel_fold_row(kb, ext, y3, L):
        """Pass 4: fold the seed filter (x10: centre 80, arms 1) into row y3 of the (L+2)^2 kernel; ext[6] = peak."""
        lo = L + 2
        hi = -1
        for j in range(y3 - 2, y3 + 1):
            if 0 <= j < L:
                if ext[4, j] < lo:
                    lo = ext[4, j]
                if ext[5, j] + 2 > hi:
                    hi = ext[5, j] + 2
        peak = 0
        for x3 in range(lo, hi + 1):
            yc = y3 - 1
            xc = x3 - 1
            s = 0
            if 0 <= yc < L:
                if 0 <= xc < L:
                    s += 80 * kb[2, yc, xc]
                if 0 <= xc - 1 < L:
                    s += kb[2, yc, xc - 1]
                if 0 <= xc + 1 < L:
                    s += kb[2, yc, xc + 1]
            if 0 <= xc < L:
                if 0 <= yc - 1 < L:
                    s += kb[2, yc - 1, xc]
                if 0 <= yc + 1 < L:
                    s += kb[2, yc + 1, xc]
            kb[3, y3, x3] = s
            if s > peak:
                peak = s
        ext[0, y3] = lo
        ext[1, y3] = hi
        ext[6, y3] = peak

    @jit
    def kernel_shift(ext, L):
        """Pass 5 (one thread): right shift that brings the folded kernel's peak to at most 2**TAP_BITS."""
        peak = 0
        for y3 in range(L + 2):
            if ext[6, y3] > peak:
                peak = ext[6, y3]
        shift = 0
        while (peak >> shift) > (1 << TAP_BITS):
            shift += 1
        return shift

    @jit
    def kernel_extent_row(kb, ext, y3, shift):
        """Pass 6: tight extent of the nonzero scaled taps of row y3 -> ext[2], ext[3]."""
        lo = 1 << 30
        hi = -1
        for x3 in range(ext[0, y3], ext[1, y3] + 1):
            if (kb[3, y3, x3] >> shift) != 0:
                if x3 < lo:
                    lo = x3
                hi = x3
        ext[2, y3] = lo
        ext[3, y3] = hi

    @jit
    def kernel_plan(ext, rows, L):
        """Pass 7 (one thread): tap rows (scatter offsets = anchor - index, anchor = L // 2 + 1) and their places in
        ``vals``; ext[4, y3] = tap row index of kernel row y3 (-1: empty). Returns (n_rows, dy/dx min and max)."""
        anchor = L // 2 + 1
        n_rows = 0
        n_vals = 0
        dy_min = 1 << 30
        dy_max = -(1 << 30)
        dx_min = 1 << 30
        dx_max = -(1 << 30)
        for y3 in range(L + 2):
            lo = ext[2, y3]
            hi = ext[3, y3]
            if hi < lo:
                ext[4, y3] = -1
                continue
            dy = anchor - y3
            rows[0, n_rows] = dy
            rows[1, n_rows] = anchor - hi
            rows[2, n_rows] = hi - lo + 1
            rows[3, n_rows] = n_vals
            ext[4, y3] = n_rows
            n_vals += hi - lo + 1
            n_rows += 1
            dy_min = imin(dy_min, dy)
            dy_max = imax(dy_max, dy)
            dx_min = imin(dx_min, anchor - hi)
            dx_max = imax(dx_max, anchor - lo)
        return n_rows, dy_min, dy_max, dx_min, dx_max

    @jit
    def kernel_fill_row(kb, ext, rows, vals, y3, shift):
        """Pass 8: scaled taps of row y3, stored right to left so that dx = dx0 + j grows with j."""
        r_ = ext[4, y3]
        if r_ < 0:
            return
        hi = ext[3, y3]
        off = rows[3, r_]
        for j in range(rows[2, r_]):
            vals[off + j] = kb[3, y3, hi - j] >> shift

    @jit
    def build_kernel(length, angle, width, trig, gauss, kb, ext, rows, vals):
        """All passes in order (the CPU path). Returns (n_rows, dy_min, dy_max, dx_min, dx_max)."""
        L = length
        for y in range(L + 2):
            kernel_clear_row(kb, y, L)
        for y in range(L):
            kernel_line_row(kb, ext, y, L, angle, trig)
        for y in range(L):
            kernel_blurx_row(kb, ext, y, L, width, gauss)
        for y in range(L):
            kernel_blury_row(kb, ext, y, L, width, gauss)
        for y3 in range(L + 2):
            kernel_fold_row(kb, ext, y3, L)
        shift = kernel_shift(ext, L)
        for y3 in range(L + 2):
            kernel_extent_row(kb, ext, y3, shift)
        plan = kernel_plan(ext, rows, L)
        for y3 in range(L + 2):
            kernel_fill_row(kb, ext, rows, vals, y3, shift)
        return plan

    @jit
    def splat_event(acc, wc, hc, qy, qx, v, rows, vals, n_rows):
        """Add ``v`` times the kernel at canvas position (qy, qx) (may lie outside the canvas) into flat ``acc``."""
        for r_ in range(n_rows):
            yy = qy + rows[0, r_]
            if yy < 0 or yy >= hc:
                continue
            xs = qx + rows[1, r_]
            n = rows[2, r_]
            off = rows[3, r_]
            j0 = 0
            if xs < 0:
                j0 = -xs
            j1 = n
            if xs + n > wc:
                j1 = wc - xs
            base = yy * wc + xs
            for j in range(j0, j1):
                add(acc, base + j, v * vals[off + j])

    @jit
    def splat_seed(acc, hc, wc, y, x, v, rows, vals, n_rows, dy_min, dy_max, dx_min, dx_max):
        """Splat a seed and each reflect-101 mirror image of it whose kernel reaches the canvas."""
        py = 2 * (hc - 1)
        px = 2 * (wc - 1)
        qy_lo = -dy_max
        qy_hi = hc - 1 - dy_min
        qx_lo = -dx_max
        qx_hi = wc - 1 - dx_min
        for by_i in range(2):
            if by_i == 0:
                by = y
            else:
                if y == 0 or y == hc - 1:
                    continue
                by = -y
            ky0 = -((by - qy_lo) // py)
            ky1 = (qy_hi - by) // py
            for ky in range(ky0, ky1 + 1):
                qy = by + ky * py
                for bx_i in range(2):
                    if bx_i == 0:
                        bx = x
                    else:
                        if x == 0 or x == wc - 1:
                            continue
                        bx = -x
                    kx0 = -((bx - qx_lo) // px)
                    kx1 = (qx_hi - bx) // px
                    for kx in range(kx0, kx1 + 1):
                        splat_event(acc, wc, hc, qy, bx + kx * px, v, rows, vals, n_rows)

    @jit
    def next_seed(state, y, j, x, wc, aq, log1m):
        """Row ``y``'s next seed after column ``x`` from draw ``j``: (x, strength in 1/16, next j); x >= wc: none."""
        b = bits(state, counter(2, (y << 12) | j))
        u = 1.0 - np.float64(b >> np.uint64(11)) * (1.0 / 9007199254740992.0)   # (0, 1]
        gap = math.log(u) / log1m
        if gap >= wc:                        # past the row (also keeps the int conversion in range)
            return wc, 0, j + 1
        x += 1 + np.int64(gap)
        v = 4095 - ((aq * np.int64(b & np.uint64(2047))) >> 23)
        return x, v, j + 1

    @jit
    def seed_row(acc, state, y, hc, wc, aq, log1m, rows, vals, n_rows, dy_min, dy_max, dx_min, dx_max):
        """Draw row ``y``'s seeds by geometric skipping and splat each one."""
        x = -1
        j = 0
        while True:
            x, v, j = next_seed(state, y, j, x, wc, aq, log1m)
            if x >= wc:
                break
            splat_seed(acc, hc, wc, y, x, v, rows, vals, n_rows, dy_min, dy_max, dx_min, dx_max)

    @jit
    def normalize_value(a, mn, d, inv):
        """floor((a - mn) * 255 / d) exactly: a float estimate (``inv`` ~ 1 / d) corrected in integers."""
        num = (a - mn) * 255
        q = np.int64(np.float64(num) * inv)
        while q * d > num:
            q -= 1
        while (q + 1) * d <= num:
            q += 1
        return q

    passes = (kernel_clear_row, kernel_line_row, kernel_blurx_row, kernel_blury_row, kernel_fold_row, kernel_shift,
              kernel_extent_row, kernel_plan, kernel_fill_row)
    return draw_params, build_kernel, seed_row, normalize_value, refl, line_value, next_seed, passes


@cpu_jit
def _add_cpu(acc, i, v):
    acc[i] += v


(_draw_params_cpu, _build_kernel_cpu, _seed_row_cpu, _normalize_value_cpu, _refl_cpu,
 _line_value_cpu, _next_seed_cpu, _passes_cpu) = build(cpu_jit, rng.cpu, _add_cpu)


@cpu_jit
def _x_images(x, wc, qx_lo, qx_hi, out_q, n):
    """Append to ``out_q`` (from index n) every column q in [qx_lo, qx_hi] with refl(q) = x; returns the new n.

    The images are ``x + k p`` and ``-x + k p`` (p = 2 (wc - 1) >= 2, the canvas being >= 2 wide). Stepped by p
    rather than divided: the range [qx_lo, qx_hi] spans less than a period or two in practice, and the four
    runtime-divisor floor divisions of the closed form cost more than the whole rest of a seed's bookkeeping."""
    px = 2 * (wc - 1)
    for bx_i in range(2):
        if bx_i == 0:
            q = x
        else:
            if x == 0 or x == wc - 1:
                continue
            q = -x
        while q - px >= qx_lo:
            q -= px
        while q < qx_lo:
            q += px
        while q <= qx_hi:
            out_q[n] = q
            n += 1
            q += px
    return n


# CPU accumulator: float64 holding exact integers. Every term is v * tap with v <= 4095 (12 bits) and 0 <= tap
# <= 2**TAP_BITS, so each product is an integer < 2**33, exact in float64. A canvas pixel receives at most one term
# per kernel tap (the extension's seeds sit at distinct positions, and pixel p gets tap p - q from the seed at q), so
# every partial sum is an integer <= 4095 * (sum of all taps) <= 4095 * 130**2 * 2**20 < 2**47 < 2**53 (lengths
# <= 128 from RainSpec; _check_canvas caps them at MAX_LENGTH, still < 2**53): all adds are
# exact, the order does not matter, and the result equals the int64 sums of the GPU and the reference. (int32
# cannot hold a single product; float64 gets one-instruction vector multiply-adds where int64 multiplies are
# multi-uop emulations even with AVX-512DQ.)

#: Taps per block of the CPU splat: each kernel row is cut into blocks of this many taps (zero-padded).
_BLOCK = 8


@intrinsic
def _axpy_block(typingctx, acc, b, v, taps, toff):
    """``acc[b : b + _BLOCK] += v * taps[toff : toff + _BLOCK]`` as one vector load, multiply, add and store
    (float64 x _BLOCK: one AVX-512 register, two AVX2 ones). numba turns off LLVM's SLP vectorizer, and its loop
    vectorizer cannot help with 8-element rows (the loop gets fully unrolled into scalars first), so the vector
    code is written out in LLVM IR. Plain IEEE multiply and add, no fusing: on the exact integers of the
    accumulator (see above) the result is the same anyway. The caller guarantees both ranges lie in the arrays."""
    f64 = types.float64
    if not (isinstance(acc, types.Array) and acc.dtype == f64 and isinstance(taps, types.Array) and taps.dtype == f64
            and v == f64 and isinstance(b, types.Integer) and isinstance(toff, types.Integer)):
        return None                  # typing error: float64 arrays and value, integer offsets only
    sig = types.void(acc, b, v, taps, toff)

    def codegen(context, builder, signature, args):
        acc_v, b_v, v_v, taps_v, toff_v = args
        acc_arr = context.make_array(signature.args[0])(context, builder, acc_v)
        taps_arr = context.make_array(signature.args[3])(context, builder, taps_v)
        dbl = ir.DoubleType()
        vec = ir.VectorType(dbl, _BLOCK)
        pa = builder.bitcast(builder.gep(acc_arr.data, [b_v], inbounds=True, source_etype=dbl), vec.as_pointer())
        pt = builder.bitcast(builder.gep(taps_arr.data, [toff_v], inbounds=True, source_etype=dbl),
                             vec.as_pointer())
        a = builder.load(pa, align=8, typ=vec)
        t = builder.load(pt, align=8, typ=vec)
        undef = ir.Constant(vec, ir.Undefined)
        one = builder.insert_element(undef, v_v, ir.Constant(ir.IntType(32), 0))
        vb = builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), _BLOCK), [0] * _BLOCK))
        builder.store(builder.fadd(a, builder.fmul(t, vb)), pa, align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy_block(typingctx, dst, d, src, soff):
    """``dst[d : d + _BLOCK] = src[soff : soff + _BLOCK]``: one (unaligned) vector load and one store, float64. The
    caller guarantees both ranges lie in the arrays."""
    f64 = types.float64
    if not (isinstance(dst, types.Array) and dst.dtype == f64 and isinstance(src, types.Array) and src.dtype == f64
            and isinstance(d, types.Integer) and isinstance(soff, types.Integer)):
        return None
    sig = types.void(dst, d, src, soff)

    def codegen(context, builder, signature, args):
        dst_arr = context.make_array(signature.args[0])(context, builder, args[0])
        src_arr = context.make_array(signature.args[2])(context, builder, args[2])
        dbl = ir.DoubleType()
        x = builder.load(_vec_ptr(builder, src_arr, args[3], dbl, _BLOCK), align=8)
        builder.store(x, _vec_ptr(builder, dst_arr, args[1], dbl, _BLOCK), align=8)
        return context.get_dummy_value()

    return sig, codegen


def _vec_ptr(builder, arr, index, etype, lanes):
    """Pointer to ``lanes`` elements of ``etype`` from ``arr.data[index]`` (no alignment assumed)."""
    return builder.bitcast(builder.gep(arr.data, [index], inbounds=True, source_etype=etype),
                           ir.VectorType(etype, lanes).as_pointer())


@njit(cache=True)
def _pad_rows_cpu(rows, vals, n_rows, rinfo, r0, taps, t0):
    """Store a built kernel (``rows`` int64 [4, KS], ``vals`` int64, from ``_build_kernel_cpu``) as zero-padded
    float64 tap rows: ``rinfo[r0 + r] = (dy, dx0, n, first)`` (int64 [R, 4]) and ``taps[first : first + n]`` the
    row's taps (float64, exact integers <= 2**TAP_BITS), with ``_BLOCK`` zeros before the first row and after
    every row (shared between neighbours). Writes from ``taps[t0]``; returns the index past the last zero.

    ``_splat_rows_cpu`` reads a row at phase ``s`` (0 <= s < _BLOCK) as blocks ``taps[first - s + _BLOCK jb :
    ... + _BLOCK]``: the padding makes those the row shifted right by ``s`` and zero-filled. One copy per row
    instead of 8 pre-shifted ones (the layout before, rebuilt per patch): an eighth of the size, small enough to
    keep per kernel in ``kernels.streak_bank``. Needs ``n_vals + _BLOCK (n_rows + 1)`` floats of ``taps`` and
    ``n_rows`` rows of ``rinfo``."""
    t = t0
    for k in range(_BLOCK):
        taps[t + k] = 0.0
    t += _BLOCK
    for r_ in range(n_rows):
        n = rows[2, r_]
        off = rows[3, r_]
        rinfo[r0 + r_, 0] = rows[0, r_]
        rinfo[r0 + r_, 1] = rows[1, r_]
        rinfo[r0 + r_, 2] = n
        rinfo[r0 + r_, 3] = t
        for j in range(n):
            taps[t + j] = np.float64(vals[off + j])
        t += n
        for k in range(_BLOCK):
            taps[t + k] = 0.0
        t += _BLOCK
    return t


@njit(cache=True)
def _splat_rows_cpu(acc, ev_base, ev_v, ph_start, nq, qy_lo, qy_hi, hc, rinfo, r0, n_rows, taps, we, tbuf):
    """Add every event's kernel into ``acc`` (canvas rows x extended columns) with aligned vector blocks.

    ``acc`` starts on a 64-byte boundary and ``we`` is a multiple of ``_BLOCK``, so an event's alignment phase is
    ``ev_base % _BLOCK``; events are grouped by phase, then sorted by row (group ``pe * nq + k`` = phase ``pe``, row
    ``qy_lo + k``, from ``ph_start``). For a tap row (``rinfo[r0 .. r0 + n_rows)``, see ``_pad_rows_cpu``), the
    events of one phase ``s`` that land on the canvas are one contiguous range and all add the same blocks: the
    row shifted right by ``s``, copied once from the padded taps (``taps[first - s ...]``) into ``tbuf`` (64-byte
    aligned, >= max row length + 2 _BLOCK floats), then one vector multiply-add per block and event
    (``_axpy_block``). Aligned blocks touch one cache line instead of two and never split a load or store across
    lines: reading the padded taps unaligned in the event loop itself measured ~15 % slower here (split loads), the
    staging copy costs a few blocks per row and phase. Columns never need clipping (``acc`` is extended on both
    sides). Tried and slower on the 2-core dev machine: canvas row bands (per-group overhead outweighs the L1
    reuse), skipping blocks beside the canvas with a narrower ``acc`` (per-event trip counts mispredict), unaligned
    4-, 8- and 16-tap blocks."""
    for r_ in range(r0, r0 + n_rows):
        dy = rinfo[r_, 0]
        dx0 = rinfo[r_, 1]
        n = rinfo[r_, 2]
        first = rinfo[r_, 3]
        k0 = max(qy_lo, -dy) - qy_lo
        k1 = min(qy_hi, hc - 1 - dy) - qy_lo
        if k1 < k0:
            continue
        for pe in range(_BLOCK):
            e0 = ph_start[pe * nq + k0]
            e1 = ph_start[pe * nq + k1 + 1]
            if e1 == e0:
                continue
            s = (pe + dx0) & (_BLOCK - 1)          # two's complement: also right for negative dx0
            base = dy * we + dx0 - s               # + ev_base: aligned
            cnt = (s + n + _BLOCK - 1) // _BLOCK
            for jb in range(cnt):
                _copy_block(tbuf, jb * _BLOCK, taps, first - s + jb * _BLOCK)
            for e in range(e0, e1):
                # all blocks of the row for one event: its position and strength are loaded once
                b = ev_base[e] + base
                v = ev_v[e]
                for jb in range(cnt):
                    _axpy_block(acc, b + jb * _BLOCK, v, tbuf, jb * _BLOCK)


# The two passes of the min-max normalization written as explicit 8-lane vector code, like ``_axpy_block``: LLVM's
# loop vectorizer does handle them, but only 4 lanes wide (the host's preferred vector width is 256 bits) and with
# a float -> int32 -> float round trip per pixel; explicit <8 x double> code gets full AVX-512 registers. Plain IEEE
# operations only (no fast-math, no fusing): the results are those of the scalar code on every target.

_MM_LANES = 4     # independent min/max accumulators per pass: the loop is latency bound with one


def _vmin(builder, a, b):
    return builder.select(builder.fcmp_ordered("<", a, b), a, b)


def _vmax(builder, a, b):
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


@intrinsic
def _minmax_blocks(typingctx, acc, start, nb):
    """``(min, max)`` of ``acc[start : start + _BLOCK * nb]`` (float64, nb >= 1), _BLOCK lanes at a time with
    ``_MM_LANES`` accumulator pairs. The values are exact integers (never NaN), so the compare-select min/max is the
    exact one. The caller guarantees the range lies in the array."""
    f64 = types.float64
    if not (isinstance(acc, types.Array) and acc.dtype == f64 and isinstance(start, types.Integer)
            and isinstance(nb, types.Integer)):
        return None
    sig = types.UniTuple(f64, 2)(acc, start, nb)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        start_v = context.cast(builder, args[1], signature.args[1], types.int64)
        nb_v = context.cast(builder, args[2], signature.args[2], types.int64)
        dbl = ir.DoubleType()
        vec = ir.VectorType(dbl, _BLOCK)
        first = builder.load(_vec_ptr(builder, arr, start_v, dbl, _BLOCK), align=8)
        n_groups = builder.sdiv(nb_v, ir.Constant(i64, _MM_LANES))
        entry = builder.block
        g_loop = builder.append_basic_block("mm.groups")
        g_comb = builder.append_basic_block("mm.groups_combine")
        g_done = builder.append_basic_block("mm.groups_done")
        r_loop = builder.append_basic_block("mm.rest")
        done = builder.append_basic_block("mm.done")
        # groups of _MM_LANES blocks, one accumulator pair per block of a group
        builder.cbranch(builder.icmp_signed(">", n_groups, ir.Constant(i64, 0)), g_loop, g_done)
        builder.position_at_end(g_loop)
        g = builder.phi(i64)
        g.add_incoming(ir.Constant(i64, 0), entry)
        mns = []
        mxs = []
        new_mns = []
        new_mxs = []
        for k in range(_MM_LANES):
            mn = builder.phi(vec)
            mx = builder.phi(vec)
            mn.add_incoming(first, entry)
            mx.add_incoming(first, entry)
            mns.append(mn)
            mxs.append(mx)
        for k in range(_MM_LANES):
            off = builder.add(start_v, builder.mul(builder.add(builder.mul(g, ir.Constant(i64, _MM_LANES)),
                                                              ir.Constant(i64, k)), ir.Constant(i64, _BLOCK)))
            x = builder.load(_vec_ptr(builder, arr, off, dbl, _BLOCK), align=8)
            new_mns.append(_vmin(builder, x, mns[k]))
            new_mxs.append(_vmax(builder, x, mxs[k]))
        g1 = builder.add(g, ir.Constant(i64, 1))
        g_end = builder.block
        g.add_incoming(g1, g_end)
        for k in range(_MM_LANES):
            mns[k].add_incoming(new_mns[k], g_end)
            mxs[k].add_incoming(new_mxs[k], g_end)
        builder.cbranch(builder.icmp_signed("<", g1, n_groups), g_loop, g_comb)
        # combine the pairs (only after the group loop ran), then the blocks left over one at a time
        builder.position_at_end(g_comb)
        mn_c = new_mns[0]
        mx_c = new_mxs[0]
        for k in range(1, _MM_LANES):
            mn_c = _vmin(builder, mn_c, new_mns[k])
            mx_c = _vmax(builder, mx_c, new_mxs[k])
        builder.branch(g_done)
        builder.position_at_end(g_done)
        mn_a = builder.phi(vec)
        mx_a = builder.phi(vec)
        mn_a.add_incoming(first, entry)
        mx_a.add_incoming(first, entry)
        mn_a.add_incoming(mn_c, g_comb)
        mx_a.add_incoming(mx_c, g_comb)
        b0 = builder.mul(n_groups, ir.Constant(i64, _MM_LANES))
        gd_end = builder.block
        builder.cbranch(builder.icmp_signed("<", b0, nb_v), r_loop, done)
        builder.position_at_end(r_loop)
        b = builder.phi(i64)
        mn_r = builder.phi(vec)
        mx_r = builder.phi(vec)
        b.add_incoming(b0, gd_end)
        mn_r.add_incoming(mn_a, gd_end)
        mx_r.add_incoming(mx_a, gd_end)
        x = builder.load(_vec_ptr(builder, arr, builder.add(start_v, builder.mul(b, ir.Constant(i64, _BLOCK))),
                                  dbl, _BLOCK), align=8)
        mn_r1 = _vmin(builder, x, mn_r)
        mx_r1 = _vmax(builder, x, mx_r)
        b1 = builder.add(b, ir.Constant(i64, 1))
        b.add_incoming(b1, r_loop)
        mn_r.add_incoming(mn_r1, r_loop)
        mx_r.add_incoming(mx_r1, r_loop)
        builder.cbranch(builder.icmp_signed("<", b1, nb_v), r_loop, done)
        builder.position_at_end(done)
        mn_f = builder.phi(vec)
        mx_f = builder.phi(vec)
        mn_f.add_incoming(mn_a, gd_end)
        mx_f.add_incoming(mx_a, gd_end)
        mn_f.add_incoming(mn_r1, r_loop)
        mx_f.add_incoming(mx_r1, r_loop)
        # horizontal: halve the vector until one lane is left
        i32 = ir.IntType(32)
        half = _BLOCK // 2
        while half >= 1:
            mask = ir.Constant(ir.VectorType(i32, _BLOCK), [(j + half) % _BLOCK for j in range(_BLOCK)])
            mn_f = _vmin(builder, mn_f, builder.shuffle_vector(mn_f, mn_f, mask))
            mx_f = _vmax(builder, mx_f, builder.shuffle_vector(mx_f, mx_f, mask))
            half //= 2
        zero = ir.Constant(i32, 0)
        return context.make_tuple(builder, signature.return_type,
                                  [builder.extract_element(mn_f, zero), builder.extract_element(mx_f, zero)])

    return sig, codegen


@intrinsic
def _normalize_blocks(typingctx, acc, start, out, ostart, nb, fmn, inv, fd):
    """``out[ostart + j] = floor((acc[start + j] - fmn) * 255 / fd)`` for ``j < _BLOCK * nb``, _BLOCK at a time,
    with the arithmetic of ``_normalize_cpu``'s float path (estimate ``floor(num * inv)``, one correction each way;
    ``floor`` equals its int32 truncation there, num >= 0). ``acc`` float64, ``out`` uint8; the caller guarantees
    the ranges lie in the arrays and the float path's preconditions."""
    f64 = types.float64
    if not (isinstance(acc, types.Array) and acc.dtype == f64 and isinstance(out, types.Array)
            and out.dtype == types.uint8 and all(isinstance(t, types.Integer) for t in (start, ostart, nb))
            and fmn == f64 and inv == f64 and fd == f64):
        return None
    sig = types.void(acc, start, out, ostart, nb, fmn, inv, fd)

    def codegen(context, builder, signature, args):
        acc_arr = context.make_array(signature.args[0])(context, builder, args[0])
        out_arr = context.make_array(signature.args[2])(context, builder, args[2])
        i64 = ir.IntType(64)
        start_v = context.cast(builder, args[1], signature.args[1], types.int64)
        ostart_v = context.cast(builder, args[3], signature.args[3], types.int64)
        nb_v = context.cast(builder, args[4], signature.args[4], types.int64)
        dbl = ir.DoubleType()
        vec = ir.VectorType(dbl, _BLOCK)
        i32 = ir.IntType(32)
        undef = ir.Constant(vec, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(i32, _BLOCK), [0] * _BLOCK)

        def bcast(x):
            return builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat_mask)

        v_mn = bcast(args[5])
        v_inv = bcast(args[6])
        v_fd = bcast(args[7])
        v_255 = ir.Constant(vec, [255.0] * _BLOCK)
        v_one = ir.Constant(vec, [1.0] * _BLOCK)
        v_zero = ir.Constant(vec, [0.0] * _BLOCK)
        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec]), f"llvm.floor.v{_BLOCK}f64")
        entry = builder.block
        loop = builder.append_basic_block("nz.loop")
        done = builder.append_basic_block("nz.done")
        builder.cbranch(builder.icmp_signed(">", nb_v, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        b = builder.phi(i64)
        b.add_incoming(ir.Constant(i64, 0), entry)
        off = builder.mul(b, ir.Constant(i64, _BLOCK))
        x = builder.load(_vec_ptr(builder, acc_arr, builder.add(start_v, off), dbl, _BLOCK), align=8)
        num = builder.fmul(builder.fsub(x, v_mn), v_255)
        q = builder.call(floor, [builder.fmul(num, v_inv)])
        r = builder.fsub(num, builder.fmul(q, v_fd))
        q = builder.select(builder.fcmp_ordered("<", r, v_zero), builder.fsub(q, v_one), q)
        q = builder.select(builder.fcmp_ordered(">=", r, v_fd), builder.fadd(q, v_one), q)
        qb = builder.fptoui(q, ir.VectorType(ir.IntType(8), _BLOCK))
        builder.store(qb, _vec_ptr(builder, out_arr, builder.add(ostart_v, off), ir.IntType(8), _BLOCK), align=1)
        b1 = builder.add(b, ir.Constant(i64, 1))
        b.add_incoming(b1, builder.block)
        builder.cbranch(builder.icmp_signed("<", b1, nb_v), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _zero_row(acc, b, we):
    """``acc[b : b + we] = 0``."""
    row = acc[b:b + we]
    for x in range(we):
        row[x] = 0.0


@njit(cache=True)
def _normalize_cpu(acc, hc, wc, we, ex, pad, out_patch):
    """Min-max normalize the canvas part of ``acc`` (rows of ``we`` columns, canvas from column ``ex``; exact
    integers in float64) into the uint8 crop ``out_patch`` (C-contiguous [h, w]): ``floor((a - min) * 255 /
    (max - min))``, all zeros when max == min. Whole 8-pixel blocks of a row go through the vector intrinsics
    (``_minmax_blocks``, ``_normalize_blocks``), the rest through the same arithmetic in scalar code.

    Leaves ``acc[: hc * we]`` all zeros, ready for the next patch: each row is cleared right after its last read,
    while it is in L1 (a separate clearing pass over the ~185 KB accumulator before the splat cost ~4 us per medium
    patch, 8 % of its rendering; this way ~1 us)."""
    h, w = out_patch.shape
    o = out_patch.reshape(h * w)
    fmn = acc[ex]
    fmx = fmn
    nbc = wc // _BLOCK
    for y in range(hc):
        b = y * we + ex
        if nbc > 0:
            lo, hi = _minmax_blocks(acc, b, nbc)
            fmn = lo if lo < fmn else fmn
            fmx = hi if hi > fmx else fmx
        for x in range(nbc * _BLOCK, wc):
            a = acc[b + x]
            fmn = a if a < fmn else fmn
            fmx = a if a > fmx else fmx
        if y < pad or y >= pad + h:
            _zero_row(acc, y * we, we)  # outside the crop: not read again
    # exact: the values are integers < 2**47
    mn = np.int64(fmn)
    mx = np.int64(fmx)
    d = mx - mn
    if d == 0:
        for p in range(h * w):
            o[p] = 0
        for y in range(pad, pad + h):
            _zero_row(acc, y * we, we)
        return
    inv = 1.0 / np.float64(d)
    if d * 255 < (1 << 52):
        # floor((a - mn) * 255 / d) in float64, exactly: num = (a - mn) * 255 is an integer < 2**52; the estimate
        # num * inv is within 1e-13 of the quotient (<= 255), so after truncation one correction each way gives the
        # floor; q * d < 2**53 and the remainder num - q * d are exact integers, so the compares are exact
        fd = np.float64(d)
        nbw = w // _BLOCK
        for y in range(h):
            b = (y + pad) * we + ex + pad
            if nbw > 0:
                _normalize_blocks(acc, b, o, y * w, nbw, fmn, inv, fd)
            for x in range(nbw * _BLOCK, w):
                num = (acc[b + x] - fmn) * 255.0
                q = np.floor(num * inv)
                r = num - q * fd
                q = q - 1.0 if r < 0.0 else q
                q = q + 1.0 if r >= fd else q
                o[y * w + x] = np.uint8(q)
            _zero_row(acc, (y + pad) * we, we)
    else:
        for y in range(h):
            b = (y + pad) * we + ex + pad
            for x in range(w):
                o[y * w + x] = _normalize_value_cpu(np.int64(acc[b + x]), mn, d, inv)
            _zero_row(acc, (y + pad) * we, we)


@cpu_jit
def _patch_kernel_cpu(bank, i, length, angle, width, trig, gauss, kb, ext, rows, vals, rinfo_s, taps_s):
    """Patch ``i``'s streak kernel as padded tap rows: (rinfo, taps, r0, n_rows, dy_min, dy_max, dx_min, dx_max),
    rows ``rinfo[r0 : r0 + n_rows]`` (layout of ``_pad_rows_cpu``). From the bank when it holds the patch's
    combination (``bank`` = (combos, meta, rinfo, taps) of ``kernels.streak_bank``, read only), else built into
    the scratch ``rinfo_s`` / ``taps_s`` (the same layout, so one splat serves both)."""
    combos, meta, b_rinfo, b_taps = bank
    ci = combos[i] if i < combos.shape[0] else -1
    if ci >= 0 and meta[ci, 0] != 0:
        return b_rinfo, b_taps, meta[ci, 6], meta[ci, 1], meta[ci, 2], meta[ci, 3], meta[ci, 4], meta[ci, 5]
    n_rows, dy_min, dy_max, dx_min, dx_max = _build_kernel_cpu(length, angle, width, trig, gauss, kb, ext, rows,
                                                               vals)
    _pad_rows_cpu(rows, vals, n_rows, rinfo_s, 0, taps_s, 0)
    return rinfo_s, taps_s, np.int64(0), n_rows, dy_min, dy_max, dx_min, dx_max


@njit(cache=True)
def _render_one_cpu(params, state, bank, i, pad, trig, gauss, kb, ext, rows, vals, rinfo_s, taps_s, tbuf, acc,
                    seed_x, seed_v, row_start, ev_base, ev_v, ev_k, ph_base, ph_v, ph_start, qbuf, qbuf_y, out_patch):
    """Patch ``i``'s rain layer into ``out_patch`` (uint8 [h, w], C-contiguous). Returns the event buffers (grown
    when a dense spec needed more room)."""
    h, w = out_patch.shape
    hc = h + 2 * pad
    wc = w + 2 * pad
    aq, length, angle, width = _draw_params_cpu(params, state)
    rinfo, taps, r0, n_rows, dy_min, dy_max, dx_min, dx_max = _patch_kernel_cpu(
        bank, i, length, angle, width, trig, gauss, kb, ext, rows, vals, rinfo_s, taps_s)
    if n_rows == 0:
        o = out_patch.reshape(h * w)
        for p in range(h * w):
            o[p] = 0
        return ev_base, ev_v, ev_k, ph_base, ph_v
    # seeds of every canvas row (CSR: row_start, seed_x, seed_v)
    log1m = math.log(1.0 - np.float64(aq) * (1.0 / 16777216.0))
    n_seeds = 0
    for y in range(hc):
        row_start[y] = n_seeds
        x = -1
        j = 0
        while True:
            x, v, j = _next_seed_cpu(state, y, j, x, wc, aq, log1m)
            if x >= wc:
                break
            seed_x[n_seeds] = x
            seed_v[n_seeds] = v
            n_seeds += 1
    row_start[hc] = n_seeds
    # events = the reflect-101 extension's seeds whose kernel reaches the canvas (ev_k: row qy - qy_lo). acc columns:
    # the canvas starts at column ex; blocks reach up to _BLOCK - 1 columns past a tap row on either side (aligned
    # blocks start up to _BLOCK - 1 before it, padded ones end up to _BLOCK - 1 after it), so ex and the row
    # length we (a multiple of _BLOCK, for the alignment) leave room for every block without clipping
    ex = dx_max - dx_min + _BLOCK - 1
    we = (wc + 2 * ex + _BLOCK - 1) // _BLOCK * _BLOCK
    qy_lo = -dy_max
    qy_hi = hc - 1 - dy_min
    qx_lo = -dx_max
    qx_hi = wc - 1 - dx_min
    nq = qy_hi - qy_lo + 1
    # room for every event up front (no allocation inside the loops below): a coordinate has at most
    # 2 (span // period + 2) images in a span, the period being 2 (n - 1)
    bound = n_seeds * (2 * (nq // (2 * (hc - 1)) + 2)) * (2 * ((qx_hi - qx_lo + 1) // (2 * (wc - 1)) + 2))
    if bound > ev_base.size:                             # rare (dense rain on a small canvas): grow
        ev_base = np.empty(bound, dtype=np.int64)
        ev_v = np.empty(bound, dtype=np.float64)
        ev_k = np.empty(bound, dtype=np.int64)
        ph_base = np.empty(bound, dtype=np.int64)
        ph_v = np.empty(bound, dtype=np.float64)
    n_ev = 0
    # seed by seed (rows without seeds cost nothing): each seed's images are its row images (rows qy with
    # refl(qy) = y) times its column images; the order does not matter, the counting sort below orders them
    for y in range(hc):
        if row_start[y] == row_start[y + 1]:
            continue
        ny = _x_images(y, hc, qy_lo, qy_hi, qbuf_y, 0)
        for s in range(row_start[y], row_start[y + 1]):
            nx = _x_images(seed_x[s], wc, qx_lo, qx_hi, qbuf, 0)
            fv = np.float64(seed_v[s])
            for a in range(ny):
                qy = qbuf_y[a]
                rb = qy * we + ex
                for k in range(nx):
                    ev_base[n_ev] = rb + qbuf[k]
                    ev_v[n_ev] = fv
                    ev_k[n_ev] = qy - qy_lo
                    n_ev += 1
    # group the events by (alignment phase, row): counting sort in flat loops over the events (the per-row loops
    # this replaced mispredicted a branch per canvas row); ph_start ends up holding the group starts, so the
    # events of one phase are sorted by row
    ng = _BLOCK * nq
    for g in range(ng + 1):
        ph_start[g] = 0
    for e in range(n_ev):
        ph_start[(ev_base[e] & (_BLOCK - 1)) * nq + ev_k[e]] += 1
    total = 0
    for g in range(ng):
        total += ph_start[g]
        ph_start[g] = total
    ph_start[ng] = total
    for e in range(n_ev - 1, -1, -1):
        g = (ev_base[e] & (_BLOCK - 1)) * nq + ev_k[e]
        d = ph_start[g] - 1
        ph_start[g] = d
        ph_base[d] = ev_base[e]
        ph_v[d] = ev_v[e]
    # acc[: hc * we] is all zeros here: allocated so, and _normalize_cpu clears what it read
    _splat_rows_cpu(acc, ph_base, ph_v, ph_start, nq, qy_lo, qy_hi, hc, rinfo, r0, n_rows, taps, we, tbuf)
    _normalize_cpu(acc, hc, wc, we, ex, pad, out_patch)
    return ev_base, ev_v, ev_k, ph_base, ph_v


@njit(cache=True, nogil=True)
def _render_chunk_cpu(params, states, active, out, trig, gauss, c, n_chunks, stage, backgrounds, bg_rows, beta_q,
                      threshold, rainy, mask, lut, out_bg, out_rainy, out_rain, bank):
    """Render patches c, c + n_chunks, ... with one set of scratch buffers (allocation stays off the per-patch
    path). Right after each patch's rain layer (while it is in L1), ``stage`` 1 (``STAGE_COMPOSITE``) also writes
    its uint8 rainy image and mask, ``stage`` 2 (``STAGE_FINISH``) its batch planes and mask
    (``kernels.finish.finish_patch_cpu``); patch i's background is ``backgrounds[bg_rows[i]]``; the arguments of the
    stage not run may be empty arrays. ``bank``:
    prebuilt streak kernels, read only (``kernels.streak_bank.prepare``)."""
    n, h, w = out.shape
    pad = np.int64(params[P.CANVAS_PAD])
    hc = h + 2 * pad
    wc = w + 2 * pad
    ks = np.int64(params[P.LENGTH_HI]) + 2
    kb = np.empty((4, ks, ks), dtype=np.int64)
    ext = np.empty((7, ks), dtype=np.int64)
    rows = np.empty((4, ks), dtype=np.int64)
    vals = np.empty(ks * ks, dtype=np.int64)
    # padded tap rows of a kernel built per patch (see _pad_rows_cpu): <= ks rows, ks * ks taps
    rinfo_s = np.empty((ks, 4), dtype=np.int64)
    taps_s = np.empty(ks * ks + _BLOCK * (ks + 1), dtype=np.float64)
    # one tap row at one phase, 64-byte aligned (see _splat_rows_cpu)
    tbuf_raw = np.empty(ks + 3 * _BLOCK, dtype=np.float64)
    tbuf = tbuf_raw[((-tbuf_raw.ctypes.data) & 63) // 8:]
    # the accumulator starts on a 64-byte boundary (see _splat_rows_cpu): over-allocate, then skip to it
    we_max = (wc + 2 * (ks + _BLOCK) + _BLOCK - 1) // _BLOCK * _BLOCK
    acc_raw = np.zeros(hc * we_max + _BLOCK, dtype=np.float64)  # kept all zeros between patches (_normalize_cpu)
    shift = ((-acc_raw.ctypes.data) & 63) // 8
    acc = acc_raw[shift:shift + hc * we_max]
    seed_x = np.empty(hc * wc, dtype=np.int64)
    seed_v = np.empty(hc * wc, dtype=np.int64)
    row_start = np.empty(hc + 1, dtype=np.int64)
    ev_base = np.empty(4096, dtype=np.int64)
    ev_v = np.empty(4096, dtype=np.float64)
    ph_base = np.empty(4096, dtype=np.int64)
    ph_v = np.empty(4096, dtype=np.float64)
    ev_k = np.empty(4096, dtype=np.int64)
    ph_start = np.empty(_BLOCK * (hc + 2 * ks + 2) + 1, dtype=np.int64)
    qbuf = np.empty(2 * ((wc + 2 * ks) // max(1, 2 * (wc - 1)) + 2), dtype=np.int64)
    qbuf_y = np.empty(2 * ((hc + 2 * ks) // max(1, 2 * (hc - 1)) + 2), dtype=np.int64)
    hw = h * w
    tt = np.empty(hw if stage == STAGE_COMPOSITE else 0, dtype=np.uint8)
    for i in range(c, n, n_chunks):
        if active[i] == 0:
            o = out[i].reshape(hw)
            for p in range(hw):
                o[p] = 0
        else:
            ev_base, ev_v, ev_k, ph_base, ph_v = _render_one_cpu(
                params, states[i], bank, i, pad, trig, gauss, kb, ext, rows, vals, rinfo_s, taps_s, tbuf, acc,
                seed_x, seed_v, row_start, ev_base, ev_v, ev_k, ph_base, ph_v, ph_start, qbuf, qbuf_y, out[i])
        if stage == STAGE_COMPOSITE:
            composite_patch_cpu(backgrounds[bg_rows[i]].reshape(hw * 3), out[i].reshape(hw), np.int32(beta_q[i]),
                                threshold, rainy[i].reshape(hw * 3), mask[i].reshape(hw), tt)
        elif stage == STAGE_FINISH:
            finish_patch_cpu(backgrounds[bg_rows[i]].reshape(hw * 3), out[i].reshape(hw), np.int32(beta_q[i]), threshold,
                             lut, out_bg[i].reshape((3, hw)), out_rainy[i].reshape((3, hw)),
                             out_rain[i].reshape(hw) if out_rain.shape[0] else out_rain.reshape(0), mask[i].reshape(hw))


# nogil: other Python threads (DALI's, a caller's) run while a batch is rendered
@njit(parallel=True, cache=True, nogil=True)
def _render_cpu_kernel(params, states, active, out, trig, gauss, n_chunks, stage, backgrounds, bg_rows, beta_q,
                       threshold, rainy, mask, lut, out_bg, out_rainy, out_rain, bank):
    for c in prange(n_chunks):
        _render_chunk_cpu(params, states, active, out, trig, gauss, c, n_chunks, stage, backgrounds, bg_rows, beta_q,
                          threshold, rainy, mask, lut, out_bg, out_rainy, out_rain, bank)


def check_render_args(params, states, active, out) -> None:
    """Shapes, dtypes and limits shared by the three renderers (numpy or CuPy arrays)."""
    if tuple(params.shape) != (P.SIZE,) or params.dtype != np.float64:
        raise ValueError(f"params: expected float64[{P.SIZE}] (RainSpec.to_vector()), "
                         f"got {params.dtype}{tuple(params.shape)}")
    if out.ndim != 3 or out.dtype != np.uint8:
        raise ValueError(f"out: expected uint8 [N, H, W] (rain layer, 0..255), got {out.dtype}{tuple(out.shape)}")
    n = out.shape[0]
    if tuple(states.shape) != (n,) or states.dtype != np.uint64:
        raise ValueError(f"states: expected uint64[{n}] (one per patch of out), got {states.dtype}{tuple(states.shape)}")
    if tuple(active.shape) != (n,) or active.dtype != np.uint8:
        raise ValueError(f"active: expected uint8[{n}] (one per patch of out), got {active.dtype}{tuple(active.shape)}")


def _host_params(params) -> np.ndarray:
    return params.get() if hasattr(params, "get") and not isinstance(params, np.ndarray) else np.asarray(params)


def _check_canvas(params_host: np.ndarray, h: int, w: int) -> None:
    pad = int(params_host[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    if hc < 2 or wc < 2:
        raise ValueError(f"out: the streak renderer needs a canvas of at least 2 x 2 pixels (reflect-101 borders), "
                         f"got {hc} x {wc}")
    if wc > MAX_CANVAS_WIDTH or hc > MAX_CANVAS_HEIGHT:
        raise ValueError(f"out: canvas {hc} x {wc} too large for the streak renderer (width <= {MAX_CANVAS_WIDTH}, "
                         f"height <= {MAX_CANVAS_HEIGHT}, canvas = patch + 2 * canvas_pad)")
    if int(params_host[P.FAMILY]) != P.FAMILY_IDS["streak"]:
        raise ValueError("params: not a streak spec (family id != 0)")
    if int(params_host[P.LENGTH_HI]) > MAX_LENGTH:
        raise ValueError(f"params: streak length up to {int(params_host[P.LENGTH_HI])}, expected at most {MAX_LENGTH} "
                         f"(the CPU accumulator's exactness bound)")


def render_cpu(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """Render each patch's streak rain layer into ``out`` (uint8 [N, H, W], 0..255, before beta).

    ``params``: float64[params.SIZE] from ``RainSpec.to_vector()``; ``states``: uint64[N] patch states
    (``rng.patch_state(seed, key)``); ``active``: uint8[N], 0 -> all zeros. numba, parallel over patches.
    """
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    if n == 0:
        return
    _check_canvas(params, h, w)
    if not out.flags.c_contiguous:
        tmp = np.empty(out.shape, dtype=np.uint8)
        _launch_cpu(params, states, active, tmp, STAGE_RENDER)
        out[...] = tmp
        return
    _launch_cpu(params, states, active, out, STAGE_RENDER)


def _fused_batch_ready(params, states, active, rain) -> bool:
    """Checks shared by the fused renderers (raising ValueError); False for an empty batch (nothing to do)."""
    check_render_args(params, states, active, rain)
    if not rain.flags.c_contiguous:
        raise ValueError("rain: expected a C-contiguous output array")
    n, h, w = rain.shape
    if n:
        _check_canvas(params, h, w)
    return n > 0


def render_composite_cpu(params: np.ndarray, states: np.ndarray, active: np.ndarray, backgrounds: np.ndarray,
                         beta_q: np.ndarray, threshold: int, rain: np.ndarray, rainy: np.ndarray,
                         mask: np.ndarray) -> None:
    """``render_cpu`` into ``rain`` and ``kernels.composite.composite_cpu`` into ``rainy`` and ``mask`` in one pass
    over the batch: each patch is composited right after its rain layer is made, while that is still in L1.

    ``backgrounds`` uint8 NHWC [N, H, W, 3] (0..255), ``beta_q`` int64 [N] (beta in 1/1024), ``threshold`` on the
    0..255 scale; ``rain`` uint8 NHW, ``rainy`` uint8 NHWC and ``mask`` bool NHW are written (C-contiguous).
    Same bytes as the two calls.
    """
    check_composite_args(backgrounds, rain, beta_q, rainy, mask)
    if not (rainy.flags.c_contiguous and mask.flags.c_contiguous):
        raise ValueError("rainy, mask: expected C-contiguous output arrays")
    if not _fused_batch_ready(params, states, active, rain):
        return
    _launch_cpu(params, states, active, rain, STAGE_COMPOSITE, backgrounds=np.ascontiguousarray(backgrounds),
                beta_q=beta_q, threshold=threshold, rainy=rainy, mask=mask)


def render_finish_cpu(params: np.ndarray, states: np.ndarray, active: np.ndarray, backgrounds: np.ndarray,
                      beta_q: np.ndarray, threshold: int, lut: np.ndarray, rain: np.ndarray, out_bg: np.ndarray,
                      out_rainy: np.ndarray, out_rain: np.ndarray, mask: np.ndarray,
                      rows: np.ndarray | None = None) -> None:
    """``render_cpu`` into ``rain`` and ``kernels.finish.finish_cpu`` into the batch planes in one pass over the
    batch: each patch's planes are written right after its rain layer is made, while that is still in L1.

    ``backgrounds`` uint8 NHWC [M, H, W, 3] (0..255; with ``rows`` int64 [N], patch i's background is
    ``backgrounds[rows[i]]``, so a resident subset needs no gathered copy), ``beta_q`` int64 [N] (beta in
    1/1024), ``threshold`` on the 0..255 scale, ``lut`` the output type's table (float32, int16, uint16 or uint8, see
    ``kernels.finish``); written: ``rain`` uint8 NHW, ``out_bg`` / ``out_rainy`` [N, 3, H, W] and ``out_rain``
    [N, 1, H, W] of ``lut``'s dtype (``out_rain`` with ``shape[0] == 0`` is skipped), ``mask`` bool NHW. Same values
    as the two calls.
    """
    rows = background_rows(backgrounds, rows)
    check_finish_args(backgrounds, rain, beta_q, lut, out_bg, out_rainy, out_rain, mask, rows.size)
    if not _fused_batch_ready(params, states, active, rain):
        return
    _launch_cpu(params, states, active, rain, STAGE_FINISH, backgrounds=np.ascontiguousarray(backgrounds),
                bg_rows=rows, beta_q=beta_q, threshold=threshold, mask=mask, lut=lut, out_bg=out_bg,
                out_rainy=out_rainy, out_rain=out_rain)


_NO_BG = np.empty((0, 1, 1, 3), dtype=np.uint8)
_NO_BETA = np.empty(0, dtype=np.int64)
_NO_MASK = np.empty((0, 1, 1), dtype=np.bool_)
_NO_LUT = np.empty(0, dtype=np.float32)
_NO_PLANES = np.empty((0, 1, 1, 1), dtype=np.float32)


def _launch_cpu(params, states, active, out, stage, backgrounds=_NO_BG, bg_rows=None, beta_q=_NO_BETA, threshold=0,
                rainy=_NO_BG, mask=_NO_MASK, lut=_NO_LUT, out_bg=_NO_PLANES, out_rainy=_NO_PLANES,
                out_rain=_NO_PLANES) -> None:
    import numba

    from kernels import streak_bank

    n = out.shape[0]
    threads = numba.get_num_threads()
    # the batch's streak kernels, built here (serially, outside any parallel region) when not yet banked
    bank = streak_bank.prepare(params, states, active)
    if bg_rows is None:
        bg_rows = np.arange(backgrounds.shape[0], dtype=np.int64)
    args = (stage, backgrounds, bg_rows, beta_q, np.int32(threshold), rainy, mask, lut, out_bg, out_rainy, out_rain,
            bank)
    if threads == 1 or n <= 2:
        # no parallel region: waking the thread pool costs more than small batches take
        _render_chunk_cpu(params, states, active, out, TRIG, GAUSS, 0, 1, *args)
    else:
        _render_cpu_kernel(params, states, active, out, TRIG, GAUSS, min(n, threads * 4), *args)


# ---- GPU: one block per patch ---------------------------------------------------------------------------------------

@cuda_device_jit
def _add_gpu(acc, i, v):
    cuda.atomic.add(acc, i, v)   # integer atomics: the sum does not depend on the threads' order


(_draw_params_gpu, _build_kernel_gpu, _seed_row_gpu, _normalize_value_gpu, _refl_gpu,
 _line_value_gpu, _next_seed_gpu, _passes_gpu) = build(cuda_device_jit, rng.gpu, _add_gpu)
(_k_clear_gpu, _k_line_gpu, _k_blurx_gpu, _k_blury_gpu, _k_fold_gpu, _k_shift_gpu, _k_extent_gpu, _k_plan_gpu,
 _k_fill_gpu) = _passes_gpu

_GPU_THREADS = 128
#: Bytes of global scratch per launch (int64 accumulators and kernel buffers); patches go in chunks to fit.
_GPU_SCRATCH_BYTES = 1 << 30   # ~4,700 medium patches per launch: enough blocks to fill an H100


@cuda.jit
def _render_gpu_kernel(params, states, active, out, trig, gauss, kb_all, ext_all, rows_all, vals_all, acc_all,
                       info_all, first):
    """Block ``b`` renders patch ``first + b``: the threads build the streak kernel pass by pass (rows spread over
    threads), share the canvas rows (seeds and splats, integer atomics into a global int64 accumulator), then a
    block min/max and the crop.

    The accumulator lives in global memory: a 128 x 128 int64 canvas is 128 KB, beyond numba's 48 KB static shared
    limit, and int64 is needed for the unreduced fixed-point sums.
    """
    b = cuda.blockIdx.x
    i = first + b
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    h = out.shape[1]
    w = out.shape[2]
    pad = np.int64(params[P.CANVAS_PAD])
    hc = h + 2 * pad
    wc = w + 2 * pad
    acc = acc_all[b]
    info = info_all[b]
    rows = rows_all[b]
    vals = vals_all[b]
    smin = cuda.shared.array(_GPU_THREADS, dtype=np.int64)
    smax = cuda.shared.array(_GPU_THREADS, dtype=np.int64)
    on = active[i] != 0
    st = states[i]
    # every thread draws the patch's parameters (a few hashes) instead of waiting for a broadcast
    aq, length, angle, width = _draw_params_gpu(params, st)
    L = length
    kb = kb_all[b]
    ext = ext_all[b]
    if on:
        for p in range(tid, hc * wc, nt):
            acc[p] = 0
        for y in range(tid, L + 2, nt):
            _k_clear_gpu(kb, y, L)
    cuda.syncthreads()
    if on:
        for y in range(tid, L, nt):
            _k_line_gpu(kb, ext, y, L, angle, trig)
    cuda.syncthreads()
    if on:
        for y in range(tid, L, nt):
            _k_blurx_gpu(kb, ext, y, L, width, gauss)
    cuda.syncthreads()
    if on:
        for y in range(tid, L, nt):
            _k_blury_gpu(kb, ext, y, L, width, gauss)
    cuda.syncthreads()
    if on:
        for y in range(tid, L + 2, nt):
            _k_fold_gpu(kb, ext, y, L)
    cuda.syncthreads()
    if on and tid == 0:
        info[6] = _k_shift_gpu(ext, L)
    cuda.syncthreads()
    if on:
        for y in range(tid, L + 2, nt):
            _k_extent_gpu(kb, ext, y, info[6])
    cuda.syncthreads()
    if on and tid == 0:
        n_rows, dy_min, dy_max, dx_min, dx_max = _k_plan_gpu(ext, rows, L)
        info[0] = aq
        info[1] = n_rows
        info[2] = dy_min
        info[3] = dy_max
        info[4] = dx_min
        info[5] = dx_max
    cuda.syncthreads()
    if on:
        for y in range(tid, L + 2, nt):
            _k_fill_gpu(kb, ext, rows, vals, y, info[6])
    cuda.syncthreads()
    if on:
        aq = info[0]
        log1m = math.log(1.0 - np.float64(aq) * (1.0 / 16777216.0))
        for y in range(tid, hc, nt):
            _seed_row_gpu(acc, st, y, hc, wc, aq, log1m, rows, vals, info[1], info[2], info[3], info[4], info[5])
    cuda.syncthreads()
    if on:
        mn = acc[0]
        mx = acc[0]
        for p in range(tid, hc * wc, nt):
            a = acc[p]
            if a < mn:
                mn = a
            if a > mx:
                mx = a
        smin[tid] = mn
        smax[tid] = mx
    cuda.syncthreads()
    if on:
        mn = smin[0]
        mx = smax[0]
        for t in range(1, nt):
            if smin[t] < mn:
                mn = smin[t]
            if smax[t] > mx:
                mx = smax[t]
        d = mx - mn
        inv = 1.0 / np.float64(d if d != 0 else 1)
        for p in range(tid, h * w, nt):
            y = p // w
            x = p - y * w
            if d == 0:
                out[i, y, x] = 0
            else:
                out[i, y, x] = _normalize_value_gpu(acc[(y + pad) * wc + x + pad], mn, d, inv)
    else:
        for p in range(tid, h * w, nt):
            y = p // w
            x = p - y * w
            out[i, y, x] = 0


def render_gpu(params, states, active, out) -> None:
    """``render_cpu`` on device arrays (CuPy arrays; numpy arrays under the CUDA simulator) via numba.cuda kernels.

    Reads ``params`` on the host (P.SIZE floats) to size the scratch buffers; no host copy of ``out``.
    """
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    if n == 0:
        return
    ph = _host_params(params)
    _check_canvas(ph, h, w)
    pad = int(ph[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    ks = kernel_size(ph)
    if type(out).__module__.split(".")[0] == "cupy":
        import cupy as xp

        stream = cuda.external_stream(xp.cuda.get_current_stream().ptr)
    else:
        xp = np
        stream = 0
    per_patch = 8 * (hc * wc + 4 * ks * ks + 11 * ks + ks * ks + 8)
    chunk = max(1, min(n, _GPU_SCRATCH_BYTES // per_patch))
    # copies: numba copies host arguments back after a launch, which fails on read-only (cached) arrays
    trig = xp.array(TRIG)
    gauss = xp.array(GAUSS)
    params_d = xp.array(params)
    kb = xp.empty((chunk, 4, ks, ks), dtype=np.int64)
    ext = xp.empty((chunk, 7, ks), dtype=np.int64)
    rows = xp.empty((chunk, 4, ks), dtype=np.int64)
    vals = xp.empty((chunk, ks * ks), dtype=np.int64)
    acc = xp.empty((chunk, hc * wc), dtype=np.int64)
    info = xp.empty((chunk, 8), dtype=np.int64)
    for first in range(0, n, chunk):
        m = min(chunk, n - first)
        _render_gpu_kernel[m, _GPU_THREADS, stream](params_d, states, active, out, trig, gauss, kb, ext, rows, vals,
                                                    acc, info, first)


def render_reference(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """The plain numpy reference (``kernels.reference_rain.render_reference``): slow, same draws, same output."""
    from kernels.reference_rain import render_reference as _reference

    _reference(params, states, active, out)
