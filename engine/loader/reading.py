"""Reading a batch of uint8 NHWC patches from a store into a caller's buffer (resident loading and the DALI source).

``engine.data.store.PatchStore.read(index, out=...)`` writes straight into the buffer; a store whose ``read`` takes
no ``out`` (a test double, another store type) returns its patches, which are checked and copied.
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from engine.arrays import check_nhwc_uint8
from engine.loader.args import LoaderError


def reads_in_place(store: Any) -> bool:
    """Whether ``store.read`` takes an ``out=`` buffer to read into."""
    try:
        return "out" in inspect.signature(store.read).parameters
    except (TypeError, ValueError):
        return False


def checked_patches(part: Any, shape: tuple) -> np.ndarray:
    """``part`` (what ``store.read`` returned) as a numpy array, if it is uint8 NHWC of ``shape``.

    Raises
    ------
    LoaderError
        Naming the store and what was expected, for another dtype, layout or shape.
    """
    part = np.asarray(part)
    try:
        check_nhwc_uint8(part, "store: read()")
    except ValueError as err:
        raise LoaderError(str(err)) from None
    if part.shape != tuple(shape):
        raise LoaderError(f"store: read() returned shape {part.shape}; expected uint8 {list(shape)}")
    return part


def read_patches(store: Any, index: np.ndarray, out: np.ndarray, in_place: bool | None = None) -> None:
    """Read the patches ``index`` of ``store`` into ``out``.

    Parameters
    ----------
    store : PatchStore
        Anything with ``read(index)`` returning uint8 [n, P, P, 3] NHWC patches (0..255).
    index : numpy.ndarray
        int64 [n] store indices.
    out : numpy.ndarray
        uint8 [n, P, P, 3] NHWC, C-contiguous, written.
    in_place : bool, optional
        ``reads_in_place(store)``, when the caller has it already (computed when None).
    """
    if in_place is None:
        in_place = reads_in_place(store)
    if in_place:
        store.read(index, out=out)  # straight into place, no temporary
    else:
        np.copyto(out, checked_patches(store.read(index), out.shape))


__all__ = ["checked_patches", "read_patches", "reads_in_place"]
