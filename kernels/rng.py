"""Counter-based random numbers: every draw is a pure function of ``(seed, key, counter)``.

The generator is splitmix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014) used as a hash. A patch's state is ``mix64(mix64(seed + GOLDEN) ^ key)``; its ``i``-th
draw of stream ``s`` is ``mix64(state + (counter(s, i) + 1) * GOLDEN)`` with ``counter(s, i) = s << 32 | i``. No
state is carried between draws, so the rain of a patch does not depend on batch size, order, worker count or device.

Stream numbers in use (documented here so renderers never collide):

- 0: per-patch draws common to all families (rain on/off, beta) — see ``COMMON_*`` below
- 1: per-patch draws of the family's parameters (amount, length, width, angle, ...)
- 2: seed positions, one sub-stream per row: ``counter = 2 << 32 | row << 12 | j``
- 3 and up: family-specific (layers, per-streak jitter, ...)

All arithmetic is on ``np.uint64`` and wraps modulo 2**64 by design.

Use from kernels: numba cannot read attributes of the ``cpu`` / ``gpu`` namespaces inside a jitted function, so
bind the helpers to plain names first, typically inside a ``build(jit, r)`` factory that receives ``rng.cpu`` or
``rng.gpu`` (``patch_state = r.patch_state``) and defines the kernel's helpers as closures over them.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from kernels.jit import cpu_jit, cuda_device_jit

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)

#: Counters of stream 0 (common per-patch draws).
COMMON_RAIN_ON = 0
COMMON_BETA = 1

#: Beta is drawn as an integer number of 1/BETA_SCALE steps so that compositing is exact integer arithmetic.
BETA_SCALE = 1024


def build(jit) -> SimpleNamespace:
    """Define the generator's helpers with decorator ``jit`` (CPU ``njit`` or ``cuda.jit(device=True)``)."""

    @jit
    def mix64(z):
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        return z ^ (z >> np.uint64(31))

    @jit
    def patch_state(seed, key):
        """uint64 state of one patch draw; ``seed`` and ``key`` are reinterpreted as uint64."""
        return mix64(mix64(np.uint64(seed) + GOLDEN) ^ np.uint64(key))

    @jit
    def counter(stream, index):
        return (np.uint64(stream) << np.uint64(32)) | np.uint64(index)

    @jit
    def bits(state, ctr):
        """64 random bits for counter ``ctr`` (uint64)."""
        return mix64(state + (ctr + np.uint64(1)) * GOLDEN)

    @jit
    def uniform(state, ctr):
        """float64 in [0, 1) with 53 random bits."""
        return np.float64(bits(state, ctr) >> np.uint64(11)) * (1.0 / 9007199254740992.0)

    @jit
    def randint(state, ctr, lo, hi):
        """Integer uniform on the closed range [lo, hi] (hi - lo < 2**32), as int64; Lemire's multiply-shift."""
        span = np.uint64(hi - lo + 1)
        top = bits(state, ctr) >> np.uint64(32)
        return np.int64(lo) + np.int64((top * span) >> np.uint64(32))

    return SimpleNamespace(mix64=mix64, patch_state=patch_state, counter=counter, bits=bits,
                           uniform=uniform, randint=randint)


#: Helpers compiled for numba CPU kernels.
cpu = build(cpu_jit)
#: Helpers compiled as CUDA device functions (run on the CPU under NUMBA_ENABLE_CUDASIM=1).
gpu = build(cuda_device_jit)


# ---- plain numpy versions, for references and host-side draws -------------------------------------------------

def _mix64_np(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        return z ^ (z >> np.uint64(31))


def patch_state_np(seed: int, keys: np.ndarray) -> np.ndarray:
    """Vectorized ``patch_state`` for int64 ``keys`` -> uint64 states."""
    with np.errstate(over="ignore"):
        s = _mix64_np(np.asarray([seed], dtype=np.int64).view(np.uint64) + GOLDEN)
        return _mix64_np(s ^ np.asarray(keys, dtype=np.int64).view(np.uint64))


def counter_np(stream: int, index) -> np.ndarray:
    return (np.uint64(stream) << np.uint64(32)) | np.asarray(index, dtype=np.uint64)


def bits_np(state: np.ndarray, ctr) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix64_np(np.asarray(state, dtype=np.uint64) + (np.asarray(ctr, dtype=np.uint64) + np.uint64(1)) * GOLDEN)


def uniform_np(state: np.ndarray, ctr) -> np.ndarray:
    return (bits_np(state, ctr) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def randint_np(state: np.ndarray, ctr, lo, hi) -> np.ndarray:
    span = (np.asarray(hi, dtype=np.int64) - np.asarray(lo, dtype=np.int64) + 1).astype(np.uint64)
    top = bits_np(state, ctr) >> np.uint64(32)
    with np.errstate(over="ignore"):
        return np.asarray(lo, dtype=np.int64) + ((top * span) >> np.uint64(32)).astype(np.int64)
