"""Degradations beyond rain: the families "gaussian-noise" and "salt-pepper", drawn per channel of every pixel.

Definitions, per channel ``k`` of pixel ``(y, x)`` of a patch drawn to be degraded (``B`` the uint8 background and
``I`` the degraded image, both on the 0..255 scale):

- "gaussian-noise" (compositing mode "add-signed-rgb"): ``I = clip(B + n, 0, 255)`` with the signed integer offset
  ``n = floor(mu + sigma * z + 1/2)``, ``z`` standard normal, held to -255..255 (which changes no output: beyond
  that ``B + n`` saturates anyway). Mask: every pixel.
- "salt-pepper" (mode "replace"): the value becomes 255 with probability ``salt``, 0 with probability ``pepper``,
  and stays ``B`` otherwise, independently for every channel. Mask: the pixels where any channel drew salt or pepper
  (also where the drawn value equals ``B``, e.g. salt on a 255).
- The layer written as ``rain``: ``max over channels of |I - B|`` (uint8 NHW, 0..255), the visible size of the
  degradation. Patches drawn without degradation (``active == 0``): ``I = B``, layer 0, mask False.

Exact on every device: channel ``k`` of pixel ``(y, x)`` draws ``u``, the top 32 bits of
``bits(state, counter(3 + k, y << 16 | x))`` (``kernels.rng``: streams 3, 4 and 5 for R, G and B; sides below
65,536 pixels), and its outcome is the number of entries ``<= u`` of an ascending uint64 table of cumulative
probabilities times 2**32, made on the host (``draw_table``). Only integer comparisons run in the kernels (no
transcendental function, whose last bit may differ between CPU and GPU libraries), so the numba CPU kernels, the
CUDA kernel and the numpy reference agree bit for bit; probabilities are quantized to 2**-32. The gaussian table
holds ``P(n <= d)`` for ``d`` in -255..254 (outcome ``j`` means ``n = j - 255``); the salt-pepper table holds
``[salt, salt + pepper]`` (outcome 0: salt, 1: pepper, 2: kept).

The draws depend on the pixel's position, not on the patch size, so a crop of a patch sees the same noise.
"""
from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
from numba import cuda, njit, prange

from kernels import params as P
from kernels import rng
from kernels.composite import check_composite_args
from kernels.finish import background_rows, check_finish_args, convert
from kernels.gpu_launch import array_module_and_stream
from kernels.jit import build_int_ops, cpu_jit, cuda_device_jit, run_chunks
from kernels.renderer import RainFamily, check_render_args, host_params

#: First random stream of the per-channel draws (channel k uses stream NOISE_STREAM + k).
NOISE_STREAM = 3
#: Patch sides must stay below this (the pixel's row and column share one 32-bit counter index).
MAX_SIDE = 1 << 16
#: The gaussian offset ``n`` is drawn in -OFFSET..OFFSET.
OFFSET = 255
MODE_SIGNED = P.MODES["add-signed-rgb"]
MODE_REPLACE = P.MODES["replace"]
SCALE = float(1 << 32)


# ---- host side: the outcome tables ------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def gaussian_table(sigma: float, mu: float) -> np.ndarray:
    """uint64 [2 * OFFSET] ascending: ``round(2**32 * P(n <= d))`` for ``d = -255 .. 254``, with
    ``n = floor(mu + sigma z + 1/2)`` (0..255 scale, ``sigma > 0``); read-only."""
    d = np.arange(-OFFSET, OFFSET, dtype=np.float64)
    cdf = np.array([0.5 * math.erfc(-(v + 0.5 - mu) / (sigma * math.sqrt(2.0))) for v in d])
    t = np.round(cdf * SCALE).astype(np.uint64)
    t.setflags(write=False)
    return t


@lru_cache(maxsize=64)
def salt_pepper_table(salt: float, pepper: float) -> np.ndarray:
    """uint64 [2]: ``round(2**32 * [salt, salt + pepper])`` (fractions, ``salt + pepper <= 1``); read-only."""
    t = np.round(np.array([salt, salt + pepper]) * SCALE).astype(np.uint64)
    t.setflags(write=False)
    return t


