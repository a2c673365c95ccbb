"""Loader throughput: patches/s that ``engine.loader`` delivers in each mode, with on-the-fly rain.

``run_loader_bench`` is what ``rainsweep bench --loader`` and ``scripts/gpu_check.sh`` call. A measurement builds
one ``Loader`` under ``engine.bench.timing.thread_limit``, takes a first batch off the clock (JIT compiles, DALI
start, resident load, page cache), then times repeats of ``REPEAT_PATCHES`` patches drawn from epoch after epoch
with ``engine.bench.timing.measure`` and reports the median rate; with a GPU each repeat synchronizes before the
clock is read. Every batch is complete when counted: background and rainy NCHW, rain and mask N1HW on the device,
in the row's ``dtype`` (float32 0..1, or uint8 0..255 which a trainer converts on its GPU with
``engine.loader.to_unit``).

Default batch 256: per-patch costs fall up to ~256 (per-batch Python and parallel-region overhead spread over
more patches) and are flat beyond; 512 doubles the pooled host memory (a float32 batch of 256 is 117 MB).

``measure_multi`` compares the multi-stream loader (``engine.loader.MultiLoader``: K streams, one batch of K x B
patches per step) with the K single-stream loaders it replaces, run one after another over the same patches with the
same rain (each stream's batches of the same epochs), timed in alternating repeats; both rows count patches.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

from engine.bench.timing import Timing, thread_limit, time_interleaved, warm_up
from engine.bench.timing import measure as time_runner

#: Patches per timed repeat (rounded up to whole batches): long enough to span several batches, short enough that
#: a large store gives several repeats within the measurement's seconds.
REPEAT_PATCHES = 2048


@contextlib.contextmanager
def synthetic_store(patches: int = 4096, patch_size: int = 128, seed: int = 0) -> Iterator[str]:
    """A temporary store of random patches, page-cached by writing it (rain cost does not depend on content).

    Parameters
    ----------
    patches : int
        Patches in the store, uint8 ``[patch_size, patch_size, 3]``, 0..255.
    patch_size : int
        Patch side in pixels.
    seed : int
        Seed of the random content.

    Yields
    ------
    str
        The store's path; the store is deleted when the block ends.
    """
    from engine.data.store import write_store

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(patches, patch_size, patch_size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="rainsweep-loader-bench-") as tmp:
        path = os.path.join(tmp, "store")
        write_store(path, data, sharpness=np.zeros(patches), complexity=np.zeros(patches))
        del data
        yield path


def _batches(loader: Any, first_epoch: int) -> Iterator[Any]:
    """The loader's batches, epoch after epoch from ``first_epoch`` on, without end."""
    for epoch in itertools.count(first_epoch):
        yield from loader.epoch(epoch)


