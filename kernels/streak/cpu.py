"""CPU renderer of the streak family (numba, parallel over patches), optionally fused with compositing.

Per patch: the streak kernel comes from the per-process bank (``kernels.streak.bank``: each (length, angle, width)
built once, as zero-padded float64 tap rows) or, for specs with too many combinations, is built per patch into the
same layout; the seeds are collected per canvas row and expanded into the events of the reflect-101 extension whose
kernel reaches the canvas, grouped by alignment phase and sorted by row; for each kernel row and phase the row is
staged as 64-byte-aligned blocks of ``BLOCK`` taps, and every event adds them to a column-extended accumulator with
one vector multiply-add per block (no clipping; ``splat_rows``); then one min/max pass and one normalization pass,
both explicit vector code (``normalize``). ``render_composite_cpu`` also composites each patch while its rain layer
is in L1, ``render_finish_cpu`` writes its channel planes instead (``kernels.finish``).

The accumulator is float64 holding exact integers. Every term is ``v * tap`` with ``v <= 4095`` (12 bits) and
``0 <= tap <= 2**TAP_BITS``, so each product is an integer below 2**33, exact in float64. A canvas pixel receives at
most one term per kernel tap (the extension's seeds sit at distinct positions, and pixel p gets tap p - q from the
seed at q), so every partial sum is an integer ``<= 4095 * (sum of all taps) <= 4095 * (length + 2)**2 * 2**20``,
below 2**53 for lengths up to ``MAX_LENGTH``: all adds are exact, the order does not matter, and the result equals
the int64 sums of the GPU and the reference. (int32 cannot hold a single product; float64 gets one-instruction
vector multiply-adds where int64 multiplies are multi-uop emulations even with AVX-512DQ.)
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from kernels import params as P
from kernels.composite import check_composite_args, composite_patch_cpu
from kernels.finish import background_rows, check_finish_args, finish_patch_cpu
from kernels.jit import cpu_jit, run_chunks
from kernels.renderer import check_render_args
from kernels.simd import BLOCK, axpy_block, copy_block, minmax_blocks, normalize_blocks
from kernels.streak import bank as streak_bank
from kernels.streak import kernel, patch
from kernels.streak.tables import GAUSS, TRIG, check_canvas

_draw_params = patch.cpu.draw_params
_next_seed = patch.cpu.next_seed
_normalize_value = patch.cpu.normalize_value
_build_kernel = kernel.cpu.build_kernel
_pad_rows = streak_bank.pad_rows

#: What the renderer writes after each patch's rain layer: nothing more, the uint8 rainy image and mask
#: (``render_composite_cpu``), or the channel planes and mask (``render_finish_cpu``).
STAGE_RENDER, STAGE_COMPOSITE, STAGE_FINISH = 0, 1, 2


# ---- seeds and events -----------------------------------------------------------------------------------------------

@cpu_jit
def _images(x, wc, qx_lo, qx_hi, out_q, n):
    """Append to ``out_q`` (from index n) every coordinate q in [qx_lo, qx_hi] with refl(q) = x; returns the new n.

    The images are ``x + k p`` and ``-x + k p`` (p = 2 (wc - 1) >= 2, the axis being >= 2 long). Stepped by p
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


@cpu_jit
def collect_seeds(state, hc, wc, aq, seeds):
    """Draw the seeds of every canvas row (``kernels.streak.patch``'s ``next_seed``) into ``seeds`` = (seed_x,
    seed_v, row_start), int64 CSR arrays: row y's seeds are ``[row_start[y], row_start[y + 1])``."""
    seed_x, seed_v, row_start = seeds
    log1m = math.log(1.0 - np.float64(aq) * (1.0 / 16777216.0))
    n_seeds = 0
    for y in range(hc):
        row_start[y] = n_seeds
        x, v, j = _next_seed(state, y, 0, -1, wc, aq, log1m)
        while x < wc:
            seed_x[n_seeds] = x
            seed_v[n_seeds] = v
            n_seeds += 1
            x, v, j = _next_seed(state, y, j, x, wc, aq, log1m)
    row_start[hc] = n_seeds


