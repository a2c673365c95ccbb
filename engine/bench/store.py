"""Store benchmarks as plain functions (used by bench/test_bench_store.py and callable from ``rainsweep bench``):
store write rate, sequential and random read rates, and precompute's ingest rate (cut + both metrics + store
write, from decoded images) on one core. Rates are patches/s; patches are 128 x 128 x 3 uint8 unless stated."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run numba kernels on one thread (per-core figures), restoring the previous count afterwards."""
    try:
        import numba
    except ImportError:  # pragma: no cover
        yield
        return
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(old)


@dataclass
class Rate:
    """Median patches per wall-clock second, and per CPU second of this process (all its threads): on a shared,
    oversubscribed machine the second is the honest per-core figure."""

    wall: float
    cpu: float


def _rate(fn: Callable[[], int], seconds: float, min_repeats: int = 3,
          cleanup: Callable[[], None] | None = None) -> Rate:
    """Median rates of ``fn`` (returns how many patches it handled) over >= min_repeats calls and >= seconds;
    ``cleanup`` runs after each call, off the clock (deleting a written store is not part of writing it)."""
    fn()  # warm-up: page cache, numba compilation, file descriptors
    if cleanup:
        cleanup()
    wall, cpu, t_end = [], [], time.perf_counter() + seconds
    while len(wall) < min_repeats or time.perf_counter() < t_end:
        t, c = time.perf_counter(), time.process_time()
        n = fn()
        wall.append(n / (time.perf_counter() - t))
        cpu.append(n / max(time.process_time() - c, 1e-9))
        if cleanup:
            cleanup()
    return Rate(float(np.median(wall)), float(np.median(cpu)))


def _remover(folder: str) -> Callable[[], None]:
    def clean() -> None:
        for name in os.listdir(folder):
            if name.endswith(".zarr") and name[:1] in ("w", "i"):
                shutil.rmtree(os.path.join(folder, name))
    return clean


def random_patches(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def bench_write(patches: np.ndarray, folder: str, seconds: float = 1.0) -> Rate:
    """write_store rate (metrics given, so only the store is timed)."""
    from engine.data.store import write_store

    zeros = np.zeros(len(patches))
    k = [0]

    def run() -> int:
        k[0] += 1
        write_store(os.path.join(folder, f"w{k[0]}.zarr"), patches, sharpness=zeros, complexity=zeros)
        return len(patches)

    return _rate(run, seconds, cleanup=_remover(folder))


def bench_reads(store, batch: int = 256, seconds: float = 1.0, seed: int = 0) -> dict[str, Rate]:
    """PatchStore.read rates: sequential batches in store order and batches of random indices (page-cached)."""
    rng = np.random.default_rng(seed)
    n = store.count
    pos = [0]

    def seq() -> int:
        s = pos[0] if pos[0] + batch <= n else 0
        pos[0] = s + batch
        return len(store.read_range(s, min(n, s + batch)))

    def rnd() -> int:
        return len(store.read(rng.integers(0, n, batch)))

    def zarr_seq() -> int:
        s = pos[0] if pos[0] + batch <= n else 0
        pos[0] = s + batch
        return len(store.patches[s:min(n, s + batch)])

    return {"sequential": _rate(seq, seconds), "random": _rate(rnd, seconds),
            "zarr_sequential": _rate(zarr_seq, seconds)}


def decoded_images() -> list[np.ndarray]:
    """Decoded pictures for the ingest benchmark: scikit-image's bundled set plus 16 procedural images."""
    from engine.data.sources import decode_item, discover

    items = discover(["builtin:skimage", "builtin:procedural?images=16&size=512"])
    return [d.rgb for d in (decode_item(it) for it in items) if d.rgb is not None]


def bench_ingest(images: list[np.ndarray], folder: str, patch: int = 128, stride: int = 128,
                 seconds: float = 1.0) -> Rate:
    """Precompute's work after decoding, on the calling thread: cut patches, sharpness and complexity, write the
    store (chunks, digests, metadata). Patches/s."""
    from engine.data.precompute import measure_patches
    from engine.data.store import write_store

    k = [0]

    def run() -> int:
        parts = [measure_patches(im, patch, stride) for im in images]
        parts = [p for p in parts if len(p["patches"])]
        k[0] += 1
        path = os.path.join(folder, f"i{k[0]}.zarr")
        write_store(path, np.concatenate([p["patches"] for p in parts]),
                    sharpness=np.concatenate([p["sharpness"] for p in parts]),
                    complexity=np.concatenate([p["complexity"] for p in parts]),
                    origin=np.concatenate([p["origins"] for p in parts]))
        return sum(len(p["patches"]) for p in parts)

    return _rate(run, seconds, cleanup=_remover(folder))


def bench_precompute(folder: str, sources: list[str] | None = None, workers: int = 1, patch: int = 128,
                     stride: int = 128) -> float:
    """End-to-end ``precompute`` (decode included) on built-in sources; one run after a warm-up run."""
    from engine.data.precompute import precompute

    sources = sources or ["builtin:skimage"]
    precompute(sources, os.path.join(folder, "warm.zarr"), patch=patch, stride=stride, workers=workers,
               progress=False)
    s = precompute(sources, os.path.join(folder, "p.zarr"), patch=patch, stride=stride, workers=workers,
                   progress=False)
    return s.patches_per_s


def run_store_bench(patches: int = 4096, patch_size: int = 128, seconds: float = 1.0, batch: int = 256,
                    ingest: bool = True) -> list[dict]:
    """All store cases, numba on one thread, in a temporary folder: rows {case, patches_per_s,
    patches_per_cpu_s, note}."""
    from engine.data.store import write_store

    rows: list[dict] = []

    def row(case: str, r: Rate, note: str) -> None:
        rows.append({"case": case, "patches_per_s": r.wall, "patches_per_cpu_s": r.cpu, "note": note})

    with tempfile.TemporaryDirectory(prefix="rainsweep-store-bench-") as tmp, one_thread():
        data = random_patches(patches, patch_size)
        row("store write", bench_write(data, tmp, seconds), f"{patches} patches, write_store")
        store = write_store(os.path.join(tmp, "r.zarr"), data, sharpness=np.zeros(patches),
                            complexity=np.zeros(patches))
        r = bench_reads(store, batch, seconds)
        row("store read sequential", r["sequential"], f"batches of {batch}, PatchStore.read_range, page-cached")
        row("store read random", r["random"], f"batches of {batch} random indices, PatchStore.read, page-cached")
        row("store read sequential (plain zarr)", r["zarr_sequential"], f"batches of {batch}, zarr slicing")
        if ingest:
            imgs = decoded_images()
            row("precompute ingest (decoded images)", bench_ingest(imgs, tmp, seconds=seconds),
                "cut + sharpness + complexity + store write, 1 core")
    return rows


if __name__ == "__main__":  # python -m engine.bench.store
    for r in run_store_bench():
        print(f"{r['case']:<40} {r['patches_per_s']:>10,.0f} /s wall {r['patches_per_cpu_s']:>10,.0f} /s cpu"
              f"   {r['note']}")
