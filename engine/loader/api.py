"""The loader's entry points: ``Loader`` (one store subset, any number of epochs) and ``batches`` (one epoch, with
the loaders cached across calls).

Modes: ``resident`` reads the subset once into device memory (``engine.loader.resident``) and gathers each batch by
index there; ``dali`` streams batches from the store through an NVIDIA DALI pipeline (``engine.loader.dali``);
``auto`` is resident when the subset fits ``memory_budget`` (default ``DEFAULT_MEMORY_BUDGET``), otherwise dali
(resident, with a RuntimeWarning, when DALI is missing). Once the uint8 batch is on the device every mode runs the
same code (``engine.loader.batch.finish_batch``), so every mode and device gives the same batches.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import engine.loader.dali as dali
from engine.loader.args import (MODES, LoaderError, check_int, resolve_device, resolve_dtype, resolve_rain,
                                resolve_store, resolve_subset)
from engine.loader.batch import Batch, finish_batch
from engine.loader.order import MAX_EPOCH, epoch_order, shard_batches
from engine.loader.planes import Scratch
from engine.loader.resident import ResidentData

#: Resident mode is chosen by ``mode="auto"`` when the subset's uint8 patches take at most this many bytes on the
#: device (override with ``memory_budget=``). 2 GiB holds the largest sweep point (30,000 patches of
#: 128 x 128 x 3 = 1.47 GB) on a GPU and is harmless in host RAM.
DEFAULT_MEMORY_BUDGET = 2 << 30

log = logging.getLogger("rainsweep.loader")

# The arguments Loader and batches share (batches adds ``epoch`` after ``seed``), in numpydoc form.
_ARGS_DATA = """
    Parameters
    ----------
    store : str, os.PathLike or PatchStore
        A store path or an open ``engine.data.store.PatchStore`` (uint8 patches [N, P, P, 3] NHWC, 0..255).
    subset : None, Subset, str, os.PathLike or array of int
        None (every patch), an ``engine.data.select.Subset``, a path to a subset JSON, or unique store indices.
    batch_size : int
        Patches per batch (>= 1).
    rain : RainSpec, str or None
        A ``RainSpec``, a preset name or spec string (``RainSpec.parse``), or None for no rain (rainy equals
        background, rain is zeros, mask all False).
    seed : int
        Seeds both the shuffle and the rain (an int64).
