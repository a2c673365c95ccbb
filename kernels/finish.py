"""Composite and convert in one pass: uint8 background + rain layer -> channel planes of a chosen number format.

Values (exactly those of ``kernels.composite`` followed by the conversion):
    ``rainy = min(255, B + ((beta_q * R) >> 10))`` per channel (the same integer as ``(1024 B + beta_q R) >> 10``),
    ``mask = R > threshold``, and every plane value is ``v`` (0..255) converted to the output's number format.

Number formats, chosen at compile time from the output arrays' dtype (``convert`` is overloaded on it):
  - float32: ``float32(v) / 255`` (0..1), an IEEE division, which vectorizes (16 lanes with AVX-512) where a
    256-entry table look-up stays scalar.
  - int16: the bfloat16 bit pattern of that float32 quotient, rounded to nearest even (numpy has no bfloat16: pass
    the int16 view of a bfloat16 buffer, e.g. ``tensor.view(torch.int16).numpy()``).
  - uint16: the float16 bit pattern of the quotient, rounded to nearest even (the uint16 view of a float16 buffer).
  - uint8: ``v`` itself (0..255).
  The 16-bit patterns are computed from the float32 quotient's bits by integer rounding (``_bf16_bits``,
  ``_f16_bits``), equal to torch's ``float32 -> bfloat16 / float16`` conversion for all 256 values.

Layout: the outputs are channel planes, ``[N, 3, H, W]`` (NCHW) for background and rainy image and ``[N, 1, H, W]``
for the rain layer, from NHWC uint8 backgrounds. The de-interleaving is part of the kernel because it is free
there: the conversion already reads each background byte once and writes each output value once, sequentially per
plane, while a separate NHWC -> NCHW pass would read and write every output value again (for float32 128 x 128
patches, 458,752 bytes each). The renderer runs this per patch right after the patch's rain layer is made, while
that is still in L1 (``kernels.streak.cpu``).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from kernels.composite import check_composite_inputs
from kernels.jit import run_chunks

#: dtypes of the output planes, with the number format each one receives (module docstring).
PLANE_DTYPES = {np.dtype(np.float32): "float32 v / 255", np.dtype(np.int16): "bfloat16 bits of v / 255",
                np.dtype(np.uint16): "float16 bits of v / 255", np.dtype(np.uint8): "uint8 v"}


def convert(v, out):
    """uint8 value ``v`` (an int32 0..255) in the number format of array ``out``'s dtype (numba only)."""
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


@overload(convert, inline="always")
def _convert_impl(v, out):
    if out.dtype == types.float32:
        return lambda v, out: np.float32(v) / np.float32(255.0)
    if out.dtype == types.uint8:
        return lambda v, out: np.uint8(v)
    if out.dtype == types.int16:
        return lambda v, out: _bf16_bits(v)
    if out.dtype == types.uint16:
        return lambda v, out: _f16_bits(v)
    return None


@njit(cache=True)
def finish_patch_cpu(b, r, q, threshold, ob, oy, orain, m):
    """One patch on flat views: ``b`` uint8 [3 HW] (background 0..255, HWC order), ``r`` uint8 [HW] (rain layer
    0..255 before beta), ``q`` int32 beta in 1/1024, ``threshold`` int32 on the 0..255 scale; written: ``ob`` and
    ``oy`` [3, HW] (background and rainy planes, CHW), ``orain`` [HW] (rain plane; size 0 to skip it), all three of
    one dtype of ``PLANE_DTYPES``, and ``m`` bool [HW] (mask)."""
    for p in range(r.size):
        t = (q * np.int32(r[p])) >> 10      # the rain's contribution, saturated below
        t = t if t < 255 else 255
        for k in range(3):
            s = np.int32(b[3 * p + k])
            v = s + t
            ob[k, p] = convert(s, ob)
            oy[k, p] = convert(v if v < 255 else 255, oy)
    for p in range(orain.size):
        orain[p] = convert(np.int32(r[p]), orain)
    for p in range(r.size):
        m[p] = np.int32(r[p]) > threshold


