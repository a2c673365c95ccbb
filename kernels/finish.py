"""Composite and convert in one pass: uint8 background + rain layer -> the training batch's planes (CPU, numba).

A loader batch holds the background, the rainy image and the rain layer as NCHW / N1HW planes of its output type
(float32 ``v / 255``, bfloat16 / float16 bit patterns of that value, or raw uint8), plus the mask. Writing those
planes is most of the host's work per patch (458,752 bytes of float32 for a 128 x 128 patch), so they are written
straight from the inputs, patch by patch while the patch's rain layer is still in L1: no uint8 rainy image in
between, no second pass over the batch.

Values (exactly those of ``kernels.composite`` followed by the conversion):
    ``rainy = min(255, B + ((beta_q * R) >> 10))`` per channel (the same integer as ``(1024 B + beta_q R) >> 10``),
    ``mask = R > threshold``, and every plane value is ``table[v]`` for its uint8 value ``v``.

The conversion is chosen at compile time from the table's dtype (``_convert`` is overloaded on it):
  - float32: ``float32(v) / 255`` computed, not looked up. It is the table's value bit for bit (IEEE division of
    the same operands) and vectorizes (16 lanes with AVX-512), where the 256-entry look-up stays scalar: measured
    58 against 118 us per 128 x 128 patch on the 2-core machine (the look-up version plus a separate uint8
    composite took 114).
  - uint8: the value itself (the table is the identity; not read).
  - int16 (bfloat16 bit patterns) and uint16 (float16 bit patterns): computed from the float32 quotient's bits by
    integer rounding to nearest even (``_bf16_bits``, ``_f16_bits``), exactly torch's ``float32 -> bfloat16 /
    float16`` conversion for these values (tested against it for all 256). The two 16-bit types share a size, so
    the table's integer signedness is what tells them apart at compile time. A 256-entry look-up (the previous
    way) stays scalar; the computed form vectorizes like float32 and writes half its bytes.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from kernels.composite import check_composite_inputs


def _convert(v, lut):
    """uint8 value ``v`` (an int32 0..255) as the output type of ``lut`` (numba only; see ``_convert_impl``)."""
    raise NotImplementedError("numba-only helper")


@intrinsic
def _f32_bits(typingctx, x):
    """The IEEE bits of float32 ``x`` as an int32 (a bit cast; numba has no scalar ``view``)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(inline="always")
def _bf16_bits(v):
    """bfloat16 bits (as int16) of ``float32(v) / 255`` for an int32 ``v`` in 0..255: the float32 bits rounded to
    their top 16 by round-to-nearest-even (``u`` <= 0x3F800000, so nothing overflows)."""
    u = _f32_bits(np.float32(v) / np.float32(255.0))
    return np.int16((u + np.int32(0x7FFF) + ((u >> 16) & np.int32(1))) >> 16)


@njit(inline="always")
def _f16_bits(v):
    """float16 bits (as uint16) of ``float32(v) / 255`` for an int32 ``v`` in 0..255. Every nonzero quotient
    (>= 1/255) is a normal float16, so: exponent rebiased (127 -> 15), top 10 of the 23 mantissa bits kept, the
    other 13 rounded to nearest even (a carry into the exponent is the right result); 0 stays 0."""
    u = _f32_bits(np.float32(v) / np.float32(255.0))
    h = (((u >> 23) - np.int32(112)) << 10) | ((u & np.int32(0x7FFFFF)) >> 13)
    r = u & np.int32(0x1FFF)
    h += np.int32(r > 0x1000) | (np.int32(r == 0x1000) & (h & np.int32(1)))
    return np.uint16(h & -np.int32(u != 0))


@overload(_convert, inline="always")
def _convert_impl(v, lut):
    """Chosen at compile time from the table's dtype (module docstring); every type is computed, the table only
    names the type."""
    if lut.dtype == types.float32:
        return lambda v, lut: np.float32(v) / np.float32(255.0)
    if lut.dtype == types.uint8:
        return lambda v, lut: np.uint8(v)
    if lut.dtype == types.int16:
        return lambda v, lut: _bf16_bits(v)
    if lut.dtype == types.uint16:
        return lambda v, lut: _f16_bits(v)
    return None


@njit(cache=True)
def finish_patch_cpu(b, r, q, threshold, lut, ob, oy, orain, m):
    """One patch on flat views: ``b`` uint8 [3 HW] (background 0..255, HWC order), ``r`` uint8 [HW] (rain layer
    0..255 before beta), ``q`` int32 beta in 1/1024, ``threshold`` int32 on the 0..255 scale, ``lut`` [256] of the
    output type (module docstring); written: ``ob`` and ``oy`` [3, HW] (background and rainy planes, CHW),
    ``orain`` [HW] (rain plane; size 0 to skip it) and ``m`` bool [HW] (mask)."""
    for p in range(r.size):
        t = (q * np.int32(r[p])) >> 10      # the rain's contribution, saturated below
        t = t if t < 255 else 255
        for k in range(3):
            s = np.int32(b[3 * p + k])
            v = s + t
            ob[k, p] = _convert(s, lut)
            oy[k, p] = _convert(v if v < 255 else 255, lut)
    for p in range(orain.size):
        orain[p] = _convert(np.int32(r[p]), lut)
    for p in range(r.size):
        m[p] = np.int32(r[p]) > threshold


