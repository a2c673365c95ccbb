"""The batch's output planes: their types, the uint8 -> 0..1 conversion, and the host memory they are written to.

A batch's images and rain layer come in one of ``DTYPES``: float32 holds ``v / 255`` of each uint8 value ``v``
(the IEEE quotient, 0..1); bfloat16 and float16 hold that float32 value rounded to nearest (ties to even), i.e.
exactly ``float32_batch.to(dtype)``, at half the bytes; uint8 holds ``v`` itself (0..255, a quarter of the bytes,
no float conversion on the host at all), which ``to_unit`` turns into exactly the float batch on any device.

Why the smaller types: the host conversion is bound by memory writes. A float32 batch writes 458,752 bytes per
128 x 128 patch (background, rainy, rain), 6.9 GB/s at 15,000 patches/s, about what one core of a 2-core machine
fills.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from engine.loader.args import LoaderError, resolve_dtype

#: uint8 value v -> float32(v) / 255, exactly what ``x.float() / 255`` gives on the CPU (IEEE division).
UNIT_VALUES = np.arange(256, dtype=np.float32) / np.float32(255.0)

#: numpy type the CPU kernels write for each output dtype: 16-bit floats as their bit patterns, which torch views
#: as bfloat16 / float16; int16 for bfloat16 and uint16 for float16 is how ``kernels.finish`` tells the two apart.
STORAGE = {"float32": np.float32, "bfloat16": np.int16, "float16": np.uint16, "uint8": np.uint8}

_TABLES: dict[str, Any] = {}


def torch_dtype(dtype: Any):
    """The torch dtype of ``dtype`` (a name in ``DTYPES`` or a torch dtype)."""
    import torch

    return getattr(torch, resolve_dtype(dtype))


def unit_table(device: Any, dtype: Any = "float32"):
    """The conversion table of ``dtype``, a torch tensor [256] of that dtype on ``device``.

    Entry ``v`` is the value a uint8 ``v`` (0..255) becomes in a batch of ``dtype``: ``float32(v) / 255`` (0..1)
    rounded to ``dtype`` by torch for the float types, ``v`` for uint8. Cached per device and dtype.
    """
    import torch

    name = resolve_dtype(dtype)
    key = f"{device}/{name}"
    if key not in _TABLES:
        if name == "uint8":
            _TABLES[key] = torch.arange(256, dtype=torch.uint8, device=device)
        else:
            _TABLES[key] = torch.from_numpy(UNIT_VALUES).to(device).to(torch_dtype(name))
    return _TABLES[key]


def unit_by_lut(x, lut):
    """``lut[x]`` of a uint8 torch tensor ``x`` (any layout, any device) as a contiguous tensor of ``x``'s shape on
    ``lut``'s device.

    With ``lut = unit_table(device, "float32")`` this is ``x / 255`` in float32. Why not ``x.float() / 255``: CUDA
    divides by a scalar as a multiplication by its reciprocal, which differs from the true quotient in the last bit
    for 126 of the 256 values; the table gives the CPU kernels' values bit for bit on every device.
    """
    return lut[x.to(lut.device, non_blocking=True).int()].contiguous()


def to_unit(x, dtype: Any = "float32"):
    """A loader ``dtype="uint8"`` tensor as the tensor the loader would have given with ``dtype``.

    For a trainer that takes uint8 batches (a quarter of the host-to-GPU bytes) and converts on its GPU:
    ``rainy = to_unit(batch.rainy.to("cuda", non_blocking=True))``. Prefer it over ``x.float() / 255``, which on
    CUDA multiplies by 1/255 and is off in the last bit for about half of the values.

    Parameters
    ----------
    x : torch.Tensor
        uint8 (0..255), any layout (NCHW images, N1HW rain layers, ...), any device.
    dtype : str or torch.dtype
        A name in ``DTYPES`` or the torch dtype; float32 by default.

    Returns
    -------
    torch.Tensor
        Contiguous, on ``x``'s device, ``x``'s shape: ``float32(v) / 255`` (0..1) rounded to ``dtype`` for the
        float types, ``x`` itself for uint8.
    """
    name = resolve_dtype(dtype)
    if str(x.dtype) != "torch.uint8":
        raise LoaderError(f"x: expected a uint8 torch tensor (0..255, a loader dtype='uint8' batch), got {x.dtype}")
    if name == "uint8":
        return x.contiguous()
    return unit_by_lut(x, unit_table(x.device, name))


class HostPool:
    """Host buffers for batch planes, recycled once the caller has let go of them.

    Fresh batch buffers cost a page fault and the kernel's zeroing per 4 KiB (as much CPU as the conversion itself).
    Each buffer is a numpy array wrapped by ``torch.from_numpy``; torch keeps a reference to the array as long as
    any tensor or view of that storage lives (``.numpy()`` views hold the tensor, so they count too). An array whose
    reference count is back to the pool's own is therefore unused and can be handed out again.
    """

    SLOTS = 6  # buffers per shape: enough for a consumer that holds a few batches (prefetch, logging)
    SHAPES = 4  # shapes remembered (full batch, the last partial one, ...)

    def __init__(self) -> None:
        self._slots: dict[tuple, list[np.ndarray]] = {}
        self._free_refs: int | None = None

    @staticmethod
    def _refs(slots: list[np.ndarray], i: int) -> int:
        return sys.getrefcount(slots[i])

    def empty(self, shape: tuple, dtype) -> Any:
        """An uninitialized CPU torch tensor of ``shape`` and numpy ``dtype`` that nobody else holds."""
        import torch

        key = (tuple(shape), np.dtype(dtype).str)
        slots = self._slots.get(key)
        if slots is None:
            while len(self._slots) >= self.SHAPES:
                self._slots.pop(next(iter(self._slots)))
            slots = self._slots[key] = []
        if self._free_refs is not None:
            for i in range(len(slots)):
                if self._refs(slots, i) == self._free_refs:
                    return torch.from_numpy(slots[i])
        arr = np.empty(shape, dtype=dtype)
        if len(slots) < self.SLOTS:
            slots.append(arr)
            if self._free_refs is None:  # what _refs reports for a slot nobody else holds (the list and `arr`)
                self._free_refs = self._refs(slots, len(slots) - 1) - 1
        return torch.from_numpy(arr)


class Scratch:
    """A loader's reusable host memory: the uint8 rain layer of one batch (an intermediate step before the output
    planes) and the pool of output buffers."""

    def __init__(self) -> None:
        self._rain: np.ndarray | None = None
        self.pool = HostPool()

    def rain(self, n: int, h: int, w: int) -> np.ndarray:
        """uint8 [n, h, w] (NHW, 0..255) for a batch's rain layer; the same array while the shape stays."""
        if self._rain is None or self._rain.shape != (n, h, w):
            self._rain = np.empty((n, h, w), dtype=np.uint8)
        return self._rain


__all__ = ["STORAGE", "UNIT_VALUES", "HostPool", "Scratch", "to_unit", "torch_dtype", "unit_by_lut",
           "unit_table"]