def draw_table(params) -> tuple[int, np.ndarray]:
    """``(mode, table)`` of a noise spec's parameter vector (float64 [P.SIZE], numpy or CuPy): the mode id of
    ``kernels.params.MODES`` and the host uint64 outcome table (module docstring)."""
    p = host_params(params)
    fid = int(p[P.FAMILY])
    if fid == P.FAMILY_IDS["gaussian-noise"]:
        return MODE_SIGNED, gaussian_table(float(p[P.SIGMA]), float(p[P.MU]))
    if fid == P.FAMILY_IDS["salt-pepper"]:
        return MODE_REPLACE, salt_pepper_table(float(p[P.SALT]), float(p[P.PEPPER]))
    names = {v: k for k, v in P.FAMILY_IDS.items()}
    raise ValueError(f"params: family {names.get(fid, fid)!r} is not a noise family (gaussian-noise, salt-pepper)")


# ---- device side: one source for the CPU and CUDA compilers ------------------------------------------------------

def build(jit, r) -> SimpleNamespace:
    """The per-pixel helpers compiled with ``jit`` over the rng helpers ``r`` (``rng.cpu`` or ``rng.gpu``)."""
    bits = r.bits
    counter = r.counter
    _, imax = build_int_ops(jit)

    @jit
    def outcome(table, u):
        """Number of entries of the ascending ``table`` that are ``<= u`` (binary search)."""
        lo = 0
        hi = table.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if table[mid] <= u:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @jit
    def channel(mode, table, state, y, x, k, b):
        """``(value, hit)``: channel ``k`` of pixel ``(y, x)`` whose background value is ``b`` (int32 0..255)."""
        u = bits(state, counter(NOISE_STREAM + k, (y << 16) | x)) >> np.uint64(32)
        j = np.int32(outcome(table, u))
        if mode == MODE_SIGNED:
            v = b + j - OFFSET
            if v < 0:
                v = 0
            if v > 255:
                v = 255
            return np.int32(v), True
        if j == 0:
            return np.int32(255), True
        if j == 1:
            return np.int32(0), True
        return b, False

    @jit
    def absdiff(a, b):
        return np.int32(a - b) if a > b else np.int32(b - a)

    @jit
    def pixel(mode, table, state, y, x, b0, b1, b2):
        """``(v0, v1, v2, layer, hit)`` of pixel ``(y, x)`` with background ``(b0, b1, b2)`` (int32)."""
        v0, h0 = channel(mode, table, state, y, x, 0, b0)
        v1, h1 = channel(mode, table, state, y, x, 1, b1)
        v2, h2 = channel(mode, table, state, y, x, 2, b2)
        d = imax(imax(absdiff(v0, b0), absdiff(v1, b1)), absdiff(v2, b2))
        return v0, v1, v2, d, h0 or h1 or h2

    @jit
    def degrade(mode, table, state, on, y, x, b0, b1, b2):
        """``pixel``, or the background itself (layer 0, no hit) in a patch drawn without noise (``on`` False)."""
        if on:
            return pixel(mode, table, state, y, x, b0, b1, b2)
        return b0, b1, b2, np.int32(0), False

    @jit
    def composite_pixel(mode, table, state, on, backgrounds, i, y, x, rainy, layer, mask):
        """Pixel ``(y, x)`` of patch ``i``: reads ``backgrounds`` (uint8 NHWC), writes ``rainy`` (uint8 NHWC),
        ``layer`` (uint8 NHW) and ``mask`` (bool NHW)."""
        v0, v1, v2, d, hit = degrade(mode, table, state, on, y, x, np.int32(backgrounds[i, y, x, 0]),
                                     np.int32(backgrounds[i, y, x, 1]), np.int32(backgrounds[i, y, x, 2]))
        rainy[i, y, x, 0] = v0
        rainy[i, y, x, 1] = v1
        rainy[i, y, x, 2] = v2
        layer[i, y, x] = d
        mask[i, y, x] = hit

    return SimpleNamespace(outcome=outcome, channel=channel, pixel=pixel, degrade=degrade,
                           composite_pixel=composite_pixel)


_cpu = build(cpu_jit, rng.cpu)
_degrade_cpu = _cpu.degrade
_composite_pixel_cpu = _cpu.composite_pixel
_composite_pixel_gpu = build(cuda_device_jit, rng.gpu).composite_pixel


# ---- CPU kernels ----------------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _composite_chunk(mode, table, states, active, backgrounds, rainy, layer, mask, c, n_chunks):
    """Patches c, c + n_chunks, ...: ``rainy`` uint8 NHWC, ``layer`` uint8 NHW, ``mask`` bool NHW."""
    n, h, w, _ = backgrounds.shape
    for i in range(c, n, n_chunks):
        st = states[i]
        on = active[i] != 0
        for y in range(h):
            for x in range(w):
                _composite_pixel_cpu(mode, table, st, on, backgrounds, i, y, x, rainy, layer, mask)


