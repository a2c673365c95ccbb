"""Precompute: turn image sources into a patch store, resumably.

Each image is decoded and converted (``engine.data.sources``), cut into patches on a ``stride`` grid, and its
patches' sharpness and complexity are computed with ``engine.metrics`` (one batch per image, split in batches of
256), in ``workers`` processes; results are consumed in source order, so the store is byte-for-byte the same for any
worker count. Patches are committed chunk by chunk (``engine.data.progress``): a run killed at any instant, SIGKILL
included, and re-run with the same arguments ends with exactly the store an uninterrupted run writes.

A re-run with other arguments against an unfinished store raises PrecomputeError; a re-run of a finished store with
the same arguments does nothing; a run that finds another one writing the same store stops with PrecomputeError.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine.data import store as st
from engine.data.atomic_dir import stale_temps
from engine.data.progress import (PROGRESS_DIR, STATE_FILE, PrecomputeError, ProgressLock, StoreWriter,
                                  create_incomplete_store, diff_params)
from engine.data.sources import SKIP_SMALL, SourceItem, cut_patches, decode_item, describe_items, discover, patch_count

__all__ = ["PROGRESS_DIR", "PrecomputeError", "Summary", "measure_patches", "precompute", "process_image"]

#: patches per call of the metrics (bounds their temporary memory)
METRIC_BATCH = 256


@dataclass
class Summary:
    """What a precompute did.

    Attributes
    ----------
    store : str
        The store path.
    images, images_read : int
        Sources discovered; images decoded and cut.
    skipped, converted : dict
        Image counts by skip reason and by conversion (see ``engine.data.sources``).
    patches : int
        Patches in the store.
    patches_this_run : int
        Patches this run added.
    seconds, patches_per_s : float
        Wall time of this run and its patch rate.
    resumed_from : int
        Committed patches found at the start (0 for a fresh run).
    already_complete : bool
        The store was already complete with these arguments (nothing was done).
    workers : int
        Worker processes used.
    """

    store: str
    images: int = 0
    images_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    patches: int = 0
    patches_this_run: int = 0
    seconds: float = 0.0
    patches_per_s: float = 0.0
    resumed_from: int = 0
    already_complete: bool = False
    workers: int = 1

    def format(self) -> str:
        """A few lines for a human: counts by reason, patches and speed."""
        lines = [f"store: {self.store}"]
        if self.already_complete:
            lines.append("already complete with these arguments: nothing to do")
        if self.resumed_from:
            lines.append(f"resumed after {self.resumed_from} committed patches")
        lines.append(f"images: {self.images} found, {self.images_read} read")
        for title, d in (("skipped", self.skipped), ("converted", self.converted)):
            if d:
                lines.append(f"{title}: " + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
            else:
                lines.append(f"{title}: none")
        lines.append(f"patches: {self.patches} in the store, {self.patches_this_run} written by this run in "
                     f"{self.seconds:.2f} s ({self.patches_per_s:,.0f} patches/s, {self.workers} worker"
                     f"{'s' if self.workers != 1 else ''})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# per-image work (runs in worker processes)

_WORK: dict[str, Any] = {}


def _init_worker(items: list[SourceItem], patch: int, stride: int, single_thread: bool = True) -> None:
    _WORK.update(items=items, patch=patch, stride=stride)
    if single_thread:
        # each pool worker is one core: keep numba's parallel metrics from oversubscribing the machine
        try:
            import numba

            numba.set_num_threads(1)
        except Exception:
            pass


def _metrics(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sharpness [n], complexity [n] and complexity profile [n, L] of uint8 NHWC patches (float64)."""
    from engine import metrics

    n, h, w = patches.shape[:3]
    sh = np.empty(n, np.float64)
    prof = np.empty((n, metrics.complexity_levels(h, w)), np.float64)
    for s in range(0, n, METRIC_BATCH):
        b = patches[s:s + METRIC_BATCH]
        sh[s:s + len(b)] = metrics.sharpness(b)
        prof[s:s + len(b)] = metrics.complexity_profile(b)
    # the profile's terms added left to right: bit for bit what metrics.complexity returns on the CPU
    return sh, metrics.complexity_from_profile(prof), prof


