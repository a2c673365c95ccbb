"""Store benchmarks (pytest-benchmark): write rate, sequential and random read rates, precompute ingest rate from
decoded images and end-to-end precompute, all on one thread (``engine.bench.timing.thread_limit(1)``).
``extra_info['patches_per_s']`` holds the rate. What a timed call returned is checked against the data written
(reads: the exact patches; writes: the store read back; ingest: the patches cut by hand from the images).

Run: ``pytest bench/test_bench_store.py`` (RAINSWEEP_BENCH_STORE_PATCHES sets the store size, default 4096).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from engine.bench import store as SB
from engine.bench.timing import thread_limit
from engine.data.store import open_store, write_store

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
    with thread_limit(1):
        yield


def _record(benchmark, patches: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["patches_per_s"] = patches / benchmark.stats.stats.median


def _assert_batches(out: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(out) == len(expected)
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(got, want)


def test_store_write(benchmark, data, tmp_path):
    benchmark.group = "store-write"
    k = [0]

    def run():
        k[0] += 1
        return write_store(tmp_path / f"w{k[0]}.zarr", data, sharpness=np.zeros(N), complexity=np.zeros(N))

    s = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    assert s.count == N
    back = open_store(s.path)
    for start in range(0, N, BATCH):
        np.testing.assert_array_equal(back.read_range(start, min(N, start + BATCH)), data[start:start + BATCH])
    _record(benchmark, N)


SEQUENTIAL = [slice(s, s + BATCH) for s in range(0, N - BATCH + 1, BATCH)]


def test_store_read_sequential(benchmark, store, data):
    benchmark.group = "store-read"
    out = benchmark(lambda: [store.read_range(s.start, s.stop) for s in SEQUENTIAL])
    _assert_batches(out, [data[s] for s in SEQUENTIAL])
    _record(benchmark, N // BATCH * BATCH)


def test_store_read_random(benchmark, store, data):
    benchmark.group = "store-read"
    idx = np.random.default_rng(0).integers(0, N, (16, BATCH))
    out = benchmark(lambda: [store.read(i) for i in idx])
    _assert_batches(out, [data[i] for i in idx])
    _record(benchmark, idx.size)


def test_store_read_sequential_plain_zarr(benchmark, store, data):
    benchmark.group = "store-read"
    out = benchmark(lambda: [store.patches[s] for s in SEQUENTIAL])
    _assert_batches(out, [data[s] for s in SEQUENTIAL])
    _record(benchmark, N // BATCH * BATCH)


def _grid_patches(images: list[np.ndarray], size: int) -> np.ndarray:
    """Every image cut by hand into ``size`` x ``size`` patches, stride ``size``, row-major, from the top left."""
    return np.array([im[y:y + size, x:x + size] for im in images
                     for y in range(0, im.shape[0] - size + 1, size)
                     for x in range(0, im.shape[1] - size + 1, size)], dtype=np.uint8)


def test_precompute_ingest_from_decoded(benchmark, tmp_path):
    """The figure: precompute >= 2,000 patches/s per core including both metrics, from decoded images."""
    benchmark.group = "precompute"
    images = SB.decoded_images()
    k = [0]

    def run():
        k[0] += 1
        return SB.ingest_images(images, tmp_path / f"i{k[0]}.zarr")

    n = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    expected = _grid_patches(images, 128)
    assert n == len(expected) > 0
    written = open_store(tmp_path / f"i{k[0]}.zarr")
    for start in range(0, n, BATCH):
        np.testing.assert_array_equal(written.read_range(start, min(n, start + BATCH)), expected[start:start + BATCH])
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
    assert s.patches > 0 and open_store(tmp_path / f"p{k[0]}.zarr").count == s.patches
    _record(benchmark, s.patches)


def test_run_store_bench_rows():
    """``python -m engine.bench.store``'s rows: every case, positive rates."""
    rows = SB.run_store_bench(patches=64, seconds=0.0, batch=16, ingest=False)
    assert [r["case"] for r in rows] == ["store write", "store read sequential", "store read random",
                                         "store read sequential (plain zarr)"]
    assert all(r["patches_per_s"] > 0 and r["patches_per_cpu_s"] > 0 for r in rows)
