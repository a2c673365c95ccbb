"""Per-patch scalar helpers of the streak renderer, one source for the CPU and GPU kernels.

``build(jit, r)`` defines them with decorator ``jit`` over the random-number helpers ``r`` (``kernels.rng.cpu`` or
``kernels.rng.gpu``); ``cpu`` and ``gpu`` are the two compiled sets. The draws follow ``kernels.streak`` (package
docstring): stream 1 for the patch's parameters, stream 2 (one sub-stream per canvas row) for the seeds.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from kernels import params as P
from kernels import rng
from kernels.jit import cpu_jit, cuda_device_jit


class PatchHelpers(NamedTuple):
    """The compiled helpers (numba dispatchers / CUDA device functions); see ``build`` for their signatures."""

    draw_params: object
    next_seed: object
    normalize_value: object


def build(jit, r) -> PatchHelpers:
    """Compile the helpers with decorator ``jit`` over rng helpers ``r``.

    - ``draw_params(params, state) -> (aq, length, angle, width)``: ``amount = aq / 2**24``, length and width in
      pixels, angle in whole degrees from vertical (stream 1, counters 0..3).
    - ``next_seed(state, y, j, x, wc, aq, log1m) -> (x, v, j)``: canvas row ``y``'s next seed after column ``x``
      from draw ``j`` (strength ``v`` in 1/16; ``x >= wc``: none left), ``log1m = log(1 - amount)``.
    - ``normalize_value(a, mn, d, inv) -> floor((a - mn) * 255 / d)`` exactly, for int64 ``a``, ``mn``, ``d > 0``
      and ``inv ~ 1 / d``.
    """
    bits = r.bits
    counter = r.counter
    randint = r.randint
    uniform = r.uniform

    @jit
    def draw_params(params, state):
        # x * 2**24 is exact and int() truncates, so lo/hi become the same integers on every backend
        lo = np.int64(params[P.AMOUNT_LO] * 16777216.0 + 0.5)
        hi = np.int64(params[P.AMOUNT_HI] * 16777216.0 + 0.5)
        if lo < 1:
            lo = np.int64(1)
        if hi < lo:
            hi = lo
        aq = randint(state, counter(1, 0), lo, hi)
        length = randint(state, counter(1, 1), np.int64(params[P.LENGTH_LO]), np.int64(params[P.LENGTH_HI]))
        angle = randint(state, counter(1, 2), np.int64(params[P.ANGLE_LO]), np.int64(params[P.ANGLE_HI]))
        u = uniform(state, counter(1, 3))
        n = np.int64(params[P.N_WIDTHS])
        k = 0
        while k < n - 1 and u >= params[P.WIDTH_CDF + k]:
            k += 1
        width = np.int64(params[P.WIDTHS + k])
        return aq, length, angle, width

    @jit
    def next_seed(state, y, j, x, wc, aq, log1m):
        b = bits(state, counter(2, (y << 12) | j))
        u = 1.0 - np.float64(b >> np.uint64(11)) * (1.0 / 9007199254740992.0)   # (0, 1]
        gap = math.log(u) / log1m
        if gap >= wc:                        # past the row (also keeps the int conversion in range)
            return wc, 0, j + 1
        x += 1 + np.int64(gap)
        v = 4095 - ((aq * np.int64(b & np.uint64(2047))) >> 23)
        return x, v, j + 1

    @jit
    def normalize_value(a, mn, d, inv):
        # a float estimate corrected in integers
        num = (a - mn) * 255
        q = np.int64(np.float64(num) * inv)
        while q * d > num:
            q -= 1
        while (q + 1) * d <= num:
            q += 1
        return q

    return PatchHelpers(draw_params, next_seed, normalize_value)


#: Helpers compiled for numba CPU kernels.
cpu = build(cpu_jit, rng.cpu)
#: Helpers compiled as CUDA device functions.
gpu = build(cuda_device_jit, rng.gpu)
