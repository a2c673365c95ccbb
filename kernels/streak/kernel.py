"""The streak kernel in integers, built in passes over its rows: one source for the CPU and GPU renderers.

A patch's streak kernel is the ``length x length`` diagonal rotated by ``angle - 45`` degrees (bilinear, weights in
1/1024 from the 1/32 px source coordinates of ``TRIG``), blurred along rows and then columns with OpenCV's Gaussian
weights (``GAUSS``, 2**-12, reflect-101 inside the kernel), with the 3 x 3 seed filter folded in (x 10: centre 80,
arms 1) and scaled down by a power of two so that its peak is at most ``2**TAP_BITS``. The result is stored as rows
of taps with scatter offsets (``plan``).

Within a pass every row is independent: the GPU kernel spreads the rows of each pass over its threads (barriers
between passes), the CPU runs them in order (``build_kernel``). Scratch arrays, for ``KS >= length + 2``:

- ``kb`` int64 [4, KS, KS]: line, row blur, column blur, folded kernel;
- ``ext`` int64 [7, KS]: per-row extents and peaks (meaning per pass in the docstrings);
- ``rows`` int64 [4, KS]: per tap row ``(dy, dx0, count, offset into vals)``, dy / dx the scatter offsets
  ``anchor - index`` with ``anchor = length // 2 + 1``;
- ``vals`` int64 [KS * KS]: the taps, row after row, stored right to left so that ``dx = dx0 + j`` grows with j.
"""
from __future__ import annotations

from typing import NamedTuple

from kernels.jit import build_int_ops, cpu_jit, cuda_device_jit
from kernels.streak.tables import TAP_BITS


class KernelPasses(NamedTuple):
    """The compiled passes (numba dispatchers / CUDA device functions), in the order they run."""

    clear_row: object
    line_row: object
    blurx_row: object
    blury_row: object
    fold_row: object
    shift: object
    extent_row: object
    plan: object
    fill_row: object
    build_kernel: object
    refl: object
    line_value: object


def build_line(jit):
    """``(line_value, clear_row, line_row)``: pass 0 (clearing) and pass 1 (the rotated line)."""
    imin, imax = build_int_ops(jit)

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

    @jit
    def clear_row(kb, y, L):
        """Pass 0: zero row y of all four kernel planes."""
        for x in range(L + 2):
            kb[0, y, x] = 0
            kb[1, y, x] = 0
            kb[2, y, x] = 0
            kb[3, y, x] = 0

    @jit
    def line_row(kb, ext, y, L, angle, trig):
        """Pass 1: row y of the rotated line -> kb[0]; its nonzero extent -> ext[0], ext[1]. Only a band of x can
        lie within 2 px of the diagonal: |sx - sy| < 2 px with sx - sy = ((cos - sin)(2x - L) - (cos + sin)
        (2y - L)) / 2; the band is a superset (exact integers)."""
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

    return line_value, clear_row, line_row


def build_blur(jit):
    """``(refl, blurx_row, blury_row, fold_row)``: passes 2 and 3 (Gaussian blur) and 4 (seed filter)."""
    imin, imax = build_int_ops(jit)

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
    def blurx_row(kb, ext, y, L, width, gauss):
        """Pass 2: Gaussian along row y -> kb[1], outputs within radius of the row's extent -> ext[2], ext[3]."""
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
    def blury_row(kb, ext, y, L, width, gauss):
        """Pass 3: Gaussian along columns for output row y -> kb[2], extent -> ext[4], ext[5] (reads rows
        y - rad .. y + rad; reflections stay within)."""
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
    def fold_row(kb, ext, y3, L):
        """Pass 4: fold the seed filter (x10: centre 80, arms 1) into row y3 of the (L+2)^2 kernel -> kb[3];
        extent -> ext[0], ext[1], peak -> ext[6]."""
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

    return refl, blurx_row, blury_row, fold_row


def build_taps(jit):
    """``(shift, extent_row, plan, fill_row)``: passes 5..8, from the folded kernel to scaled tap rows."""
    imin, imax = build_int_ops(jit)

    @jit
    def shift(ext, L):
        """Pass 5 (one thread): right shift that brings the folded kernel's peak to at most 2**TAP_BITS."""
        peak = 0
        for y3 in range(L + 2):
            if ext[6, y3] > peak:
                peak = ext[6, y3]
        s = 0
        while (peak >> s) > (1 << TAP_BITS):
            s += 1
        return s

    @jit
    def extent_row(kb, ext, y3, s):
        """Pass 6: tight extent of the nonzero scaled taps of row y3 -> ext[2], ext[3]."""
        lo = 1 << 30
        hi = -1
        for x3 in range(ext[0, y3], ext[1, y3] + 1):
            if (kb[3, y3, x3] >> s) != 0:
                if x3 < lo:
                    lo = x3
                hi = x3
        ext[2, y3] = lo
        ext[3, y3] = hi

    @jit
    def plan(ext, rows, L):
        """Pass 7 (one thread): tap rows and their places in ``vals``; ext[4, y3] = tap row index of kernel row
        y3 (-1: empty). Returns (n_rows, dy_min, dy_max, dx_min, dx_max)."""
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
    def fill_row(kb, ext, rows, vals, y3, s):
        """Pass 8: scaled taps of row y3 into ``vals``, stored right to left so that dx = dx0 + j grows with j."""
        r_ = ext[4, y3]
        if r_ < 0:
            return
        hi = ext[3, y3]
        off = rows[3, r_]
        for j in range(rows[2, r_]):
            vals[off + j] = kb[3, y3, hi - j] >> s

    return shift, extent_row, plan, fill_row


def build(jit) -> KernelPasses:
    """Compile every pass with decorator ``jit``, and ``build_kernel``, which runs them all in order (the CPU path):
    ``build_kernel(length, angle, width, trig, gauss, kb, ext, rows, vals) -> (n_rows, dy_min, dy_max, dx_min,
    dx_max)``, the scatter offsets' ranges over the kernel's taps."""
    line_value, clear_row, line_row = build_line(jit)
    refl, blurx_row, blury_row, fold_row = build_blur(jit)
    shift, extent_row, plan, fill_row = build_taps(jit)

    @jit
    def build_kernel(length, angle, width, trig, gauss, kb, ext, rows, vals):
        L = length
        for y in range(L + 2):
            clear_row(kb, y, L)
        for y in range(L):
            line_row(kb, ext, y, L, angle, trig)
        for y in range(L):
            blurx_row(kb, ext, y, L, width, gauss)
        for y in range(L):
            blury_row(kb, ext, y, L, width, gauss)
        for y3 in range(L + 2):
            fold_row(kb, ext, y3, L)
        s = shift(ext, L)
        for y3 in range(L + 2):
            extent_row(kb, ext, y3, s)
        result = plan(ext, rows, L)
        for y3 in range(L + 2):
            fill_row(kb, ext, rows, vals, y3, s)
        return result

    return KernelPasses(clear_row, line_row, blurx_row, blury_row, fold_row, shift, extent_row, plan, fill_row,
                        build_kernel, refl, line_value)


#: Passes compiled for numba CPU kernels.
cpu = build(cpu_jit)
#: Passes compiled as CUDA device functions.
gpu = build(cuda_device_jit)
