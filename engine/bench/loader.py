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
"""
from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

from engine.bench.timing import measure as time_runner
from engine.bench.timing import thread_limit

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


def run_loader_bench(store: Any = None, modes: Sequence[str] = ("resident", "dali"), batch_size: int = 256,
                     seconds: float = 2.0, threads: int | Sequence[int] = 2, device: str | None = None,
                     patches: int = 2048, gpu: bool | None = None, rain: Any = "medium",
                     workers: Sequence[int | None] = (None,),
                     dtypes: Sequence[str] = ("float32", "bfloat16", "uint8")) -> list[dict]:
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
    return rows