"""
_ARGS_RUN = """    device : str or torch.device
        "cpu", "cuda", "cuda:N" or a torch.device: where the tensors (and the rain synthesis) live.
    mode : str
        One of ``MODES``: "resident" (subset loaded once into device memory, gathered by index), "dali" (NVIDIA
        DALI pipeline reading the store; CPU pipeline without a GPU, GPU output with one) or "auto" (resident when
        the subset's uint8 patches fit ``memory_budget`` bytes, else dali; resident when DALI is missing). Every
        mode yields the same batches.
    drop_last : bool
        Drop the last partial batch (and, with shards, equalize batch counts across shards).
    shard_id, num_shards : int
        This rank's share of each epoch: batch ``b`` goes to shard ``b % num_shards``.
    memory_budget : int
        Bytes of uint8 patches up to which ``mode="auto"`` picks resident (default 2 GiB).
    workers : int or None
        DALI parallel reader processes (None: 0 for a CPU device, where reading is cheap next to rain synthesis,
        else min(8, cores / 2); 0: read in this process, on the loader's DALI feed thread).
    threads : int
        DALI CPU threads, and threads splitting one store read (torch and numba threads are the caller's to set).
    dtype : str or torch.dtype
        Type of ``background``, ``rainy`` and ``rain`` (a name in ``DTYPES`` or the torch dtype): "float32"
        (default, 0..1 = uint8 / 255), "bfloat16" / "float16" (0..1, that float32 value rounded to nearest even:
        half the bytes), "uint8" (raw 0..255, a quarter of the bytes; ``to_unit(t)`` gives the float32 values
        exactly, on any device). Images are NCHW, the rain layer and mask N1HW; ``mask`` is always bool.
"""


class Loader:
    __doc__ = """Batches of one store subset for any number of epochs.

    Keeps its state between epochs: the resident patches, or the DALI pipeline. Epoch order, shards and rain keys
    are pure functions of ``(seed, epoch)`` and the subset (``engine.loader.order``).
""" + _ARGS_DATA + _ARGS_RUN + """
    Attributes
    ----------
    mode : str
        The mode in use, "resident" or "dali" (``auto`` resolved); ``note`` says why when ``auto`` chose.
    indices : numpy.ndarray
        int64 store indices of the subset, in the order given.
    device : torch.device
        Where batches live.
    dtype : str
        Output type name, one of ``DTYPES``.

    Examples
    --------
    >>> with Loader("store.zarr", batch_size=64, rain="medium", device="cuda") as loader:  # doctest: +SKIP
    ...     for epoch in range(10):
    ...         for batch in loader.epoch(epoch):
    ...             step(batch.rainy, batch.background)
    """

    def __init__(self, store: Any, subset: Any = None, batch_size: int = 16, rain: Any = "medium", seed: int = 0,
                 device: Any = "cpu", mode: str = "auto", drop_last: bool = False, shard_id: int = 0,
                 num_shards: int = 1, memory_budget: int = DEFAULT_MEMORY_BUDGET, workers: int | None = None,
                 threads: int = 2, dtype: Any = "float32") -> None:
        if mode not in MODES:
            raise LoaderError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_shards = check_int("num_shards", num_shards, 1)
        self.shard_id = check_int("shard_id", shard_id, 0, self.num_shards - 1)
        self.seed = check_int("seed", seed, -(1 << 63), (1 << 63) - 1)  # an int64, like the rain seed
        self.memory_budget = check_int("memory_budget", memory_budget, 0)
        self.threads = check_int("threads", threads, 1)
        if workers is not None:
            workers = check_int("workers", workers, 0)
        self.workers = workers
        self.drop_last = bool(drop_last)
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        self.rain = resolve_rain(rain)
        self.store = resolve_store(store)
        self.indices = resolve_subset(self.store, subset)
        self.patch_size = int(self.store.patch_size)
        self.note = ""
        self.mode = self._choose_mode(mode)
        if self.note:
            log.info("loader: %s", self.note)
        self._resident: ResidentData | None = None
        self._dali: dali.DaliReader | None = None
        self._scratch = Scratch()
        self._lock = threading.Lock()

    # -- mode choice --
    @property
    def subset_nbytes(self) -> int:
        """Bytes of the subset's uint8 patches (what resident mode holds on the device)."""
        return int(self.indices.size) * self.patch_size * self.patch_size * 3

    @property
    def resident(self) -> ResidentData | None:
        """The resident patches once the first resident epoch has loaded them (None before, or in dali mode)."""
        return self._resident

    @property
    def dali_workers(self) -> int | None:
        """DALI reader processes in use (0: reading in this process); None until the first dali epoch built the
        pipeline, and in resident mode."""
        reader = self._dali
        return None if reader is None else reader.workers

    def _choose_mode(self, mode: str) -> str:
        if mode == "resident":
            return mode
        if mode == "dali":
            problem = dali.dali_problem()
            if problem:
                raise LoaderError(f"mode: 'dali' cannot run: {problem}; use mode='resident' or 'auto'")
            return mode
        if self.subset_nbytes <= self.memory_budget:
            self.note = (f"auto: resident ({self.subset_nbytes / 2**20:.1f} MiB <= memory budget "
                         f"{self.memory_budget / 2**20:.1f} MiB)")
            return "resident"
        problem = dali.dali_problem()
        if problem:
            self.note = (f"auto: subset ({self.subset_nbytes / 2**20:.1f} MiB) exceeds the memory budget but DALI "
                         f"cannot run ({problem}); falling back to resident")
            warnings.warn(self.note, RuntimeWarning, stacklevel=3)
            return "resident"
        self.note = (f"auto: dali ({self.subset_nbytes / 2**20:.1f} MiB > memory budget "
                     f"{self.memory_budget / 2**20:.1f} MiB)")
        return "dali"

    # -- sizes --
    def __len__(self) -> int:
        """Batches this shard yields per epoch."""
        return len(shard_batches(self.indices.size, self.batch_size, self.shard_id, self.num_shards, self.drop_last))

    def plan(self, epoch: int) -> list[np.ndarray]:
        """int64 store indices of each batch this shard yields in ``epoch`` (0..``MAX_EPOCH``), in order."""
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        order = epoch_order(self.indices, self.seed, epoch)
        return [order[a:b] for a, b in shard_batches(order.size, self.batch_size, self.shard_id, self.num_shards,
                                                     self.drop_last)]

    # -- iteration --
    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` (0..``MAX_EPOCH``) for this shard.

        Returns
        -------
        Iterator[Batch]
            ``len(self)`` batches; see ``Batch`` for units, layouts and dtypes. A dali loader iterates one epoch
            at a time (asking for another meanwhile raises ``engine.loader.dali.ReaderBusy``).
        """
        plan = self.plan(epoch)
        if self.mode == "resident":
            return self._resident_epoch(plan, epoch)
        return self._dali_epoch(plan, epoch)

    def _resident_epoch(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        import torch

        with self._lock:
            if self._resident is None:
                self._resident = ResidentData(self.store, self.indices, self.device)
        data = self._resident
        if not plan:
            return
        # one host-to-device copy of the epoch's rows; per batch only a slice and a gather on the device
        rows_all = data.rows(np.concatenate(plan))
        if self.device.type == "cuda":
            rows_all = torch.from_numpy(rows_all).to(self.device)
        start = 0
        for step, idx in enumerate(plan):
            rows = rows_all[start:start + idx.size]
            start += idx.size
            if isinstance(data.data, np.ndarray):
                # CPU: the kernels read the resident rows in place (a gathered copy cost ~23 us per patch, serial)
                yield finish_batch(torch.from_numpy(data.data), idx, self.rain, self.seed, epoch, step, self._scratch,
                                   self.dtype, rows=rows)
            else:
                yield finish_batch(data.gather(rows), idx, self.rain, self.seed, epoch, step, self._scratch,
                                   self.dtype)

    def _dali_epoch(self, plan: list[np.ndarray], epoch: int) -> Iterator[Batch]:
        with self._lock:
            if self._dali is None:
                self._dali = dali.DaliReader(self.store, self.batch_size, self.device, threads=self.threads,
                                             workers=self.workers, capacity=int(self.indices.size))
        try:
            for step, (u8, idx) in enumerate(self._dali.epoch(plan)):
                yield finish_batch(u8, idx, self.rain, self.seed, epoch, step, self._scratch, self.dtype)
        except dali.ReaderBusy:
            raise  # the caller's mistake; the epoch in progress goes on
        except Exception:
            # an epoch that failed (a damaged store, ...) leaves DALI mid-iteration, where its pipeline cannot be
            # reset: the next epoch builds a fresh one
            with self._lock:
                reader, self._dali = self._dali, None
            if reader is not None:
                reader.close()
            raise

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the resident data and stop DALI workers."""
        self._resident = None
        if self._dali is not None:
            self._dali.close()
            self._dali = None


# one Loader per argument set, so calling ``batches`` every epoch reuses resident data and DALI pipelines
_CACHE: dict[tuple, Loader] = {}
_CACHE_SIZE = 2


def _cache_key(store: Any, subset: Any, kwargs: dict) -> tuple | None:
    try:
        if isinstance(store, (str, os.PathLike)):
            root = Path(store).resolve()
            # a store rebuilt at the same path rewrites zarr.json: a new key, so no stale resident data
            skey = ("path", str(root), (root / "zarr.json").stat().st_mtime_ns)
        else:
            # by content, not id(): a collected store's id can be reused by another one
            skey = ("store", str(Path(store.path).resolve()), getattr(store, "fingerprint", None))
        if subset is None:
            sub = None
        elif isinstance(subset, (str, os.PathLike)):
            p = Path(subset).resolve()
            sub = ("path", str(p), p.stat().st_mtime_ns)
        elif hasattr(subset, "indices"):
            sub = ("subset", np.asarray(subset.indices).tobytes(), getattr(subset, "store_fingerprint", None))
        else:
            a = subset.detach().cpu().numpy() if type(subset).__module__.startswith("torch") else np.asarray(subset)
            sub = ("array", str(a.dtype), a.tobytes())
        items = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        return (skey, sub, items)
    except (OSError, TypeError, ValueError):
        return None


def batches(store: Any, subset: Any = None, batch_size: int = 16, rain: Any = "medium", seed: int = 0,
            epoch: int = 0, device: Any = "cpu", mode: str = "auto", drop_last: bool = False, shard_id: int = 0,
            num_shards: int = 1, memory_budget: int = DEFAULT_MEMORY_BUDGET, workers: int | None = None,
            threads: int = 2, dtype: Any = "float32") -> Iterator[Batch]:
    return _cached_loader(store, subset, dict(
        batch_size=batch_size, rain=rain, seed=seed, device=device, mode=mode, drop_last=drop_last,
        shard_id=shard_id, num_shards=num_shards, memory_budget=memory_budget, workers=workers, threads=threads,
        dtype=resolve_dtype(dtype))).epoch(epoch)


batches.__doc__ = """The training batches of one epoch.

    Each epoch visits every subset index exactly once, in an order fixed by ``(seed, epoch)``; the rain of store
    index ``i`` in epoch ``e`` is keyed ``e << 40 | i`` (``engine.loader.order``). Loaders are cached per argument
    set (the last two), so resident data is loaded and DALI pipelines are built once across epochs; use ``Loader``
    directly to control their lifetime, ``clear_cache`` to free them.
""" + _ARGS_DATA + """    epoch : int
        0 .. 2**23 - 1 (``MAX_EPOCH``).
""" + _ARGS_RUN + """
    Yields
    ------
    Batch
        ``index`` (int64 [N], CPU), ``background`` and ``rainy`` ([N, 3, P, P] NCHW), ``rain`` ([N, 1, P, P] N1HW)
        of ``dtype`` on ``device`` (float types in 0..1, uint8 in 0..255), ``mask`` (bool [N, 1, P, P] N1HW).
"""


def _cached_loader(store: Any, subset: Any, kwargs: dict) -> Loader:
    key = _cache_key(store, subset, kwargs)
    loader = _CACHE.get(key) if key is not None else None
    if loader is None:
        loader = Loader(store, subset, **kwargs)
        if key is not None:
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE))).close()
            _CACHE[key] = loader
    return loader


def cached_loaders() -> list[Loader]:
    """The loaders ``batches`` keeps, oldest first (at most two)."""
    return list(_CACHE.values())


def clear_cache() -> None:
    """Forget the cached loaders (frees resident patches and stops DALI workers)."""
    while _CACHE:
        _CACHE.popitem()[1].close()


atexit.register(clear_cache)  # stop DALI workers and free shared memory before the interpreter tears down


__all__ = ["DEFAULT_MEMORY_BUDGET", "Loader", "batches", "cached_loaders", "clear_cache"]
