"""Loader benchmarks: patches/s of ``engine.loader`` per mode with on-the-fly medium rain, one epoch per round.

The store is written from the suite's built-in patches (``RAINSWEEP_BENCH_PATCHES``, default 2048) just before,
so it is page-cached. Batches in float32 (the default), bfloat16 (half the bytes) and uint8 (raw, converted by a
GPU trainer). Threads: 2 (the target: DALI CPU loader, 2 threads, >= 15,000 patches/s). CUDA cases are marked
``gpu``. ``extra_info['patches_per_s']`` holds the rate (median round).

Every round must deliver the whole epoch, and the last batch of the last timed epoch is compared with the store's
patches and a direct ``engine.synth.synthesize`` call with the loader's rain keys (``epoch << 40 | index``).

Run: ``pytest bench/test_bench_loader.py`` (``rainsweep bench --loader`` measures the same through
``engine.bench.loader``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.bench.core import suite_settings
from engine.bench.loader import measure, run_loader_bench
from engine.bench.timing import thread_limit
from engine.loader import Loader

ROUNDS = suite_settings().rounds
THREADS = 2
BATCH = 256
SEED = 0

CASES = [("resident", "cpu", None, "float32"), ("dali", "cpu", 0, "float32"), ("dali", "cpu", 1, "float32"),
         ("resident", "cpu", None, "bfloat16"), ("dali", "cpu", 0, "bfloat16"),
         ("resident", "cpu", None, "uint8"), ("dali", "cpu", 0, "uint8"),
         ("resident", "cuda", None, "float32"), ("dali", "cuda", None, "float32"), ("dali", "cuda", None, "uint8")]


def _param(mode: str, device: str, workers: int | None, dtype: str):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    return pytest.param(mode, device, workers, dtype, marks=marks, id=f"{mode}-{device}-w{workers}-{dtype}")


@pytest.fixture(scope="module")
def store_path(patches, tmp_path_factory) -> str:
    from engine.data.store import write_store

    n = len(patches)
    path = tmp_path_factory.mktemp("bench_loader") / "store"
    write_store(path, patches, sharpness=np.zeros(n), complexity=np.zeros(n))
    return str(path)


def _as_batch_dtype(u8: np.ndarray, dtype: str) -> torch.Tensor:
    """uint8 0..255 values as the loader's batch type: uint8 itself, float32 / 255, or that rounded to bfloat16."""
    if dtype == "uint8":
        return torch.from_numpy(u8)
    f32 = torch.from_numpy(u8.astype(np.float32) / np.float32(255))
    return f32 if dtype == "float32" else f32.to(getattr(torch, dtype))


def _check_batch(batch, epoch: int, patches: np.ndarray, dtype: str) -> None:
    """One delivered batch against the store's patches and a direct synthesis with the loader's rain keys."""
    from engine.synth import synthesize

    idx = batch.index.numpy()
    ref = synthesize(patches[idx], "medium", seed=SEED, keys=(np.int64(epoch) << 40) | idx, backend="cpu")
    expected = {"background": patches[idx].transpose(0, 3, 1, 2), "rainy": ref.rainy.transpose(0, 3, 1, 2),
                "rain": ref.rain[:, None]}
    for name, u8 in expected.items():
        got = getattr(batch, name).cpu()
        assert torch.equal(got, _as_batch_dtype(np.ascontiguousarray(u8), dtype)), name
    assert torch.equal(batch.mask.cpu(), torch.from_numpy(ref.mask[:, None]))


@pytest.mark.parametrize("mode, device, workers, dtype", [_param(*c) for c in CASES])
def test_loader_epoch(benchmark, store_path, patches, mode, device, workers, dtype):
    with thread_limit(THREADS):
        loader = Loader(store_path, batch_size=BATCH, rain="medium", seed=SEED, device=device, mode=mode,
                        workers=workers, threads=THREADS, dtype=dtype)
        try:
            n = loader.indices.size
            state = {"epoch": 0, "last": None}

            def one_epoch() -> int:
                count = 0
                for b in loader.epoch(state["epoch"]):
                    count += len(b)
                    state["last"] = (b, state["epoch"])
                if device == "cuda":
                    torch.cuda.synchronize()
                state["epoch"] += 1
                return count

            benchmark.group = f"loader-{device}-{THREADS}t"
            benchmark.extra_info.update(mode=mode, device=device, workers=workers, threads=THREADS, batch=BATCH,
                                        dtype=dtype, rain="medium", patches=n)
            got = benchmark.pedantic(one_epoch, rounds=ROUNDS, warmup_rounds=1, iterations=1)
            assert got == n  # every round delivered the whole epoch
            _check_batch(*state["last"], patches, dtype)
            if benchmark.stats is not None:  # None under --benchmark-disable
                benchmark.extra_info["patches_per_s"] = n / benchmark.stats.stats.median
        finally:
            loader.close()


ROW_KEYS = {"case", "mode", "device", "threads", "workers", "batch_size", "dtype", "rain", "subset", "patches",
            "seconds", "patches_per_s", "patches_per_cpu_s", "setup_s"}


def test_measure_row(store_path, patches):
    """``rainsweep bench --loader``'s row: its fields, and patch counts that add up over whole batches."""
    row = measure(store_path, "resident", batch_size=BATCH, seconds=0.0, threads=1, dtype="uint8")
    assert set(row) == ROW_KEYS
    assert row["mode"] == "resident" and row["device"] == "cpu" and row["workers"] == "-"
    assert row["subset"] == len(patches) and row["rain"] == "medium"
    assert row["patches"] >= 3 * min(len(patches), BATCH)  # at least 3 repeats of at least one batch
    assert row["patches_per_s"] > 0 and row["patches_per_cpu_s"] > 0 and row["seconds"] >= 0


def test_run_loader_bench_reports_a_failing_case(store_path):
    rows = run_loader_bench(store_path, modes=("no-such-mode",), seconds=0.0, threads=1, device="cpu",
                            dtypes=("float32",))
    assert len(rows) == 1 and rows[0]["patches_per_s"] is None and "no-such-mode" in rows[0]["skipped"]
