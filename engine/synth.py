"""Rain synthesis on batches: ``synthesize(backgrounds, spec, seed, keys)`` -> rainy image, rain layer, beta, mask.

Every random number of a patch comes from ``(seed, key)`` (``kernels.rng``), so a patch's rain does not depend on
the batch it is in, its position, the backend or the device. Per patch, stream 0 of the generator gives the common
draws: rain on/off (``uniform < spec.rain_prob``) and ``beta`` in 1/1024 steps; the family's renderer
(``kernels.families``) draws the rest. Compositing is exact integer arithmetic (``kernels.composite``).

The noise families ("gaussian-noise", "salt-pepper"; ``kernels.noise``) go through the same calls: ``rainy`` is the
noisy image, ``rain`` the layer ``max over channels of |rainy - background|`` (0..255), ``mask`` the corrupted
pixels (every pixel for gaussian-noise; those with any channel salted or peppered for salt-pepper) and ``beta`` 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numba import njit

from engine import arrays
from engine.rain import RainSpec
from kernels import rng
from kernels.families import family
from kernels.finish import background_rows, finish_cpu


@dataclass
class SynthResult:
    """Outputs of ``synthesize``, in the input's library and on its device.

    Attributes
    ----------
    rainy : array
        uint8 NHWC [N, H, W, 3], 0..255: ``min(255, B + beta * R)`` in exact 1/1024 fixed point (noise families:
        the noisy image, ``kernels.noise``).
    rain : array
        uint8 NHW [N, H, W], 0..255: the rain layer before beta (all zeros for patches without rain); noise
        families: ``max over channels of |rainy - B|``.
    beta : array
        float64 [N]: the compositing weight of each patch (a multiple of 1/1024; drawn for every patch); 1 for
        the noise families.
    mask : array
        bool NHW [N, H, W]: ``rain > spec.threshold``; noise families: the corrupted pixels (all of a noisy
        patch for gaussian-noise, those with any channel replaced for salt-pepper).
    """

    rainy: Any
    rain: Any
    beta: Any
    mask: Any


@lru_cache(maxsize=64)
def _parse(text: str) -> RainSpec:
    return RainSpec.parse(text)


def _as_spec(spec: RainSpec | str) -> RainSpec:
    if isinstance(spec, str):
        return _parse(spec)
    if not isinstance(spec, RainSpec):
        raise TypeError(f"spec: expected a RainSpec or a spec string, got {type(spec).__name__}")
    return spec


@lru_cache(maxsize=64)
def _vector(spec: RainSpec) -> np.ndarray:
    v = spec.to_vector()
    v.setflags(write=False)
    return v


def beta_q_range(spec: RainSpec) -> tuple[int, int]:
    """The closed range of beta in 1/1024 steps: ``spec.beta``'s for rain, ``(1024, 1024)`` for the noise families
    (which do not scale their noise, so they report 1)."""
    if spec.mode != "add-layer":
        return rng.BETA_SCALE, rng.BETA_SCALE
    return int(round(spec.beta[0] * rng.BETA_SCALE)), int(round(spec.beta[1] * rng.BETA_SCALE))


def common_draws(spec: RainSpec, seed: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host-side per-patch draws: (states uint64 [N], active uint8 [N], beta_q int64 [N] in 1/1024).

    One numba loop over ``kernels.rng``'s CPU helpers: the numpy formulation (``common_draws_np``, the same numbers)
    spends most of a loader-sized batch's overhead in temporaries.
    """
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    lo, hi = beta_q_range(spec)
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
    lo, hi = beta_q_range(spec)
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
        where = "GPU" if kind.on_gpu else "host"
        raise ValueError(f"out.{name}: expected a buffer on the backgrounds' device ({where})")
    contiguous = a.is_contiguous() if own.library == "torch" else a.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"out.{name}: expected a C-contiguous buffer (results are written in place)")
    return arrays.to_backend(a, own)


