"""Multi-stream batches: K training streams (each its own subset, rain and seed) delivered as one batch with a
leading stream axis, for a fused model that trains K runs at once (HFTA: Wang et al., "Horizontally Fused Training
Array", MLSys 2021, github.com/UofT-EcoSystem/hfta).

Layout: every tensor of a ``MultiBatch`` is the K single-stream tensors stacked on a new leading axis: ``index``
int64 [K, B] (CPU), ``background`` / ``rainy`` [K, B, 3, P, P] (stream, batch, NCHW), ``rain`` [K, B, 1, P, P] and
``mask`` bool [K, B, 1, P, P]. They are C-contiguous, so ``t.view(K * B, ...)`` is the flat batch and ``t[k]`` is
stream k's batch. Stream k's slice is byte for byte the ``Batch`` that ``engine.loader.batches(store,
subset_k, batch_size, rain_k, seed_k, epoch_k, ...)`` yields at the same step: the same patches in the same order
(``engine.loader.order.epoch_order`` of the stream's subset, seed and epoch) with the same rain (key
``epoch << 40 | index`` under the stream's seed), in every mode and on every device.

One pass: per step the K streams' patches are read together (one resident gather, or one DALI batch of K * B
patches) and rendered together. The renderer of a rain family takes a per-patch random state (``kernels.rng``
``patch_state(seed, key)``), so patches of different seeds and epochs share one call as long as they share the
spec's parameter vector: the batch is rendered with **one renderer call per run of consecutive streams with equal
rain spec** (None, no rain, counts as a spec). On the CPU that call is the family's ``render_finish_cpu``: one numba
pass over the run's patches, rendering each patch's rain and writing its output planes while it is in cache, reading
backgrounds in place from the resident array. On a GPU it is the family's ``render_gpu`` plus one
``composite_gpu`` launch per run, then one table look-up per output tensor over the whole [K * B] batch. Streams
ordered by spec (``order_by_rain``) therefore take one call per distinct spec: K streams of one preset take one.
Calls are per run rather than per distinct spec because each call writes a contiguous range of output rows.
The renderers are in ``engine.loader.multi_render``.

Resident mode holds the union of the streams' subsets once (``MultiLoader.resident``), each stream indexing into
it; ``auto`` picks resident when the union's uint8 patches fit the memory budget.
"""
from __future__ import annotations

import atexit
import itertools
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

import engine.loader.dali as dali
from engine.loader.api import DEFAULT_MEMORY_BUDGET
from engine.loader.args import (MODES, LoaderError, check_int, resolve_device, resolve_dtype, resolve_rain,
                                resolve_store, resolve_subset)
from engine.loader.multi_render import MultiBatch, finish_streams_device, rain_runs, render_streams_cpu
from engine.loader.order import MAX_EPOCH, epoch_order, rain_keys, shard_batches
from engine.loader.planes import STORAGE, Scratch, torch_dtype
from engine.loader.resident import ResidentData

if TYPE_CHECKING:
    from engine.rain import RainSpec


@dataclass(frozen=True, eq=False)
class Stream:
    """One run's data: what ``engine.loader.batches`` takes as ``subset``, ``rain`` and ``seed``.

    Attributes
    ----------
    subset : array of int
        Unique store indices of the run's training subset (numpy, torch or a sequence; also an
        ``engine.data.select.Subset`` or a subset JSON path).
    rain : RainSpec, str or None
        The run's rain: a spec, a preset name or spec string (``RainSpec.parse``), or None for none.
    seed : int
        Seeds the run's shuffle and rain (an int64).

    Streams compare by identity (``subset`` is an array).
    """

    subset: Any
    rain: Any = "medium"
    seed: int = 0


@dataclass(frozen=True)
class ResolvedStream:
    """A checked ``Stream``: ``indices`` int64 store indices (in the order given), ``rain`` a RainSpec or None,
    ``seed`` an int64."""

    indices: np.ndarray
    rain: RainSpec | None
    seed: int


