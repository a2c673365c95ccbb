"""Loader throughput: patches/s that ``engine.loader`` delivers in each mode, with on-the-fly rain.

``run_loader_bench`` is what ``rainsweep bench --loader`` and ``bench/test_bench_loader.py`` call. A measurement
builds one ``Loader``, runs a warm-up (JIT compiles, DALI start, resident load, page cache), then iterates epochs
for ``seconds`` and counts delivered patches; with a GPU it synchronizes before reading the clock. Every batch
is complete when counted: background and rainy NCHW, rain and mask N1HW on the device, in the row's ``dtype``
(float32 0..1, or uint8 0..255 which a trainer converts on its GPU with ``engine.loader.to_unit``).

Default batch 256: per-patch costs fall up to ~256 (per-batch Python and parallel-region overhead spread over
more patches) and are flat beyond; 512 doubles the pooled host memory (a float32 batch of 256 is 117 MB).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

import kernels  # noqa: F401 - sets OMP_WAIT_POLICY before cpu_threads starts numba's thread pool


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Limit torch and numba to ``n`` threads inside the block."""
    import numba
    import torch

    old_t, old_n = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(old_t)
        numba.set_num_threads(old_n)


@contextlib.contextmanager
def synthetic_store(patches: int = 4096, patch_size: int = 128, seed: int = 0) -> Iterator[str]:
    """A temporary store of random uint8 patches (rain cost does not depend on content), page-cached by writing."""
    from engine.data.store import write_store

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(patches, patch_size, patch_size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="rainsweep-loader-bench-") as tmp:
        path = os.path.join(tmp, "store")
        write_store(path, data, sharpness=np.zeros(patches), complexity=np.zeros(patches))
        del data
        yield path


def measure(store: Any, mode: str, batch_size: int = 256, seconds: float = 2.0, threads: int = 2,
            device: str = "cpu", rain: Any = "medium", workers: int | None = None, subset: Any = None,
            seed: int = 0, dtype: str = "float32") -> dict:
    """One measurement row: patches/s of ``Loader(...).epoch(e)`` iterated for about ``seconds``."""
    import torch

    from engine.loader import Loader

    with cpu_threads(threads):
        t0 = time.perf_counter()
        loader = Loader(store, subset=subset, batch_size=batch_size, rain=rain, seed=seed, device=device,
                        mode=mode, workers=workers, threads=threads, dtype=dtype)
        try:
            it = loader.epoch(0)
            first = next(it)  # compile kernels, start DALI, load resident data
            del first
            it.close()
            setup = time.perf_counter() - t0
            cuda = loader.device.type == "cuda"
            n, epoch = 0, 1
            cpu0 = time.process_time()
            start = time.perf_counter()
            elapsed = 0.0
            while elapsed < seconds:
                for b in loader.epoch(epoch):
                    n += len(b)
                    if time.perf_counter() - start >= seconds:
                        break
                epoch += 1
                if cuda:
                    torch.cuda.synchronize(loader.device)
                elapsed = time.perf_counter() - start
            if cuda:
                torch.cuda.synchronize(loader.device)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            row = dict(case="loader", mode=loader.mode, device=str(loader.device), threads=threads,
                       workers=getattr(loader._dali, "workers", "-") if loader.mode == "dali" else "-",
                       batch_size=batch_size, dtype=loader.dtype, rain=loader.rain.name if loader.rain is not None else "none",
                       subset=int(loader.indices.size), patches=n, seconds=round(elapsed, 3),
                       patches_per_s=n / elapsed if elapsed > 0 else float("nan"),
                       # CPU seconds of this process (all its threads; not DALI worker processes): on a shared
                       # machine patches per CPU-second x cores estimates the rate the machine alone would give
                       patches_per_cpu_s=n / cpu if cpu > 0 else float("nan"), setup_s=round(setup, 3))
        finally:
            loader.close()
    return row


def run_loader_bench(store: Any = None, modes: Sequence[str] = ("resident", "dali"), batch_size: int = 256,
                     seconds: float = 2.0, threads: int | Sequence[int] = 2, device: str | None = None,
                     patches: int = 2048, gpu: bool | None = None, rain: Any = "medium",
                     workers: Sequence[int | None] = (None,),
                     dtypes: Sequence[str] = ("float32", "bfloat16", "uint8")) -> list[dict]:
    """Loader patches/s in each mode (and DALI worker count), with on-the-fly ``rain`` (default medium).

    Args:
        store: a store path; None builds a temporary page-cached store of ``patches`` random 128 x 128 patches.
        modes: loader modes to measure ("resident", "dali", "auto").
        batch_size, seconds, threads: per measurement (threads: torch / numba / DALI CPU threads; a list
            measures each).
        device: "cpu" or "cuda"; None: CPU rows, plus CUDA rows when ``gpu`` is true or (None) a GPU is usable.
        workers: DALI reader processes per dali row (None: the loader's default; 0: in the main process).
        dtypes: batch dtypes measured (``engine.loader.DTYPES``): float32 is the default batch, bfloat16 the same
            values in half the bytes (for bf16 training), uint8 the raw batch a GPU trainer converts itself (no host
            float conversion).

    Returns one dict per measurement (``patches_per_s`` is the figure, ``patches_per_cpu_s`` the rate per CPU-second
    of this process; rows that cannot run carry ``skipped``).
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