@njit(cache=True, nogil=True)  # nogil: other Python threads run meanwhile, as for the render kernels
def _finish_chunk(backgrounds, rows, rain, beta_q, threshold, out_bg, out_rainy, out_rain, mask, c, n_chunks):
    n = rows.shape[0]
    _, h, w, _ = backgrounds.shape
    hw = h * w
    with_rain = out_rain.shape[0] > 0
    no_rain = np.empty((0,), dtype=out_bg.dtype)
    for i in range(c, n, n_chunks):
        orain = out_rain[i].reshape(hw) if with_rain else no_rain
        finish_patch_cpu(backgrounds[rows[i]].reshape(hw * 3), rain[i].reshape(hw), np.int32(beta_q[i]), threshold,
                         out_bg[i].reshape((3, hw)), out_rainy[i].reshape((3, hw)), orain, mask[i].reshape(hw))


@njit(parallel=True, cache=True, nogil=True)
def _finish_cpu_kernel(backgrounds, rows, rain, beta_q, threshold, out_bg, out_rainy, out_rain, mask, n_chunks):
    for c in prange(n_chunks):
        _finish_chunk(backgrounds, rows, rain, beta_q, threshold, out_bg, out_rainy, out_rain, mask, c, n_chunks)


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


def check_finish_args(backgrounds, rain, beta_q, out_bg, out_rainy, out_rain, mask, n: int | None = None) -> None:
    """Shapes, dtypes and contiguity; raises ValueError naming the argument and the expected layout. ``n``: patches
    in the batch when the backgrounds are picked by row."""
    check_composite_inputs(backgrounds, rain, beta_q, n)
    n = backgrounds.shape[0] if n is None else n
    _, h, w, _ = backgrounds.shape
    if out_bg.dtype not in PLANE_DTYPES:
        raise ValueError(f"out_bg: expected one of the plane dtypes float32 (v / 255), int16 (bfloat16 bits), uint16 "
                         f"(float16 bits) or uint8, got {out_bg.dtype}")
    for name, a, shape in (("out_bg", out_bg, (n, 3, h, w)), ("out_rainy", out_rainy, (n, 3, h, w)),
                           ("out_rain", out_rain, (n, 1, h, w))):
        if name == "out_rain" and a.shape[0] == 0:
            continue  # rain plane not wanted
        if tuple(a.shape) != shape or a.dtype != out_bg.dtype or not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected C-contiguous {out_bg.dtype} {list(shape)} (NCHW, out_bg's dtype), "
                             f"got {a.dtype}{tuple(a.shape)}")
    if tuple(mask.shape) != (n, h, w) or mask.dtype != np.bool_ or not mask.flags.c_contiguous:
        raise ValueError(f"mask: expected C-contiguous bool NHW [{n}, {h}, {w}], got {mask.dtype}{tuple(mask.shape)}")


def finish_cpu(backgrounds: np.ndarray, rain: np.ndarray, beta_q: np.ndarray, threshold: int, out_bg: np.ndarray,
               out_rainy: np.ndarray, out_rain: np.ndarray, mask: np.ndarray, rows: np.ndarray | None = None) -> None:
    """Write a batch's planes from uint8 inputs; numba, parallel over patches.

    Parameters
    ----------
    backgrounds : numpy.ndarray
        uint8 NHWC [M, H, W, 3] (0..255): the batch's backgrounds, or with ``rows`` an array they are picked from
        (e.g. a loader's resident subset: no gathered copy is made).
    rain : numpy.ndarray
        uint8 NHW [N, H, W] (0..255, before beta; zeros for no rain).
    beta_q : numpy.ndarray
        int64 [N], beta in 1/1024 (0 for no rain).
    threshold : int
        Mask threshold on the 0..255 scale.
    out_bg, out_rainy : numpy.ndarray
        [N, 3, H, W] NCHW, C-contiguous, written; one dtype of ``PLANE_DTYPES``, which chooses the number format.
    out_rain : numpy.ndarray
        [N, 1, H, W] of that dtype, written, or an array with ``shape[0] == 0`` to skip the rain plane.
    mask : numpy.ndarray
        bool NHW [N, H, W], written.
    rows : numpy.ndarray, optional
        int64 [N]: patch i's background is ``backgrounds[rows[i]]``; None: ``backgrounds[i]`` (N = M).
    """
    rows = background_rows(backgrounds, rows)
    check_finish_args(backgrounds, rain, beta_q, out_bg, out_rainy, out_rain, mask, rows.size)
    if rows.size:
        run_chunks(_finish_chunk, _finish_cpu_kernel, rows.size, np.ascontiguousarray(backgrounds), rows,
                   np.ascontiguousarray(rain), beta_q, np.int32(threshold), out_bg, out_rainy, out_rain, mask)