@cpu_jit
def _event_bound(n_seeds, hc, wc, frame):
    """Most events the seeds can have: a coordinate has at most 2 (span // period + 2) images in a span, the period
    being 2 (n - 1)."""
    _, _, qy_lo, qy_hi, qx_lo, qx_hi = frame
    ny = 2 * ((qy_hi - qy_lo + 1) // (2 * (hc - 1)) + 2)
    nx = 2 * ((qx_hi - qx_lo + 1) // (2 * (wc - 1)) + 2)
    return n_seeds * ny * nx


@cpu_jit
def _new_events(n):
    """Event buffers for ``n`` events (layout in ``expand_events``)."""
    return (np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64), np.empty(n, dtype=np.int64),
            np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64))


@cpu_jit
def expand_events(seeds, hc, wc, frame, events, images):
    """The events: every image of every seed under the reflect-101 extension whose kernel reaches the canvas.

    ``frame`` = (we, ex, qy_lo, qy_hi, qx_lo, qx_hi): accumulator row length, canvas column offset, and the range of
    seed positions whose kernel reaches the canvas. ``events`` = (ev_base, ev_v, ev_k, ph_base, ph_v), each with room
    for ``_event_bound`` events: position in the accumulator, strength, row ``qy - qy_lo``, and the sorted copies
    that ``group_events`` writes; ``images`` = (qbuf, qbuf_y) scratch. Returns the number of events.
    """
    seed_x, seed_v, row_start = seeds
    we, ex, qy_lo, qy_hi, qx_lo, qx_hi = frame
    qbuf, qbuf_y = images
    ev_base, ev_v, ev_k, _, _ = events
    n_ev = 0
    # seed by seed (rows without seeds cost nothing): each seed's images are its row images (rows qy with
    # refl(qy) = y) times its column images; the order does not matter, group_events orders them
    for y in range(hc):
        if row_start[y] == row_start[y + 1]:
            continue
        ny = _images(y, hc, qy_lo, qy_hi, qbuf_y, 0)
        for s in range(row_start[y], row_start[y + 1]):
            nx = _images(seed_x[s], wc, qx_lo, qx_hi, qbuf, 0)
            fv = np.float64(seed_v[s])
            for a in range(ny):
                qy = qbuf_y[a]
                rb = qy * we + ex
                for k in range(nx):
                    ev_base[n_ev] = rb + qbuf[k]
                    ev_v[n_ev] = fv
                    ev_k[n_ev] = qy - qy_lo
                    n_ev += 1
    return n_ev


@cpu_jit
def group_events(events, n_ev, nq, ph_start):
    """Group the events by (alignment phase ``ev_base % BLOCK``, row): a counting sort in flat loops over the events
    into ``ph_base`` / ``ph_v``; ``ph_start`` (int64 [BLOCK nq + 1]) ends up holding the group starts, group ``pe *
    nq + k`` being phase ``pe``, row ``k``, so the events of one phase are sorted by row."""
    ev_base, ev_v, ev_k, ph_base, ph_v = events
    ng = BLOCK * nq
    for g in range(ng + 1):
        ph_start[g] = 0
    for e in range(n_ev):
        ph_start[(ev_base[e] & (BLOCK - 1)) * nq + ev_k[e]] += 1
    total = 0
    for g in range(ng):
        total += ph_start[g]
        ph_start[g] = total
    ph_start[ng] = total
    for e in range(n_ev - 1, -1, -1):
        g = (ev_base[e] & (BLOCK - 1)) * nq + ev_k[e]
        d = ph_start[g] - 1
        ph_start[g] = d
        ph_base[d] = ev_base[e]
        ph_v[d] = ev_v[e]


# ---- splat and normalization ----------------------------------------------------------------------------------------

