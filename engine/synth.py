"""Rain synthesis on batches: ``synthesize(backgrounds, spec, seed, keys)`` -> rainy image, rain layer, beta, mask.

Every random number of a patch comes from ``(seed, key)`` (``kernels.rng``), so a patch's rain does not depend on
the batch it is in, its position, the backend or the device. Per patch, stream 0 of the generator gives the common
draws: rain on/off (``uniform < spec.rain_prob``) and ``beta`` in 1/1024 steps; the family's renderer
(``kernels.rain_<family>``) draws the rest. Compositing is exact integer arithmetic (``kernels.composite``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numba import njit

from engine import arrays
from engine.rain import RainSpec
from kernels import rng

BACKENDS = ("auto", "cpu", "cuda", "reference")


@dataclass
class SynthResult:
    """Outputs of ``synthesize``, in the input's library and on its device.

    Attributes:
        rainy: uint8 NHWC [N, H, W, 3], 0..255: ``min(255, B + beta * R)`` in exact 1/1024 fixed point.
        rain: uint8 NHW [N, H, W], 0..255: the rain layer before beta (all zeros for patches without rain).
        beta: float64 [N]: the compositing weight of each patch (a multiple of 1/1024; drawn for every patch).
        mask: bool NHW [N, H, W]: ``rain > spec.threshold``.
    """

    rainy: Any
    rain: Any
    beta: Any
    mask: Any


@lru_cache(maxsize=64)
def _parse(text: str) -> RainSpec:
    return RainSpec.parse(text)


@lru_cache(maxsize=64)
def _vector(spec: RainSpec) -> np.ndarray:
    v = spec.to_vector()
    v.setflags(write=False)
    return v


@lru_cache(maxsize=16)
def _family_module(family: str):
    name = f"kernels.rain_{family}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            raise ValueError(f"spec.family: no renderer for rain family {family!r} (module {name} is missing)") from None
        raise


def common_draws(spec: RainSpec, seed: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host-side per-patch draws: (states uint64 [N], active uint8 [N], beta_q int64 [N] in 1/1024).

    One numba loop (``kernels.rng``'s CPU helpers): the numpy formulation (``common_draws_np``, same numbers) costs
    ~50 us per call in temporaries, which is most of ``synthesize``'s overhead on loader-sized batches.
    """
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    lo = int(round(spec.beta[0] * rng.BETA_SCALE))
    hi = int(round(spec.beta[1] * rng.BETA_SCALE))
    n = keys.shape[0]
    states = np.empty(n, dtype=np.uint64)
    active = np.empty(n, dtype=np.uint8)
    beta_q = np.empty(n, dtype=np.int64)
    _common_draws_cpu(np.int64(seed), keys, float(spec.rain_prob), lo, hi, states, active, beta_q)
    return states, active, beta_q


def common_draws_np(spec: RainSpec, seed: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``common_draws`` in plain numpy (the reference the numba loop is tested against)."""
    states = rng.patch_state_np(seed, keys)
    active = (rng.uniform_np(states, rng.counter_np(0, rng.COMMON_RAIN_ON)) < spec.rain_prob).astype(np.uint8)
    lo = int(round(spec.beta[0] * rng.BETA_SCALE))
    hi = int(round(spec.beta[1] * rng.BETA_SCALE))
    beta_q = rng.randint_np(states, rng.counter_np(0, rng.COMMON_BETA), lo, hi).astype(np.int64)
    return states, active, beta_q


_patch_state = rng.cpu.patch_state
_counter = rng.cpu.counter
_uniform = rng.cpu.uniform
_randint = rng.cpu.randint


@njit(cache=True)
def _common_draws_cpu(seed, keys, rain_prob, lo, hi, states, active, beta_q):
    for i in range(keys.shape[0]):
        st = _patch_state(seed, keys[i])
        states[i] = st
        active[i] = _uniform(st, _counter(0, rng.COMMON_RAIN_ON)) < rain_prob
        beta_q[i] = _randint(st, _counter(0, rng.COMMON_BETA), lo, hi)


def _out_view(a, name: str, kind: arrays.ArrayKind):
    """Backend view (no copy) of a caller's output buffer ``out.<name>``; it may be numpy, CuPy or torch."""
    own = arrays.kind_of(a)
    if own.on_gpu != kind.on_gpu:
        raise ValueError(f"out.{name}: expected a buffer on the backgrounds' device ({'GPU' if kind.on_gpu else 'host'})")
    contiguous = a.is_contiguous() if own.library == "torch" else a.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"out.{name}: expected a C-contiguous buffer (results are written in place)")
    return arrays.to_backend(a, own)


