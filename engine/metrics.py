"""Patch metrics on batches: sharpness, multiscale structural complexity, decoupled deraining metrics.

All three accept numpy arrays, CuPy arrays or torch tensors (CPU or CUDA) and return **host numpy float64 arrays of
N numbers** (one per patch), whatever the input's device: they are small, and callers sort, band or log them.

``backend``:

- ``"auto"``: the numba.cuda kernel for device inputs (CuPy / torch CUDA, no host copy of the images), the numba
  CPU kernel (parallel over patches) for host inputs;
- ``"cpu"``: numba CPU kernel (device inputs are copied to the host);
- ``"cuda"``: numba.cuda kernel (host inputs are copied to the device; under ``NUMBA_ENABLE_CUDASIM=1`` this runs
  numba's CUDA simulator, which is how the tests exercise it without a GPU);
- ``"reference"``: the slow plain-numpy reference (device inputs are copied to the host).

Definitions: DESIGN 3 and the docstrings of ``kernels.sharpness``, ``kernels.complexity``, ``kernels.decoupled``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.arrays import ArrayKind, check_nhwc_uint8, kind_of, to_backend
from kernels import complexity as _cx
from kernels import decoupled as _dc
from kernels import sharpness as _sh

BACKENDS = ("auto", "cpu", "cuda", "reference")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")


def _host(a: Any) -> np.ndarray:
    """C-contiguous host numpy array from a numpy or CuPy backend array."""
    if not isinstance(a, np.ndarray):
        a = a.get()
    return np.ascontiguousarray(a)


def _device(a: Any, kind: ArrayKind) -> Any:
    """Backend array for the numba.cuda path: CuPy arrays stay on the device (made C-contiguous there), numpy arrays
    are copied by the kernel wrapper."""
    if kind.on_gpu:
        import cupy

        return cupy.ascontiguousarray(a)
    return np.ascontiguousarray(a)


def _resolve(backend: str, kind: ArrayKind) -> str:
    _check_backend(backend)
    if backend == "auto":
        return "cuda" if kind.on_gpu else "cpu"
    return backend


def _per_patch(x: Any, backend: str, cpu, cuda_fn, reference, check_size) -> np.ndarray:
    kind = kind_of(x)
    check_nhwc_uint8(x, "x")
    backend = _resolve(backend, kind)
    n, h, w = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
    if n == 0:
        return np.empty(0, dtype=np.float64)
    check_size(h, w)
    a = to_backend(x, kind)
    if backend == "cuda":
        return cuda_fn(_device(a, kind))
    a = _host(a)
    return cpu(a) if backend == "cpu" else reference(a)


def sharpness(x: Any, backend: str = "auto") -> np.ndarray:
    """Sharpness per patch: ``Var(Laplacian(gray))`` (DESIGN 3).

    ``x``: uint8 NHWC [N, H, W, 3] RGB, 0..255. ``gray = 0.299 R + 0.587 G + 0.114 B`` in floating point (not
    rounded), 4-neighbour Laplacian with reflect-101 borders, population variance over the H * W values: equal to
    ``cv2.Laplacian(gray_float64, cv2.CV_64F).var()`` (the kernels compute it exactly in integers and round once).
    Returns float64 [N] on the host, in (0..255)^2 units. H * W up to 8,000,000 pixels, W up to 8192.
    """
    return _per_patch(x, backend, _sh.sharpness_cpu, _sh.sharpness_cuda, _sh.sharpness_reference, _sh.check_size)


def complexity(x: Any, backend: str = "auto") -> np.ndarray:
    """Multiscale structural complexity per patch (Bagrov et al., PNAS 2020; DESIGN 3).

    ``x``: uint8 NHWC [N, H, W, 3] RGB, scaled to 0..1; 2 x 2 block averaging down to one row or column; the three
    channels' overlaps summed (RGB as a 3-vector). Sizes that are not powers of two: an odd last row / column is
    dropped at each level. For power-of-two square patches the sum telescopes to half the summed per-channel
    variance of the 0..1 values (see ``kernels.complexity``). Returns float64 [N] on the host. H * W up to
    2,900,000 pixels.
    """
    return _per_patch(x, backend, _cx.complexity_cpu, _cx.complexity_cuda, _cx.complexity_reference,
                      _cx.check_size)


_OUTPUT_DTYPES = ("uint8", "float32", "float64")


def _dtype_name(a: Any) -> str:
    return str(a.dtype).replace("torch.", "")


def _check_decoupled(output: Any, rainy: Any, background: Any, mask: Any) -> None:
    dt = _dtype_name(output)
    shape = tuple(output.shape)
    if dt not in _OUTPUT_DTYPES:
        raise ValueError(f"output: expected NHWC [N, H, W, 3] uint8 or float32 / float64 on the 0..255 scale, "
                         f"got dtype {dt}")
    if len(shape) != 4 or shape[3] != 3:
        hint = " (NCHW given? expected channels last)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"output: expected NHWC [N, H, W, 3] (channels last), got shape {shape}{hint}")
    check_nhwc_uint8(rainy, "rainy")
    check_nhwc_uint8(background, "background")
    for name, a in (("rainy", rainy), ("background", background)):
        if tuple(a.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} does not match output's {shape}")
    mdt = _dtype_name(mask)
    if mdt != "bool":
        raise ValueError(f"mask: expected bool NHW [N, H, W], got dtype {mdt}")
    if tuple(mask.shape) != shape[:3]:
        raise ValueError(f"mask: expected shape [N, H, W] = {shape[:3]} matching output, got {tuple(mask.shape)}")


def decoupled(output: Any, rainy: Any, background: Any, mask: Any, backend: str = "auto") -> dict[str, np.ndarray]:
    """Decoupled deraining metrics per patch (DESIGN 3): ``{"E_R", "E_B", "rain_residual", "PSNR"}``.

    ``output``: the network's output O, NHWC [N, H, W, 3] on the 0..255 scale, uint8 or float32 / float64 (the
    trainer passes unquantized float outputs; they are used as given, not rounded or clipped). ``rainy`` I and
    ``background`` B: uint8 NHWC, same shape. ``mask`` M: bool NHW (``rain > t``), applied to all three channels.
    All four on the same side (host or device).

    - ``E_R = sqrt(sum M (O - I)^2 / sum M)``, higher is better (ceiling: with O = B);
    - ``E_B = sqrt(sum (1 - M) (O - B)^2 / sum (1 - M))``, lower is better;
    - ``rain_residual = sum M (O - B)^2 / sum M`` (a mean square, no root);
    - ``PSNR = 10 log10(255^2 / MSE(O, B))`` over all pixels and channels, in dB.

    Sums run over pixels and channels (``sum M`` counts 3 per masked pixel). Empty mask -> E_R and rain_residual
    NaN; full mask -> E_B NaN; O == B -> PSNR inf. Returns a dict of float64 [N] host numpy arrays.
    """
    kinds = [kind_of(a) for a in (output, rainy, background, mask)]
    _check_decoupled(output, rainy, background, mask)
    names = ("output", "rainy", "background", "mask")
    if len({k.on_gpu for k in kinds}) > 1:
        where = ", ".join(f"{nm} on {'GPU' if k.on_gpu else 'host'}" for nm, k in zip(names, kinds))
        raise ValueError(f"decoupled: inputs must all be on the host or all on the GPU, got {where}")
    backend = _resolve(backend, kinds[0])
    n, h, w, c = (int(s) for s in output.shape)
    if n == 0:
        return {k: np.empty(0, dtype=np.float64) for k in _dc.KEYS}
    arrs = [to_backend(a, k) for a, k in zip((output, rainy, background, mask), kinds)]
    if backend == "cuda":
        return _dc.finish(_dc.sums_cuda(*[_device(a, k) for a, k in zip(arrs, kinds)]), h, w, c)
    arrs = [_host(a) for a in arrs]
    if backend == "reference":
        return _dc.decoupled_reference(*arrs)
    return _dc.finish(_dc.sums_cpu(*arrs), h, w, c)