@njit(parallel=True, cache=True, nogil=True)
def _composite_cpu_kernel(mode, table, states, active, backgrounds, rainy, layer, mask, n_chunks):
    for c in prange(n_chunks):
        _composite_chunk(mode, table, states, active, backgrounds, rainy, layer, mask, c, n_chunks)


@njit(cache=True, nogil=True)
def _finish_chunk(mode, table, states, active, backgrounds, rows, layer, out_bg, out_rainy, out_rain, mask, c,
                  n_chunks):
    """Patches c, c + n_chunks, ...: NCHW planes of ``out_bg``'s dtype (``kernels.finish.convert``), the layer and
    mask; patch i's background is ``backgrounds[rows[i]]``."""
    n = rows.shape[0]
    _, h, w, _ = backgrounds.shape
    with_rain = out_rain.shape[0] > 0
    for i in range(c, n, n_chunks):
        b = backgrounds[rows[i]]
        st = states[i]
        on = active[i] != 0
        for y in range(h):
            for x in range(w):
                b0 = np.int32(b[y, x, 0])
                b1 = np.int32(b[y, x, 1])
                b2 = np.int32(b[y, x, 2])
                v0, v1, v2, d, hit = _degrade_cpu(mode, table, st, on, y, x, b0, b1, b2)
                out_bg[i, 0, y, x] = convert(b0, out_bg)
                out_bg[i, 1, y, x] = convert(b1, out_bg)
                out_bg[i, 2, y, x] = convert(b2, out_bg)
                out_rainy[i, 0, y, x] = convert(v0, out_rainy)
                out_rainy[i, 1, y, x] = convert(v1, out_rainy)
                out_rainy[i, 2, y, x] = convert(v2, out_rainy)
                layer[i, y, x] = d
                mask[i, y, x] = hit
                if with_rain:
                    out_rain[i, 0, y, x] = convert(d, out_rain)


@njit(parallel=True, cache=True, nogil=True)
def _finish_cpu_kernel(mode, table, states, active, backgrounds, rows, layer, out_bg, out_rainy, out_rain, mask,
                       n_chunks):
    for c in prange(n_chunks):
        _finish_chunk(mode, table, states, active, backgrounds, rows, layer, out_bg, out_rainy, out_rain, mask, c,
                      n_chunks)


def _check_side(backgrounds) -> None:
    h, w = int(backgrounds.shape[1]), int(backgrounds.shape[2])
    if h >= MAX_SIDE or w >= MAX_SIDE:
        raise ValueError(f"backgrounds: noise families need patch sides below {MAX_SIDE} pixels, got {h} x {w}")


def render_composite_cpu(params, states, active, backgrounds, beta_q, threshold, rain, rainy, mask) -> None:
    """Degrade uint8 NHWC ``backgrounds`` into ``rainy`` (uint8 NHWC), the layer ``rain`` (uint8 NHW,
    ``max_k |I - B|``) and ``mask`` (bool NHW); numba, parallel over patches. ``beta_q`` and ``threshold`` are
    checked but unused (module docstring)."""
    check_render_args(params, states, active, rain)
    check_composite_args(backgrounds, rain, beta_q, rainy, mask)
    _check_side(backgrounds)
    if not (rainy.flags.c_contiguous and rain.flags.c_contiguous and mask.flags.c_contiguous):
        raise ValueError("rain, rainy, mask: expected C-contiguous output arrays")
    mode, table = draw_table(params)
    n = backgrounds.shape[0]
    if n:
        run_chunks(_composite_chunk, _composite_cpu_kernel, n, np.int32(mode), table, states, active,
                   np.ascontiguousarray(backgrounds), rainy, rain, mask)


def render_finish_cpu(params, states, active, backgrounds, beta_q, threshold, rain, out_bg, out_rainy, out_rain,
                      mask, rows=None) -> None:
    """``render_composite_cpu`` written as channel planes (the ``kernels.finish`` layout and number formats):
    ``out_bg`` / ``out_rainy`` [N, 3, H, W], ``out_rain`` [N, 1, H, W] (the layer; ``shape[0] == 0`` skips it),
    ``rain`` uint8 NHW (the layer) and ``mask``; patch i's background is ``backgrounds[rows[i]]`` (None:
    ``backgrounds[i]``)."""
    rows = background_rows(backgrounds, rows)
    check_render_args(params, states, active, rain)
    check_finish_args(backgrounds, rain, beta_q, out_bg, out_rainy, out_rain, mask, rows.size)
    _check_side(backgrounds)
    if not rain.flags.c_contiguous:
        raise ValueError("rain: expected a C-contiguous output array")
    mode, table = draw_table(params)
    if rows.size:
        run_chunks(_finish_chunk, _finish_cpu_kernel, rows.size, np.int32(mode), table, states, active,
                   np.ascontiguousarray(backgrounds), rows, rain, out_bg, out_rainy, out_rain, mask)


