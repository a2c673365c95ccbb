"""One source, two compilers: build the same device-side helpers for numba's CPU JIT and for numba.cuda.

Kernels that must give bit-identical results on CPU and GPU share their per-element logic through factories
``build(jit)`` that define the helpers with the given decorator. ``cpu_jit`` and ``cuda_device_jit`` are the two
decorators; under ``NUMBA_ENABLE_CUDASIM=1`` the CUDA one runs the same Python code on the CPU.
"""
from __future__ import annotations

import numba
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


def build_int_ops(jit):
    """Integer ``(imin, imax)`` of two values, compiled with ``jit``.

    Written out because numba >= 0.66 fails to compile the two-argument builtins ``min`` / ``max`` for CUDA
    ("Signature mismatch: 2 argument types given, but function takes 1 arguments", numba issue #10753) while the
    CUDA simulator accepts them, so only a real compile (tests/test_gpu_compile.py) would notice.
    """

    @jit
    def imin(a, b):
        return a if a < b else b

    @jit
    def imax(a, b):
        return a if a > b else b

    return imin, imax


def run_chunks(chunk_kernel, parallel_kernel, n: int, *args) -> None:
    """Run a batch of ``n`` patches: ``chunk_kernel(*args, c, n_chunks)`` renders patches ``c, c + n_chunks, ...``
    and ``parallel_kernel(*args, n_chunks)`` runs it over ``prange(n_chunks)``. One thread or ``n <= 2``: one serial
    chunk, because waking numba's thread pool costs more than such batches take; else ``min(n, 4 * threads)`` chunks
    (several per thread, so uneven patches balance out)."""
    threads = numba.get_num_threads()
    if threads == 1 or n <= 2:
        chunk_kernel(*args, 0, 1)
    else:
        parallel_kernel(*args, min(n, threads * 4))
