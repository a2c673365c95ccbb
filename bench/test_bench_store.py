"""Store benchmarks (pytest-benchmark): write rate, sequential and random read rates, precompute ingest rate from
decoded images and end-to-end precompute, all on one core. ``extra_info['patches_per_s']`` holds the rate.

Run: ``pytest bench/test_bench_store.py`` (RAINSWEEP_BENCH_STORE_PATCHES sets the store size, default 4096).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from engine.bench import store as SB
from engine.data.store import write_store

N = int(os.environ.get("RAINSWEEP_BENCH_STORE_PATCHES", "4096"))
BATCH = 256


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return SB.random_patches(N, 128)


@pytest.fixture(scope="module")
def store(data, tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store") / "s.zarr", data, sharpness=np.zeros(N),
                       complexity=np.zeros(N))


@pytest.fixture(autouse=True)
def _one_thread():
    with SB.one_thread():
        yield


def _record(benchmark, patches: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["patches_per_s"] = patches / benchmark.stats.stats.median


def test_store_write(benchmark, data, tmp_path):
    benchmark.group = "store-write"
    k = [0]

    def run():
        k[0] += 1
        return write_store(tmp_path / f"w{k[0]}.zarr", data, sharpness=np.zeros(N), complexity=np.zeros(N))

    s = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    assert s.count == N
    _record(benchmark, N)


def test_store_read_sequential(benchmark, store, data):
    benchmark.group = "store-read"
    out = benchmark(lambda: [store.read_range(s, s + BATCH) for s in range(0, N - BATCH + 1, BATCH)])
    np.testing.assert_array_equal(out[-1], data[N - BATCH:])
    _record(benchmark, N // BATCH * BATCH)


def test_store_read_random(benchmark, store, data):
    benchmark.group = "store-read"
    idx = np.random.default_rng(0).integers(0, N, (16, BATCH))
    out = benchmark(lambda: [store.read(i) for i in idx])
    np.testing.assert_array_equal(out[3], data[idx[3]])
    _record(benchmark, idx.size)


def test_store_read_sequential_plain_zarr(benchmark, store, data):
    benchmark.group = "store-read"
    out = benchmark(lambda: [store.patches[s:s + BATCH] for s in range(0, N - BATCH + 1, BATCH)])
    np.testing.assert_array_equal(out[0], data[:BATCH])
    _record(benchmark, N // BATCH * BATCH)


def test_precompute_ingest_from_decoded(benchmark, tmp_path):
    """The figure: precompute >= 2,000 patches/s per core including both metrics, from decoded images."""
    from engine.data.precompute import measure_patches

    benchmark.group = "precompute"
    images = SB.decoded_images()
    k = [0]

    def run():
        parts = [measure_patches(im, 128, 128) for im in images]
        k[0] += 1
        pts = np.concatenate([p["patches"] for p in parts])
        write_store(tmp_path / f"i{k[0]}.zarr", pts, sharpness=np.concatenate([p["sharpness"] for p in parts]),
                    complexity=np.concatenate([p["complexity"] for p in parts]),
                    origin=np.concatenate([p["origins"] for p in parts]))
        return len(pts)

    n = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    assert n > 0
    _record(benchmark, n)


def test_precompute_end_to_end_skimage(benchmark, tmp_path):
    """End to end, decoding included (PNG/JPEG decoding of scikit-image's pictures), one worker."""
    from engine.data.precompute import precompute

    benchmark.group = "precompute"
    k = [0]

    def run():
        k[0] += 1
        return precompute(["builtin:skimage"], tmp_path / f"p{k[0]}.zarr", progress=False)

    s = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    assert s.patches > 0
    _record(benchmark, s.patches)
