"""Plain numpy reference of the streak renderer: slow and obvious, the same random draws, the same output bytes.

``render_reference`` follows the description in ``kernels.streak`` (package docstring) step by step with whole-array
numpy:
the streak kernel is evaluated on the full ``length x length`` grid (no bands), blurred through ``np.pad(...,
"reflect")`` (numpy's "reflect" is OpenCV's reflect-101), the seed image is built densely and extended with
``np.pad(..., "reflect")``, and the rain is the correlation of that extension with the kernel (no scatter, no
mirror-image bookkeeping). Normalization uses integer floor division. Intensities are 0..255, layout NHW.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import params as P
from kernels import rng
from kernels.renderer import check_render_args
from kernels.streak.tables import AMOUNT_BITS, GAUSS, TAP_BITS, TRIG, TRIG_OFFSET, check_canvas


def streak_draws(params: np.ndarray, state: int) -> tuple[int, int, int, int]:
    """(aq, length, angle, width) of one patch: ``amount = aq / 2**24``; stream 1, counters 0..3."""
    s = np.uint64(state)
    lo = max(1, int(params[P.AMOUNT_LO] * (1 << AMOUNT_BITS) + 0.5))
    hi = max(lo, int(params[P.AMOUNT_HI] * (1 << AMOUNT_BITS) + 0.5))
    aq = int(rng.randint_np(s, rng.counter_np(1, 0), lo, hi))
    length = int(rng.randint_np(s, rng.counter_np(1, 1), int(params[P.LENGTH_LO]), int(params[P.LENGTH_HI])))
    angle = int(rng.randint_np(s, rng.counter_np(1, 2), int(params[P.ANGLE_LO]), int(params[P.ANGLE_HI])))
    u = float(rng.uniform_np(s, rng.counter_np(1, 3)))
    n = int(params[P.N_WIDTHS])
    cdf = params[P.WIDTH_CDF:P.WIDTH_CDF + n]
    k = 0
    while k < n - 1 and u >= cdf[k]:
        k += 1
    return aq, length, angle, int(params[P.WIDTHS + k])


def line_kernel(length: int, angle: int) -> np.ndarray:
    """int64 [L, L]: the diagonal rotated by ``angle - 45`` degrees (bilinear, weights in 1/1024), whole grid."""
    L = length
    cq, sq = (int(v) for v in TRIG[angle - 45 + TRIG_OFFSET])
    y, x = np.mgrid[0:L, 0:L].astype(np.int64)
    sx = (L * 65536 + cq * (2 * x - L) - sq * (2 * y - L) + 2048) >> 12   # source x in 1/32 px
    sy = (L * 65536 + sq * (2 * x - L) + cq * (2 * y - L) + 2048) >> 12
    ix, iy, fx, fy = sx >> 5, sy >> 5, sx & 31, sy & 31

    def diag(i, j):  # the source image: ones on its diagonal, zero outside (BORDER_CONSTANT)
        return ((i == j) & (i >= 0) & (i < L)).astype(np.int64)

    return ((32 - fx) * (32 - fy) * diag(ix, iy) + fx * (32 - fy) * diag(ix + 1, iy)
            + (32 - fx) * fy * diag(ix, iy + 1) + fx * fy * diag(ix + 1, iy + 1))


def streak_kernel(length: int, angle: int, width: int) -> tuple[np.ndarray, int]:
    """(folded kernel int64 [L+2, L+2] as a correlation kernel with anchor ``L // 2 + 1``, scale shift).

    The returned kernel is already shifted right by the scale shift (taps <= 2**TAP_BITS).
    """
    L, r = length, width // 2
    g = GAUSS[width // 2, :width]
    k0 = line_kernel(length, angle)
    p = np.pad(k0, ((0, 0), (r, r)), mode="reflect")
    k1 = sum(g[k] * p[:, k:k + L] for k in range(width))
    p = np.pad(k1, ((r, r), (0, 0)), mode="reflect")
    k2 = sum(g[k] * p[k:k + L, :] for k in range(width))
    z = np.pad(k2, 2)                    # zero padding: the seed filter's full convolution with the kernel
    k3 = (80 * z[1:L + 3, 1:L + 3] + z[0:L + 2, 1:L + 3] + z[2:L + 4, 1:L + 3]
          + z[1:L + 3, 0:L + 2] + z[1:L + 3, 2:L + 4])
    peak = int(k3.max())
    shift = 0
    while (peak >> shift) > (1 << TAP_BITS):
        shift += 1
    return k3 >> shift, shift


def seed_image(state: int, aq: int, hc: int, wc: int) -> np.ndarray:
    """int64 [hc, wc]: seed strengths (1/16 units, 0 = no seed), geometric skipping per row on stream 2."""
    s = np.uint64(state)
    log1m = math.log(1.0 - aq / float(1 << AMOUNT_BITS))
    seeds = np.zeros((hc, wc), dtype=np.int64)
    for y in range(hc):
        x, j = -1, 0
        while True:
            b = int(rng.bits_np(s, rng.counter_np(2, (y << 12) | j)))
            j += 1
            u = 1.0 - (b >> 11) * (1.0 / 9007199254740992.0)
            gap = math.log(u) / log1m
            if gap >= wc:
                break
            x += 1 + int(gap)
            if x >= wc:
                break
            seeds[y, x] = 4095 - ((aq * (b & 2047)) >> 23)
    return seeds


def rain_patch(params: np.ndarray, state: int, h: int, w: int) -> np.ndarray:
    """uint8 [h, w] rain layer of one active patch."""
    pad = int(params[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    aq, length, angle, width = streak_draws(params, state)
    k3, _ = streak_kernel(length, angle, width)
    a = length // 2 + 1
    n = length + 2
    ext = np.pad(seed_image(state, aq, hc, wc), ((a, n - 1 - a), (a, n - 1 - a)), mode="reflect")
    acc = np.zeros((hc, wc), dtype=np.int64)
    for my, mx in zip(*np.nonzero(k3)):      # correlation: acc(p) = sum_m k3[m] * ext(p + m - anchor)
        acc += k3[my, mx] * ext[my:my + hc, mx:mx + wc]
    mn, mx_ = int(acc.min()), int(acc.max())
    if mx_ == mn:
        return np.zeros((h, w), dtype=np.uint8)
    norm = (acc - mn) * 255 // (mx_ - mn)
    return norm[pad:pad + h, pad:pad + w].astype(np.uint8)


def render_reference(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """Streak rain of each patch into ``out`` (uint8 NHW [N, H, W], 0..255); zeros where ``active == 0``."""
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    if n:
        check_canvas(params, h, w)
    for i in range(n):
        out[i] = rain_patch(params, int(states[i]), h, w) if active[i] else 0
