"""Precompute: turn image sources into a patch store, resumably.

``precompute(sources, out, patch=128, stride=128, category=None, workers=1, progress=True) -> Summary``

Each image is decoded and converted (engine.data.sources), cut into patches on a ``stride`` grid, and its patches'
sharpness and complexity are computed with engine.metrics (one batch per image, split in batches of 256), in
``workers`` processes; results are consumed in source order, so the store is byte-for-byte the same for any worker
count.

Commit protocol (a run killed at any instant, SIGKILL included, and re-run with the same arguments ends with
exactly the store an uninterrupted run writes):

1. The store directory appears atomically: it is built under a temporary name with its initial progress record and
   renamed into place.
2. Patches are written only in whole chunks (64 patches) beyond the committed count, so a write never touches a
   committed chunk file (we do not depend on zarr writing files atomically, which zarr-python only does since 3.1.3,
   PR #3412).
3. The chunk's metadata rows go to a new segment file in ``<store>/rainsweep-progress/`` (temp file + os.replace).
4. Then ``state.json`` is replaced atomically (temp file + os.replace): committed patch count, the resume position
   (image k, grid index j), the finished images' records, the segment count and the chunk digests. This is the
   commit point; anything written after the last commit is ignored and overwritten on resume.
5. At the end: the last partial chunk, the metadata arrays (from the segments), the attributes with
   ``complete: true`` (the store becomes openable), then the progress folder is removed. A kill in between is
   finished by the next run.

A re-run with other arguments against an unfinished store raises PrecomputeError; a re-run of a finished store
with the same arguments does nothing. ``fcntl`` locking stops two runs writing one store at once.
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
from typing import Any, Iterator

import numpy as np

from engine.atomic import atomic_write, atomic_write_json
from engine.data import store as st
from engine.data.atomic_dir import build_dir, stale_temps
from engine.data.sources import SKIP_SMALL, SourceItem, decode_item, describe_items, discover, patch_count, cut_patches

PROGRESS_DIR = "rainsweep-progress"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
METRIC_BATCH = 256
#: test hook: when RAINSWEEP_PRECOMPUTE_HOOK is "<phase>" or "<phase>@<n>", the run prints "HOOK <phase>" to stderr
#: and sleeps the n-th time (default first) it reaches that phase, so a test can SIGKILL it inside that exact window;
#: any value also makes it print "committed <count>" after each commit
HOOK_ENV = "RAINSWEEP_PRECOMPUTE_HOOK"
_hook_seen: dict[str, int] = {}


class PrecomputeError(ValueError):
    """Precompute cannot run: bad arguments, or an existing store made with other arguments."""


@dataclass
class Summary:
    """What a precompute did. ``images``: sources discovered; ``images_read``: decoded and cut; ``skipped`` /
    ``converted``: image counts by reason; ``patches``: patches in the store; ``patches_this_run``; ``seconds`` and
    ``patches_per_s``: this run only; ``resumed_from``: committed patches found at start (0 for a fresh run)."""

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


def _metrics(patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from engine import metrics

    n = len(patches)
    sh = np.empty(n, np.float64)
    cx = np.empty(n, np.float64)
    for s in range(0, n, METRIC_BATCH):
        b = patches[s:s + METRIC_BATCH]
        sh[s:s + len(b)] = metrics.sharpness(b)
        cx[s:s + len(b)] = metrics.complexity(b)
    return sh, cx


def process_image(task: tuple[int, int]) -> tuple[int, dict, dict | None]:
    """Decode image ``i``, cut its patches from grid index ``start`` and measure them.
    Returns (i, record, data) with data = {patches, origins, sharpness, complexity} or None."""
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
    """Cut ``rgb`` (uint8 [H, W, 3]) into patches from grid index ``start`` and measure them: the per-image work of
    precompute after decoding. Returns {patches, origins, sharpness, complexity}."""
    patches, origins = cut_patches(rgb, patch, stride, start)
    sh, cx = _metrics(patches)
    return {"patches": patches, "origins": origins, "sharpness": sh, "complexity": cx}


def _results(items: list[SourceItem], patch: int, stride: int, first: int, start: int,
             workers: int) -> Iterator[tuple[int, dict, dict | None]]:
    tasks = [(first, start)] + [(i, 0) for i in range(first + 1, len(items))] if first < len(items) else []
    if workers <= 1:
        _init_worker(items, patch, stride, single_thread=False)  # in-process: leave the caller's threads alone
        for t in tasks:
            yield process_image(t)
        return
    import multiprocessing as mp

    # spawn: workers start clean (no inherited numba/CUDA/thread state); imap keeps source order
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(items, patch, stride)) as pool:
        yield from pool.imap(process_image, tasks, chunksize=1)


# ----------------------------------------------------------------------------------------------------------------
# the run

def _params(specs: list[str], patch: int, stride: int, category: str | None, chunk_patches: int) -> dict:
    return {"sources": list(specs), "patch": patch, "stride": stride, "category": category,
            "chunk_patches": chunk_patches}


def _diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k))


def _counts(records: list[dict]) -> dict:
    skipped: dict[str, int] = {}
    converted: dict[str, int] = {}
    read = 0
    for r in records:
        if r["status"] == "ok":
            read += 1
        else:
            skipped[r["status"]] = skipped.get(r["status"], 0) + 1
        if r.get("height") is not None:  # decoded: its conversions happened even if then too small
            for c in r["conversions"]:
                converted[c] = converted.get(c, 0) + 1
    return {"images": len(records), "images_read": read, "skipped": skipped, "converted": converted,
            "patches": int(sum(r["patches"] for r in records if r["status"] == "ok"))}


def _busy(out: Path) -> PrecomputeError:
    return PrecomputeError(f"store {str(out)!r}: another precompute is writing it right now; wait for it to "
                           f"finish")


class _Lock:
    def __init__(self, path: Path) -> None:
        self.f = open(path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.f.close()
            raise _busy(path.parent.parent) from e

    def release(self) -> None:
        self.f.close()


def precompute(sources: list[str] | str, out: str | os.PathLike, patch: int = 128, stride: int = 128,
               category: str | None = None, workers: int = 1, progress: bool = True, *,
               chunk_patches: int = st.CHUNK_PATCHES, commit_seconds: float = 1.0) -> Summary:
    """Build (or finish) the store ``out`` from ``sources`` (files, folders, globs, builtin:skimage,
    builtin:procedural; see engine.data.sources). ``patch``: side in pixels; ``stride``: grid step in pixels;
    ``category``: one category name for every patch (default: per source, see engine.data.sources.discover);
    ``workers``: decoding/metrics processes (the output does not depend on it; they are started with
    multiprocessing's "spawn", so a script calling this with workers > 1 needs the usual
    ``if __name__ == "__main__":`` guard); ``commit_seconds``: how often progress is committed (at least one
    chunk per commit). ``chunk_patches``: patches per chunk file (64; small values are for tests)."""
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
    identity = describe_items(items)
    params = _params(specs, patch, stride, category, chunk_patches)
    out = Path(out)
    prog = out / PROGRESS_DIR

    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for us
    # a run killed while creating the store leaves only its temporary sibling: remove it (not one that a live run
    # is building right now)
    for old in stale_temps(out):
        shutil.rmtree(old, ignore_errors=True)
    if not out.exists():
        create_incomplete_store(out, params, identity, list(dict.fromkeys(it.category for it in items)))
    elif not (out / "zarr.json").is_file():
        raise PrecomputeError(f"--out {str(out)!r} exists and is not a rainsweep store; choose a new path")

    lock = _Lock(prog / LOCK_FILE) if prog.is_dir() else None
    try:
        try:
            existing = st.open_store(out, allow_incomplete=True)
        except st.StoreError as e:
            raise PrecomputeError(f"--out {str(out)!r}: {e}") from e
        old = existing.attrs.get("params") or {}
        if old != params:
            raise PrecomputeError(f"store {str(out)!r} was made with other arguments ({_diff(old, params)}); "
                                  f"re-run with the original arguments or choose a new --out")
        if existing.complete:
            shutil.rmtree(prog, ignore_errors=True)  # killed after marking complete: only cleanup was left
            c = existing.attrs.get("counts", {})
            return Summary(store=str(out), images=c.get("images", 0), images_read=c.get("images_read", 0),
                           skipped=c.get("skipped", {}), converted=c.get("converted", {}),
                           patches=existing.count, seconds=time.perf_counter() - t0, already_complete=True,
                           workers=workers)
        if lock is None or not (prog / STATE_FILE).is_file():
            raise PrecomputeError(f"store {str(out)!r} is incomplete and its progress record is missing; delete "
                                  f"it and run again")
        return _run(out, items, identity, params, patch, stride, workers, progress, chunk_patches,
                    commit_seconds, t0, started)
    finally:
        if lock is not None:
            lock.release()


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
        raise _busy(out) from e


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


def _run(out: Path, items: list[SourceItem], identity: list[dict], params: dict, patch: int, stride: int,
         workers: int, progress: bool, C: int, commit_seconds: float, t0: float, started: str) -> Summary:
    import zarr

    prog = out / PROGRESS_DIR
    state = json.loads((prog / STATE_FILE).read_text())
    if state["params"] != params:
        raise PrecomputeError(f"store {str(out)!r}: progress record made with other arguments "
                              f"({_diff(state['params'], params)})")
    if state["identity"] != identity:
        changed = [a["path"] for a, b in zip(state["identity"], identity) if a != b]
        more = "" if len(state["identity"]) == len(identity) else (
            f" ({len(state['identity'])} sources then, {len(identity)} now)")
        raise PrecomputeError(f"store {str(out)!r}: the sources changed since the interrupted run{more}"
                              f"{': ' + ', '.join(changed[:5]) if changed else ''}; restore them or start a new "
                              f"store")
    _clean_uncommitted(out, state)
    group = zarr.open_group(str(out), mode="r+")
    parr = st.writable(group, "patches")
    categories = group.attrs[st.ATTR_KEY]["categories"]
    cat_code = {c: i for i, c in enumerate(categories)}

    committed = int(state["committed"])
    resumed_from = committed
    k0, j0 = state["position"]
    records: list[dict] = state["records"]
    digests: list[str] = state["digests"]
    segments = int(state["segments"])
    capacity = int(parr.shape[0])

    # pending (not yet written) patches, in order, with where they came from
    buf: list[dict] = []
    buf_n = 0
    pending_records: list[tuple[int, dict]] = []  # (image index, record) not yet committed
    last_commit = time.perf_counter()
    written_this_run = 0

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=k0, unit="img", desc="precompute", file=sys.stderr,
                   dynamic_ncols=True)

    def take(m: int) -> dict:
        """Pop the first m pending patches (concatenated)."""
        nonlocal buf_n
        parts, need = [], m
        while need:
            b = buf[0]
            n = len(b["patches"])
            if n <= need:
                parts.append(buf.pop(0))
                need -= n
            else:
                parts.append({k: v[:need] for k, v in b.items()})
                buf[0] = {k: v[need:] for k, v in b.items()}
                need = 0
        buf_n -= m
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def position_after(next_image: int) -> tuple[int, int]:
        if buf:
            return int(buf[0]["image"][0]), int(buf[0]["grid"][0])
        return next_image, 0

    def commit(m: int, next_image: int) -> None:
        nonlocal committed, segments, capacity, last_commit, written_this_run
        data = take(m)
        end = committed + m
        if end > capacity:  # grow geometrically: few metadata rewrites
            capacity = max(end, 2 * capacity, 16 * C)
            parr.resize((capacity, patch, patch, 3))
        parr[committed:end] = data["patches"]
        for s in range(0, m, C):
            digests.append(st.chunk_digest(data["patches"][s:s + C]).hex())
        _hook("after_data")
        buf_seg = io.BytesIO()
        np.savez(buf_seg, **{k: data[k] for k in ("sharpness", "complexity", "source", "origin", "category")})
        atomic_write(prog / f"seg-{segments:06d}.npz", buf_seg.getvalue())
        _hook("after_segment")
        k, j = position_after(next_image)
        done = [r for i, r in pending_records if i < k]
        pending_records[:] = [(i, r) for i, r in pending_records if i >= k]
        records.extend(done)
        state.update(committed=end, position=[k, j], records=records, segments=segments + 1, digests=digests)
        atomic_write_json(prog / STATE_FILE, state, indent=1, sort_keys=True)
        segments += 1
        committed = end
        written_this_run += m
        last_commit = time.perf_counter()
        if os.environ.get(HOOK_ENV):  # tests watch commits to time their kills
            print(f"committed {committed}", file=sys.stderr, flush=True)
        _hook("after_commit")

    next_image = k0
    try:
        for i, rec, data in _results(items, patch, stride, k0, j0, workers):
            rec_idx = i
            pending_records.append((rec_idx, rec))
            if data is not None and len(data["patches"]):
                n = len(data["patches"])
                start = j0 if i == k0 else 0
                buf.append({"patches": data["patches"], "origin": data["origins"],
                            "sharpness": data["sharpness"], "complexity": data["complexity"],
                            "source": np.full(n, i, np.int32),
                            "category": np.full(n, cat_code[items[i].category], np.int16),
                            "image": np.full(n, i, np.int64),
                            "grid": np.arange(start, start + n, dtype=np.int64)})
                buf_n += n
            next_image = i + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(patches=committed + buf_n, refresh=False)
            due = time.perf_counter() - last_commit >= commit_seconds
            if buf_n >= C and (due or buf_n >= 16 * C):
                commit(buf_n // C * C, next_image)
        # the tail: whole chunks first (same protocol), then the partial last chunk in finalize
        if buf_n >= C:
            commit(buf_n // C * C, next_image)
        _hook("before_finalize")
        _finalize(out, group, parr, state, buf, buf_n, take, pending_records, records, digests, committed,
                  segments, patch, items, params, started, t0, workers, resumed_from)
    finally:
        if bar is not None:
            bar.close()
    counts = _counts(records)
    seconds = time.perf_counter() - t0
    total = counts["patches"]
    this_run = total - resumed_from
    return Summary(store=str(out), images=counts["images"], images_read=counts["images_read"],
                   skipped=counts["skipped"], converted=counts["converted"], patches=total,
                   patches_this_run=this_run, seconds=seconds,
                   patches_per_s=this_run / seconds if seconds > 0 else 0.0, resumed_from=resumed_from,
                   workers=workers)


def _finalize(out, group, parr, state, buf, buf_n, take, pending_records, records, digests, committed, segments,
              patch, items, params, started, t0, workers, resumed_from) -> None:
    prog = out / PROGRESS_DIR
    n_total = committed + buf_n
    tail = take(buf_n) if buf_n else None
    records.extend(r for _, r in pending_records)
    pending_records.clear()
    # resize first, so the edge chunk is written whole (no stale bytes from an earlier attempt past the end)
    parr.resize((n_total, patch, patch, 3))
    if tail is not None:
        # zarr merges a partial edge chunk into the existing file: drop any file an earlier attempt left there so
        # the padding past the end is fill (0) and the bytes match an uninterrupted run
        edge = out / "patches" / "c" / str(committed // parr.chunks[0]) / "0" / "0" / "0"
        edge.unlink(missing_ok=True)
        parr[committed:n_total] = tail["patches"]
        digests.append(st.chunk_digest(tail["patches"]).hex())
    meta_parts = []
    for s in range(segments):
        with np.load(prog / f"seg-{s:06d}.npz") as z:
            meta_parts.append({k: z[k] for k in z.files})
    if tail is not None:
        meta_parts.append(tail)
    meta = {name: (np.concatenate([p[name] for p in meta_parts]) if meta_parts
                   else np.zeros((0, *tail_shape), dtype))
            for name, (dtype, tail_shape) in st.META_ARRAYS.items()}
    if len(records) != len(items):
        raise RuntimeError(f"internal error: {len(records)} source records for {len(items)} sources")
    counts = _counts(records)
    if counts["patches"] != n_total or len(meta["source"]) != n_total:
        raise RuntimeError(f"internal error: {n_total} patches written, records say {counts['patches']}, "
                           f"metadata rows {len(meta['source'])}")
    st.write_meta(group, meta, n_total)
    _hook("before_attrs")
    info = dict(group.attrs[st.ATTR_KEY])
    run_seconds = time.perf_counter() - t0
    info.update(complete=True, count=n_total, sources=records, counts=counts,
                patches_digest=st.combine_digests([bytes.fromhex(d) for d in digests]),
                meta_sha256=st.meta_digest(meta), rainsweep_version=st.rainsweep_version(),
                run={"started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "seconds_last_run": round(run_seconds, 3), "resumed_from": resumed_from,
                     "workers": workers})
    group.attrs[st.ATTR_KEY] = info
    _hook("after_attrs")
    shutil.rmtree(prog, ignore_errors=True)
