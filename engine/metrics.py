"""Patch metrics on batches: sharpness, multiscale structural complexity, decoupled deraining metrics.

All three accept numpy arrays, CuPy arrays or torch tensors (CPU or CUDA) and return **host numpy float64 arrays of
N numbers** (one per patch), whatever the input's device: they are small, and callers sort, band or log them.

``backend`` (``engine.arrays.resolve_backend``):

- ``"auto"``: the numba.cuda kernel for device inputs (CuPy / torch CUDA, no host copy of the images), the numba
  CPU kernel (parallel over patches) for host inputs;
- ``"cpu"``: numba CPU kernel (device inputs are copied to the host);
- ``"cuda"``: numba.cuda kernel (host inputs are copied to the device; under ``NUMBA_ENABLE_CUDASIM=1`` this runs
  numba's CUDA simulator, which is how the tests exercise it without a GPU);
- ``"reference"``: the slow plain-numpy reference (device inputs are copied to the host).

Definitions: the docstrings below and those of ``kernels.sharpness``, ``kernels.complexity``, ``kernels.decoupled``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from engine.arrays import ArrayKind, check_array, kind_of, resolve_backend, to_backend
from kernels import complexity as complexity_kernels
from kernels import decoupled as decoupled_kernels
from kernels import sharpness as sharpness_kernels

#: dtypes ``decoupled`` accepts for the network's output (0..255 scale).
OUTPUT_DTYPES = ("uint8", "float32", "float64")


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


def _per_patch(x: Any, backend: str, cpu: Callable, cuda_fn: Callable, reference: Callable,
               check_size: Callable[[int, int], None]) -> np.ndarray:
    kind = kind_of(x)
    check_array(x, "x", ("uint8",), "NHWC")
    backend = resolve_backend(backend, kind.on_gpu, host_copy=True)
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
    """Sharpness per patch: the variance of the Laplacian of the gray image.

    ``gray = 0.299 R + 0.587 G + 0.114 B`` in floating point (not rounded), 4-neighbour Laplacian
    ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` with reflect-101 borders, population variance over the H * W values:
    equal to ``cv2.Laplacian(gray_float64, cv2.CV_64F).var()`` (the kernels compute it exactly in integers and
    round once, ``kernels.sharpness``).

    Parameters
    ----------
    x : numpy.ndarray, cupy.ndarray or torch.Tensor
        uint8 NHWC [N, H, W, 3] RGB, 0..255, on the host or a CUDA device. H * W up to 8,000,000 pixels, W up to
        8192.
    backend : {"auto", "cpu", "cuda", "reference"}
        See the module docstring.

    Returns
    -------
    numpy.ndarray
        float64 [N] on the host, in (0..255)^2 units.

    References
    ----------
    The variance of the Laplacian as a focus measure: Pech-Pacheco, Cristobal, Chamorro-Martinez,
    Fernandez-Valdivia, "Diatom autofocusing in brightfield microscopy: a comparative study", ICPR 2000. Its
    low / medium / high bands as an axis of the training data: Hu, You, Gu, Zhu, Xue, Dong, "Revisiting the
    Generalization Problem of Low-level Vision Models Through the Lens of Image Deraining" (journal extension of Gu
    et al., "Networks are Slacking Off: Understanding Generalization Problem in Image Deraining", NeurIPS 2023,
    arXiv:2305.14709).
    """
    k = sharpness_kernels
    return _per_patch(x, backend, k.sharpness_cpu, k.sharpness_cuda, k.sharpness_reference, k.check_size)


def complexity(x: Any, backend: str = "auto", levels: tuple[int, int] | None = None) -> np.ndarray:
    """Multiscale structural complexity per patch.

    Values scaled to 0..1; 2 x 2 block averaging down to one row or column; at each level ``|O_{k,k+1} - (O_{k,k} +
    O_{k+1,k+1}) / 2|`` summed, with the three channels' overlaps summed (RGB as a 3-vector). Sizes that are not
    powers of two: an odd last row / column is dropped at each level. For power-of-two square patches the sum
    telescopes to half the summed per-channel variance of the 0..1 values (``kernels.complexity``).

    Parameters
    ----------
    x : numpy.ndarray, cupy.ndarray or torch.Tensor
        uint8 NHWC [N, H, W, 3] RGB, 0..255, on the host or a CUDA device. H * W up to 2,900,000 pixels.
    backend : {"auto", "cpu", "cuda", "reference"}
        See the module docstring.
    levels : pair of int (start, steps), optional
        Sum only the per-level terms ``T_k`` of ``complexity_profile`` for ``start <= k < start + steps`` (added left
        to right), as the ``compl_start`` / ``compl_steps`` options of the authors' C++ program. ``start >= 0``,
        ``steps >= 1``, ``start + steps <= L`` (the patch size's number of levels) or a ValueError. None (default):
        the full range, computed by the full-range kernel.

    Returns
    -------
    numpy.ndarray
        float64 [N] on the host (dimensionless, values on the 0..1 scale).

    Notes
    -----
    Which setting reproduces which published code (a mapping of parameters): the full range (``levels=None``, or
    ``levels=(0, L)``, equal to it bit for bit on the CPU) is Bagrov et al.'s definition and the authors' C++
    program (github.com/IakovlevIA/structural-complexity) with ``compl_start = 0`` and ``compl_steps >= L``; the C++
    program's default ``compl_steps = 8`` from level 0 is ``levels=(0, 8)``; the other public (Python) port, which
    stops at ``log2(N) - 2`` for N x N patches, is ``levels=(0, log2(N) - 2)``.

    References
    ----------
    Bagrov, Iakovlev, Iliasov, Katsnelson, Mazurenko, "Multiscale structural complexity of natural patterns",
    PNAS 117(48):30241-30251, 2020, doi:10.1073/pnas.2004976117.
    """
    k = complexity_kernels
    if levels is not None:
        check_array(x, "x", ("uint8",), "NHWC")
        k.check_levels(levels, k.num_levels(int(x.shape[1]), int(x.shape[2])))
        return complexity_from_profile(complexity_profile(x, backend), levels)
    return _per_patch(x, backend, k.complexity_cpu, k.complexity_cuda, k.complexity_reference, k.check_size)


def complexity_profile(x: Any, backend: str = "auto") -> np.ndarray:
    """Per-level terms of the multiscale structural complexity, per patch.

    ``T_k = |O_{k,k+1} - (O_{k,k} + O_{k+1,k+1}) / 2| = mean |f_k - f_{k+1}|^2 / 2`` for ``k = 0 .. L-1``, with
    ``f_0`` the patch scaled to 0..1 and ``f_{k+1}`` the 2 x 2 block average of ``f_k`` (odd last row / column
    dropped); see ``complexity``. The terms added left to right give ``complexity(x)``.

    Parameters
    ----------
    x : numpy.ndarray, cupy.ndarray or torch.Tensor
        As for ``complexity``: uint8 NHWC [N, H, W, 3] RGB, 0..255, host or CUDA device, H * W <= 2,900,000.
    backend : {"auto", "cpu", "cuda", "reference"}
        As for ``complexity`` (the CUDA kernel reduces each level over a block's threads on its own, so its terms
        can differ from the CPU's in the last bits).

    Returns
    -------
    numpy.ndarray
        float64 [N, L] on the host (dimensionless, values on the 0..1 scale). ``L = floor(log2(min(H, W)))``, the
        number of 2 x 2 coarsenings until one row or column (0 when H or W is 1): 7 for 128 x 128, 4 for 16 x 24.
    """
    k = complexity_kernels
    check_array(x, "x", ("uint8",), "NHWC")
    n_levels = k.num_levels(int(x.shape[1]), int(x.shape[2]))
    if int(x.shape[0]) == 0:
        return np.empty((0, n_levels), dtype=np.float64)
    return _per_patch(x, backend, k.complexity_profile_cpu, k.complexity_profile_cuda,
                      k.complexity_profile_reference, k.check_size)


def complexity_levels(h: int, w: int) -> int:
    """Number of levels ``L`` of an H x W patch's complexity profile: ``floor(log2(min(H, W)))``, 0 when H or W is
    below 2."""
    return complexity_kernels.num_levels(h, w)


def complexity_from_profile(profile: Any, levels: tuple[int, int] | None = None) -> np.ndarray:
    """Complexity from per-level terms: the terms ``start <= k < start + steps`` added left to right.

    Parameters
    ----------
    profile : array_like of float
        float64 [N, L], ``complexity_profile``'s output (dimensionless, 0..1 scale), e.g. a store's
        ``complexity_profile``.
    levels : pair of int (start, steps), optional
        As in ``complexity``; None: all L levels (then bit for bit equal to ``complexity(x, backend="cpu")``).

    Returns
    -------
    numpy.ndarray
        float64 [N].
    """
    profile = np.asarray(profile, dtype=np.float64)
    if profile.ndim != 2:
        raise ValueError(f"profile: expected float64 [N, L] per-level terms, got shape {profile.shape}")
    if levels is None:
        return complexity_kernels.sum_levels(profile)
    k0, k1 = complexity_kernels.check_levels(levels, profile.shape[1])
    return complexity_kernels.sum_levels(profile, k0, k1)


def _check_decoupled(output: Any, rainy: Any, background: Any, mask: Any) -> None:
    check_array(output, "output", OUTPUT_DTYPES, "NHWC")
    shape = tuple(int(s) for s in output.shape)
    check_array(rainy, "rainy", ("uint8",), "NHWC", shape=shape, shape_of="output")
    check_array(background, "background", ("uint8",), "NHWC", shape=shape, shape_of="output")
    check_array(mask, "mask", ("bool",), "NHW", shape=shape[:3], shape_of="output")


def decoupled(output: Any, rainy: Any, background: Any, mask: Any, backend: str = "auto") -> dict[str, np.ndarray]:
    """Decoupled deraining metrics per patch: ``{"E_R", "E_B", "rain_residual", "PSNR"}``.

    - ``E_R = sqrt(sum M (O - I)^2 / sum M)``, higher is better (ceiling: with O = B);
    - ``E_B = sqrt(sum (1 - M) (O - B)^2 / sum (1 - M))``, lower is better;
    - ``rain_residual = sum M (O - B)^2 / sum M`` (a mean square, no root);
    - ``PSNR = 10 log10(255^2 / MSE(O, B))`` over all pixels and channels, in dB.

    Sums run over pixels and channels (``sum M`` counts 3 per masked pixel). Empty mask -> E_R and rain_residual
    NaN; full mask -> E_B NaN; O == B -> PSNR inf.

    For the noise families (``kernels.noise``) M is the set of corrupted pixels, so E_R measures the output on the
    corrupted pixels and E_B on the untouched ones. salt-pepper corrupts a few percent of the pixels and leaves both
    defined; gaussian-noise corrupts every pixel, so there E_B is NaN (no clean pixel to preserve) and E_R is the
    RMS of ``O - I`` over the whole image.

    Parameters
    ----------
    output : numpy.ndarray, cupy.ndarray or torch.Tensor
        The network's output O, NHWC [N, H, W, 3] on the 0..255 scale, uint8 or float32 / float64 (unquantized
        float outputs are used as given, not rounded or clipped).
    rainy : array
        The rainy input I, uint8 NHWC [N, H, W, 3], 0..255.
    background : array
        The ground truth B, uint8 NHWC [N, H, W, 3], 0..255.
    mask : array
        The rain mask M (``rain > t``), bool NHW [N, H, W], applied to all three channels.
    backend : {"auto", "cpu", "cuda", "reference"}
        See the module docstring. All four inputs must be on the same side (host or device).

    Returns
    -------
    dict of str to numpy.ndarray
        float64 [N] host arrays under ``"E_R"``, ``"E_B"``, ``"rain_residual"`` (0..255 units, squared for the
        residual) and ``"PSNR"`` (dB).

    References
    ----------
    Hu, You, Gu, Zhu, Xue, Dong, "Revisiting the Generalization Problem of Low-level Vision Models Through the Lens
    of Image Deraining" (journal extension of Gu et al., "Networks are Slacking Off: Understanding Generalization
    Problem in Image Deraining", NeurIPS 2023, arXiv:2305.14709).
    """
    kinds = [kind_of(a) for a in (output, rainy, background, mask)]
    _check_decoupled(output, rainy, background, mask)
    names = ("output", "rainy", "background", "mask")
    if len({k.on_gpu for k in kinds}) > 1:
        where = ", ".join(f"{nm} on {'GPU' if k.on_gpu else 'host'}" for nm, k in zip(names, kinds))
        raise ValueError(f"decoupled: inputs must all be on the host or all on the GPU, got {where}")
    backend = resolve_backend(backend, kinds[0].on_gpu, host_copy=True)
    n, h, w, c = (int(s) for s in output.shape)
    dk = decoupled_kernels
    if n == 0:
        return {k: np.empty(0, dtype=np.float64) for k in dk.KEYS}
    arrs = [to_backend(a, k) for a, k in zip((output, rainy, background, mask), kinds)]
    if backend == "cuda":
        return dk.finish(dk.sums_cuda(*[_device(a, k) for a, k in zip(arrs, kinds)]), h, w, c)
    arrs = [_host(a) for a in arrs]
    if backend == "reference":
        return dk.decoupled_reference(*arrs)
    return dk.finish(dk.sums_cpu(*arrs), h, w, c)