def order_by_rain(streams: Sequence[Stream]) -> list[int]:
    """Positions of ``streams`` reordered so that streams of equal rain spec are adjacent (stable; groups in the
    order their spec first appears): ``[streams[i] for i in order_by_rain(streams)]`` renders with one call per
    distinct spec."""
    specs = [resolve_rain(s.rain) for s in streams]
    first: dict = {}
    for i, s in enumerate(specs):
        first.setdefault(s, i)
    return sorted(range(len(specs)), key=lambda i: first[specs[i]])


def _stream_error(k: int, err: Exception) -> LoaderError:
    return LoaderError(f"streams[{k}].{err}")


def resolve_streams(store: Any, streams: Any) -> list[ResolvedStream]:
    """Each ``Stream``'s subset, rain and seed checked against ``store``; ``LoaderError`` names the stream."""
    if isinstance(streams, Stream) or not isinstance(streams, Sequence):
        raise LoaderError(f"streams: expected a sequence of engine.loader.Stream, got {type(streams).__name__}")
    if len(streams) == 0:
        raise LoaderError("streams: is empty (K = 0); expected at least one Stream")
    out = []
    for k, s in enumerate(streams):
        if not isinstance(s, Stream):
            raise LoaderError(f"streams[{k}]: expected an engine.loader.Stream, got {type(s).__name__}")
        try:
            indices = resolve_subset(store, s.subset)
            spec = resolve_rain(s.rain)
            seed = check_int("seed", s.seed, -(1 << 63), (1 << 63) - 1)
        except LoaderError as err:
            raise _stream_error(k, err) from None
        out.append(ResolvedStream(indices, spec, seed))
    return out


def _one_device(device: Any):
    if isinstance(device, (list, tuple)):
        raise LoaderError(f"device: expected one device for all streams (the fused model's), got {device!r}")
    return resolve_device(device)