@njit(cache=True, nogil=True)  # nogil: other Python threads run meanwhile, as for the render kernels
def _finish_chunk(backgrounds, rows, rain, beta_q, threshold, lut, out_bg, out_rainy, out_rain, mask, c, n_chunks):
    n = rows.shape[0]
    _, h, w, _ = backgrounds.shape
    hw = h * w
    with_rain = out_rain.shape[0] > 0
    no_rain = np.empty((0,), dtype=out_bg.dtype)
    for i in range(c, n, n_chunks):
        orain = out_rain[i].reshape(hw) if with_rain else no_rain
        finish_patch_cpu(backgrounds[rows[i]].reshape(hw * 3), rain[i].reshape(hw), np.int32(beta_q[i]), threshold,
                         lut, out_bg[i].reshape((3, hw)), out_rainy[i].reshape((3, hw)), orain, mask[i].reshape(hw))


@njit(parallel=True, cache=True, nogil=True)
def _finish_cpu_kernel(backgrounds, rows, rain, beta_q, threshold, lut, out_bg, out_rainy, out_rain, mask, n_chunks):
    for c in prange(n_chunks):
        _finish_chunk(backgrounds, rows, rain, beta_q, threshold, lut, out_bg, out_rainy, out_rain, mask, c,
                      n_chunks)


def background_rows(backgrounds, rows) -> np.ndarray:
    """int64 [N] rows of ``backgrounds`` that hold the batch's patches: ``arange(len(backgrounds))`` for None, else
    ``rows`` checked (a 1-d integer array of valid row numbers; repeats allowed)."""
    if rows is None:
        return np.arange(backgrounds.shape[0], dtype=np.int64)
    r = np.asarray(rows)
    if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
        raise ValueError(f"rows: expected a 1-d integer array of background rows, got {r.dtype}{r.shape}")
    r = np.ascontiguousarray(r, dtype=np.int64)
    if r.size and (r.min() < 0 or r.max() >= backgrounds.shape[0]):
        raise ValueError(f"rows: background rows must lie in 0..{backgrounds.shape[0] - 1}, got "
                         f"{int(r.min())}..{int(r.max())}")
    return r


def check_finish_args(backgrounds, rain, beta_q, lut, out_bg, out_rainy, out_rain, mask, n: int | None = None) -> None:
    """Shapes, dtypes and contiguity; raises ValueError naming the argument and the expected layout. ``n``: patches
    in the batch when the backgrounds are picked by row."""
    check_composite_inputs(backgrounds, rain, beta_q, n)
    n = backgrounds.shape[0] if n is None else n
    _, h, w, _ = backgrounds.shape
    if lut.shape != (256,) or lut.dtype not in (np.float32, np.int16, np.uint16, np.uint8):
        raise ValueError(f"lut: expected a float32, int16 (bfloat16 bits), uint16 (float16 bits) or uint8 table of 256 "
                         f"values, got {lut.dtype}{lut.shape}")
    for name, a, shape in (("out_bg", out_bg, (n, 3, h, w)), ("out_rainy", out_rainy, (n, 3, h, w)),
                           ("out_rain", out_rain, (n, 1, h, w))):
        if name == "out_rain" and a.shape[0] == 0:
            continue  # rain plane not wanted
        if tuple(a.shape) != shape or a.dtype != lut.dtype or not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected C-contiguous {lut.dtype} {list(shape)} (NCHW, the table's type), got "
                             f"{a.dtype}{tuple(a.shape)}")
    if tuple(mask.shape) != (n, h, w) or mask.dtype != np.bool_ or not mask.flags.c_contiguous:
        raise ValueError(f"mask: expected C-contiguous bool NHW [{n}, {h}, {w}], got {mask.dtype}{tuple(mask.shape)}")


def finish_cpu(backgrounds: np.ndarray, rain: np.ndarray, beta_q: np.ndarray, threshold: int, lut: np.ndarray,
               out_bg: np.ndarray, out_rainy: np.ndarray, out_rain: np.ndarray, mask: np.ndarray,
               rows: np.ndarray | None = None) -> None:
    """Write a batch's planes from uint8 inputs; numba, parallel over patches.

    Args:
        backgrounds: uint8 NHWC [M, H, W, 3] (0..255): the batch's backgrounds, or with ``rows`` an array they are
            picked from (e.g. a loader's resident subset: no gathered copy is made).
        rain: uint8 NHW [N, H, W] (0..255, before beta; zeros for no rain).
        beta_q: int64 [N], beta in 1/1024 (0 for no rain). threshold: mask threshold on the 0..255 scale.
        lut: [256] float32 (``v / 255``), int16 (bfloat16 bits of it), uint16 (float16 bits of it) or uint8
            (identity): the output type (module docstring).
        out_bg, out_rainy: [N, 3, H, W] NCHW of ``lut``'s dtype, written. out_rain: [N, 1, H, W], written, or an
            array with ``shape[0] == 0`` to skip the rain plane. mask: bool NHW, written.
        rows: int64 [N]: patch i's background is ``backgrounds[rows[i]]``; None: ``backgrounds[i]`` (N = M).
    """
    rows = background_rows(backgrounds, rows)
    check_finish_args(backgrounds, rain, beta_q, lut, out_bg, out_rainy, out_rain, mask, rows.size)
    n = rows.size
    if n == 0:
        return
    import numba

    args = (np.ascontiguousarray(backgrounds), rows, np.ascontiguousarray(rain), beta_q, np.int32(threshold), lut,
            out_bg, out_rainy, out_rain, mask)
    threads = numba.get_num_threads()
    if threads == 1 or n <= 2:
        _finish_chunk(*args, 0, 1)  # no parallel region: waking the pool costs more than tiny batches take
    else:
        _finish_cpu_kernel(*args, min(n, threads * 4))
