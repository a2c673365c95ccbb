"""Loader benchmarks: patches/s of ``engine.loader`` per mode with on-the-fly medium rain, one epoch per round.

The store is written from the suite's built-in patches (``RAINSWEEP_BENCH_PATCHES``, default 2048) just before,
so it is page-cached. Batches in float32 (the default), bfloat16 (half the bytes) and uint8 (raw, converted by a
GPU trainer). Threads: 2 (the issue's figure: DALI CPU loader, 2 threads, >= 15,000 patches/s). GPU cases run when
CUDA is usable. ``extra_info['patches_per_s']`` holds the rate (median round).

Run: ``pytest bench/test_bench_loader.py`` (``rainsweep bench --loader`` measures the same through
``engine.bench.loader``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.bench.core import suite_settings
from engine.loader import Loader
from engine.bench.loader import cpu_threads

ROUNDS = suite_settings().rounds
THREADS = 2
BATCH = 256

CASES = [("resident", "cpu", None, "float32"), ("dali", "cpu", 0, "float32"), ("dali", "cpu", 1, "float32"),
         ("resident", "cpu", None, "bfloat16"), ("dali", "cpu", 0, "bfloat16"),
         ("resident", "cpu", None, "uint8"), ("dali", "cpu", 0, "uint8"),
         ("resident", "cuda", None, "float32"), ("dali", "cuda", None, "float32"), ("dali", "cuda", None, "uint8")]


@pytest.fixture(scope="module")
def store_path(patches, tmp_path_factory) -> str:
    from engine.data.store import write_store

    n = len(patches)
    path = tmp_path_factory.mktemp("bench_loader") / "store"
    write_store(path, patches, sharpness=np.zeros(n), complexity=np.zeros(n))
    return str(path)


@pytest.mark.parametrize("mode, device, workers, dtype", CASES, ids=[f"{m}-{d}-w{w}-{t}" for m, d, w, t in CASES])
def test_loader_epoch(benchmark, store_path, mode, device, workers, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    with cpu_threads(THREADS):
        loader = Loader(store_path, batch_size=BATCH, rain="medium", seed=0, device=device, mode=mode,
                        workers=workers, threads=THREADS, dtype=dtype)
        try:
            n = loader.indices.size
            state = {"epoch": 0}

            def one_epoch() -> int:
                count = 0
                for b in loader.epoch(state["epoch"]):
                    count += len(b)
                if device == "cuda":
                    torch.cuda.synchronize()
                state["epoch"] += 1
                return count

            benchmark.group = f"loader-{device}-{THREADS}t"
            benchmark.extra_info.update(mode=mode, device=device, workers=workers, threads=THREADS, batch=BATCH, dtype=dtype,
                                        rain="medium", patches=n)
            got = benchmark.pedantic(one_epoch, rounds=ROUNDS, warmup_rounds=1, iterations=1)
            assert got == n  # every round delivered the whole epoch
            if benchmark.stats is not None:  # None under --benchmark-disable
                benchmark.extra_info["patches_per_s"] = n / benchmark.stats.stats.median
        finally:
            loader.close()
