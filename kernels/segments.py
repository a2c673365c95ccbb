"""Anti-aliased streak segments in integer fixed point: the primitives of the held-out rain families.

``kernels.rain_layered`` and ``kernels.rain_sparse`` draw each streak on its own as a segment through a centre, with
a soft cross profile and ramped ends, and add the streaks with saturation at 255 (no convolution, no
normalization). This module holds what they share: the fixed-point units, the host-made direction table, the
segment splat compiled for CPU and GPU from one source, the GPU launch, and the numpy reference of one segment.

Exactness: everything that reaches a pixel is integer fixed point (positions in 1/16 px, directions in 1/4096 from
``SINCOS``, distances in 1/65536 px, weights in 1/256 through ``ceil(2**32 / d)`` reciprocals), accumulated in
int32 with plain adds (CPU) or integer atomics (GPU, order-independent). Each row of a streak visits the x range
solved from its inequalities in integers, and every visited pixel tests them again, so the culling cannot change the
result.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from kernels import params as P
from kernels import rng
from kernels.gpu_launch import array_module_and_stream, block_patch
from kernels.jit import build_int_ops, cpu_jit, cuda_device_jit
from kernels.renderer import RainFamily, check_render_args, unfused_family

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


def build_segments(jit, add):
    """``(splat, saturate_crop)`` compiled with ``jit``; ``add(acc, y, x, v)`` adds int ``v`` to ``acc[y, x]``."""
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

    return splat, saturate_crop


@cpu_jit
def _add_cpu(acc, y, x, v):
    acc[y, x] += v


@cuda_device_jit
def _add_gpu(acc, y, x, v):
    cuda.atomic.add(acc, (y, x), np.int32(v))   # integer atomics: the sum does not depend on thread order


#: CPU versions (inlined into the families' numba kernels).
splat_cpu, saturate_crop_cpu = build_segments(cpu_jit, _add_cpu)
#: GPU versions (CUDA device functions, integer atomics).
splat_gpu, saturate_crop_gpu = build_segments(cuda_device_jit, _add_gpu)
_imin_gpu, _ = build_int_ops(cuda_device_jit)


# ---- CPU: one patch per prange iteration -------------------------------------------------------------------------

def cpu_render_patch(splat_patch):
    """``render_patch(params, state, on, out_patch, table)``: one patch of a segment family on the CPU, inlined into
    the family's parallel kernel: zeros when ``on == 0``, else the family's ``splat_patch`` (all of the patch's
    streaks, ``tid`` 0 of 1) into a fresh int32 canvas, saturated and cropped into ``out_patch`` (uint8 [H, W])."""

    @cpu_jit
    def render_patch(params, state, on, out_patch, table):
        if on == 0:
            out_patch[:, :] = 0
            return
        pad = np.int64(params[P.CANVAS_PAD])
        hc = out_patch.shape[0] + 2 * pad
        wc = out_patch.shape[1] + 2 * pad
        acc = np.zeros((hc, wc), dtype=np.int32)
        splat_patch(params, state, acc, hc, wc, table, 0, 1)
        saturate_crop_cpu(acc, pad, out_patch)

    return render_patch


# ---- GPU: one block per patch --------------------------------------------------------------------------------------

def gpu_render_kernel(splat_patch):
    """The CUDA kernel ``kernel(params, states, active, out, scratch, table, first)`` of a segment family.

    Block ``b`` renders patch ``first + b`` into ``out`` (uint8 [N, H, W]): its threads call the family's device
    function ``splat_patch(params, state, acc, hc, wc, table, tid, nt)`` (each thread splats its share of the
    patch's streaks into ``acc = scratch[b]``, int32 [Hc, Wc], zeros on entry), then saturate and crop.
    """

    @cuda.jit
    def kernel(params, states, active, out, scratch, table, first):
        b, i, tid, nt, h, w, pad, hc, wc = block_patch(params, out, first)
        acc = scratch[b]
        on = active[i] != 0
        if on:
            splat_patch(params, states[i], acc, hc, wc, table, tid, nt)
        cuda.syncthreads()
        for p in range(tid, h * w, nt):
            y = p // w
            x = p - y * w
            if on:
                out[i, y, x] = _imin_gpu(acc[y + pad, x + pad], 255)
            else:
                out[i, y, x] = 0

    return kernel


def launch_gpu(kernel, params, states, active, out, table_host: np.ndarray) -> None:
    """Check the arguments and run ``kernel(params, states, active, out, scratch, table, first)`` (of
    ``gpu_render_kernel``) over ``out`` in chunks of patches.

    Works on CuPy arrays (real GPU; launched on CuPy's current stream) and on numpy arrays (CUDA simulator).
    Reads the canvas padding from ``params`` on the host (one scalar) to size the int32 scratch canvas.
    """
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    if n == 0:
        return
    pad = int(params[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    chunk = max(1, min(n, _GPU_SCRATCH_BYTES // (hc * wc * 4)))
    xp, stream = array_module_and_stream(out)
    table = xp.asarray(table_host)
    scratch = xp.zeros((chunk, hc, wc), dtype=np.int32)
    for first in range(0, n, chunk):
        m = min(chunk, n - first)
        if first:
            scratch[:m] = 0
        kernel[m, _GPU_THREADS, stream](params, states, active, out, scratch, table, first)


# ---- a family's renderers -------------------------------------------------------------------------------------------

def segment_family(name: str, cpu_kernel, gpu_kernel, patch_reference) -> RainFamily:
    """The ``RainFamily`` of segment family ``name`` from its three implementations.

    ``cpu_kernel(params, states, active, out, table)``: the family's numba kernel, parallel over patches (one
    top-level kernel per family, for numba's on-disk cache; its body is ``cpu_render_patch``); ``gpu_kernel``: from
    ``gpu_render_kernel``; ``patch_reference``: see ``render_reference_with``. All three get ``SINCOS`` as the table.
    """

    def render_cpu(params, states, active, out) -> None:
        check_render_args(params, states, active, out)
        if out.shape[0]:
            cpu_kernel(params, states, active, out, SINCOS)

    def render_gpu(params, states, active, out) -> None:
        launch_gpu(gpu_kernel, params, states, active, out, SINCOS)

    def render_reference(params, states, active, out) -> None:
        render_reference_with(patch_reference, params, states, active, out)

    for f, what in ((render_cpu, "numba, parallel over patches"),
                    (render_gpu, "numba.cuda, one block per patch; CuPy arrays, or numpy under the CUDA simulator"),
                    (render_reference, "plain numpy, every streak evaluated on the whole canvas")):
        f.__doc__ = (f"Render the {name} rain layer of each patch into ``out`` (uint8 NHW [N, H, W], 0..255, before "
                     f"beta) from ``params`` (float64 [P.SIZE]), ``states`` (uint64 [N]) and ``active`` (uint8 [N], "
                     f"0: no rain); {what}.")
    return unfused_family(name, render_cpu, render_gpu, render_reference)


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


def render_reference_with(patch_reference, params: np.ndarray, states: np.ndarray, active: np.ndarray,
                          out: np.ndarray) -> None:
    """The numpy reference of a segment family: ``patch_reference(params, state, hc, wc)`` (np.uint64 state) gives
    an active patch's int64 [hc, wc] canvas, which is saturated at 255 and cropped into ``out`` (uint8 NHW)."""
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    pad = int(params[P.CANVAS_PAD])
    for i in range(n):
        if active[i] == 0:
            out[i] = 0
            continue
        acc = patch_reference(params, np.uint64(states[i]), h + 2 * pad, w + 2 * pad)
        out[i] = np.minimum(acc[pad:pad + h, pad:pad + w], 255).astype(np.uint8)


def draw_int_np(state, stream, index, lo, hi) -> int:
    """``rng.randint`` on the host: integer in [lo, hi] from counter ``(stream, index)`` of ``state``."""
    return int(rng.randint_np(state, rng.counter_np(stream, index), lo, hi))


def choose_width_np(params: np.ndarray, u: float) -> int:
    """Width (pixels) chosen by the uniform ``u`` in [0, 1) against the width CDF in ``params``."""
    nw = int(params[P.N_WIDTHS])
    cdf = params[P.WIDTH_CDF:P.WIDTH_CDF + nw]
    k = min(int(np.sum(u >= cdf[:nw - 1])), nw - 1)
    return int(params[P.WIDTHS + k])
