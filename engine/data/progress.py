"""The commit protocol of ``engine.data.precompute``: a store written chunk by chunk so that a run killed at any
instant, SIGKILL included, and re-run with the same arguments ends with exactly the store an uninterrupted run
writes.

1. The store folder appears atomically (``create_incomplete_store``): it is built under a temporary name with its
   initial progress record and renamed into place (``engine.data.atomic_dir``).
2. Patches are written only in whole chunks beyond the committed count, so a write never touches a committed chunk
   file (the protocol does not depend on zarr writing files atomically, which zarr-python only does since 3.1.3,
   PR #3412).
3. The chunk's metadata rows go to a new segment file ``seg-NNNNNN.npz`` in ``<store>/rainsweep-progress/``
   (written atomically).
4. Then ``state.json`` in that folder is replaced atomically: committed patch count, the resume position (image k,
   grid index j), the finished images' records, the segment count and the chunk digests. This is the commit point;
   anything written after the last commit is removed on resume (``StoreWriter.open``) and written again.
5. At the end (``StoreWriter.finalize``): the last partial chunk, the metadata arrays (from the segments), the
   attributes with ``complete: true`` (the store becomes openable), then the progress folder is removed. A kill in
   between is finished by the next run.

``ProgressLock`` (``fcntl``) stops two runs writing one store at once.

Test hook: when the environment variable ``RAINSWEEP_PRECOMPUTE_HOOK`` is ``"<phase>"`` or ``"<phase>@<n>"``, the
run prints ``HOOK <phase>`` to stderr and sleeps the n-th time (default the first) it reaches that phase, so a test
can SIGKILL it inside that exact window; any value also makes it print ``committed <count>`` after each commit.
Phases: ``before_rename`` (store folder built, not yet renamed into place), ``after_data``, ``after_segment``,
``after_commit``, ``before_finalize``, ``before_attrs``, ``after_attrs``.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.atomic import atomic_write, atomic_write_json
from engine.data import store as st
from engine.data.atomic_dir import build_dir

PROGRESS_DIR = "rainsweep-progress"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
HOOK_ENV = "RAINSWEEP_PRECOMPUTE_HOOK"
_hook_seen: dict[str, int] = {}


class PrecomputeError(ValueError):
    """Precompute cannot run: bad arguments, an existing store made with other arguments, or a store another
    precompute is writing."""


def _hook(phase: str) -> None:
    want = os.environ.get(HOOK_ENV)
    if not want:
        return
    name, _, nth = want.partition("@")
    if name != phase:
        return
    _hook_seen[phase] = _hook_seen.get(phase, 0) + 1
    if _hook_seen[phase] == int(nth or 1):
        print(f"HOOK {phase}", file=sys.stderr, flush=True)
        time.sleep(600)


def busy_error(out: Path) -> PrecomputeError:
    """The error of a run that finds another precompute writing the store ``out``."""
    return PrecomputeError(f"store {str(out)!r}: another precompute is writing it right now; wait for it to "
                           f"finish")


def diff_params(then: dict, now: dict) -> str:
    """``"key: <then> then, <now> now; ..."`` for the keys whose values differ (for error messages)."""
    keys = sorted(set(then) | set(now))
    return "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in keys if then.get(k) != now.get(k))


class ProgressLock:
    """An exclusive ``fcntl`` lock on ``<store>/rainsweep-progress/lock``, held until ``release``.

    Parameters
    ----------
    out : Path
        The store folder; its progress folder must exist.

    Raises
    ------
    PrecomputeError
        Another process holds the lock (``busy_error``).
    """

    def __init__(self, out: Path) -> None:
        self.f = open(Path(out) / PROGRESS_DIR / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.f.close()
            raise busy_error(Path(out)) from e

    def release(self) -> None:
        """Release the lock (closing the file releases it)."""
        self.f.close()


def create_incomplete_store(out: Path, params: dict, identity: list[dict], categories: list[str]) -> None:
    """Create the empty, incomplete store ``out`` with its initial progress record, atomically.

    Parameters
    ----------
    out : Path
        The store folder; it must not exist yet.
    params : dict
        The run's arguments (``sources``, ``patch``, ``stride``, ``category``, ``chunk_patches``), recorded in the
        attributes and the progress record so a re-run with other arguments is refused.
    identity : list of dict
        ``engine.data.sources.describe_items`` of the discovered sources (detects changed inputs on resume).
    categories : list of str
        Category names, in code order.

    Raises
    ------
    PrecomputeError
        Another precompute created ``out`` while this one was building it (the other run owns the store).
    """
    patch, chunk_patches = params["patch"], params["chunk_patches"]
    info = {"schema": st.SCHEMA_VERSION, "complete": False, "count": 0, "patch_size": patch,
            "stride": params["stride"], "chunk_patches": chunk_patches, "categories": list(categories),
            "sources": [], "params": params, "rainsweep_version": st.rainsweep_version(), "run": {}}

    def build(tmp: Path) -> None:
        st.create_layout(tmp, patch, info, chunk_patches=chunk_patches, capacity=0)
        (tmp / PROGRESS_DIR).mkdir()
        atomic_write_json(tmp / PROGRESS_DIR / STATE_FILE, {
            "params": params, "identity": identity, "committed": 0, "position": [0, 0], "records": [],
            "segments": 0, "digests": []}, indent=1, sort_keys=True)
        _hook("before_rename")

    try:
        build_dir(out, build)
    except FileExistsError as e:
        raise busy_error(out) from e


def record_counts(records: list[dict]) -> dict:
    """Counts over source records: ``images``, ``images_read``, ``skipped`` and ``converted`` (image counts by
    reason) and ``patches``. An image's conversions count once it was decoded, even if it then was too small."""
    skipped: dict[str, int] = {}
    converted: dict[str, int] = {}
    read = 0
    for r in records:
        if r["status"] == "ok":
            read += 1
        else:
            skipped[r["status"]] = skipped.get(r["status"], 0) + 1
        if r.get("height") is not None:
            for c in r["conversions"]:
                converted[c] = converted.get(c, 0) + 1
    return {"images": len(records), "images_read": read, "skipped": skipped, "converted": converted,
            "patches": int(sum(r["patches"] for r in records if r["status"] == "ok"))}