def _resolve_backend(backend: str, on_gpu: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "cuda" if on_gpu else "cpu"
    if on_gpu and backend in ("cpu", "reference"):
        raise ValueError(f"backend {backend!r} works on host arrays; the backgrounds are on the GPU "
                         f"(use backend='auto' or 'cuda', or move them to the host)")
    return backend


def synthesize(backgrounds, spec: RainSpec | str, seed: int = 0, keys=None, backend: str = "auto",
               out: SynthResult | None = None) -> SynthResult:
    """Add rain of ``spec`` to each background patch.

    Args:
        backgrounds: uint8 NHWC [N, H, W, 3] (0..255) as a numpy array, CuPy array or torch tensor (CPU or CUDA).
        spec: a ``RainSpec`` or a string for ``RainSpec.parse`` (preset name or field list).
        seed: run seed; with ``keys`` it fixes every random number.
        keys: int64 [N], one per patch (default ``arange(N)``), e.g. a global patch index mixed with the epoch.
        backend: "auto" (GPU kernels for device inputs, CPU kernels for host inputs), "cpu" (numba), "cuda"
            (numba.cuda; with numpy inputs this runs under the CUDA simulator or copies to a real GPU), "reference"
            (the slow numpy references).
        out: optional preallocated result (same library/device as ``backgrounds``, shapes and dtypes as returned)
            to write into, e.g. reused by a loader across batches.

    Returns:
        ``SynthResult`` with ``rainy``, ``rain``, ``beta`` and ``mask`` in the input's library and on its device.
        Device inputs never leave the device; only the N per-patch states, flags and betas travel from the host.
    """
    if isinstance(spec, str):
        spec = _parse(spec)
    elif not isinstance(spec, RainSpec):
        raise TypeError(f"spec: expected a RainSpec or a spec string, got {type(spec).__name__}")
    kind = arrays.kind_of(backgrounds)
    arrays.check_nhwc_uint8(backgrounds, "backgrounds")
    n, h, w, _ = (int(s) for s in backgrounds.shape)
    keys_np = np.arange(n, dtype=np.int64) if keys is None else arrays.check_keys(keys, n)
    which = _resolve_backend(backend, kind.on_gpu)
    module = _family_module(spec.family)
    x = arrays.to_backend(backgrounds, kind)
    xp = arrays.xp_of(kind)
    if out is None:
        rain = xp.empty((n, h, w), dtype=np.uint8)
        rainy = xp.empty((n, h, w, 3), dtype=np.uint8)
        mask = xp.empty((n, h, w), dtype=np.bool_)
    else:
        rain, rainy, mask = (_out_view(getattr(out, f), f, kind) for f in ("rain", "rainy", "mask"))
    states, active, beta_q = common_draws(spec, seed, keys_np)
    beta = beta_q / float(rng.BETA_SCALE)
    if n:
        params = _vector(spec)
        if which == "reference":
            from kernels.reference_rain import composite_reference

            module.render_reference(params, states, active, rain)
            r, m = composite_reference(x, rain, beta_q, spec.threshold)
            rainy[...] = r
            mask[...] = m
        elif which == "cpu":
            fused = getattr(module, "render_composite_cpu", None)
            if fused is not None:
                # one pass: each patch is composited while its rain layer is still in cache
                fused(params, states, active, x, beta_q, spec.threshold, rain, rainy, mask)
            else:
                from kernels.composite import composite_cpu

                module.render_cpu(params, states, active, rain)
                composite_cpu(x, rain, beta_q, spec.threshold, rainy, mask)
        else:
            from kernels.composite import composite_gpu

            if kind.on_gpu:
                params_d, states, active, beta_q_d = (xp.asarray(a) for a in (params, states, active, beta_q))
            else:
                params_d, beta_q_d = params.copy(), beta_q   # numba writes host arguments back after a launch
            module.render_gpu(params_d, states, active, rain)
            composite_gpu(x, rain, beta_q_d, spec.threshold, rainy, mask)
    beta_out = xp.asarray(beta) if kind.on_gpu else beta
    if out is not None:
        _out_view(out.beta, "beta", kind)[...] = beta_out
        return out
    return SynthResult(rainy=arrays.from_backend(rainy, kind), rain=arrays.from_backend(rain, kind),
                       beta=arrays.from_backend(beta_out, kind), mask=arrays.from_backend(mask, kind))


def synthesize_planes_cpu(backgrounds: np.ndarray, spec: RainSpec | None, seed: int, keys: np.ndarray,
                          lut: np.ndarray, rain: np.ndarray, out_bg: np.ndarray, out_rainy: np.ndarray,
                          out_rain: np.ndarray, mask: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``synthesize`` on the host, written straight into a training batch's planes (``kernels.finish``).

    The values are those of ``synthesize(backgrounds, spec, seed, keys)`` converted by ``lut``: ``out_bg`` =
    ``lut[background]``, ``out_rainy`` = ``lut[rainy]`` (NCHW), ``out_rain`` = ``lut[rain]`` (N1HW; an array with
    ``shape[0] == 0`` skips it), ``mask`` bool NHW, and ``rain`` (uint8 NHW) holds the rain layer. With
    ``spec=None`` there is no rain: rainy equals the background, the rain layer is zeros and the mask all False.
    For a streak spec each patch is rendered and finished in one pass while it is in cache
    (``render_finish_cpu``); other families render the batch first, then finish it.

    Args:
        backgrounds: uint8 NHWC [M, H, W, 3] numpy (0..255): the batch's backgrounds, or with ``rows`` (int64
            [N]) an array they are picked from: patch i's background is ``backgrounds[rows[i]]`` (no gathered copy).
        keys: int64 [N]. lut: [256] float32 / int16 (bfloat16) / uint16 (float16) / uint8 table of the output type (``kernels.finish``).
        rain, out_bg, out_rainy, out_rain, mask: numpy outputs, C-contiguous.

    Returns:
        float64 [N]: each patch's beta (zeros without rain).
    """
    from kernels.finish import finish_cpu

    from kernels.finish import background_rows

    backgrounds = np.ascontiguousarray(backgrounds)
    rows = background_rows(backgrounds, rows)
    n = rows.size
    if spec is None:
        rain.fill(0)
        finish_cpu(backgrounds, rain, np.zeros(n, dtype=np.int64), 0, lut, out_bg, out_rainy, out_rain, mask, rows)
        return np.zeros(n, dtype=np.float64)
    if isinstance(spec, str):
        spec = _parse(spec)
    keys = arrays.check_keys(keys, n)
    states, active, beta_q = common_draws(spec, seed, keys)
    if n:
        params = _vector(spec)
        module = _family_module(spec.family)
        fused = getattr(module, "render_finish_cpu", None)
        if fused is not None:
            fused(params, states, active, backgrounds, beta_q, spec.threshold, lut, rain, out_bg, out_rainy,
                  out_rain, mask, rows)
        else:
            module.render_cpu(params, states, active, rain)
            finish_cpu(backgrounds, rain, beta_q, spec.threshold, lut, out_bg, out_rainy, out_rain, mask, rows)
    return beta_q / float(rng.BETA_SCALE)