def synthesize(backgrounds: Any, spec: RainSpec | str, seed: int = 0, keys: Any = None, backend: str = "auto",
               out: SynthResult | None = None) -> SynthResult:
    """Add rain of ``spec`` to each background patch (or the noise of a noise family, see the module docstring).

    Parameters
    ----------
    backgrounds : numpy.ndarray, cupy.ndarray or torch.Tensor
        uint8 NHWC [N, H, W, 3], 0..255 (CPU or CUDA; any strides).
    spec : RainSpec or str
        The rain ranges, or a string for ``RainSpec.parse`` (preset name or field list).
    seed : int
        Run seed; with ``keys`` it fixes every random number.
    keys : array of int64 [N], optional
        One per patch (default ``arange(N)``), e.g. a global patch index mixed with the epoch.
    backend : {"auto", "cpu", "cuda", "reference"}
        "auto": GPU kernels for device inputs, CPU kernels for host inputs; "cpu": numba; "cuda": numba.cuda (with
        numpy inputs this runs under the CUDA simulator or copies to a real GPU); "reference": the slow numpy
        references. "cpu" and "reference" need host inputs.
    out : SynthResult, optional
        Preallocated, C-contiguous result buffers (same device as ``backgrounds``, shapes and dtypes as returned)
        to write into, e.g. reused by a loader across batches.

    Returns
    -------
    SynthResult
        ``rainy`` (uint8 NHWC, 0..255), ``rain`` (uint8 NHW, 0..255, before beta), ``beta`` (float64 [N]) and
        ``mask`` (bool NHW) in the input's library and on its device (``out`` itself when given). Device inputs
        never leave the device; only the N per-patch states, flags and betas travel from the host.

    Raises
    ------
    ValueError
        Naming the input: wrong dtype, layout or shape, bad keys, unknown backend, a host backend for device inputs.
    TypeError
        ``spec`` neither a RainSpec nor a string, or ``backgrounds`` not an array.

    References
    ----------
    The "streak" family is the authors' generator of Hu, You, Gu, Zhu, Xue, Dong, "Revisiting the Generalization
    Problem of Low-level Vision Models Through the Lens of Image Deraining" (journal extension of Gu et al.,
    "Networks are Slacking Off: Understanding Generalization Problem in Image Deraining", NeurIPS 2023,
    arXiv:2305.14709); "layered" follows the depth layers of Garg & Nayar, "Vision and Rain", IJCV 75(1):3-27,
    2007, doi:10.1007/s11263-006-0028-6.
    """
    spec = _as_spec(spec)
    kind = arrays.kind_of(backgrounds)
    arrays.check_array(backgrounds, "backgrounds", ("uint8",), "NHWC")
    n, h, w, _ = (int(s) for s in backgrounds.shape)
    keys_np = np.arange(n, dtype=np.int64) if keys is None else arrays.check_keys(keys, n)
    which = arrays.resolve_backend(backend, kind.on_gpu, host_copy=False)
    fam = family(spec.family)
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
            fam.render_composite_reference(params, states, active, x, beta_q, spec.threshold, rain, rainy, mask)
        elif which == "cpu":
            fam.render_composite_cpu(params, states, active, x, beta_q, spec.threshold, rain, rainy, mask)
        else:
            if kind.on_gpu:
                params_d, states, active, beta_q_d = (xp.asarray(a) for a in (params, states, active, beta_q))
            else:
                params_d, beta_q_d = params.copy(), beta_q   # numba writes host arguments back after a launch
            fam.render_composite_gpu(params_d, states, active, x, beta_q_d, spec.threshold, rain, rainy, mask)
    beta_out = xp.asarray(beta) if kind.on_gpu else beta
    if out is not None:
        _out_view(out.beta, "beta", kind)[...] = beta_out
        return out
    return SynthResult(rainy=arrays.from_backend(rainy, kind), rain=arrays.from_backend(rain, kind),
                       beta=arrays.from_backend(beta_out, kind), mask=arrays.from_backend(mask, kind))


def synthesize_planes_cpu(backgrounds: np.ndarray, spec: RainSpec | str | None, seed: int, keys: np.ndarray,
                          rain: np.ndarray, out_bg: np.ndarray, out_rainy: np.ndarray, out_rain: np.ndarray,
                          mask: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``synthesize`` on the host, written straight into channel planes (``kernels.finish``).

    The values are those of ``synthesize(backgrounds, spec, seed, keys)``, each converted to the number format of
    the planes' dtype (``kernels.finish.PLANE_DTYPES``: float32 ``v / 255``, bfloat16 bits as int16, float16 bits
    as uint16, or uint8 ``v``). With ``spec=None`` there is no rain: rainy equals the background, the rain layer is
    zeros and the mask all False. A streak spec renders and converts each patch in one pass while it is in cache,
    and so do the noise families; the other rain families render the batch first, then convert it.

    Parameters
    ----------
    backgrounds : numpy.ndarray
        uint8 NHWC [M, H, W, 3] (0..255): the batch's backgrounds, or with ``rows`` an array they are picked from.
    spec : RainSpec, str or None
        The rain, or None for none.
    seed : int
        Run seed.
    keys : numpy.ndarray
        int64 [N], one per patch.
    rain : numpy.ndarray
        uint8 NHW [N, H, W], written: the rain layer (0..255, before beta).
    out_bg, out_rainy : numpy.ndarray
        [N, 3, H, W] NCHW planes of one dtype of ``PLANE_DTYPES``, written: background and rainy image.
    out_rain : numpy.ndarray
        [N, 1, H, W] of that dtype, written: the rain layer; an array with ``shape[0] == 0`` skips it.
    mask : numpy.ndarray
        bool NHW [N, H, W], written: ``rain > spec.threshold`` (noise families: the corrupted pixels).
    rows : numpy.ndarray, optional
        int64 [N]: patch i's background is ``backgrounds[rows[i]]`` (no gathered copy); None: ``backgrounds[i]``.

    Returns
    -------
    numpy.ndarray
        float64 [N]: each patch's beta (zeros without rain; 1 for the noise families).
    """
    backgrounds = np.ascontiguousarray(backgrounds)
    rows = background_rows(backgrounds, rows)
    n = rows.size
    if spec is None:
        rain.fill(0)
        finish_cpu(backgrounds, rain, np.zeros(n, dtype=np.int64), 0, out_bg, out_rainy, out_rain, mask, rows)
        return np.zeros(n, dtype=np.float64)
    spec = _as_spec(spec)
    keys = arrays.check_keys(keys, n)
    states, active, beta_q = common_draws(spec, seed, keys)
    if n:
        family(spec.family).render_finish_cpu(_vector(spec), states, active, backgrounds, beta_q, spec.threshold,
                                              rain, out_bg, out_rainy, out_rain, mask, rows)
    return beta_q / float(rng.BETA_SCALE)
