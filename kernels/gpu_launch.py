"""Launch plumbing shared by the numba.cuda kernels: array module and stream, and a block's patch geometry."""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from numba import cuda

from kernels import params as P
from kernels.jit import cuda_device_jit


def array_module_and_stream(a: Any) -> tuple[ModuleType, Any]:
    """``(xp, stream)`` for launching on array ``a``: CuPy and CuPy's current stream for a CuPy array (so the launch
    is ordered with the caller's CuPy work; 0 is the legacy default stream), numpy and stream 0 for a numpy array
    (numba's CUDA simulator, or numba copying host arrays to a real GPU)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        ptr = cupy.cuda.get_current_stream().ptr
        return cupy, (cuda.external_stream(ptr) if ptr else 0)
    return np, 0


@cuda_device_jit
def block_patch(params, out, first):
    """Geometry of the patch that this block renders into ``out`` (uint8 [N, H, W]), the block's ``blockIdx.x``-th
    from patch ``first``: ``(b, i, tid, nt, h, w, pad, hc, wc)`` = block index, patch index, thread index, threads
    per block, patch height and width, canvas padding and canvas height and width (pixels)."""
    b = cuda.blockIdx.x
    h = out.shape[1]
    w = out.shape[2]
    pad = np.int64(params[P.CANVAS_PAD])
    return b, first + b, cuda.threadIdx.x, cuda.blockDim.x, h, w, pad, h + 2 * pad, w + 2 * pad
