"""Held-out test rain "layered": Garg-Nayar-style multi-layer streak compositing, rendered directly as segments.

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

Exactness: everything that reaches a pixel is integer fixed point (positions in 1/16 px, directions in 1/4096 from a
host-made sin/cos table per whole degree, distances in 1/65536 px, weights in 1/256 through ``ceil(2**32 / d)``
reciprocals), accumulated in int32 with plain adds (CPU) or integer atomics (GPU, order-independent). The only float
operations are the draw of the width choice (an exact compare of a 53-bit uniform with the CDF) and
``floor(amount * area)`` (one IEEE multiply, no add to fuse into an FMA); both are correctly rounded on CPU and GPU
(tests compile the kernels to PTX and check that multiplication is their only float64 arithmetic). Each row of a
streak visits the x range solved from its inequalities in integers, and every visited pixel tests them again, so
the culling cannot change the result. ``canvas_pad`` is honoured: the patch is the centre of a canvas padded by
``pad`` pixels on each side, and the density applies to the canvas area.

Caching: the CPU kernels use numba's on-disk cache, which is keyed on the kernel's own source file only. After
editing ``kernels/rng.py``, or the segment primitives here (used by ``kernels.rain_sparse``), delete the stale
``kernels/__pycache__/rain_*.nb[ic]`` files.

This module also holds the segment primitives that ``kernels.rain_sparse`` reuses (``build_segments``).
"""
from __future__ import annotations

import numpy as np
from numba import cuda, njit, prange

from kernels import params as P
from kernels import rng
from kernels.jit import cpu_jit, cuda_device_jit

#: Fixed-point scales: positions in 1/16 px, directions in 1/4096, distances (position x direction) in 1/65536 px.
POS_ONE = 16
DIR_ONE = 4096
DIST_ONE = POS_ONE * DIR_ONE

#: sin and cos of each whole degree -90..90 (row ``deg + 90``), scaled by DIR_ONE, made once on the host so CPU and
#: GPU use the same integers.
_deg = np.deg2rad(np.arange(-90, 91, dtype=np.float64))
SINCOS = np.ascontiguousarray(np.stack([np.round(np.sin(_deg) * DIR_ONE), np.round(np.cos(_deg) * DIR_ONE)],
                                       axis=1).astype(np.int64))
del _deg

#: Patches per GPU launch, to bound the int32 accumulation canvas (chunk * canvas pixels * 4 bytes).
_GPU_SCRATCH_BYTES = 256 * 1024 * 1024
_GPU_THREADS = 128

#: Family constants (whole numbers; see the module docstring).
LAYERS_MIN, LAYERS_MAX = 2, 4
JITTER_MIN, JITTER_MAX = 2, 6
NEAR_PEAK = (200, 255)
FAR_PEAK = (60, 110)
BRIGHT_FACTOR = (160, 256)   # /256
LENGTH_FACTOR = (205, 256)   # /256


def build_width_choice(jit):
    """``choose_width(params, u)``: the width whose CDF interval in ``params`` holds the uniform ``u`` in [0, 1)."""

    @jit
    def choose_width(params, u):
        nw = np.int64(params[P.N_WIDTHS])
        k = 0
        while k < nw - 1 and u >= params[P.WIDTH_CDF + k]:
            k += 1
        return np.int64(params[P.WIDTHS + k])

    return choose_width


def build_int_ops(jit):
    """Integer ``imin`` / ``imax`` compiled with ``jit``.

    Why not the builtins: numba >= 0.66 fails to compile two-argument ``min`` / ``max`` for CUDA ("Signature
    mismatch: 2 argument types given, but function takes 1 arguments", numba issue #10753; the CUDA simulator does
    not show it).
    """

    @jit
    def imin(a, b):
        return a if a < b else b

    @jit
    def imax(a, b):
        return a if a > b else b

    return imin, imax


