"""One source, two compilers: build the same device-side helpers for numba's CPU JIT and for numba.cuda.

Kernels that must give bit-identical results on CPU and GPU share their per-element logic through a factory
``build(jit)`` that defines the helpers with the given decorator. ``cpu_jit`` and ``cuda_device_jit`` are the two
decorators; under ``NUMBA_ENABLE_CUDASIM=1`` the CUDA one runs the same Python code on the CPU.
"""
from __future__ import annotations

from numba import cuda, njit

#: Decorator for CPU helpers: inlined into the numba kernels that call them.
cpu_jit = njit(inline="always", cache=False)

#: Decorator for GPU helpers (``@cuda.jit(device=True)``).
cuda_device_jit = cuda.jit(device=True)


def cuda_available() -> bool:
    """True when numba can launch CUDA kernels: a real GPU, or the CUDA simulator."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install should read as "no GPU", not crash the caller
        return False