@njit(cache=True)
def splat_rows(acc, we, hc, qy_lo, qy_hi, events, ph_start, kern, tbuf):
    """Add every event's kernel into ``acc`` (canvas rows x ``we`` extended columns) with aligned vector blocks.

    ``acc`` starts on a 64-byte boundary and ``we`` is a multiple of ``BLOCK``, so an event's alignment phase is
    ``ev_base % BLOCK``; ``events`` / ``ph_start`` are grouped by ``group_events``. ``kern`` = (rinfo, taps, r0,
    n_rows): tap rows ``rinfo[r0 : r0 + n_rows]`` in the layout of ``kernels.streak.bank.pad_rows``. For a tap row,
    the events of one phase ``s`` that land on the canvas are one contiguous range and all add the same blocks: the
    row shifted right by ``s``, copied once from the padded taps (``taps[first - s ...]``) into ``tbuf`` (64-byte
    aligned, >= max row length + 2 BLOCK floats), then one vector multiply-add per block and event
    (``axpy_block``). Aligned blocks touch one cache line instead of two and never split a load or store across
    lines; reading the padded taps unaligned in the event loop itself is slower (split loads), while the staging
    copy costs a few blocks per row and phase. Columns never need clipping (``acc`` is extended on both sides).
    """
    _, _, _, ph_base, ph_v = events
    rinfo, taps, r0, n_rows = kern
    nq = qy_hi - qy_lo + 1
    for r_ in range(r0, r0 + n_rows):
        dy = rinfo[r_, 0]
        dx0 = rinfo[r_, 1]
        n = rinfo[r_, 2]
        first = rinfo[r_, 3]
        k0 = max(qy_lo, -dy) - qy_lo
        k1 = min(qy_hi, hc - 1 - dy) - qy_lo
        if k1 < k0:
            continue
        for pe in range(BLOCK):
            e0 = ph_start[pe * nq + k0]
            e1 = ph_start[pe * nq + k1 + 1]
            if e1 == e0:
                continue
            s = (pe + dx0) & (BLOCK - 1)          # two's complement: also right for negative dx0
            base = dy * we + dx0 - s               # + ph_base[e]: aligned
            cnt = (s + n + BLOCK - 1) // BLOCK
            for jb in range(cnt):
                copy_block(tbuf, jb * BLOCK, taps, first - s + jb * BLOCK)
            for e in range(e0, e1):
                # all blocks of the row for one event: its position and strength are loaded once
                b = ph_base[e] + base
                v = ph_v[e]
                for jb in range(cnt):
                    axpy_block(acc, b + jb * BLOCK, v, tbuf, jb * BLOCK)


@njit(cache=True)
def _zero_row(acc, b, we):
    """``acc[b : b + we] = 0``."""
    row = acc[b:b + we]
    for x in range(we):
        row[x] = 0.0


@cpu_jit
def _canvas_min_max(acc, hc, wc, we, ex, pad, h):
    """(min, max) over the canvas part of ``acc``; rows outside the crop are cleared after their last read."""
    fmn = acc[ex]
    fmx = fmn
    nbc = wc // BLOCK
    for y in range(hc):
        b = y * we + ex
        if nbc > 0:
            lo, hi = minmax_blocks(acc, b, nbc)
            fmn = lo if lo < fmn else fmn
            fmx = hi if hi > fmx else fmx
        for x in range(nbc * BLOCK, wc):
            a = acc[b + x]
            fmn = a if a < fmn else fmn
            fmx = a if a > fmx else fmx
        if y < pad or y >= pad + h:
            _zero_row(acc, y * we, we)  # outside the crop: not read again
    return fmn, fmx


@njit(cache=True)
def normalize(acc, hc, wc, we, ex, pad, out_patch):
    """Min-max normalize the canvas part of ``acc`` (rows of ``we`` columns, canvas from column ``ex``; exact
    integers in float64) into the uint8 crop ``out_patch`` (C-contiguous [h, w]): ``floor((a - min) * 255 /
    (max - min))``, all zeros when max == min. Whole ``BLOCK``-pixel blocks of a row go through the vector
    intrinsics (``minmax_blocks``, ``normalize_blocks``), the rest through the same arithmetic in scalar code.

    Leaves ``acc[: hc * we]`` all zeros, ready for the next patch: each row is cleared right after its last read,
    while it is in L1 (a separate clearing pass over the ~185 KB accumulator of a medium patch would cost several
    times more)."""
    h, w = out_patch.shape
    o = out_patch.reshape(h * w)
    fmn, fmx = _canvas_min_max(acc, hc, wc, we, ex, pad, h)
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
        nbw = w // BLOCK
        for y in range(h):
            b = (y + pad) * we + ex + pad
            if nbw > 0:
                normalize_blocks(acc, b, o, y * w, nbw, fmn, inv, fd)
            for x in range(nbw * BLOCK, w):
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
                o[y * w + x] = _normalize_value(np.int64(acc[b + x]), mn, d, inv)
            _zero_row(acc, (y + pad) * we, we)


# ---- one patch, one chunk of patches --------------------------------------------------------------------------------

