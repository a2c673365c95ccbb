"""Held-out test rain "sparse": a few thin, long, bright streaks with tapered ends, near one steep direction.

Each streak is an anti-aliased segment (``kernels.segments``) whose intensity ramps
up from zero at one end, holds, and ramps down to zero at the other; streaks add with saturation at 255. No
convolution and no normalization, unlike the authors' generator.

Generator (per patch, all draws from ``(seed, key)`` through ``kernels.rng``):

- ``spec.amount``: streaks per pixel of the canvas; the count is drawn from
  ``[max(1, floor(amount_lo * area)), floor(amount_hi * area)]`` (at least one streak in an active patch).
- ``spec.angle``: one direction ``A`` per patch, whole degrees from vertical (0 = vertical; a positive angle puts
  the lower end to the right); each streak gets ``A + jitter``, jitter a whole degree in ``[-J, J]``, ``J`` in 0..3.
- ``spec.length``: each streak's full length in pixels (uniform integer range).
- ``spec.width`` / ``width_prob``: each streak's width choice in pixels (half-width ``(width + 1) / 2``, smoothstep
  cross profile as in the layered family).
- Peak intensity 190..255 per streak; each end ramps linearly over 37.5..75 % of the half-length (at least 1 px).
- Output ``min(255, sum over streaks)`` as uint8 (the rain layer before ``beta``).

Random counters (``kernels.rng``): stream 1, counters 0..2: count, ``A``, ``J``. Stream 3, counter ``8 j + k`` for
streak ``j`` with ``k`` = 0: centre x, 1: centre y, 2: angle jitter, 3: length, 4: width choice, 5: peak, 6: taper
fraction. Stream 0 is synth's (rain on/off, beta).

Exactness and ``canvas_pad``: as in ``kernels.rain_layered`` (integer fixed point throughout, ``kernels.segments``;
the padded canvas is honoured).
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

JITTER_MIN, JITTER_MAX = 0, 3
PEAK = (190, 255)
TAPER_FRACTION = (96, 192)   # /256 of the half-length, per end


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
    def patch_draws(params, state, area):
        """(n, A, J) of one patch."""
        lo = imax(np.int64(1), np.int64(params[P.AMOUNT_LO] * area))
        hi = imax(lo, np.int64(params[P.AMOUNT_HI] * area))
        n = randint(state, counter(1, 0), lo, hi)
        ang = randint(state, counter(1, 1), np.int64(params[P.ANGLE_LO]), np.int64(params[P.ANGLE_HI]))
        jt = randint(state, counter(1, 2), JITTER_MIN, JITTER_MAX)
        return n, ang, jt

    @jit
    def streak(params, state, j, ang, jt, hc, wc, table):
        """(cx, cy, dx, dy, hl, hw, tp, peak) of streak ``j``, in splat's fixed-point units."""
        b = 8 * j
        cx = randint(state, counter(3, b + 0), 0, wc * POS_ONE - 1)
        cy = randint(state, counter(3, b + 1), 0, hc * POS_ONE - 1)
        a = ang + randint(state, counter(3, b + 2), -jt, jt)
        a = imin(imax(a, -90), 90)
        length = randint(state, counter(3, b + 3), np.int64(params[P.LENGTH_LO]), np.int64(params[P.LENGTH_HI]))
        width = choose_width(params, uniform(state, counter(3, b + 4)))
        peak = randint(state, counter(3, b + 5), PEAK[0], PEAK[1])
        tf = randint(state, counter(3, b + 6), TAPER_FRACTION[0], TAPER_FRACTION[1])
        hl = length * (DIST_ONE // 2)
        hw = (width + 1) * (DIST_ONE // 2)
        tp = imax(DIST_ONE, (hl * tf) >> 8)
        return cx, cy, table[a + 90, 0], table[a + 90, 1], hl, hw, tp, peak

    @jit
    def splat_patch(params, state, acc, hc, wc, table, tid, nt):
        n, ang, jt = patch_draws(params, state, hc * wc)
        for j in range(tid, n, nt):
            cx, cy, dx, dy, hl, hw, tp, peak = streak(params, state, j, ang, jt, hc, wc, table)
            splat(acc, cx, cy, dx, dy, hl, hw, tp, peak)

    return splat_patch


_render_patch_cpu = cpu_render_patch(build(cpu_jit, rng.cpu, splat_cpu))


# A top-level kernel of this family's own, for numba's on-disk cache (see kernels/rain_layered.py).
@njit(parallel=True, cache=True)
def _render_cpu_kernel(params, states, active, out, table):
    for i in prange(out.shape[0]):
        _render_patch_cpu(params, states[i], active[i], out[i], table)


def _patch_reference(params: np.ndarray, st: np.uint64, hc: int, wc: int) -> np.ndarray:
    """int64 [hc, wc] canvas of one active patch: every streak evaluated on the whole canvas."""
    area = hc * wc
    lo = max(1, int(params[P.AMOUNT_LO] * area))
    hi = max(lo, int(params[P.AMOUNT_HI] * area))
    n = draw_int_np(st, 1, 0, lo, hi)
    ang = draw_int_np(st, 1, 1, int(params[P.ANGLE_LO]), int(params[P.ANGLE_HI]))
    jt = draw_int_np(st, 1, 2, JITTER_MIN, JITTER_MAX)
    acc = np.zeros((hc, wc), dtype=np.int64)
    for j in range(n):
        b = 8 * j
        cx = draw_int_np(st, 3, b, 0, wc * POS_ONE - 1)
        cy = draw_int_np(st, 3, b + 1, 0, hc * POS_ONE - 1)
        a = min(max(ang + draw_int_np(st, 3, b + 2, -jt, jt), -90), 90)
        length = draw_int_np(st, 3, b + 3, int(params[P.LENGTH_LO]), int(params[P.LENGTH_HI]))
        width = choose_width_np(params, float(rng.uniform_np(st, rng.counter_np(3, b + 4))))
        peak = draw_int_np(st, 3, b + 5, *PEAK)
        tf = draw_int_np(st, 3, b + 6, *TAPER_FRACTION)
        hl = length * DIST_ONE // 2
        tp = max(DIST_ONE, (hl * tf) >> 8)
        acc += reference_segment(hc, wc, cx, cy, int(SINCOS[a + 90, 0]), int(SINCOS[a + 90, 1]), hl,
                                 (width + 1) * DIST_ONE // 2, tp, peak)
    return acc


#: CUDA kernel: one block per patch, the threads share the patch's streaks (``kernels.segments``).
render_gpu_kernel = gpu_render_kernel(build(cuda_device_jit, rng.gpu, splat_gpu))

#: The sparse family's renderers.
FAMILY = segment_family("sparse", _render_cpu_kernel, render_gpu_kernel, _patch_reference)
