"""Array interop: accept numpy, CuPy or torch (CPU or CUDA) batches, validate layouts, hand back the same kind.

Kernels work on numpy arrays (CPU) or on objects with ``__cuda_array_interface__`` (CuPy arrays, GPU). Device
inputs stay on the device: torch CUDA tensors are viewed as CuPy arrays through DLPack, never copied to the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Backends of the public entry points: "auto" picks "cuda" for device inputs and "cpu" for host inputs.
BACKENDS = ("auto", "cpu", "cuda", "reference")

_DIMS = {"NHWC": "[N, H, W, {c}]", "NHW": "[N, H, W]"}


@dataclass(frozen=True)
class ArrayKind:
    """Where an input came from, so outputs can be returned in the same form."""

    library: str  # "numpy" | "cupy" | "torch"
    on_gpu: bool
    torch_device: Any = None


def kind_of(x: Any) -> ArrayKind:
    """Classify ``x`` as a numpy array, CuPy array or torch tensor."""
    if isinstance(x, np.ndarray):
        return ArrayKind("numpy", False)
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return ArrayKind("torch", x.device.type == "cuda", x.device)
    if mod == "cupy":
        return ArrayKind("cupy", True)
    raise TypeError(f"expected a numpy array, CuPy array or torch tensor, got {type(x).__name__}")


def to_backend(x: Any, kind: ArrayKind):
    """numpy array for CPU inputs, CuPy array for GPU inputs (zero-copy for torch tensors)."""
    if kind.library == "numpy":
        return x
    if kind.library == "cupy":
        return x
    if kind.on_gpu:
        import cupy

        return cupy.from_dlpack(x.detach().contiguous())
    return x.detach().contiguous().numpy()


def from_backend(a, kind: ArrayKind):
    """Return backend array ``a`` in the input's form (torch tensors on the input's device)."""
    if kind.library != "torch":
        return a
    import torch

    if kind.on_gpu:
        return torch.from_dlpack(a)
    return torch.from_numpy(np.ascontiguousarray(a))


def xp_of(kind: ArrayKind):
    """The array module for the backend arrays of ``kind``: numpy or cupy."""
    if kind.on_gpu:
        import cupy

        return cupy
    return np


def dtype_name(x: Any) -> str:
    """numpy-style dtype name of a numpy array, CuPy array or torch tensor (``"uint8"``, ``"float32"``, ``"bool"``)."""
    return str(x.dtype).replace("torch.", "")


def check_array(x: Any, name: str, dtypes: tuple[str, ...] = ("uint8",), layout: str = "NHWC", channels: int = 3,
                shape: tuple[int, ...] | None = None, shape_of: str = "") -> None:
    """Raise a ValueError naming ``name`` unless ``x`` is a batch of one of ``dtypes`` in ``layout``.

    Parameters
    ----------
    x : numpy.ndarray, cupy.ndarray or torch.Tensor
        The array to check (any device).
    name : str
        The argument's name, for the message.
    dtypes : tuple of str
        Accepted dtype names (numpy spelling, e.g. ``("uint8",)`` or ``("bool",)``).
    layout : {"NHWC", "NHW"}
        ``"NHWC"``: 4-d [N, H, W, channels], channels last; ``"NHW"``: 3-d [N, H, W].
    channels : int
        Channels of an NHWC batch.
    shape : tuple of int, optional
        The exact shape required (e.g. another input's), named ``shape_of`` in the message.
    """
    got = tuple(int(s) for s in x.shape)
    dt = dtype_name(x)
    dims = _DIMS[layout].format(c=channels)
    kinds = " or ".join(dtypes)
    if dt not in dtypes:
        raise ValueError(f"{name}: expected dtype {kinds} in {layout} layout {dims}, got dtype {dt} (shape {got})")
    if len(got) != len(layout):
        raise ValueError(f"{name}: expected a {len(layout)}-d {layout} batch {dims} of {kinds}, got shape {got}")
    if layout == "NHWC" and got[3] != channels:
        hint = " (NCHW given? expected channels last)" if got[1] == channels else ""
        raise ValueError(f"{name}: expected {layout} {dims} with {channels} channels last, got shape {got}{hint}")
    if shape is not None and got != tuple(shape):
        raise ValueError(f"{name}: shape {got} does not match {shape_of}'s {tuple(shape)} ({layout} {dims})")


def check_nhwc_uint8(x: Any, name: str, channels: int = 3) -> None:
    """``check_array`` for a uint8 NHWC batch [N, H, W, channels] (0..255)."""
    check_array(x, name, ("uint8",), "NHWC", channels)


def resolve_backend(backend: str, on_gpu: bool, host_copy: bool) -> str:
    """The backend that runs: ``"cpu"``, ``"cuda"`` or ``"reference"``.

    ``backend`` is one of ``BACKENDS``; ``"auto"`` is ``"cuda"`` for inputs on the GPU (``on_gpu``) and ``"cpu"``
    otherwise. ``host_copy``: whether a host backend may copy device inputs to the host; without it, asking for
    ``"cpu"`` or ``"reference"`` with device inputs is a ValueError (an entry point that writes its outputs on the
    input's device).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "cuda" if on_gpu else "cpu"
    if on_gpu and not host_copy and backend in ("cpu", "reference"):
        raise ValueError(f"backend {backend!r} works on host arrays; the inputs are on the GPU "
                         f"(use backend='auto' or 'cuda', or move them to the host)")
    return backend


def check_keys(keys: Any, n: int) -> np.ndarray:
    """int64 keys, one per patch, as a host numpy array."""
    if hasattr(keys, "get") and type(keys).__module__.startswith("cupy"):
        keys = keys.get()
    elif type(keys).__module__.split(".")[0] == "torch":
        keys = keys.detach().cpu().numpy()
    k = np.asarray(keys)
    if k.ndim != 1 or k.shape[0] != n:
        raise ValueError(f"keys: expected {n} int64 keys (one per patch), got shape {k.shape}")
    if k.size and not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"keys: expected integers (int64), got dtype {k.dtype}")
    return k.astype(np.int64, copy=False)