def build_segments(jit, add):
    """Segment primitives compiled with ``jit``; ``add(acc, y, x, v)`` adds int ``v`` to ``acc[y, x]``."""
    imin, imax = build_int_ops(jit)

    @jit
    def row_span(k, b, r, lo, hi):
        """Integer x range (inclusive) where ``|k x + b| < r`` (fixed point), clipped to [lo, hi]; empty: lo > hi.

        Exact in integers: ``k x + b > -r`` <=> ``x >= floor((-r - b) / k) + 1`` and ``k x + b < r`` <=>
        ``x <= -floor((b - r) / k) - 1`` for ``k > 0`` (negate ``k`` and ``b`` when ``k < 0``). It only decides
        which pixels are visited; the weights test the same inequalities again.
        """
        if k == 0:
            if b < r and -b < r:
                return lo, hi
            return hi + 1, hi
        if k < 0:
            k = -k
            b = -b
        a = (-r - b) // k + 1
        z = -((b - r) // k) - 1
        return imax(a, lo), imin(z, hi)

    @jit
    def recip(d):
        """ceil(2**32 / d): weights below are ``(distance * recip) >> 24`` in 1/256, with no per-pixel division."""
        return ((1 << 32) + d - 1) // d

    @jit
    def weight(perp, along, hw, hl, inv_hw, inv_tp, peak):
        """Value (0..255) of a pixel at |distance| ``perp`` across / ``along`` the axis, inside the streak."""
        c = imin(256, ((hw - perp) * inv_hw) >> 24)        # 1 - perp / hw, in 1/256
        s = (c * c * (768 - 2 * c)) >> 16                   # smoothstep, 0..256
        e = imin(256, ((hl - along) * inv_tp) >> 24)        # end ramp min(1, (hl - along) / tp), in 1/256
        return (peak * s * e) >> 16

    @jit
    def splat(acc, cx, cy, dx, dy, hl, hw, tp, peak):
        """Add one streak to ``acc`` (int32 [Hc, Wc]).

        ``cx``, ``cy``: centre in 1/16 px; ``dx``, ``dy``: unit direction in 1/4096; ``hl``, ``hw``: half-length
        and half-width in 1/65536 px; ``tp``: end-ramp length in 1/65536 px (>= 1 px); ``peak``: 0..255.
        """
        hc = acc.shape[0]
        wc = acc.shape[1]
        ext = (hl + hw) // DIST_ONE + 2   # the support lies in a disc of radius hl + hw around the centre
        cyp = cy // POS_ONE
        cxp = cx // POS_ONE
        y0 = imax(cyp - ext, 0)
        y1 = imin(cyp + ext, hc - 1)
        x0 = imax(cxp - ext, 0)
        x1 = imin(cxp + ext, wc - 1)
        inv_hw = recip(hw)
        inv_tp = recip(tp)
        sdx = POS_ONE * dx
        sdy = POS_ONE * dy
        for y in range(y0, y1 + 1):
            ry = y * POS_ONE - cy
            # perp(x) = 16 dy x - (cx dy + ry dx); along(x) = 16 dx x + (ry dy - cx dx): intersect both strips
            pa, pz = row_span(sdy, -(cx * dy + ry * dx), hw, x0, x1)
            aa, az = row_span(sdx, ry * dy - cx * dx, hl, pa, pz)
            rx = aa * POS_ONE - cx
            perp_x = rx * dy - ry * dx      # both are linear in x: step them instead of multiplying per pixel
            along_x = rx * dx + ry * dy
            for x in range(aa, az + 1):
                perp = abs(perp_x)
                along = abs(along_x)
                perp_x += sdy
                along_x += sdx
                if perp < hw and along < hl:
                    v = weight(perp, along, hw, hl, inv_hw, inv_tp, peak)
                    if v > 0:
                        add(acc, y, x, v)

    @jit
    def saturate_crop(acc, pad, out_patch):
        """``out_patch[y, x] = min(255, acc[y + pad, x + pad])``."""
        for y in range(out_patch.shape[0]):
            for x in range(out_patch.shape[1]):
                out_patch[y, x] = imin(acc[y + pad, x + pad], 255)

    return row_span, splat, saturate_crop


def build(jit, r):
    """The family's draws, compiled with ``jit`` over the rng helpers ``r`` (``rng.cpu`` or ``rng.gpu``)."""
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
    def layer_count(n, layer, nl):
        return n + n * layer // (nl - 1)

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

    return patch_draws, layer_count, streak


# ---- CPU ----------------------------------------------------------------------------------------------------------

@cpu_jit
def add_cpu(acc, y, x, v):
    acc[y, x] += v


_row_span_cpu, _splat_cpu, _saturate_crop_cpu = build_segments(cpu_jit, add_cpu)
_patch_draws_cpu, _layer_count_cpu, _streak_cpu = build(cpu_jit, rng.cpu)


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
        nl, ang, lf, wd, n, jt, pn, pf = _patch_draws_cpu(params, st, hc * wc)
        for layer in range(nl):
            for j in range(_layer_count_cpu(n, layer, nl)):
                cx, cy, dx, dy, hl, hw, tp, peak = _streak_cpu(st, layer, j, nl, ang, lf, wd, jt, pn, pf,
                                                               hc, wc, table)
                _splat_cpu(acc, cx, cy, dx, dy, hl, hw, tp, peak)
        _saturate_crop_cpu(acc, pad, out[i])


def check_render_args(params, states, active, out) -> None:
    """Shapes and dtypes shared by all three renderers (works on numpy and CuPy arrays)."""
    if params.shape != (P.SIZE,) or params.dtype != np.float64:
        raise ValueError(f"params: expected float64[{P.SIZE}] (RainSpec.to_vector()), got {params.dtype}{params.shape}")
    if out.ndim != 3 or out.dtype != np.uint8:
        raise ValueError(f"out: expected uint8 [N, H, W], got {out.dtype}{tuple(out.shape)}")
    n = out.shape[0]
    if states.shape != (n,) or states.dtype != np.uint64:
        raise ValueError(f"states: expected uint64[{n}] (one per patch of out), "
                         f"got {states.dtype}{tuple(states.shape)}")
    if active.shape != (n,) or active.dtype != np.uint8:
        raise ValueError(f"active: expected uint8[{n}] (one per patch of out), got {active.dtype}{tuple(active.shape)}")


def render_cpu(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """Render the layered rain layer of each patch into ``out`` (uint8 [N, H, W], 0..255, before beta).

    ``params``: float64[params.SIZE] from ``RainSpec.to_vector()``; ``states``: uint64[N] patch states;
    ``active``: uint8[N], 0 -> the patch's rain is all zeros. numba, parallel over patches.
    """
    check_render_args(params, states, active, out)
    if out.shape[0]:
        _render_cpu_kernel(params, states, active, out, SINCOS)


# ---- GPU ----------------------------------------------------------------------------------------------------------

@cuda_device_jit
def add_gpu(acc, y, x, v):
    cuda.atomic.add(acc, (y, x), np.int32(v))   # integer atomics: the sum does not depend on thread order


_row_span_gpu, _splat_gpu, _saturate_crop_gpu = build_segments(cuda_device_jit, add_gpu)
imin_gpu, imax_gpu = build_int_ops(cuda_device_jit)
_patch_draws_gpu, _layer_count_gpu, _streak_gpu = build(cuda_device_jit, rng.gpu)


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
        nl, ang, lf, wd, n, jt, pn, pf = _patch_draws_gpu(params, st, hc * wc)
        total = 0
        for layer in range(nl):
            total += _layer_count_gpu(n, layer, nl)
        for idx in range(tid, total, nt):
            layer = 0
            j = idx
            cnt = _layer_count_gpu(n, 0, nl)
            while j >= cnt:
                j -= cnt
                layer += 1
                cnt = _layer_count_gpu(n, layer, nl)
            cx, cy, dx, dy, hl, hw, tp, peak = _streak_gpu(st, layer, j, nl, ang, lf, wd, jt, pn, pf, hc, wc, table)
            _splat_gpu(acc, cx, cy, dx, dy, hl, hw, tp, peak)
    cuda.syncthreads()
    for p in range(tid, h * w, nt):
        y = p // w
        x = p - y * w
        if on:
            out[i, y, x] = imin_gpu(acc[y + pad, x + pad], 255)
        else:
            out[i, y, x] = 0


def launch_gpu(kernel, params, states, active, out, table_host: np.ndarray) -> None:
    """Run ``kernel(params, states, active, out, scratch, table, first)`` over ``out`` in chunks of patches.

    Works on CuPy arrays (real GPU; launched on CuPy's current stream) and on numpy arrays (CUDA simulator).
    Reads the canvas padding from ``params`` on the host (one scalar) to size the int32 scratch canvas.
    """
    n, h, w = out.shape
    if n == 0:
        return
    pad = int(params[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    chunk = max(1, min(n, _GPU_SCRATCH_BYTES // (hc * wc * 4)))
    if type(out).__module__.split(".")[0] == "cupy":
        import cupy as xp

        ptr = xp.cuda.get_current_stream().ptr
        # CuPy's current stream, so the launch is ordered with the caller's CuPy work (0 = the legacy default)
        stream = cuda.external_stream(ptr) if ptr else 0
    else:
        xp = np
        stream = 0
    table = xp.asarray(table_host)
    scratch = xp.zeros((chunk, hc, wc), dtype=np.int32)
    for first in range(0, n, chunk):
        m = min(chunk, n - first)
        if first:
            scratch[:m] = 0
        kernel[m, _GPU_THREADS, stream](params, states, active, out, scratch, table, first)


def render_gpu(params, states, active, out) -> None:
    """``render_cpu`` on device arrays (CuPy; numpy under the CUDA simulator), via numba.cuda kernels."""
    check_render_args(params, states, active, out)
    launch_gpu(_render_gpu_kernel, params, states, active, out, SINCOS)


# ---- numpy reference ------------------------------------------------------------------------------------------------

def reference_segment(hc: int, wc: int, cx: int, cy: int, dx: int, dy: int, hl: int, hw: int, tp: int,
                      peak: int) -> np.ndarray:
    """One streak's int64 [hc, wc] contribution, evaluated on every canvas pixel (no support culling)."""
    y, x = np.mgrid[0:hc, 0:wc].astype(np.int64)
    rx = x * POS_ONE - cx
    ry = y * POS_ONE - cy
    perp = np.abs(rx * dy - ry * dx)
    along = np.abs(rx * dx + ry * dy)
    inside = (perp < hw) & (along < hl)
    inv_hw = -(-(1 << 32) // hw)          # ceil(2**32 / hw)
    inv_tp = -(-(1 << 32) // tp)
    c = np.where(inside, np.minimum(256, ((hw - perp) * inv_hw) >> 24), 0)
    s = (c * c * (768 - 2 * c)) >> 16
    e = np.where(inside, np.minimum(256, ((hl - along) * inv_tp) >> 24), 0)
    return np.where(inside, (peak * s * e) >> 16, 0)


def draw_int_np(state, stream, index, lo, hi) -> int:
    """``rng.randint`` on the host: integer in [lo, hi] from counter ``(stream, index)`` of ``state``."""
    return int(rng.randint_np(state, rng.counter_np(stream, index), lo, hi))


def choose_width_np(params: np.ndarray, u: float) -> int:
    """Width (pixels) chosen by the uniform ``u`` in [0, 1) against the width CDF in ``params``."""
    nw = int(params[P.N_WIDTHS])
    cdf = params[P.WIDTH_CDF:P.WIDTH_CDF + nw]
    k = min(int(np.sum(u >= cdf[:nw - 1])), nw - 1)
    return int(params[P.WIDTHS + k])


def render_reference(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """Plain numpy version of ``render_cpu`` (slow and obvious; same draws, same integer arithmetic)."""
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    pad = int(params[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    area = hc * wc
    for i in range(n):
        if active[i] == 0:
            out[i] = 0
            continue
        st = np.uint64(states[i])
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
        out[i] = np.minimum(acc[pad:pad + h, pad:pad + w], 255).astype(np.uint8)