def process_image(task: tuple[int, int]) -> tuple[int, dict, dict | None]:
    """Decode one source image, cut its patches and measure them (runs in a worker process).

    Parameters
    ----------
    task : tuple of int
        ``(i, start)``: index into the worker's source list, and the grid index of the first patch to cut.

    Returns
    -------
    tuple
        ``(i, record, data)``: ``record`` is the image's entry of the store's ``sources`` attribute (``path``,
        ``kind``, ``category``, ``size`` in bytes, ``sha256``, ``conversions``, ``status`` "ok" or the skip reason,
        ``patches``, and ``height`` / ``width`` once decoded); ``data`` is ``measure_patches``'s dict, or None for a
        skipped image.
    """
    i, start = task
    item: SourceItem = _WORK["items"][i]
    patch, stride = _WORK["patch"], _WORK["stride"]
    d = decode_item(item)
    rec: dict[str, Any] = {"path": item.path, "kind": item.kind, "category": item.category, "size": d.size,
                           "sha256": d.sha256, "conversions": list(d.conversions), "status": "ok", "patches": 0}
    if d.rgb is None:
        rec["status"] = d.skip
        if d.detail:
            rec["detail"] = d.detail
        return i, rec, None
    h, w = d.rgb.shape[:2]
    rec.update(height=int(h), width=int(w))
    n = patch_count(h, w, patch, stride)
    rec["patches"] = n
    if n == 0:
        rec["status"] = SKIP_SMALL
        return i, rec, None
    return i, rec, measure_patches(d.rgb, patch, stride, start)


def measure_patches(rgb: np.ndarray, patch: int, stride: int, start: int = 0) -> dict:
    """Cut an image into patches and measure them: the per-image work of precompute after decoding.

    Parameters
    ----------
    rgb : numpy.ndarray
        uint8 [H, W, 3] (HWC, RGB, 0..255).
    patch, stride : int
        Patch side and grid step in pixels.
    start : int
        Grid index of the first patch (row-major over the grid of ``engine.data.sources.cut_patches``).

    Returns
    -------
    dict
        ``patches``: uint8 [n, patch, patch, 3] (NHWC, 0..255); ``origins``: int32 [n, 2], (y, x) of each top-left
        corner in pixels; ``sharpness``: float64 [n], Laplacian variance on the 0..255 scale; ``complexity``:
        float64 [n], multiscale structural complexity of the 0..1-scaled patch (``engine.metrics``);
        ``complexity_profile``: float64 [n, L], its per-level terms (``L = floor(log2(patch))``).
    """
    patches, origins = cut_patches(rgb, patch, stride, start)
    sh, cx, prof = _metrics(patches)
    return {"patches": patches, "origins": origins, "sharpness": sh, "complexity": cx, "complexity_profile": prof}


def _results(job: _Job, first: int, start: int) -> Iterator[tuple[int, dict, dict | None]]:
    """``process_image`` results in source order from image ``first`` (grid index ``start``) to the last."""
    items = job.items
    tasks = [(first, start)] + [(i, 0) for i in range(first + 1, len(items))] if first < len(items) else []
    if job.workers <= 1:
        _init_worker(items, job.patch, job.stride, single_thread=False)  # in-process: leave the caller's threads
        for t in tasks:
            yield process_image(t)
        return
    import multiprocessing as mp

    # spawn: workers start clean (no inherited numba/CUDA/thread state); imap keeps source order
    ctx = mp.get_context("spawn")
    with ctx.Pool(job.workers, initializer=_init_worker, initargs=(items, job.patch, job.stride)) as pool:
        yield from pool.imap(process_image, tasks, chunksize=1)


# ----------------------------------------------------------------------------------------------------------------
# the run

@dataclass(frozen=True)
class _Job:
    """A precompute's checked arguments and start time."""

    out: Path
    items: list[SourceItem]
    identity: list[dict]
    params: dict
    patch: int
    stride: int
    chunk_patches: int
    workers: int
    progress: bool
    commit_seconds: float
    t0: float
    started: str