class MultiLoader:
    """Batches of K streams over one store, with one resident copy of their union (or one DALI pipeline).

    Parameters
    ----------
    store : str, os.PathLike or PatchStore
        The patch store (uint8 patches [N, P, P, 3] NHWC, 0..255).
    streams : sequence of Stream
        K >= 1 streams: each one's subset, rain and seed.
    device : str or torch.device
        One device for all streams: where the tensors and the rain synthesis live.
    mode : str
        "resident" (the union of the subsets loaded once, each stream gathering from it), "dali" (one DALI
        pipeline reading K * B patches per step) or "auto" (resident when the union fits ``memory_budget``).
    dtype : str or torch.dtype
        Output type: "float32", "bfloat16", "float16" (0..1) or "uint8" (0..255), as in ``engine.loader.batches``.
    memory_budget, workers, threads
        As in ``engine.loader.Loader``.

    Attributes
    ----------
    streams : list
        Resolved streams: ``indices`` (int64 store indices), ``rain`` (RainSpec or None), ``seed``.
    union : numpy.ndarray
        int64 sorted store indices of the union of the subsets.
    mode, note, device, dtype
        As in ``Loader``.
    calls : int
        Renderer calls made so far (see the module docstring).
    """

    #: Steps handed to DALI per pipeline epoch when the plan has no end (training streams).
    DALI_CHUNK_STEPS = 64

    def __init__(self, store: Any, streams: Sequence[Stream], device: Any = "cpu", mode: str = "auto",
                 dtype: Any = "float32", memory_budget: int = DEFAULT_MEMORY_BUDGET, workers: int | None = None,
                 threads: int = 2) -> None:
        if mode not in MODES:
            raise LoaderError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.device = _one_device(device)
        self.dtype = resolve_dtype(dtype)
        self.memory_budget = check_int("memory_budget", memory_budget, 0)
        self.threads = check_int("threads", threads, 1)
        self.workers = None if workers is None else check_int("workers", workers, 0)
        self.store = resolve_store(store)
        self.streams = resolve_streams(self.store, streams)
        self.union = np.unique(np.concatenate([s.indices for s in self.streams]))
        self.patch_size = int(self.store.patch_size)
        self.specs = [s.rain for s in self.streams]
        self.seeds = [s.seed for s in self.streams]
        self.note = ""
        self.mode = self._choose_mode(mode)
        self.calls = 0
        self._resident: ResidentData | None = None
        self._dali: dali.DaliReader | None = None
        self._dali_batch = 0
        self._scratch = Scratch()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """K, the number of streams."""
        return len(self.streams)

    @property
    def union_nbytes(self) -> int:
        """Bytes of the union's uint8 patches (what resident mode holds)."""
        return int(self.union.size) * self.patch_size * self.patch_size * 3

    @property
    def resident(self) -> ResidentData | None:
        """The resident union once loaded (None before, and in dali mode)."""
        return self._resident

    def _choose_mode(self, mode: str) -> str:
        if mode == "resident":
            return mode
        problem = dali.dali_problem()
        if mode == "dali":
            if problem:
                raise LoaderError(f"mode: 'dali' cannot run: {problem}; use mode='resident' or 'auto'")
            return mode
        size = f"{self.union_nbytes / 2**20:.1f} MiB"
        if self.union_nbytes <= self.memory_budget:
            self.note = f"auto: resident (union of the subsets {size} <= memory budget)"
            return "resident"
        if problem:
            self.note = f"auto: union ({size}) exceeds the memory budget but DALI cannot run ({problem}); resident"
            warnings.warn(self.note, RuntimeWarning, stacklevel=3)
            return "resident"
        self.note = f"auto: dali (union of the subsets {size} > memory budget)"
        return "dali"

    # -- plans --
    def epoch_plan(self, batch_size: int, epochs: Sequence[int], drop_last: bool = False
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(index [K, B], keys [K, B])`` of each step of one epoch per stream (see ``multi_batches``)."""
        b = check_int("batch_size", batch_size, 1)
        plans = []
        for s, e in zip(self.streams, epochs):
            order = epoch_order(s.indices, s.seed, e)
            plans.append([order[a:z] for a, z in shard_batches(order.size, b, 0, 1, drop_last)])
        steps = min(len(p) for p in plans)
        out = []
        for step in range(steps):
            sizes = {p[step].size for p in plans}
            if len(sizes) > 1:
                raise LoaderError(f"streams: batch {step} has {[p[step].size for p in plans]} patches per stream; "
                                  f"a multi-stream batch needs equal sizes: use drop_last=True, equal subset sizes, "
                                  f"or engine.loader.multi_steps.MultiTrainingStream")
            idx = np.stack([p[step] for p in plans])
            keys = np.stack([rain_keys(e, row) for e, row in zip(epochs, idx)])
            out.append((idx, keys))
        return out

    # -- rendering --
    def run(self, plan: Iterable[tuple[np.ndarray, np.ndarray]], epochs: Sequence[int] | None = None
            ) -> Iterator[MultiBatch]:
        """The ``MultiBatch`` of each ``(index [K, B], keys [K, B])`` step of ``plan`` (any iterable, endless too).

        ``epochs`` (per stream) is recorded in the batches (zeros when None).
        """
        epochs = tuple(int(e) for e in epochs) if epochs is not None else (0,) * len(self)
        if self.mode == "resident":
            return self._run_resident(iter(plan), epochs)
        return self._run_dali(iter(plan), epochs)

    def _run_resident(self, plan: Iterator, epochs: tuple) -> Iterator[MultiBatch]:
        import torch

        with self._lock:
            if self._resident is None:
                self._resident = ResidentData(self.store, self.union, self.device)
        data = self._resident
        for step, (idx, keys) in enumerate(plan):
            rows = data.rows(idx.reshape(-1))
            if isinstance(data.data, np.ndarray):
                yield self._finish_cpu(data.data, rows, idx, keys, epochs, step)
            else:
                yield self._finish_gpu(data.gather(torch.from_numpy(rows).to(self.device)), idx, keys, epochs, step)

    def _run_dali(self, plan: Iterator, epochs: tuple) -> Iterator[MultiBatch]:
        step = 0
        while True:
            chunk = list(itertools.islice(plan, self.DALI_CHUNK_STEPS))
            if not chunk:
                return
            reader = self._reader(max(idx.size for idx, _ in chunk), self.DALI_CHUNK_STEPS * chunk[0][0].size)
            read = reader.epoch([idx.reshape(-1) for idx, _ in chunk])
            try:
                for (u8, got), (idx, keys) in zip(read, chunk):
                    if not np.array_equal(got, idx.reshape(-1)):
                        raise RuntimeError("loader: DALI returned other patches than planned")
                    if u8.device.type == "cpu":
                        yield self._finish_cpu(u8.numpy(), None, idx, keys, epochs, step)
                    else:
                        yield self._finish_gpu(u8, idx, keys, epochs, step)
                    step += 1
            except dali.ReaderBusy:
                raise
            except Exception:
                read.close()
                self._close_dali()  # a failed DALI epoch cannot be reset; the next one builds a fresh pipeline
                raise
            finally:
                read.close()  # an abandoned chunk drains DALI's prefetched batches now, not at garbage collection

    def _reader(self, batch: int, capacity: int) -> dali.DaliReader:
        with self._lock:
            if self._dali is not None and (self._dali_batch < batch or self._dali.capacity < capacity):
                self._dali.close()
                self._dali = None
            if self._dali is None:
                self._dali = dali.DaliReader(self.store, batch, self.device, threads=self.threads,
                                             workers=self.workers, capacity=capacity)
                self._dali_batch = batch
            return self._dali

    def _finish_cpu(self, backgrounds: np.ndarray, rows: np.ndarray | None, idx: np.ndarray, keys: np.ndarray,
                    epochs: tuple, step: int) -> MultiBatch:
        """Host path: ``render_streams_cpu`` into pooled buffers (numpy and numba only, no torch op)."""
        import torch

        k, b = idx.shape
        p = self.patch_size
        storage, tdt, pool = STORAGE[self.dtype], torch_dtype(self.dtype), self._scratch.pool

        def planes(shape: tuple):
            t = pool.empty(shape, storage)
            return (t if t.dtype == tdt else t.view(tdt)), t.numpy()

        bg, bg_np = planes((k, b, 3, p, p))
        rainy, rainy_np = planes((k, b, 3, p, p))
        rain_t, rain_np = planes((k, b, 1, p, p))
        mask = pool.empty((k, b, 1, p, p), np.bool_)
        flat = k * b
        if self.dtype == "uint8":
            layer, rain_out = rain_np.reshape(flat, p, p), np.empty((0, 1, 1, 1), dtype=storage)
        else:
            layer, rain_out = self._scratch.rain(flat, p, p), rain_np.reshape(flat, 1, p, p)
        self.calls += render_streams_cpu(backgrounds, rows, self.specs, self.seeds, keys, layer,
                                         bg_np.reshape(flat, 3, p, p), rainy_np.reshape(flat, 3, p, p), rain_out,
                                         mask.numpy().reshape(flat, p, p))
        return MultiBatch(index=torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64).copy()), background=bg,
                          rainy=rainy, rain=rain_t, mask=mask, epochs=epochs, step=step)

    def _finish_gpu(self, x: Any, idx: np.ndarray, keys: np.ndarray, epochs: tuple, step: int) -> MultiBatch:
        self.calls += len(rain_runs(self.specs))
        return finish_streams_device(x, self.specs, self.seeds, idx, keys, self.dtype, epochs, step)

    # -- epochs --
    def epoch(self, batch_size: int, epoch: int | Sequence[int] = 0, drop_last: bool = False) -> Iterator[MultiBatch]:
        """The multi-stream batches of one epoch per stream; see ``multi_batches``."""
        epochs = resolve_epochs(epoch, len(self))
        return self.run(self.epoch_plan(batch_size, epochs, drop_last), epochs)

    def _close_dali(self) -> None:
        with self._lock:
            reader, self._dali = self._dali, None
        if reader is not None:
            reader.close()

    def __enter__(self) -> "MultiLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the resident union and stop DALI."""
        self._resident = None
        self._close_dali()


def resolve_epochs(epoch: int | Sequence[int], k: int) -> tuple[int, ...]:
    """One epoch per stream from an int (all streams) or a sequence of K ints, each 0..``MAX_EPOCH``."""
    if isinstance(epoch, (int, np.integer)) and not isinstance(epoch, bool):
        epochs = [epoch] * k
    elif isinstance(epoch, Sequence) and not isinstance(epoch, str):
        if len(epoch) != k:
            raise LoaderError(f"epoch: expected an int or {k} epochs (one per stream), got {len(epoch)}")
        epochs = list(epoch)
    else:
        raise LoaderError(f"epoch: expected an int or a sequence of ints, got {epoch!r}")
    return tuple(check_int(f"epoch[{i}]" if k > 1 else "epoch", e, 0, MAX_EPOCH) for i, e in enumerate(epochs))


_CACHE: dict[tuple, MultiLoader] = {}


def _cache_key(store: Any, streams: Any, kwargs: dict) -> tuple | None:
    try:
        if isinstance(store, (str, os.PathLike)):
            root = Path(store).resolve()
            skey = (str(root), (root / "zarr.json").stat().st_mtime_ns)
        else:
            skey = (str(Path(store.path).resolve()), getattr(store, "fingerprint", None))
        parts = []
        for s in streams:
            sub = s.subset
            if type(sub).__module__.startswith("torch"):
                sub = sub.detach().cpu().numpy()
            a = np.asarray(sub)
            if a.dtype == object or not np.issubdtype(a.dtype, np.integer):
                return None
            parts.append((a.dtype.str, a.tobytes(), repr(s.rain), repr(s.seed)))
        return skey, tuple(parts), tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    except (AttributeError, OSError, TypeError, ValueError):
        return None


def multi_batches(store: Any, streams: Sequence[Stream], batch_size: int = 16, epoch: int | Sequence[int] = 0,
                  device: Any = "cpu", mode: str = "auto", dtype: Any = "float32", drop_last: bool = False,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, workers: int | None = None,
                  threads: int = 2) -> Iterator[MultiBatch]:
    """The multi-stream batches of one epoch per stream: stream k's slice of every batch is exactly the batch of
    ``engine.loader.batches(store, streams[k].subset, batch_size, streams[k].rain, streams[k].seed, epoch_k,
    device, mode, drop_last, dtype=dtype)`` at that step.

    The epoch has ``min_k len_k`` steps, ``len_k`` being stream k's batch count (``ceil(n_k / batch_size)``, or
    ``n_k // batch_size`` with ``drop_last``): a longer stream's later batches are not in it. Batches of one step
    must have equal sizes (a partial last batch of one stream beside a full one of another raises; use
    ``drop_last=True``). For streams that run on their own epochs use ``engine.loader.multi_steps``. The last
    loader is cached (resident union, DALI pipeline) across calls with the same arguments.

    Parameters
    ----------
    store : str, os.PathLike or PatchStore
        The patch store (uint8 [N, P, P, 3] NHWC, 0..255).
    streams : sequence of Stream
        K >= 1 streams (subset, rain, seed).
    batch_size : int
        Patches per stream per batch (B).
    epoch : int or sequence of int
        The loader epoch of every stream, or one per stream (0..``MAX_EPOCH``).
    device, mode, dtype, drop_last, memory_budget, workers, threads
        As in ``engine.loader.batches``; one device for all streams.

    Yields
    ------
    MultiBatch
        ``index`` int64 [K, B] (CPU), ``background`` / ``rainy`` [K, B, 3, P, P], ``rain`` [K, B, 1, P, P] of
        ``dtype`` (float types 0..1, uint8 0..255) and ``mask`` bool [K, B, 1, P, P] on ``device``.

    Raises
    ------
    LoaderError
        No streams, an empty subset, store indices outside the store, a sequence of devices, unequal batch sizes
        at a step, bad epochs.
    """
    kwargs = dict(device=str(device) if not isinstance(device, (list, tuple)) else device, mode=mode,
                  dtype=resolve_dtype(dtype), memory_budget=memory_budget, workers=workers, threads=threads)
    key = _cache_key(store, streams, kwargs) if isinstance(streams, Sequence) else None
    loader = _CACHE.get(key) if key is not None else None
    if loader is None:
        loader = MultiLoader(store, streams, **kwargs)
        if key is not None:
            clear_multi_cache()
            _CACHE[key] = loader
    return loader.epoch(batch_size, epoch, drop_last)


def clear_multi_cache() -> None:
    """Forget the loader ``multi_batches`` keeps (frees its resident union, stops DALI)."""
    while _CACHE:
        _CACHE.popitem()[1].close()


atexit.register(clear_multi_cache)  # stop DALI workers before the interpreter tears down, as engine.loader.api does


__all__ = ["MultiLoader", "ResolvedStream", "Stream", "clear_multi_cache", "multi_batches", "order_by_rain", "resolve_epochs",
           "resolve_streams"]
