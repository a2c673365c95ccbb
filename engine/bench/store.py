"""Store benchmarks as plain functions, used by ``bench/test_bench_store.py`` and ``python -m engine.bench.store``.

Store write rate, sequential and random read rates, and precompute's ingest rate (cut + both metrics + store write,
from decoded images) on one core. Rates are patches/s, the median over repeats of ``engine.bench.timing.measure``;
patches are uint8 NHWC ``[N, 128, 128, 3]`` (0..255) unless stated.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from engine.bench.timing import measure, thread_limit


@dataclass
class Rate:
    """Median rates of one store benchmark.

    Attributes
    ----------
    wall : float
        Patches per wall-clock second.
    cpu : float
        Patches per CPU second of this process (all its threads): on a shared, oversubscribed machine the honest
        per-core figure.
    """

    wall: float
    cpu: float


def _rate(fn: Callable[[], int], seconds: float, cleanup: Callable[[], None] | None = None) -> Rate:
    """Median rates of ``fn`` (returns how many patches it handled) over at least 3 calls and ``seconds``."""
    timing = measure(fn, None, seconds=seconds, max_repeats=None, cleanup=cleanup)
    return Rate(timing.median, timing.cpu_median)


def _remover(folder: str) -> Callable[[], None]:
    def clean() -> None:
        for name in os.listdir(folder):
            if name.endswith(".zarr") and name[:1] in ("w", "i"):
                shutil.rmtree(os.path.join(folder, name))
    return clean


def random_patches(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Uniform random patches, uint8 NHWC ``[n, size, size, 3]``, 0..255 (store costs do not depend on content)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def bench_write(patches: np.ndarray, folder: str, seconds: float = 1.0) -> Rate:
    """Rate of ``write_store`` (metrics given, so only the store is timed).

    Parameters
    ----------
    patches : numpy.ndarray
        uint8 NHWC ``[N, H, W, 3]``, 0..255.
    folder : str
        Where the stores are written (each is deleted after its call, off the clock).
    seconds : float
        Minimum timed seconds.

    Returns
    -------
    Rate
    """
    from engine.data.store import write_store

    zeros = np.zeros(len(patches))
    k = [0]

    def run() -> int:
        k[0] += 1
        write_store(os.path.join(folder, f"w{k[0]}.zarr"), patches, sharpness=zeros, complexity=zeros)
        return len(patches)

    return _rate(run, seconds, cleanup=_remover(folder))


def bench_reads(store: Any, batch: int = 256, seconds: float = 1.0, seed: int = 0) -> dict[str, Rate]:
    """Read rates of a page-cached ``PatchStore``.

    Parameters
    ----------
    store : engine.data.store.PatchStore
        The store to read.
    batch : int
        Patches per read.
    seconds : float
        Minimum timed seconds per case.
    seed : int
        Seed of the random indices.

    Returns
    -------
    dict of str to Rate
        ``sequential`` (``read_range`` in store order), ``random`` (``read`` of random indices) and
        ``zarr_sequential`` (plain zarr slicing in store order).
    """
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
    """Decoded pictures for the ingest benchmark.

    Returns
    -------
    list of numpy.ndarray
        scikit-image's bundled set plus 16 procedural 512 x 512 images, uint8 RGB ``[H, W, 3]``, 0..255.
    """
    from engine.data.sources import decode_item, discover

    items = discover(["builtin:skimage", "builtin:procedural?images=16&size=512"])
    return [d.rgb for d in (decode_item(it) for it in items) if d.rgb is not None]


def ingest_images(images: list[np.ndarray], path: str | os.PathLike, patch: int = 128, stride: int = 128) -> int:
    """Precompute's work after decoding, on the calling thread: cut patches, sharpness and complexity, write a store.

    Parameters
    ----------
    images : list of numpy.ndarray
        Decoded pictures, uint8 RGB ``[H, W, 3]``, 0..255.
    path : str or os.PathLike
        The store to write.
    patch, stride : int
        Patch size and stride in pixels.

    Returns
    -------
    int
        Patches written.
    """
    from engine.data.precompute import measure_patches
    from engine.data.store import write_store

    parts = [measure_patches(im, patch, stride) for im in images]
    parts = [p for p in parts if len(p["patches"])]
    write_store(path, np.concatenate([p["patches"] for p in parts]),
                sharpness=np.concatenate([p["sharpness"] for p in parts]),
                complexity=np.concatenate([p["complexity"] for p in parts]),
                origin=np.concatenate([p["origins"] for p in parts]))
    return sum(len(p["patches"]) for p in parts)


def bench_ingest(images: list[np.ndarray], folder: str, patch: int = 128, stride: int = 128,
                 seconds: float = 1.0) -> Rate:
    """Rate of ``ingest_images`` (cut, sharpness, complexity, store write; chunks, digests, metadata).

    Parameters
    ----------
    images : list of numpy.ndarray
        Decoded pictures, uint8 RGB ``[H, W, 3]``, 0..255.
    folder : str
        Where the stores are written (each is deleted after its call, off the clock).
    patch, stride : int
        Patch size and stride in pixels.
    seconds : float
        Minimum timed seconds.

    Returns
    -------
    Rate
    """
    k = [0]

    def run() -> int:
        k[0] += 1
        return ingest_images(images, os.path.join(folder, f"i{k[0]}.zarr"), patch, stride)

    return _rate(run, seconds, cleanup=_remover(folder))


def bench_precompute(folder: str, sources: list[str] | None = None, workers: int = 1, patch: int = 128,
                     stride: int = 128) -> float:
    """End-to-end ``precompute`` (decoding included) on built-in sources: one run after a warm-up run.

    Parameters
    ----------
    folder : str
        Where the stores are written.
    sources : list of str, optional
        Source specs (default ``["builtin:skimage"]``).
    workers : int
        precompute's worker processes.
    patch, stride : int
        Patch size and stride in pixels.

    Returns
    -------
    float
        Patches/s that precompute reports.
    """
    from engine.data.precompute import precompute

    sources = sources or ["builtin:skimage"]
    precompute(sources, os.path.join(folder, "warm.zarr"), patch=patch, stride=stride, workers=workers,
               progress=False)
    s = precompute(sources, os.path.join(folder, "p.zarr"), patch=patch, stride=stride, workers=workers,
                   progress=False)
    return s.patches_per_s


def run_store_bench(patches: int = 4096, patch_size: int = 128, seconds: float = 1.0, batch: int = 256,
                    ingest: bool = True) -> list[dict]:
    """All store cases on one thread (``thread_limit(1)``), in a temporary folder.

    Parameters
    ----------
    patches : int
        Patches in the written and read stores.
    patch_size : int
        Patch side in pixels.
    seconds : float
        Minimum timed seconds per case.
    batch : int
        Patches per read.
    ingest : bool
        Also time precompute's ingest from decoded images.

    Returns
    -------
    list of dict
        Rows ``{case, patches_per_s, patches_per_cpu_s, note}``.
    """
    from engine.data.store import write_store

    rows: list[dict] = []

    def row(case: str, r: Rate, note: str) -> None:
        rows.append({"case": case, "patches_per_s": r.wall, "patches_per_cpu_s": r.cpu, "note": note})

    with tempfile.TemporaryDirectory(prefix="rainsweep-store-bench-") as tmp, thread_limit(1):
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
