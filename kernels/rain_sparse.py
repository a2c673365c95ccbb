"""Held-out test rain "sparse": a few thin, long, bright streaks with tapered ends, near one steep direction.

Each streak is an anti-aliased segment (the segment primitives of ``kernels.rain_layered``) whose intensity ramps
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

Exactness and ``canvas_pad``: as in ``kernels.rain_layered`` (integer fixed point throughout, host-made sin/cos
table, int32 accumulation with plain adds on CPU and integer atomics on GPU; the padded canvas is honoured).
"""
from __future__ import annotations

import numpy as np
from numba import cuda, njit, prange

from kernels import params as P
from kernels import rng
from kernels.jit import cpu_jit, cuda_device_jit
from kernels.rain_layered import (DIST_ONE, POS_ONE, SINCOS, add_cpu, add_gpu, build_int_ops, build_segments,
                                  build_width_choice, check_render_args, choose_width_np, draw_int_np, imin_gpu,
                                  launch_gpu, reference_segment)

JITTER_MIN, JITTER_MAX = 0, 3
PEAK = (190, 255)
TAPER_FRACTION = (96, 192)   # /256 of the half-length, per end


def build(jit, r):
    """The family's draws, compiled with ``jit`` over the rng helpers ``r`` (``rng.cpu`` or ``rng.gpu``)."""
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

    return patch_draws, streak


# ---- CPU ----------------------------------------------------------------------------------------------------------

_row_span_cpu, _splat_cpu, _saturate_crop_cpu = build_segments(cpu_jit, add_cpu)
_patch_draws_cpu, _streak_cpu = build(cpu_jit, rng.cpu)


@njit(parallel=True, cache=True)
def _render_cpu_kernel(params, states, active, out, table):
    n_patches, h, w = out.shape
    pad = np.int64(params[P.CANVAS_PAD])
    hc = h + 2 * pad
    wc = w + 2 * pad
    for i in prange(n_patches):
        if active[i] == 0:
            out[i] = 0
            continue
        acc = np.zeros((hc, wc), dtype=np.int32)
        st = states[i]
        n, ang, jt = _patch_draws_cpu(params, st, hc * wc)
        for j in range(n):
            cx, cy, dx, dy, hl, hw, tp, peak = _streak_cpu(params, st, j, ang, jt, hc, wc, table)
            _splat_cpu(acc, cx, cy, dx, dy, hl, hw, tp, peak)
        _saturate_crop_cpu(acc, pad, out[i])


def render_cpu(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """Render the sparse rain layer of each patch into ``out`` (uint8 [N, H, W], 0..255, before beta).

    ``params``: float64[params.SIZE] from ``RainSpec.to_vector()``; ``states``: uint64[N] patch states;
    ``active``: uint8[N], 0 -> the patch's rain is all zeros. numba, parallel over patches.
    """
    check_render_args(params, states, active, out)
    if out.shape[0]:
        _render_cpu_kernel(params, states, active, out, SINCOS)


# ---- GPU ----------------------------------------------------------------------------------------------------------

_row_span_gpu, _splat_gpu, _saturate_crop_gpu = build_segments(cuda_device_jit, add_gpu)
_patch_draws_gpu, _streak_gpu = build(cuda_device_jit, rng.gpu)


@cuda.jit
def _render_gpu_kernel(params, states, active, out, scratch, table, first):
    """One block per patch: threads share the patch's streaks, splat with atomics, then saturate and crop."""
    b = cuda.blockIdx.x
    i = first + b
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    h = out.shape[1]
    w = out.shape[2]
    pad = np.int64(params[P.CANVAS_PAD])
    hc = h + 2 * pad
    wc = w + 2 * pad
    acc = scratch[b]
    on = active[i] != 0
    if on:
        st = states[i]
        n, ang, jt = _patch_draws_gpu(params, st, hc * wc)
        for j in range(tid, n, nt):
            cx, cy, dx, dy, hl, hw, tp, peak = _streak_gpu(params, st, j, ang, jt, hc, wc, table)
            _splat_gpu(acc, cx, cy, dx, dy, hl, hw, tp, peak)
    cuda.syncthreads()
    for p in range(tid, h * w, nt):
        y = p // w
        x = p - y * w
        if on:
            out[i, y, x] = imin_gpu(acc[y + pad, x + pad], 255)
        else:
            out[i, y, x] = 0


def render_gpu(params, states, active, out) -> None:
    """``render_cpu`` on device arrays (CuPy; numpy under the CUDA simulator), via numba.cuda kernels."""
    check_render_args(params, states, active, out)
    launch_gpu(_render_gpu_kernel, params, states, active, out, SINCOS)


# ---- numpy reference ------------------------------------------------------------------------------------------------

def render_reference(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """Plain numpy version of ``render_cpu`` (slow and obvious; same draws, same integer arithmetic)."""
    check_render_args(params, states, active, out)
    n_patches, h, w = out.shape
    pad = int(params[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    area = hc * wc
    for i in range(n_patches):
        if active[i] == 0:
            out[i] = 0
            continue
        st = np.uint64(states[i])
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
        out[i] = np.minimum(acc[pad:pad + h, pad:pad + w], 255).astype(np.uint8)