def _check_state(out: Path, state: dict, params: dict, identity: list[dict]) -> None:
    if state["params"] != params:
        raise PrecomputeError(f"store {str(out)!r}: progress record made with other arguments "
                              f"({diff_params(state['params'], params)})")
    if state["identity"] != identity:
        changed = [a["path"] for a, b in zip(state["identity"], identity) if a != b]
        more = "" if len(state["identity"]) == len(identity) else (
            f" ({len(state['identity'])} sources then, {len(identity)} now)")
        raise PrecomputeError(f"store {str(out)!r}: the sources changed since the interrupted run{more}"
                              f"{': ' + ', '.join(changed[:5]) if changed else ''}; restore them or start a new "
                              f"store")


def _clean_uncommitted(out: Path, state: dict) -> None:
    """Remove whatever a killed run left beyond its last commit: extra segments, temp files, zarr partial files."""
    prog = out / PROGRESS_DIR
    for f in prog.iterdir():
        if f.name.startswith("seg-") and f.suffix == ".npz" and int(f.stem[4:]) >= state["segments"]:
            f.unlink()
        elif f.name.startswith("."):
            f.unlink()
    for f in out.rglob("*.partial"):  # zarr >= 3.1.3 writes chunk files via <name>.<uuid>.partial + rename
        f.unlink(missing_ok=True)
    for f in out.rglob(".*.tmp-*"):
        if f.is_file():
            f.unlink(missing_ok=True)


