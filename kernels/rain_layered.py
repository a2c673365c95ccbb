"""Held-out test rain "layered": multi-layer streak compositing after Garg and Nayar, rendered directly as segments.

Garg and Nayar model rain as streaks at several depths whose length, width and brightness change with the distance
to the camera (K. Garg, S. K. Nayar, "Vision and Rain", IJCV 75(1):3-27, 2007, doi:10.1007/s11263-006-0028-6).

Unlike the authors' generator (seed noise convolved with one line kernel, then min-max normalized), each streak is
drawn on its own as an anti-aliased segment with a soft cross profile, and the streaks of all layers add up with
saturation at 255. There is no convolution and no normalization, so a patch's brightest value is whatever its
streaks reach.

Generator (per patch, all draws from ``(seed, key)`` through ``kernels.rng``):

- ``L`` in {2, 3, 4} depth layers; layer 0 is nearest, layer ``L - 1`` farthest; ``d = l / (L - 1)``.
- One global direction ``A`` per patch: a whole degree in ``spec.angle`` (degrees from vertical, 0 = vertical; a
  positive angle puts the lower end of a streak to the right). Each streak gets ``A + jitter`` with jitter a whole
  degree in ``[-J, J]``, ``J`` in 2..6 drawn per patch.
- ``spec.length`` is the range of the far-layer length ``Lf`` (pixels); the near layer is ``Ln = max(6, 2 Lf / 5)``
  long and layer ``l`` interpolates, ``Ln + (Lf - Ln) d``; each streak is 80..100 % of its layer's length.
- ``spec.width`` / ``width_prob`` are the near-layer width choices ``W`` (pixels); layer ``l`` is
  ``W - (W - 1) d`` wide, so the far layer is 1 pixel wide.
- Brightness: the near layer peaks at ``Pn`` in 200..255, the far layer at ``Pf`` in 60..110, interpolated; each
  streak is 62.5..100 % of its layer's peak.
- ``spec.amount`` is the streak density per layer, streaks per pixel of the canvas: ``n`` streaks drawn from
  ``[floor(amount_lo * area), floor(amount_hi * area)]``; layer ``l`` gets ``n + n d`` streaks (twice as many far
  drops as near ones, as in a receding rain volume).
- A streak is a segment through a uniform random centre (1/16 pixel steps) with half-length ``hl`` and half-width
  ``hw = (width + 1) / 2`` pixels. A pixel at distance ``a`` along and ``p`` across the axis gets
  ``peak * s(1 - p / hw) * min(1, hl - a)``, ``s`` the smoothstep ``3t^2 - 2t^3`` (soft cross profile, one-pixel
  anti-aliased ends).
- Output ``min(255, sum over streaks)`` as uint8 (the rain layer before ``beta``).

Random counters (``kernels.rng``): stream 1, counters 0..7: ``L``, ``A``, ``Lf``, the width choice, ``n``, ``J``,
``Pn``, ``Pf``. Streams 3..6 (3 + layer), counter ``8 j + k`` for streak ``j`` of that layer with ``k`` = 0: centre
x, 1: centre y, 2: angle jitter, 3: brightness factor, 4: length factor. Stream 0 is synth's (rain on/off, beta).

Exactness: everything that reaches a pixel is integer fixed point (``kernels.segments``). The only float
operations are the draw of the width choice (an exact compare of a 53-bit uniform with the CDF) and
``floor(amount * area)`` (one IEEE multiply, no add to fuse into an FMA); both are correctly rounded on CPU and GPU
(tests compile the kernels to PTX and check that multiplication is their only float64 arithmetic). ``canvas_pad``
is honoured: the patch is the centre of a canvas padded by
``pad`` pixels on each side, and the density applies to the canvas area.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import params as P
from kernels import rng
from kernels.jit import build_int_ops, cpu_jit, cuda_device_jit
from kernels.segments import (DIST_ONE, POS_ONE, SINCOS, build_width_choice, choose_width_np, cpu_render_patch,
                              draw_int_np, gpu_render_kernel, reference_segment, segment_family, splat_cpu,
                              splat_gpu)

#: Family constants (whole numbers; see the module docstring).
LAYERS_MIN, LAYERS_MAX = 2, 4
JITTER_MIN, JITTER_MAX = 2, 6
NEAR_PEAK = (200, 255)
FAR_PEAK = (60, 110)
BRIGHT_FACTOR = (160, 256)   # /256
LENGTH_FACTOR = (205, 256)   # /256


def build(jit, r, splat):
    """``splat_patch(params, state, acc, hc, wc, table, tid, nt)``: the family's draws for one patch, compiled with
    ``jit`` over the rng helpers ``r`` (``rng.cpu`` or ``rng.gpu``); the caller's share ``tid`` of ``nt`` of the
    patch's streaks is added to ``acc`` (int32 [Hc, Wc]) with ``splat`` (``kernels.segments``)."""
    counter = r.counter
    randint = r.randint
    uniform = r.uniform
    imin, imax = build_int_ops(jit)
    choose_width = build_width_choice(jit)

    @jit
    def count_range(params, area):
        """Streak-count range ``floor(amount * area)`` for the amount range in ``params``."""
        lo = np.int64(params[P.AMOUNT_LO] * area)
        hi = np.int64(params[P.AMOUNT_HI] * area)
        return lo, imax(lo, hi)

    @jit
    def patch_draws(params, state, area):
        """(L, A, Lf, W, n, J, Pn, Pf) of one patch: see the module docstring."""
        nl = randint(state, counter(1, 0), LAYERS_MIN, LAYERS_MAX)
        ang = randint(state, counter(1, 1), np.int64(params[P.ANGLE_LO]), np.int64(params[P.ANGLE_HI]))
        lf = randint(state, counter(1, 2), np.int64(params[P.LENGTH_LO]), np.int64(params[P.LENGTH_HI]))
        w = choose_width(params, uniform(state, counter(1, 3)))
        clo, chi = count_range(params, area)
        n = randint(state, counter(1, 4), clo, chi)
        jit_ = randint(state, counter(1, 5), JITTER_MIN, JITTER_MAX)
        pn = randint(state, counter(1, 6), NEAR_PEAK[0], NEAR_PEAK[1])
        pf = randint(state, counter(1, 7), FAR_PEAK[0], FAR_PEAK[1])
        return nl, ang, lf, w, n, jit_, pn, pf

    @jit
    def streak(state, layer, j, nl, ang, lf, w, jit_, pn, pf, hc, wc, table):
        """(cx, cy, dx, dy, hl, hw, tp, peak) of streak ``j`` of ``layer``, in splat's fixed-point units."""
        s = 3 + layer
        b = 8 * j
        cx = randint(state, counter(s, b + 0), 0, wc * POS_ONE - 1)
        cy = randint(state, counter(s, b + 1), 0, hc * POS_ONE - 1)
        a = ang + randint(state, counter(s, b + 2), -jit_, jit_)
        a = imin(imax(a, -90), 90)
        bright = randint(state, counter(s, b + 3), BRIGHT_FACTOR[0], BRIGHT_FACTOR[1])
        lfac = randint(state, counter(s, b + 4), LENGTH_FACTOR[0], LENGTH_FACTOR[1])
        dl = nl - 1
        ln = imax(6, lf * 2 // 5)
        length = ln + (lf - ln) * layer // dl
        width = w - (w - 1) * layer // dl
        peak = pn - (pn - pf) * layer // dl
        hl = length * lfac * (DIST_ONE // 512)      # length * lfac / 256 / 2, in 1/65536 px
        hw = (width + 1) * (DIST_ONE // 2)
        return cx, cy, table[a + 90, 0], table[a + 90, 1], hl, hw, DIST_ONE, (peak * bright) >> 8

    @jit
    def splat_patch(params, state, acc, hc, wc, table, tid, nt):
        # streak j of a layer is number base + j of the patch; this share is the numbers = tid (mod nt)
        nl, ang, lf, wd, n, jt, pn, pf = patch_draws(params, state, hc * wc)
        base = 0
        for layer in range(nl):
            cnt = n + n * layer // (nl - 1)
            for j in range((tid - base) % nt, cnt, nt):
                cx, cy, dx, dy, hl, hw, tp, peak = streak(state, layer, j, nl, ang, lf, wd, jt, pn, pf, hc, wc,
                                                          table)
                splat(acc, cx, cy, dx, dy, hl, hw, tp, peak)
            base += cnt

    return splat_patch


_render_patch_cpu = cpu_render_patch(build(cpu_jit, rng.cpu, splat_cpu))


# Each family keeps its own top-level parallel kernel: numba's on-disk cache keys a kernel by its defining module
# and name, and a kernel made by a shared factory would be compiled again in every process.
@njit(parallel=True, cache=True)
def _render_cpu_kernel(params, states, active, out, table):
    for i in prange(out.shape[0]):
        _render_patch_cpu(params, states[i], active[i], out[i], table)


def _patch_reference(params: np.ndarray, st: np.uint64, hc: int, wc: int) -> np.ndarray:
    """int64 [hc, wc] canvas of one active patch: every streak of every layer evaluated on the whole canvas."""
    area = hc * wc
    nl = draw_int_np(st, 1, 0, LAYERS_MIN, LAYERS_MAX)
    ang = draw_int_np(st, 1, 1, int(params[P.ANGLE_LO]), int(params[P.ANGLE_HI]))
    lf = draw_int_np(st, 1, 2, int(params[P.LENGTH_LO]), int(params[P.LENGTH_HI]))
    wd = choose_width_np(params, float(rng.uniform_np(st, rng.counter_np(1, 3))))
    clo = int(params[P.AMOUNT_LO] * area)
    chi = max(clo, int(params[P.AMOUNT_HI] * area))
    cnt = draw_int_np(st, 1, 4, clo, chi)
    jt = draw_int_np(st, 1, 5, JITTER_MIN, JITTER_MAX)
    pn = draw_int_np(st, 1, 6, *NEAR_PEAK)
    pf = draw_int_np(st, 1, 7, *FAR_PEAK)
    acc = np.zeros((hc, wc), dtype=np.int64)
    ln = max(6, lf * 2 // 5)
    for layer in range(nl):
        d_num, d_den = layer, nl - 1
        length = ln + (lf - ln) * d_num // d_den
        width = wd - (wd - 1) * d_num // d_den
        peak_l = pn - (pn - pf) * d_num // d_den
        for j in range(cnt + cnt * d_num // d_den):
            s, b = 3 + layer, 8 * j
            cx = draw_int_np(st, s, b, 0, wc * POS_ONE - 1)
            cy = draw_int_np(st, s, b + 1, 0, hc * POS_ONE - 1)
            a = min(max(ang + draw_int_np(st, s, b + 2, -jt, jt), -90), 90)
            bright = draw_int_np(st, s, b + 3, *BRIGHT_FACTOR)
            lfac = draw_int_np(st, s, b + 4, *LENGTH_FACTOR)
            acc += reference_segment(hc, wc, cx, cy, int(SINCOS[a + 90, 0]), int(SINCOS[a + 90, 1]),
                                     length * lfac * DIST_ONE // 512, (width + 1) * DIST_ONE // 2, DIST_ONE,
                                     (peak_l * bright) >> 8)
    return acc


#: CUDA kernel: one block per patch, the threads share the patch's streaks (``kernels.segments``).
render_gpu_kernel = gpu_render_kernel(build(cuda_device_jit, rng.gpu, splat_gpu))

#: The layered family's renderers.
FAMILY = segment_family("layered", _render_cpu_kernel, render_gpu_kernel, _patch_reference)