@cpu_jit
def _patch_kernel(bank, i, length, angle, width, tables, build_scratch):
    """Patch ``i``'s streak kernel as padded tap rows: ``((rinfo, taps, r0, n_rows), (dy_min, dy_max, dx_min,
    dx_max))``. From the bank when it holds the patch's combination (``bank`` = (combos, meta, rinfo, taps) of
    ``kernels.streak.bank``, read only), else built into ``build_scratch`` = (kb, ext, rows, vals, rinfo_s, taps_s)
    (the same layout, so one splat serves both)."""
    combos, meta, b_rinfo, b_taps = bank
    trig, gauss = tables
    kb, ext, rows, vals, rinfo_s, taps_s = build_scratch
    ci = combos[i] if i < combos.shape[0] else -1
    if ci >= 0 and meta[ci, 0] != 0:
        return (b_rinfo, b_taps, meta[ci, 6], meta[ci, 1]), (meta[ci, 2], meta[ci, 3], meta[ci, 4], meta[ci, 5])
    n_rows, dy_min, dy_max, dx_min, dx_max = _build_kernel(length, angle, width, trig, gauss, kb, ext, rows, vals)
    _pad_rows(rows, vals, n_rows, rinfo_s, 0, taps_s, 0)
    return (rinfo_s, taps_s, np.int64(0), n_rows), (dy_min, dy_max, dx_min, dx_max)


@cpu_jit
def render_patch(params, state, i, pad, tables, bank, build_scratch, seeds, events, splat_scratch, out_patch):
    """Patch ``i``'s rain layer into ``out_patch`` (uint8 [h, w], C-contiguous).

    ``tables`` = (TRIG, GAUSS); ``bank``: see ``_patch_kernel``; scratch groups as ``_scratch`` allocates them:
    ``build_scratch`` (a per-patch kernel build), ``seeds`` (``collect_seeds``), ``events`` (``expand_events``),
    ``splat_scratch`` = (acc, tbuf, ph_start, qbuf, qbuf_y). Returns ``events``, grown when a dense spec needed more
    room.
    """
    h, w = out_patch.shape
    hc = h + 2 * pad
    wc = w + 2 * pad
    acc, tbuf, ph_start, qbuf, qbuf_y = splat_scratch
    aq, length, angle, width = _draw_params(params, state)
    kern, (dy_min, dy_max, dx_min, dx_max) = _patch_kernel(bank, i, length, angle, width, tables, build_scratch)
    if kern[3] == 0:
        o = out_patch.reshape(h * w)
        for p in range(h * w):
            o[p] = 0
        return events
    collect_seeds(state, hc, wc, aq, seeds)
    # acc columns: the canvas starts at column ex; blocks reach up to BLOCK - 1 columns past a tap row on either
    # side (aligned blocks start up to BLOCK - 1 before it, padded ones end up to BLOCK - 1 after it), so ex and the
    # row length we (a multiple of BLOCK, for the alignment) leave room for every block without clipping
    ex = dx_max - dx_min + BLOCK - 1
    we = (wc + 2 * ex + BLOCK - 1) // BLOCK * BLOCK
    qy_lo = -dy_max
    qy_hi = hc - 1 - dy_min
    frame = (we, ex, qy_lo, qy_hi, -dx_max, wc - 1 - dx_min)
    bound = _event_bound(seeds[2][hc], hc, wc, frame)
    if bound > events[0].size:                       # rare (dense rain on a small canvas): grow
        events = _new_events(bound)
    n_ev = expand_events(seeds, hc, wc, frame, events, (qbuf, qbuf_y))
    group_events(events, n_ev, qy_hi - qy_lo + 1, ph_start)
    # acc[: hc * we] is all zeros here: allocated so, and normalize clears what it read
    splat_rows(acc, we, hc, qy_lo, qy_hi, events, ph_start, kern, tbuf)
    normalize(acc, hc, wc, we, ex, pad, out_patch)
    return events


@njit(cache=True)
def _aligned_zeros(n):
    """float64 zeros [n] starting on a 64-byte boundary (a view into a slightly larger allocation)."""
    raw = np.zeros(n + BLOCK, dtype=np.float64)
    shift = ((-raw.ctypes.data) & 63) // 8
    return raw[shift:shift + n]


