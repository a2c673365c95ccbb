"""GPU renderer of the streak family (numba.cuda, one block per patch).

The threads of a block build the patch's streak kernel pass by pass (``kernels.streak.kernel``, rows spread over
threads, barriers between passes), draw the seeds of one canvas row each and splat them and their reflect-101
mirror images with int64 atomics into a global scratch accumulator (a 128 x 128 int64 canvas is 128 KB, beyond
numba's 48 KB static shared memory, and int64 holds the unreduced fixed-point sums), then reduce min/max in shared
memory and write the normalized crop. Integer sums do not depend on the order of the atomics, so the result is the
CPU's exactly.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from kernels import params as P
from kernels.gpu_launch import array_module_and_stream, block_patch
from kernels.jit import cuda_device_jit
from kernels.renderer import check_render_args, host_params
from kernels.streak import kernel, patch
from kernels.streak.tables import GAUSS, TRIG, check_canvas, kernel_size

_draw_params, _next_seed, _normalize_value = patch.gpu
(_clear_row, _line_row, _blurx_row, _blury_row, _fold_row, _shift, _extent_row, _plan, _fill_row,
 _, _, _) = kernel.gpu

_THREADS = 128
#: Bytes of global scratch per launch (int64 accumulators and kernel buffers); patches go in chunks to fit.
_SCRATCH_BYTES = 1 << 30   # ~4,700 medium patches per launch: enough blocks to fill an H100


# ---- seeds and splats -----------------------------------------------------------------------------------------------

@cuda_device_jit
def _mirror(c, n, which, lo, hi):
    """Reflect-101 images of coordinate ``c`` on an axis of ``n >= 2`` pixels that lie in [lo, hi]: family ``which``
    (0: ``c + k p``, 1: ``-c + k p``, ``p = 2 (n - 1)``) as ``(base, k0, k1)``, the images being ``base + k p`` for
    ``k0 <= k <= k1``. Family 1 is empty (k1 < k0) at the edges, where it would repeat family 0."""
    p = 2 * (n - 1)
    if which == 0:
        base = c
    else:
        if c == 0 or c == n - 1:
            return c, 1, 0
        base = -c
    return base, -((base - lo) // p), (hi - base) // p


@cuda_device_jit
def _splat_event(acc, wc, hc, qy, qx, v, rows, vals, n_rows):
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
            cuda.atomic.add(acc, base + j, v * vals[off + j])   # integer atomics: the sum is order-independent


@cuda_device_jit
def _splat_seed(acc, hc, wc, y, x, v, rows, vals, info):
    """Splat a seed and each reflect-101 mirror image of it whose kernel reaches the canvas (``info``: the kernel's
    n_rows, dy_min, dy_max, dx_min, dx_max at 1..5)."""
    n_rows = info[1]
    py = 2 * (hc - 1)
    px = 2 * (wc - 1)
    for by_i in range(2):
        by, ky0, ky1 = _mirror(y, hc, by_i, -info[3], hc - 1 - info[2])
        for ky in range(ky0, ky1 + 1):
            qy = by + ky * py
            for bx_i in range(2):
                bx, kx0, kx1 = _mirror(x, wc, bx_i, -info[5], wc - 1 - info[4])
                for kx in range(kx0, kx1 + 1):
                    _splat_event(acc, wc, hc, qy, bx + kx * px, v, rows, vals, n_rows)


@cuda_device_jit
def _seed_row(acc, state, y, hc, wc, aq, log1m, rows, vals, info):
    """Draw row ``y``'s seeds by geometric skipping and splat each one."""
    x, v, j = _next_seed(state, y, 0, -1, wc, aq, log1m)
    while x < wc:
        _splat_seed(acc, hc, wc, y, x, v, rows, vals, info)
        x, v, j = _next_seed(state, y, j, x, wc, aq, log1m)


# ---- the kernel -----------------------------------------------------------------------------------------------------

#: The passes of ``kernels.streak.kernel`` in order: 0 clear, 1 line, 2 row blur, 3 column blur, 4 fold, 5 shift
#: (one thread), 6 extent, 7 plan (one thread), 8 fill.
_N_PASSES = 9


@cuda_device_jit
def _pass_rows(k, L):
    """Rows of pass ``k``: the line and blurs work on the L x L kernel, the rest on the folded (L+2) x (L+2) one;
    the shift and the plan are one step each."""
    if k == 5 or k == 7:
        return 1
    if 1 <= k <= 3:
        return L
    return L + 2