@dataclass
class StoreWriter:
    """One run's writing of an incomplete store: patches wait in a buffer until whole chunks are committed.

    Open one with ``StoreWriter.open``; feed each image's patches in source order with ``add``; ``commit`` whole
    chunks when due; ``finalize`` once every image was added.

    Attributes
    ----------
    out : Path
        The store folder.
    group : zarr.Group
        The store, open for writing.
    patches : zarr.Array
        Its ``patches`` array, writable (``engine.data.store.writable``).
    cat_code : dict
        Category name -> code (the store's ``categories`` attribute).
    state : dict
        The progress record as last committed (``state.json``); its ``records`` (finished images) and ``digests``
        (hex CRC-32 per committed chunk) lists grow in place.
    patch, chunk : int
        Patch side in pixels; patches per chunk.
    resumed_from : int
        Patches committed when this run opened the store (0 for a fresh store).
    committed, segments, capacity : int
        Patches and segment files committed so far; current length of the ``patches`` array.
    buffered : int
        Patches added but not yet committed.
    """

    out: Path
    group: Any
    patches: Any
    cat_code: dict[str, int]
    state: dict
    patch: int
    chunk: int
    resumed_from: int
    committed: int
    segments: int
    capacity: int
    buffered: int = 0
    last_commit: float = field(default_factory=time.perf_counter)
    #: buffered patches, one dict of columns per image part, in order (``_take`` splits the first)
    _buf: list[dict] = field(default_factory=list, init=False, repr=False)
    #: (image index, record) of images added but not yet covered by a commit
    _pending: list[tuple[int, dict]] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def open(cls, out: Path, params: dict, identity: list[dict]) -> StoreWriter:
        """Open the incomplete store ``out`` to continue from its last commit, removing anything written after it.

        Parameters
        ----------
        out : Path
            The store folder (its progress record must exist; hold its ``ProgressLock``).
        params, identity
            This run's arguments and source identity (see ``create_incomplete_store``).

        Raises
        ------
        PrecomputeError
            The progress record was made with other arguments or other sources.
        """
        import zarr

        state = json.loads((out / PROGRESS_DIR / STATE_FILE).read_text())
        _check_state(out, state, params, identity)
        _clean_uncommitted(out, state)
        group = zarr.open_group(str(out), mode="r+")
        patches = st.writable(group, "patches")
        categories = group.attrs[st.ATTR_KEY]["categories"]
        committed = int(state["committed"])
        return cls(out=out, group=group, patches=patches, cat_code={c: i for i, c in enumerate(categories)},
                   state=state, patch=int(params["patch"]), chunk=int(params["chunk_patches"]),
                   resumed_from=committed, committed=committed, segments=int(state["segments"]),
                   capacity=int(patches.shape[0]))

    @property
    def position(self) -> tuple[int, int]:
        """Where this run starts: (image index, grid index within that image) after the last commit."""
        k, j = self.state["position"]
        return int(k), int(j)

    @property
    def records(self) -> list[dict]:
        """Source records of the committed images, in source order."""
        return self.state["records"]

    def add(self, image: int, record: dict, data: dict | None, start: int) -> None:
        """Buffer the result of image ``image``: its source record, and its patches when it has any.

        Parameters
        ----------
        image : int
            Source index (the ``source`` metadata value of its patches).
        record : dict
            The image's source record (``engine.data.precompute.process_image``).
        data : dict or None
            ``measure_patches`` output: ``patches`` uint8 [n, P, P, 3] (NHWC, 0..255), ``origins`` int32 [n, 2],
            ``sharpness`` / ``complexity`` float64 [n], ``complexity_profile`` float64 [n, L]; None for a skipped
            image.
        start : int
            Grid index of the first patch (non-zero only for the image a resumed run starts inside).
        """
        self._pending.append((image, record))
        if data is None or not len(data["patches"]):
            return
        n = len(data["patches"])
        code = self.cat_code[record["category"]]
        self._buf.append({"patches": data["patches"], "origin": data["origins"], "sharpness": data["sharpness"],
                          "complexity": data["complexity"], st.PROFILE_ARRAY: data[st.PROFILE_ARRAY],
                          "source": np.full(n, image, np.int32),
                          "category": np.full(n, code, np.int16), "image": np.full(n, image, np.int64),
                          "grid": np.arange(start, start + n, dtype=np.int64)})
        self.buffered += n

    def commit_due(self, commit_seconds: float) -> bool:
        """Whether to commit now: at least one whole chunk is buffered, and ``commit_seconds`` have passed since
        the last commit or 16 chunks are buffered (bounding memory)."""
        due = time.perf_counter() - self.last_commit >= commit_seconds
        return self.buffered >= self.chunk and (due or self.buffered >= 16 * self.chunk)

    def _take(self, m: int) -> dict:
        """Pop the first ``m`` buffered patches, their columns concatenated."""
        parts, need = [], m
        while need:
            b = self._buf[0]
            n = len(b["patches"])
            if n <= need:
                parts.append(self._buf.pop(0))
                need -= n
            else:
                parts.append({k: v[:need] for k, v in b.items()})
                self._buf[0] = {k: v[need:] for k, v in b.items()}
                need = 0
        self.buffered -= m
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _position_after(self, next_image: int) -> tuple[int, int]:
        if self._buf:
            return int(self._buf[0]["image"][0]), int(self._buf[0]["grid"][0])
        return next_image, 0

    def commit(self, next_image: int) -> None:
        """Commit the buffered whole chunks (steps 2-4 of the protocol).

        Parameters
        ----------
        next_image : int
            Index of the first image not yet added (the resume position when nothing stays buffered).
        """
        m = self.buffered // self.chunk * self.chunk
        if m == 0:
            return
        data = self._take(m)
        end = self.committed + m
        if end > self.capacity:  # grow geometrically: few metadata rewrites
            self.capacity = max(end, 2 * self.capacity, 16 * self.chunk)
            self.patches.resize((self.capacity, self.patch, self.patch, 3))
        self.patches[self.committed:end] = data["patches"]
        digests = self.state["digests"]
        for s in range(0, m, self.chunk):
            digests.append(st.chunk_digest(data["patches"][s:s + self.chunk]).hex())
        _hook("after_data")
        seg = io.BytesIO()
        np.savez(seg, **{k: data[k] for k in st.meta_arrays(self.patch)})
        atomic_write(self.out / PROGRESS_DIR / f"seg-{self.segments:06d}.npz", seg.getvalue())
        _hook("after_segment")
        k, j = self._position_after(next_image)
        self.records.extend(r for i, r in self._pending if i < k)
        self._pending = [(i, r) for i, r in self._pending if i >= k]
        self.state.update(committed=end, position=[k, j], records=self.records, segments=self.segments + 1,
                          digests=digests)
        atomic_write_json(self.out / PROGRESS_DIR / STATE_FILE, self.state, indent=1, sort_keys=True)
        self.segments += 1
        self.committed = end
        self.last_commit = time.perf_counter()
        if os.environ.get(HOOK_ENV):  # tests watch commits to time their kills
            print(f"committed {self.committed}", file=sys.stderr, flush=True)
        _hook("after_commit")

    def finalize(self, n_images: int, started: str, t0: float, workers: int) -> dict:
        """Write the rest and mark the store complete (step 5 of the protocol).

        Parameters
        ----------
        n_images : int
            Number of sources (every one must have been added).
        started : str
            When this run started (UTC, ISO 8601), for the ``run`` attribute.
        t0 : float
            ``time.perf_counter()`` at the start of this run (``run.seconds_last_run``).
        workers : int
            Worker processes of this run (``run.workers``).

        Returns
        -------
        dict
            ``record_counts`` of all source records (also stored as the ``counts`` attribute).
        """
        _hook("before_finalize")
        n_total = self.committed + self.buffered
        tail = self._take(self.buffered) if self.buffered else None
        self.records.extend(r for _, r in self._pending)
        self._pending = []
        self._write_tail(tail, n_total)
        meta = self._gathered_meta(tail)
        if len(self.records) != n_images:
            raise RuntimeError(f"internal error: {len(self.records)} source records for {n_images} sources")
        counts = record_counts(self.records)
        if counts["patches"] != n_total or len(meta["source"]) != n_total:
            raise RuntimeError(f"internal error: {n_total} patches written, records say {counts['patches']}, "
                               f"metadata rows {len(meta['source'])}")
        st.write_meta(self.group, meta, n_total)
        _hook("before_attrs")
        info = dict(self.group.attrs[st.ATTR_KEY])
        run_seconds = time.perf_counter() - t0
        info.update(complete=True, count=n_total, sources=self.records, counts=counts,
                    patches_digest=st.combine_digests([bytes.fromhex(d) for d in self.state["digests"]]),
                    meta_sha256=st.meta_digest(meta), rainsweep_version=st.rainsweep_version(),
                    run={"started": started,
                         "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "seconds_last_run": round(run_seconds, 3), "resumed_from": self.resumed_from,
                         "workers": workers})
        self.group.attrs[st.ATTR_KEY] = info
        _hook("after_attrs")
        shutil.rmtree(self.out / PROGRESS_DIR, ignore_errors=True)
        return counts

    def _write_tail(self, tail: dict | None, n_total: int) -> None:
        """Shrink the patches array to ``n_total`` and write the last, partial chunk."""
        parr = self.patches
        # resize first, so the edge chunk is written whole (no stale bytes from an earlier attempt past the end)
        parr.resize((n_total, self.patch, self.patch, 3))
        if tail is None:
            return
        # zarr merges a partial edge chunk into the existing file: drop any file an earlier attempt left there so
        # the padding past the end is fill (0) and the bytes match an uninterrupted run
        edge = self.out / "patches" / "c" / str(self.committed // parr.chunks[0]) / "0" / "0" / "0"
        edge.unlink(missing_ok=True)
        parr[self.committed:n_total] = tail["patches"]
        self.state["digests"].append(st.chunk_digest(tail["patches"]).hex())

    def _gathered_meta(self, tail: dict | None) -> dict[str, np.ndarray]:
        """The metadata arrays of every patch: the committed segments, then the tail."""
        parts = []
        for s in range(self.segments):
            with np.load(self.out / PROGRESS_DIR / f"seg-{s:06d}.npz") as z:
                parts.append({k: z[k] for k in z.files})
        if tail is not None:
            parts.append(tail)
        return {name: (np.concatenate([p[name] for p in parts]) if parts else np.zeros((0, *tail_shape), dtype))
                for name, (dtype, tail_shape) in st.meta_arrays(self.patch).items()}