@njit(cache=True)
def _scratch(params, h, w):
    """The scratch groups of ``render_patch`` for H x W patches of ``params``; allocated once per chunk, so
    allocation stays off the per-patch path."""
    pad = np.int64(params[P.CANVAS_PAD])
    hc = h + 2 * pad
    wc = w + 2 * pad
    ks = np.int64(params[P.LENGTH_HI]) + 2
    # a kernel built per patch, and its padded tap rows (<= ks rows, ks * ks taps)
    build_scratch = (np.empty((4, ks, ks), dtype=np.int64), np.empty((7, ks), dtype=np.int64),
                     np.empty((4, ks), dtype=np.int64), np.empty(ks * ks, dtype=np.int64),
                     np.empty((ks, 4), dtype=np.int64), np.empty(ks * ks + BLOCK * (ks + 1), dtype=np.float64))
    seeds = (np.empty(hc * wc, dtype=np.int64), np.empty(hc * wc, dtype=np.int64), np.empty(hc + 1, dtype=np.int64))
    events = _new_events(4096)
    we_max = (wc + 2 * (ks + BLOCK) + BLOCK - 1) // BLOCK * BLOCK
    # the accumulator is kept all zeros between patches (normalize clears what it read)
    splat_scratch = (_aligned_zeros(hc * we_max), _aligned_zeros(ks + 2 * BLOCK),  # tbuf: one tap row, one phase
                     np.empty(BLOCK * (hc + 2 * ks + 2) + 1, dtype=np.int64),
                     np.empty(2 * ((wc + 2 * ks) // max(1, 2 * (wc - 1)) + 2), dtype=np.int64),
                     np.empty(2 * ((hc + 2 * ks) // max(1, 2 * (hc - 1)) + 2), dtype=np.int64))
    return pad, build_scratch, seeds, events, splat_scratch


@cpu_jit
def _after_patch(stage, i, stage_in, stage_out, rain_patch, hw, tt):
    """Stage ``STAGE_COMPOSITE`` or ``STAGE_FINISH`` for patch ``i`` (``kernels.composite.composite_patch_cpu``,
    ``kernels.finish.finish_patch_cpu``); ``stage_in`` = (backgrounds, bg_rows, beta_q, threshold), ``stage_out``
    = (rainy, mask, out_bg, out_rainy, out_rain); the arrays of the stage not run may be empty."""
    backgrounds, bg_rows, beta_q, threshold = stage_in
    rainy, mask, out_bg, out_rainy, out_rain = stage_out
    bg = backgrounds[bg_rows[i]].reshape(hw * 3)
    if stage == STAGE_COMPOSITE:
        composite_patch_cpu(bg, rain_patch, np.int32(beta_q[i]), threshold, rainy[i].reshape(hw * 3),
                            mask[i].reshape(hw), tt)
    elif stage == STAGE_FINISH:
        finish_patch_cpu(bg, rain_patch, np.int32(beta_q[i]), threshold, out_bg[i].reshape((3, hw)),
                         out_rainy[i].reshape((3, hw)), out_rain[i].reshape(hw) if out_rain.shape[0]
                         else out_rain.reshape(0), mask[i].reshape(hw))


@njit(cache=True, nogil=True)
def _render_chunk(params, states, active, out, tables, stage, stage_in, stage_out, bank, c, n_chunks):
    """Render patches c, c + n_chunks, ... with one set of scratch buffers; after each patch's rain layer (while
    it is in L1) run ``stage`` (``_after_patch``). ``bank``: prebuilt streak kernels, read only
    (``kernels.streak.bank.prepare``)."""
    n, h, w = out.shape
    pad, build_scratch, seeds, events, splat_scratch = _scratch(params, h, w)
    hw = h * w
    tt = np.empty(hw if stage == STAGE_COMPOSITE else 0, dtype=np.uint8)
    for i in range(c, n, n_chunks):
        if active[i] == 0:
            o = out[i].reshape(hw)
            for p in range(hw):
                o[p] = 0
        else:
            events = render_patch(params, states[i], i, pad, tables, bank, build_scratch, seeds, events,
                                  splat_scratch, out[i])
        if stage != STAGE_RENDER:
            _after_patch(stage, i, stage_in, stage_out, out[i].reshape(hw), hw, tt)


# nogil: other Python threads (DALI's, a caller's) run while a batch is rendered
@njit(parallel=True, cache=True, nogil=True)
def _render_kernel(params, states, active, out, tables, stage, stage_in, stage_out, bank, n_chunks):
    for c in prange(n_chunks):
        _render_chunk(params, states, active, out, tables, stage, stage_in, stage_out, bank, c, n_chunks)


_NO_BG = np.empty((0, 1, 1, 3), dtype=np.uint8)
_NO_BETA = np.empty(0, dtype=np.int64)
_NO_MASK = np.empty((0, 1, 1), dtype=np.bool_)
_NO_PLANES = np.empty((0, 1, 1, 1), dtype=np.float32)


def _launch(params, states, active, out, stage, backgrounds=_NO_BG, bg_rows=None, beta_q=_NO_BETA, threshold=0,
            rainy=_NO_BG, mask=_NO_MASK, out_bg=_NO_PLANES, out_rainy=_NO_PLANES, out_rain=_NO_PLANES) -> None:
    # the batch's streak kernels, built here (serially, outside any parallel region) when not yet banked
    bank = streak_bank.prepare(params, states, active)
    if bg_rows is None:
        bg_rows = np.arange(backgrounds.shape[0], dtype=np.int64)
    stage_in = (backgrounds, bg_rows, beta_q, np.int32(threshold))
    stage_out = (rainy, mask, out_bg, out_rainy, out_rain)
    run_chunks(_render_chunk, _render_kernel, out.shape[0], params, states, active, out, (TRIG, GAUSS), stage,
               stage_in, stage_out, bank)


def render_cpu(params: np.ndarray, states: np.ndarray, active: np.ndarray, out: np.ndarray) -> None:
    """Render each patch's streak rain layer into ``out`` (uint8 NHW [N, H, W], 0..255, before beta).

    ``params``: float64[P.SIZE] from ``RainSpec.to_vector()``; ``states``: uint64[N] patch states
    (``rng.patch_state(seed, key)``); ``active``: uint8[N], 0 -> all zeros. numba, parallel over patches.
    """
    check_render_args(params, states, active, out)
    n, h, w = out.shape
    if n == 0:
        return
    check_canvas(params, h, w)
    if not out.flags.c_contiguous:
        tmp = np.empty(out.shape, dtype=np.uint8)
        _launch(params, states, active, tmp, STAGE_RENDER)
        out[...] = tmp
        return
    _launch(params, states, active, out, STAGE_RENDER)


def _fused_batch_ready(params, states, active, rain) -> bool:
    """Checks shared by the fused renderers (raising ValueError); False for an empty batch (nothing to do)."""
    check_render_args(params, states, active, rain)
    if not rain.flags.c_contiguous:
        raise ValueError("rain: expected a C-contiguous output array")
    n, h, w = rain.shape
    if n:
        check_canvas(params, h, w)
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
    _launch(params, states, active, rain, STAGE_COMPOSITE, backgrounds=np.ascontiguousarray(backgrounds),
            beta_q=beta_q, threshold=threshold, rainy=rainy, mask=mask)


def render_finish_cpu(params: np.ndarray, states: np.ndarray, active: np.ndarray, backgrounds: np.ndarray,
                      beta_q: np.ndarray, threshold: int, rain: np.ndarray, out_bg: np.ndarray,
                      out_rainy: np.ndarray, out_rain: np.ndarray, mask: np.ndarray,
                      rows: np.ndarray | None = None) -> None:
    """``render_cpu`` into ``rain`` and ``kernels.finish.finish_cpu`` into the channel planes in one pass over the
    batch: each patch's planes are written right after its rain layer is made, while that is still in L1.

    ``backgrounds`` uint8 NHWC [M, H, W, 3] (0..255; with ``rows`` int64 [N], patch i's background is
    ``backgrounds[rows[i]]``, so a resident subset needs no gathered copy), ``beta_q`` int64 [N] (beta in
    1/1024), ``threshold`` on the 0..255 scale; written: ``rain`` uint8 NHW, ``out_bg`` / ``out_rainy``
    [N, 3, H, W] and ``out_rain`` [N, 1, H, W] of one dtype of ``kernels.finish.PLANE_DTYPES`` (``out_rain`` with
    ``shape[0] == 0`` is skipped), ``mask`` bool NHW. Same values as the two calls.
    """
    rows = background_rows(backgrounds, rows)
    check_finish_args(backgrounds, rain, beta_q, out_bg, out_rainy, out_rain, mask, rows.size)
    if not _fused_batch_ready(params, states, active, rain):
        return
    _launch(params, states, active, rain, STAGE_FINISH, backgrounds=np.ascontiguousarray(backgrounds), bg_rows=rows,
            beta_q=beta_q, threshold=threshold, mask=mask, out_bg=out_bg, out_rainy=out_rainy, out_rain=out_rain)
