"""Checking the loader's arguments: each ``resolve_*`` turns what a caller may pass into the one form the loader
uses, or raises ``LoaderError`` naming the argument and what was expected."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from engine.loader.order import MAX_SHUFFLE_INDEX

#: How a loader gets its patches onto the device (see ``engine.loader.api.Loader``).
MODES = ("auto", "resident", "dali")

#: Output types of the images and rain layer of a ``Batch``: float32 / bfloat16 / float16 in 0..1, uint8 in 0..255.
DTYPES = ("float32", "bfloat16", "float16", "uint8")


class LoaderError(ValueError):
    """Bad loader arguments: the message names the argument and what was expected."""


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi`` (no upper bound when ``hi`` is None); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LoaderError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise LoaderError(f"{name}: expected an integer {rng}, got {value}")
    return value


def resolve_store(store: Any):
    """A ``PatchStore`` from a path or an open store (anything with ``count``, ``patch_size`` and ``read``)."""
    from engine.data import store as store_mod

    if isinstance(store, (str, os.PathLike)):
        return store_mod.open_store(store)
    if all(hasattr(store, a) for a in ("count", "patch_size", "read")):
        return store
    raise LoaderError(f"store: expected a store path or an engine.data.store.PatchStore, got {type(store).__name__}")


def resolve_subset(store: Any, subset: Any) -> np.ndarray:
    """Store indices of ``subset``.

    Parameters
    ----------
    store : PatchStore
        The store the indices refer to.
    subset : None, Subset, path or array of int
        None (all patches), an ``engine.data.select.Subset``, a path to a subset JSON, or store indices (numpy,
        torch or a sequence).

    Returns
    -------
    numpy.ndarray
        int64 [n] unique store indices in the order given. Mismatched stores, out-of-range, duplicate or
        non-integer indices raise.
    """
    if subset is None:
        return np.arange(store.count, dtype=np.int64)
    if isinstance(subset, (str, os.PathLike)):
        from engine.data.select import load_subset

        subset = load_subset(subset)
    if hasattr(subset, "indices") and hasattr(subset, "store_fingerprint"):
        from engine.data.select import check_subset

        check_subset(store, subset)  # raises when the subset was selected from another store
        subset = subset.indices
    if type(subset).__module__.split(".")[0] == "torch":
        subset = subset.detach().cpu().numpy()
    arr = np.asarray(subset)
    if arr.ndim != 1:
        raise LoaderError(f"subset: expected a 1-d array of store indices, got shape {arr.shape}")
    if arr.size == 0:
        raise LoaderError("subset: is empty; expected at least one store index")
    if not np.issubdtype(arr.dtype, np.integer):
        raise LoaderError(f"subset: expected integer store indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= store.count:
        raise LoaderError(f"subset: store indices must lie in 0..{store.count - 1} (the store holds {store.count} "
                          f"patches), got {lo}..{hi}; was the subset selected from another store?")
    if np.unique(arr).size != arr.size:
        raise LoaderError("subset: holds duplicate store indices; an epoch visits each patch exactly once")
    if hi > MAX_SHUFFLE_INDEX:
        raise LoaderError(f"subset: store indices above {MAX_SHUFFLE_INDEX} are not supported")
    return arr


def resolve_rain(rain: Any):
    """A ``RainSpec`` (or None for no rain) from a spec, a preset name or a spec string."""
    from engine.rain import RainSpec

    if rain is None or isinstance(rain, RainSpec):
        return rain
    if isinstance(rain, str):
        try:
            return RainSpec.parse(rain)
        except ValueError as err:
            raise LoaderError(f"rain: {err}") from None
    raise LoaderError(f"rain: expected a RainSpec, a preset name or spec string, or None; got {type(rain).__name__}")


def resolve_device(device: Any):
    """A ``torch.device`` for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device; CUDA must be usable."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoaderError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise LoaderError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderError(f"device: {device!r} asked for but torch sees no CUDA GPU; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise LoaderError(f"device: {device!r} does not exist; {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: Any) -> str:
    """The name in ``DTYPES`` of ``dtype`` (a name such as ``"bfloat16"`` or a torch dtype)."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else ""
    if name not in DTYPES:
        raise LoaderError(f"dtype: expected one of {', '.join(DTYPES)} (or the torch dtype), got {dtype!r}")
    return name


__all__ = ["DTYPES", "MODES", "LoaderError", "check_int", "resolve_device", "resolve_dtype", "resolve_rain",
           "resolve_store", "resolve_subset"]