# ---- CUDA kernel ----------------------------------------------------------------------------------------------------

@cuda.jit
def composite_gpu_kernel(mode, table, states, active, backgrounds, rainy, layer, mask):
    """One thread per pixel (all three channels): grid-stride over N * H * W."""
    n, h, w, _ = backgrounds.shape
    total = n * h * w
    for p in range(cuda.grid(1), total, cuda.gridsize(1)):
        i = p // (h * w)
        rem = p - i * h * w
        y = rem // w
        x = rem - y * w
        _composite_pixel_gpu(mode, table, states[i], active[i] != 0, backgrounds, i, y, x, rainy, layer, mask)


def render_composite_gpu(params, states, active, backgrounds, beta_q, threshold, rain, rainy, mask) -> None:
    """``render_composite_cpu`` on device arrays (CuPy; numpy under the CUDA simulator); the outcome table (a few
    KB) is the only host-to-device copy."""
    check_render_args(params, states, active, rain)
    check_composite_args(backgrounds, rain, beta_q, rainy, mask)
    _check_side(backgrounds)
    n, h, w, _ = backgrounds.shape
    total = n * h * w
    if total == 0:
        return
    mode, table = draw_table(params)
    xp, stream = array_module_and_stream(rainy)
    if xp is np:
        threads, blocks = 32, min((total + 31) // 32, 8)   # the simulator runs threads as Python threads
        table = table.copy()                                # numba writes host arguments back after a launch
    else:
        threads, blocks = 256, min((total + 255) // 256, 65535)
        table = xp.asarray(table)
    composite_gpu_kernel[blocks, threads, stream](np.int32(mode), table, states, active, backgrounds, rainy, rain,
                                                  mask)


# ---- numpy reference ------------------------------------------------------------------------------------------------

def render_composite_reference(params, states, active, backgrounds, beta_q, threshold, rain, rainy, mask) -> None:
    """Plain numpy ``render_composite_cpu``: every draw vectorized over the patch, outcomes by ``np.searchsorted``."""
    check_render_args(params, states, active, rain)
    check_composite_args(backgrounds, rain, beta_q, rainy, mask)
    _check_side(backgrounds)
    mode, table = draw_table(params)
    n, h, w, _ = backgrounds.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.uint64)
    index = (y << np.uint64(16)) | x
    for i in range(n):
        b = backgrounds[i].astype(np.int64)
        if not active[i]:
            rainy[i], rain[i], mask[i] = backgrounds[i], 0, False
            continue
        u = np.stack([rng.bits_np(states[i], rng.counter_np(NOISE_STREAM + k, index)) >> np.uint64(32)
                      for k in range(3)], axis=-1)
        j = np.searchsorted(table, u, side="right")
        if mode == MODE_SIGNED:
            v, hit = np.clip(b + j - OFFSET, 0, 255), np.ones(b.shape, dtype=bool)
        else:
            v, hit = np.where(j == 0, 255, np.where(j == 1, 0, b)), j < 2
        rainy[i] = v
        rain[i] = np.abs(v - b).max(axis=-1)
        mask[i] = hit.any(axis=-1)


# ---- the families -----------------------------------------------------------------------------------------------------

def _no_layer(name: str):
    def render(params, states, active, out) -> None:
        raise ValueError(f"family {name!r} (compositing mode {P.FAMILY_MODES[name]}) degrades each channel from the "
                         f"background, so it has no background-free rain layer: use its render_composite_* / "
                         f"render_finish_cpu renderers (engine.synth.synthesize)")

    render.__doc__ = f"Raises: the {name} family has no rain layer without a background (module docstring)."
    return render


def noise_family(name: str) -> RainFamily:
    """The ``RainFamily`` of noise family ``name`` ("gaussian-noise" or "salt-pepper")."""
    layer = _no_layer(name)
    return RainFamily(name, layer, layer, layer, render_composite_cpu, render_finish_cpu,
                      render_composite_gpu=render_composite_gpu,
                      render_composite_reference=render_composite_reference)


GAUSSIAN = noise_family("gaussian-noise")
SALT_PEPPER = noise_family("salt-pepper")
