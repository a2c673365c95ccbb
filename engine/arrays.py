"""Array interop: accept numpy, CuPy or torch (CPU or CUDA) batches, validate layouts, hand back the same kind.

Kernels work on numpy arrays (CPU) or on objects with ``__cuda_array_interface__`` (CuPy arrays, GPU). Device
inputs stay on the device: torch CUDA tensors are viewed as CuPy arrays through DLPack, never copied to the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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


def check_nhwc_uint8(x: Any, name: str, channels: int = 3) -> None:
    """Raise a ValueError naming ``name`` unless ``x`` is a uint8 [N, H, W, channels] batch (NHWC, 0..255)."""
    shape = tuple(x.shape)
    dtype = str(x.dtype).replace("torch.", "")
    if dtype != "uint8":
        raise ValueError(f"{name}: expected dtype uint8 (0..255) in NHWC layout [N, H, W, {channels}], got {dtype}")
    if len(shape) != 4:
        raise ValueError(f"{name}: expected a 4-d NHWC batch [N, H, W, {channels}] of uint8, got shape {shape}")
    if shape[3] != channels:
        hint = " (NCHW given? expected channels last)" if len(shape) == 4 and shape[1] == channels else ""
        raise ValueError(f"{name}: expected NHWC [N, H, W, {channels}] with {channels} channels last, "
                         f"got shape {shape}{hint}")


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