@cuda_device_jit
def _run_pass(k, y, L, angle, width, trig, gauss, kb, ext, rows, info, vals):
    """Row ``y`` of pass ``k``; info[6] = the scale shift, info[1..5] = n_rows, dy/dx min and max."""
    if k == 0:
        _clear_row(kb, y, L)
    elif k == 1:
        _line_row(kb, ext, y, L, angle, trig)
    elif k == 2:
        _blurx_row(kb, ext, y, L, width, gauss)
    elif k == 3:
        _blury_row(kb, ext, y, L, width, gauss)
    elif k == 4:
        _fold_row(kb, ext, y, L)
    elif k == 5:
        info[6] = _shift(ext, L)
    elif k == 6:
        _extent_row(kb, ext, y, info[6])
    elif k == 7:
        n_rows, dy_min, dy_max, dx_min, dx_max = _plan(ext, rows, L)
        info[1] = n_rows
        info[2] = dy_min
        info[3] = dy_max
        info[4] = dx_min
        info[5] = dx_max
    else:
        _fill_row(kb, ext, rows, vals, y, info[6])


@cuda_device_jit
def _build_kernel_block(on, tid, nt, L, angle, width, trig, gauss, kb, ext, rows, info, vals):
    """The block builds the patch's streak kernel: every pass with its rows spread over the threads, a barrier
    after each (all threads of the block must call it)."""
    for k in range(_N_PASSES):
        if on:
            for y in range(tid, _pass_rows(k, L), nt):
                _run_pass(k, y, L, angle, width, trig, gauss, kb, ext, rows, info, vals)
        cuda.syncthreads()


@cuda_device_jit
def _block_min_max(acc, n, tid, nt, smin, smax):
    """(min, max) of ``acc[:n]`` over the block: per-thread partials in shared ``smin`` / ``smax``, then every
    thread reads all partials (the same result on every thread). All threads of the block must call it."""
    mn = acc[0]
    mx = acc[0]
    for p in range(tid, n, nt):
        a = acc[p]
        if a < mn:
            mn = a
        if a > mx:
            mx = a
    smin[tid] = mn
    smax[tid] = mx
    cuda.syncthreads()
    mn = smin[0]
    mx = smax[0]
    for t in range(1, nt):
        if smin[t] < mn:
            mn = smin[t]
        if smax[t] > mx:
            mx = smax[t]
    return mn, mx


@cuda.jit
def render_gpu_kernel(params, states, active, out, trig, gauss, kb_all, ext_all, rows_all, vals_all, acc_all,
                      info_all, first):
    """The CUDA kernel: block ``b`` renders patch ``first + b`` (module docstring); ``*_all[b]`` are its scratch
    buffers (``render_gpu`` sizes them)."""
    b, i, tid, nt, h, w, pad, hc, wc = block_patch(params, out, first)
    acc = acc_all[b]
    info = info_all[b]
    rows = rows_all[b]
    vals = vals_all[b]
    smin = cuda.shared.array(_THREADS, dtype=np.int64)
    smax = cuda.shared.array(_THREADS, dtype=np.int64)
    on = active[i] != 0
    st = states[i]
    # every thread draws the patch's parameters (a few hashes) instead of waiting for a broadcast
    aq, length, angle, width = _draw_params(params, st)
    if on:
        for p in range(tid, hc * wc, nt):
            acc[p] = 0
    _build_kernel_block(on, tid, nt, length, angle, width, trig, gauss, kb_all[b], ext_all[b], rows, info, vals)
    if on:
        log1m = math.log(1.0 - np.float64(aq) * (1.0 / 16777216.0))
        for y in range(tid, hc, nt):
            _seed_row(acc, st, y, hc, wc, aq, log1m, rows, vals, info)
    cuda.syncthreads()
    # every thread takes part in the reduction (an inactive patch's values are not used)
    mn, mx = _block_min_max(acc, hc * wc, tid, nt, smin, smax)
    d = mx - mn
    inv = 1.0 / np.float64(d if d != 0 else 1)
    for p in range(tid, h * w, nt):
        y = p // w
        x = p - y * w
        if on and d != 0:
            out[i, y, x] = _normalize_value(acc[(y + pad) * wc + x + pad], mn, d, inv)
        else:
            out[i, y, x] = 0


def render_gpu(params, states, active, out) -> None:
    """``kernels.streak.cpu.render_cpu`` on device arrays (CuPy arrays; numpy arrays under the CUDA simulator).

    Reads ``params`` on the host (P.SIZE floats) to size the scratch buffers; no host copy of ``out``.
    """
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    if n == 0:
        return
    ph = host_params(params)
    check_canvas(ph, h, w)
    pad = int(ph[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    ks = kernel_size(ph)
    xp, stream = array_module_and_stream(out)
    per_patch = 8 * (hc * wc + 4 * ks * ks + 11 * ks + ks * ks + 8)
    chunk = max(1, min(n, _SCRATCH_BYTES // per_patch))
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
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        render_gpu_kernel[m, _THREADS, stream](params_d, states, active, out, trig, gauss, kb, ext, rows, vals,
                                               acc, info, start)