def precompute(sources: list[str] | str, out: str | os.PathLike, patch: int = 128, stride: int = 128,
               category: str | None = None, workers: int = 1, progress: bool = True, *,
               chunk_patches: int = st.CHUNK_PATCHES, commit_seconds: float = 1.0) -> Summary:
    """Build (or finish) the patch store ``out`` from image sources.

    The store holds every patch of every image on the ``stride`` grid with its metrics and origin (format:
    ``engine.data.store``). Interrupted runs resume: re-run the same call.

    Parameters
    ----------
    sources : str or list of str
        Image files, folders (recursive), globs, ``builtin:skimage`` and ``builtin:procedural``; see
        ``engine.data.sources``.
    out : str or os.PathLike
        The store folder: new, an empty folder, or a store an earlier run with the same arguments started.
    patch : int
        Patch side in pixels (>= 2).
    stride : int
        Grid step in pixels (>= 1); less than ``patch`` gives overlapping patches.
    category : str, optional
        One category name for every patch (default: per source, see ``engine.data.sources.discover``).
    workers : int
        Decoding and metrics processes (>= 1); the store does not depend on it. They are started with
        multiprocessing's "spawn", so a script calling this with workers > 1 needs the usual
        ``if __name__ == "__main__":`` guard.
    progress : bool
        Show a progress bar on stderr.
    chunk_patches : int
        Patches per chunk file (64; small values are for tests).
    commit_seconds : float
        How often progress is committed, in seconds (at least one whole chunk per commit).

    Returns
    -------
    Summary
        Counts by reason, patches in the store and written by this run, speed.

    Raises
    ------
    PrecomputeError
        Bad arguments; ``out`` is something else than a store; the store was made with other arguments or from
        sources that changed since; another precompute is writing it.
    engine.data.sources.SourceError
        A source names nothing usable.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    specs = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    specs = [str(s) for s in specs]
    for name, v, lo in (("patch", patch, 2), ("stride", stride, 1), ("workers", workers, 1),
                        ("chunk_patches", chunk_patches, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise PrecomputeError(f"{name}: expected an integer >= {lo}, got {v!r}")
    patch, stride, workers, chunk_patches = int(patch), int(stride), int(workers), int(chunk_patches)
    if category is not None and not str(category).strip():
        raise PrecomputeError("category: expected a non-empty name")
    items = discover(specs, category)
    params = {"sources": list(specs), "patch": patch, "stride": stride, "category": category,
              "chunk_patches": chunk_patches}
    job = _Job(out=Path(out), items=items, identity=describe_items(items), params=params, patch=patch,
               stride=stride, chunk_patches=chunk_patches, workers=workers, progress=progress,
               commit_seconds=commit_seconds, t0=t0, started=started)
    _ensure_store(job)
    prog = job.out / PROGRESS_DIR
    lock = ProgressLock(job.out) if prog.is_dir() else None
    try:
        try:
            existing = st.open_store(job.out, allow_incomplete=True)
        except st.StoreError as e:
            raise PrecomputeError(f"--out {str(job.out)!r}: {e}") from e
        old = existing.attrs.get("params") or {}
        if old != params:
            raise PrecomputeError(f"store {str(job.out)!r} was made with other arguments "
                                  f"({diff_params(old, params)}); re-run with the original arguments or choose a "
                                  f"new --out")
        if existing.complete:
            shutil.rmtree(prog, ignore_errors=True)  # killed after marking complete: only cleanup was left
            c = existing.attrs.get("counts", {})
            return Summary(store=str(job.out), images=c.get("images", 0), images_read=c.get("images_read", 0),
                           skipped=c.get("skipped", {}), converted=c.get("converted", {}),
                           patches=existing.count, seconds=time.perf_counter() - t0, already_complete=True,
                           workers=workers)
        if lock is None or not (prog / STATE_FILE).is_file():
            raise PrecomputeError(f"store {str(job.out)!r} is incomplete and its progress record is missing; "
                                  f"delete it and run again")
        return _run(job)
    finally:
        if lock is not None:
            lock.release()


def _ensure_store(job: _Job) -> None:
    """Make sure ``job.out`` is a store folder: create it (incomplete) when it is missing or an empty folder."""
    out = job.out
    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for us
    # a run killed while creating the store leaves only its temporary sibling: remove it (not one that a live run
    # is building right now)
    for old in stale_temps(out):
        shutil.rmtree(old, ignore_errors=True)
    if not out.exists():
        create_incomplete_store(out, job.params, job.identity, list(dict.fromkeys(it.category for it in job.items)))
    elif not (out / "zarr.json").is_file():
        raise PrecomputeError(f"--out {str(out)!r} exists and is not a rainsweep store; choose a new path")


def _run(job: _Job) -> Summary:
    """Continue the incomplete store ``job.out`` from its last commit to the end."""
    writer = StoreWriter.open(job.out, job.params, job.identity)
    k0, j0 = writer.position
    bar = None
    if job.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(job.items), initial=k0, unit="img", desc="precompute", file=sys.stderr,
                   dynamic_ncols=True)
    next_image = k0
    try:
        for i, rec, data in _results(job, k0, j0):
            writer.add(i, rec, data, start=j0 if i == k0 else 0)
            next_image = i + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(patches=writer.committed + writer.buffered, refresh=False)
            if writer.commit_due(job.commit_seconds):
                writer.commit(next_image)
        # the tail: whole chunks first (same protocol), then the partial last chunk in finalize
        writer.commit(next_image)
        counts = writer.finalize(len(job.items), job.started, job.t0, job.workers)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - job.t0
    total = counts["patches"]
    this_run = total - writer.resumed_from
    return Summary(store=str(job.out), images=counts["images"], images_read=counts["images_read"],
                   skipped=counts["skipped"], converted=counts["converted"], patches=total,
                   patches_this_run=this_run, seconds=seconds,
                   patches_per_s=this_run / seconds if seconds > 0 else 0.0, resumed_from=writer.resumed_from,
                   workers=job.workers)