def measure(store: Any, mode: str, batch_size: int = 256, seconds: float = 2.0, threads: int = 2,
            device: str = "cpu", rain: Any = "medium", workers: int | None = None, subset: Any = None,
            seed: int = 0, dtype: str = "float32") -> dict:
    """One measurement row: median patches/s of ``Loader(...)`` batches over about ``seconds`` of timed repeats.

    Parameters
    ----------
    store : str or engine.data.store.PatchStore
        The store to load.
    mode : str
        Loader mode ("resident", "dali", "auto").
    batch_size : int
        Patches per batch.
    seconds : float
        Minimum timed seconds (at least 3 repeats of ``REPEAT_PATCHES`` patches).
    threads : int
        torch / numba / OpenCV threads (``thread_limit``) and the loader's DALI CPU threads.
    device : str
        "cpu" or "cuda".
    rain : RainSpec, str or None
        On-the-fly rain.
    workers : int or None
        DALI reader processes (None: the loader's default).
    subset, seed, dtype
        Passed to ``Loader``.

    Returns
    -------
    dict
        ``case, mode, device, threads, workers, batch_size, dtype, rain, subset, patches`` (counted in timed
        repeats), ``seconds`` (timed), ``patches_per_s`` (median over repeats), ``patches_per_cpu_s`` (median per CPU
        second of this process, all its threads, not DALI worker processes: on a shared machine patches per
        CPU-second x cores estimates the rate the machine alone would give) and ``setup_s``.
    """
    import torch  # before thread_limit, so that it limits torch's threads too

    from engine.loader import Loader

    with thread_limit(threads):
        t0 = time.perf_counter()
        loader = Loader(store, subset=subset, batch_size=batch_size, rain=rain, seed=seed, device=device,
                        mode=mode, workers=workers, threads=threads, dtype=dtype)
        batches = _batches(loader, 0)
        try:
            next(batches)  # compile kernels, start DALI, load resident data
            setup = time.perf_counter() - t0
            cuda = loader.device.type == "cuda"
            steps = max(1, -(-REPEAT_PATCHES // batch_size))

            def repeat() -> int:
                n = sum(len(b) for b in itertools.islice(batches, steps))
                if cuda:
                    torch.cuda.synchronize(loader.device)
                return n

            timing = time_runner(repeat, None, seconds=seconds, max_repeats=None, warmup=0)
            row = dict(case="loader", mode=loader.mode, device=str(loader.device), threads=threads,
                       workers=loader.dali_workers if loader.mode == "dali" else "-",
                       batch_size=batch_size, dtype=loader.dtype,
                       rain=loader.rain.name if loader.rain is not None else "none",
                       subset=int(loader.indices.size), patches=timing.counted, seconds=round(timing.timed_s, 3),
                       patches_per_s=timing.median, patches_per_cpu_s=timing.cpu_median, setup_s=round(setup, 3))
        finally:
            batches.close()
            loader.close()
    return row


def bench_streams(count: int, store_count: int, per_stream: int, rain: Any = "medium") -> list:
    """``count`` streams of the benchmark: disjoint (when the store allows) subsets of ``per_stream`` patches,
    seeds ``0 .. count - 1`` and ``rain`` for every stream (a sweep's fused group shares its architecture and often
    its rain range), or with a list of specs, stream k gets ``rain[k % len(rain)]``, the streams ordered by spec
    (``engine.loader.multi.order_by_rain``) as a fused trainer orders them."""
    from engine.loader import Stream
    from engine.loader.multi import order_by_rain

    per_stream = min(per_stream, store_count)
    starts = [(k * per_stream) % max(1, store_count - per_stream + 1) for k in range(count)]
    rains = list(rain) if isinstance(rain, (list, tuple)) else [rain]
    streams = [Stream(np.arange(a, a + per_stream, dtype=np.int64), rains[k % len(rains)], k)
               for k, a in enumerate(starts)]
    return [streams[i] for i in order_by_rain(streams)]


def measure_multi(store: Any, streams: int = 8, batch_size: int = 16, seconds: float = 2.0, threads: int = 2,
                  device: str = "cpu", rain: Any = "medium", mode: str = "resident", dtype: str = "float32",
                  per_stream: int = 256) -> list[dict]:
    """Multi-stream loader against the single-stream loaders it replaces: two rows, median patches/s of each.

    Parameters
    ----------
    store : str or engine.data.store.PatchStore
        The store to load.
    streams : int
        K, the number of streams (``bench_streams``: subsets of ``per_stream`` patches, ``rain``, seeds 0..K-1).
    batch_size : int
        Patches per stream per step (B): the multi-stream batch holds K x B patches, each single loader B.
    seconds : float
        Minimum timed seconds of each of the two cases (alternating repeats of ``REPEAT_PATCHES`` patches).
    threads : int
        torch / numba / OpenCV threads and DALI CPU threads.
    rain : RainSpec, str, None or list of them
        Every stream's rain, or one spec per stream in turn (``bench_streams``).
    device, mode, dtype
        As in ``measure``.
    per_stream : int
        Patches in each stream's subset.

    Returns
    -------
    list of dict
        ``case`` ("loader-multi" then "loader-single-x K", the K single loaders one after another), ``mode``,
        ``device``, ``threads``, ``streams``, ``batch_size`` (per stream), ``dtype``, ``rain``, ``patches``,
        ``seconds``, ``patches_per_s``, ``patches_per_cpu_s``, and on the multi row ``vs_single`` (its rate over
        the single loaders' rate, per patch) and ``renderer_calls_per_step``.
    """
    import torch

    from engine.loader import Loader, MultiLoader

    with thread_limit(threads):
        specs = bench_streams(streams, int(_store_count(store)), per_stream, rain)
        multi = MultiLoader(store, specs, device=device, mode=mode, dtype=dtype, threads=threads)
        singles = [Loader(store, s.subset, batch_size, s.rain, s.seed, device=device, mode=mode, drop_last=True,
                          threads=threads, dtype=dtype) for s in specs]
        cuda = multi.device.type == "cuda"
        steps = max(1, -(-REPEAT_PATCHES // (batch_size * streams)))
        multi_it = _multi_batches(multi, batch_size)
        single_its = [_batches(loader, 0) for loader in singles]
        try:
            def sync() -> None:
                if cuda:
                    torch.cuda.synchronize(multi.device)

            def run_multi() -> int:
                n = sum(b.background.shape[0] * b.background.shape[1] for b in itertools.islice(multi_it, steps))
                sync()
                return n

            def run_single() -> int:
                n = 0
                for it in single_its:  # one stream after another, each its share of the repeat
                    n += sum(len(b) for b in itertools.islice(it, steps))
                sync()
                return n

            setup = warm_up(run_multi) + warm_up(run_single)
            timings = [Timing(None), Timing(None)]
            for err in time_interleaved([run_multi, run_single], timings, seconds, max_repeats=None):
                if err is not None:
                    raise err
            calls = multi.calls
            steps_done = steps * (timings[0].repeats + 1)  # the warm-up call made `steps` too
        finally:
            multi_it.close()
            for it in single_its:
                it.close()
            multi.close()
            for loader in singles:
                loader.close()
    rain_names = dict.fromkeys("none" if s is None else s.name for s in multi.specs)
    common = dict(mode=multi.mode, device=str(multi.device), threads=threads, streams=streams,
                  batch_size=batch_size, dtype=multi.dtype, rain="/".join(rain_names))
    rows = []
    for case, t in (("loader-multi", timings[0]), (f"loader-single-x{streams}", timings[1])):
        rows.append(dict(case=case, **common, patches=t.counted, seconds=round(t.timed_s, 3),
                         patches_per_s=t.median, patches_per_cpu_s=t.cpu_median, setup_s=round(setup, 3)))
    rows[0]["vs_single"] = round(timings[0].median / timings[1].median, 3)
    rows[0]["renderer_calls_per_step"] = round(calls / max(1, steps_done), 2)
    return rows


def _store_count(store: Any) -> int:
    from engine.loader.args import resolve_store

    return int(resolve_store(store).count)


def _multi_batches(loader: Any, batch_size: int) -> Iterator[Any]:
    """A multi-stream loader's batches, epoch after epoch, without end."""
    for epoch in itertools.count():
        yield from loader.epoch(batch_size, epoch, drop_last=True)


def run_loader_bench(store: Any = None, modes: Sequence[str] = ("resident", "dali"), batch_size: int = 256,
                     seconds: float = 2.0, threads: int | Sequence[int] = 2, device: str | None = None,
                     patches: int = 2048, gpu: bool | None = None, rain: Any = "medium",
                     workers: Sequence[int | None] = (None,),
                     dtypes: Sequence[str] = ("float32", "bfloat16", "uint8"), streams: int = 8,
                     stream_batch: int = 16) -> list[dict]:
    """Loader patches/s in each mode (and DALI worker count), with on-the-fly ``rain`` (default medium).

    Parameters
    ----------
    store : str, optional
        A store path; None builds a temporary page-cached store of ``patches`` random 128 x 128 patches.
    modes : sequence of str
        Loader modes to measure ("resident", "dali", "auto").
    batch_size : int
        Patches per batch.
    seconds : float
        Minimum timed seconds per measurement.
    threads : int or sequence of int
        torch / numba / OpenCV / DALI CPU threads; a list measures each.
    device : str, optional
        "cpu" or "cuda"; None: CPU rows, plus CUDA rows when ``gpu`` is true or (None) a GPU is usable.
    patches : int
        Size of the temporary store when ``store`` is None.
    gpu : bool, optional
        See ``device``.
    rain : RainSpec, str or None
        On-the-fly rain.
    workers : sequence of int or None
        DALI reader processes per dali row (None: the loader's default; 0: in the main process).
    dtypes : sequence of str
        Batch dtypes measured (``engine.loader.DTYPES``): float32 is the default batch, bfloat16 the same values in
        half the bytes (for bf16 training), uint8 the raw batch a GPU trainer converts itself (no host float
        conversion).
    streams : int
        K of the multi-stream rows (``measure_multi``, resident mode, each dtype); 0 leaves them out.
    stream_batch : int
        Patches per stream per step in the multi-stream rows (16: a fused sweep's per-run batch).

    Returns
    -------
    list of dict
        One row per measurement (see ``measure``); rows that cannot run carry ``skipped`` and
        ``patches_per_s`` None.
    """
    import torch

    if device is None:
        use_gpu = torch.cuda.is_available() if gpu is None else bool(gpu)
        devices = ["cpu"] + (["cuda"] if use_gpu else [])
    else:
        devices = [device]
    thread_list = [threads] if isinstance(threads, int) else list(threads)
    rows: list[dict] = []
    ctx = synthetic_store(patches) if store is None else contextlib.nullcontext(store)
    with ctx as path:
        for dev in devices:
            for t in thread_list:
                for mode in modes:
                    for w in (workers if mode == "dali" else (None,)):
                        for dt in dtypes:
                            try:
                                rows.append(measure(path, mode, batch_size=batch_size, seconds=seconds, threads=t,
                                                    device=dev, rain=rain, workers=w, dtype=dt))
                            except Exception as err:  # one case failing (no DALI, no GPU) must not sink the table
                                rows.append(dict(case="loader", mode=mode, device=dev, threads=t, workers=w,
                                                 batch_size=batch_size, dtype=dt, patches_per_s=None,
                                                 skipped=f"{type(err).__name__}: {err}"))
                for dt in (dtypes if streams else ()):
                    try:
                        rows += measure_multi(path, streams, stream_batch, seconds=seconds, threads=t, device=dev,
                                              rain=rain, dtype=dt)
                    except Exception as err:  # as above: report, go on
                        rows.append(dict(case="loader-multi", device=dev, threads=t, streams=streams,
                                         batch_size=stream_batch, dtype=dt, patches_per_s=None,
                                         skipped=f"{type(err).__name__}: {err}"))
    return rows
