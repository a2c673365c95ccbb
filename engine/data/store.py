"""Zarr patch stores: the on-disk format, opening, fast reads and whole-store writes.

Store format (schema version 1)
-------------------------------
A store is a Zarr v3 group in a directory (zarr-python's LocalStore); any zarr-python >= 3 user can open it with
``zarr.open_group(path, mode="r")``. Arrays, all with the same length N along the first axis:

=============  ==============  ==========================================================================
array          dtype, shape    meaning
=============  ==============  ==========================================================================
``patches``    uint8 [N,P,P,3]  RGB patches, NHWC, 0..255. Chunks of 64 patches (64 x P x P x 3), no
                                compression, no sharding (see the layout benchmark below).
``sharpness``  float64 [N]      Var(Laplacian(BT.601 gray)) on the 0..255 scale (DESIGN 3).
``complexity`` float64 [N]      multiscale structural complexity on 0..1 values (DESIGN 3).
``source``     int32 [N]        index into the ``sources`` attribute list; -1 when unknown.
``origin``     int32 [N, 2]     (y, x) of the patch's top-left corner in its source image, pixels.
``category``   int16 [N]        code into the ``categories`` attribute list.
=============  ==============  ==========================================================================

Group attributes live under one key, ``"rainsweep"``:
``schema`` (int, 1), ``complete`` (bool; False while a precompute is running or was interrupted), ``count`` (N),
``patch_size`` (P), ``stride`` (pixels, or null for stores written from arrays), ``chunk_patches`` (64),
``categories`` (list of names), ``sources`` (list of dicts: ``path``, ``size`` in bytes, ``sha256``,
``category``, ``status`` "ok" or the skip reason, ``height``/``width``, ``patches``), ``params`` (the arguments
that produced the store), ``counts`` (images read, skipped by reason, converted by reason, patches),
``patches_digest`` (sha256 over the big-endian CRC-32 of each chunk's valid patch bytes, chunk by chunk of
``chunk_patches`` patches), ``meta_sha256`` (sha256 of the metadata arrays' little-endian bytes,
in the order sharpness, complexity, source, origin, category), ``rainsweep_version``, and ``run`` (timing
fields: seconds, started/finished UTC; the only fields that differ between identical runs).

Layout benchmark (zarr 3.1.6, 4,096 random 128 x 128 patches, page-cached, one core of a busy 2-core machine;
random = batches of 256 random indices):

==============================  ========  ===========  ========================  ========================
layout                          write/s   zarr seq/s   zarr random (oindex)/s   raw pread random/s
==============================  ========  ===========  ========================  ========================
1-patch chunks, 256-patch shard    2,100        6,100                      280              104,000
1-patch chunks, 64-patch shard     2,900        3,700                      260                   --
16-patch chunks, 256-patch shard  10,900       22,600                      240                   --
64-patch chunks, no shard         12,100       33,800                    1,230              107,000
==============================  ========  ===========  ========================  ========================

zarr-python's per-chunk overhead dominates: sharded 1-patch chunks are slow to write and slow to read through
zarr, and do not help random reads through zarr either. Uncompressed, unsharded 64-patch chunks are the fastest
through zarr *and* let ``PatchStore.read`` bypass zarr: with the plain ``bytes`` codec a chunk file is the raw
C-order array, so patch i is ``P*P*3`` bytes at offset ``(i % 64) * P*P*3`` in file ``patches/c/<i // 64>/0/0/0``
and a random batch is one ``preadv`` per run of consecutive indices straight into the output (about 100k
patches/s per core random, memory-copy speed sequential). Natural-image patches compress poorly (about 1.3-2x)
and decompression would cost more than the disk saves on page-cached reads. Every chunk file exists
(``write_empty_chunks``), so a missing file means damage, not zeros.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine.data.atomic_dir import build_dir
from engine.data.lru import LRUCache

SCHEMA_VERSION = 1
ATTR_KEY = "rainsweep"
CHUNK_PATCHES = 64
META_CHUNK = 65536
#: metadata arrays: name -> (dtype, trailing shape)
META_ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    "sharpness": ("float64", ()),
    "complexity": ("float64", ()),
    "source": ("int32", ()),
    "origin": ("int32", (2,)),
    "category": ("int16", ()),
}
#: attribute fields that legitimately differ between two identical runs (excluded from the fingerprint)
VOLATILE_ATTRS = ("run", "rainsweep_version")
#: Open chunk-file descriptors kept per thread.
FD_CACHE_SIZE = 64
#: Chunk maps kept per process. Each map holds a duplicated descriptor (Python's mmap keeps one), so this stays well
#: below the usual 1,024 open-file limit; 256 maps cover 16,384 patches of 64-patch chunks without remapping.
MAP_CACHE_SIZE = 256


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class StoreError(ValueError):
    """A path is not a usable rainsweep store (not a store, wrong schema version, incomplete, damaged)."""


def rainsweep_version() -> str:
    try:
        from importlib.metadata import version

        return version("rainsweep")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# hashing helpers (shared by writers and verify)

def chunk_digest(patches: np.ndarray) -> bytes:
    """Checksum of one chunk's valid patches (uint8 [n, P, P, 3], C order): CRC-32, 4 bytes big-endian. CRC-32
    rather than sha256 because it runs ~3x faster (about 60 vs 170 us per 128 x 128 patch here, which matters next
    to the ~130 us of both metrics) and only has to catch damage; content identity comes from the sha256 below."""
    return zlib.crc32(np.ascontiguousarray(patches, dtype=np.uint8).data).to_bytes(4, "big")


def combine_digests(digests: list[bytes]) -> str:
    """The store's ``patches_digest``: sha256 over the concatenated per-chunk checksums."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def meta_digest(meta: dict[str, np.ndarray]) -> str:
    """``meta_sha256``: sha256 of the metadata arrays' little-endian bytes in META_ARRAYS order."""
    h = hashlib.sha256()
    for name, (dtype, _) in META_ARRAYS.items():
        a = np.ascontiguousarray(meta[name], dtype=np.dtype(dtype).newbyteorder("<"))
        h.update(a.data)
    return h.hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_of(info: dict) -> str:
    """Short content identifier of a store from its ``rainsweep`` attributes (timing fields excluded)."""
    stable = {k: v for k, v in info.items() if k not in VOLATILE_ATTRS}
    return hashlib.sha256(_canonical(stable).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# reading

class PatchStore:
    """An opened store. Metadata arrays load lazily, once; patches are read on demand.

    Picklable (zarr handles and file descriptors are reopened in the new process), so it can be handed to
    worker processes (DALI external sources, multiprocessing).
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.allow_incomplete = allow_incomplete
        self._open()

    # -- opening -------------------------------------------------------------------------------------------------
    def _open(self) -> None:
        import zarr

        p = self.path
        if not p.exists():
            raise StoreError(f"store {str(p)!r}: no such file or directory")
        if not p.is_dir() or not (p / "zarr.json").is_file():
            raise StoreError(f"store {str(p)!r}: not a rainsweep store (expected a Zarr v3 group directory with "
                             f"a zarr.json; create one with `rainsweep precompute`)")
        try:
            group = zarr.open_group(str(p), mode="r")
        except Exception as e:
            raise StoreError(f"store {str(p)!r}: not a readable Zarr v3 group ({e})") from e
        info = dict(group.attrs).get(ATTR_KEY)
        if not isinstance(info, dict):
            raise StoreError(f"store {str(p)!r}: a Zarr group but not a rainsweep store (no {ATTR_KEY!r} "
                             f"attribute)")
        schema = info.get("schema")
        if schema != SCHEMA_VERSION:
            raise StoreError(f"store {str(p)!r}: schema version {schema}, this rainsweep reads version "
                             f"{SCHEMA_VERSION}; re-run `rainsweep precompute` with this version")
        if not info.get("complete", False) and not self.allow_incomplete:
            raise StoreError(f"store {str(p)!r}: incomplete (a precompute was interrupted or is still running); "
                             f"re-run the same `rainsweep precompute` command to finish it")
        self._group = group
        self.attrs: dict = info
        try:
            self.patches = group["patches"]
        except KeyError as e:
            raise StoreError(f"store {str(p)!r}: missing the 'patches' array") from e
        self.count = int(info.get("count", self.patches.shape[0]))
        self.patch_size = int(info["patch_size"])
        self.chunk_patches = int(self.patches.chunks[0])
        shape = tuple(self.patches.shape)
        if info.get("complete", False) and shape != (self.count, self.patch_size, self.patch_size, 3):
            raise StoreError(f"store {str(p)!r}: damaged: 'patches' has shape {shape}, attributes say "
                             f"{(self.count, self.patch_size, self.patch_size, 3)}")
        self._meta: dict[str, np.ndarray] = {}
        self._raw = self._raw_layout_ok()
        self._local = threading.local()
        self._maps_pid: int | None = None
        self._maps: LRUCache[int, np.ndarray] | None = None

    def _raw_layout_ok(self) -> bool:
        """True when chunk files are raw C-order bytes we can pread directly (the layout we write)."""
        md = self.patches.metadata.to_dict()
        codecs = md.get("codecs", [])
        enc = md.get("chunk_key_encoding", {})
        return (len(codecs) == 1 and codecs[0].get("name") == "bytes"
                and enc.get("name") == "default" and enc.get("configuration", {}).get("separator", "/") == "/"
                and md.get("data_type") == "uint8" and self.patches.chunks[1:] == self.patches.shape[1:])

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "allow_incomplete": self.allow_incomplete}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self.allow_incomplete = state["allow_incomplete"]
        self._open()

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"PatchStore({str(self.path)!r}, count={self.count}, patch_size={self.patch_size}, "
                f"complete={self.complete})")

    # -- attributes ----------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def categories(self) -> list[str]:
        return list(self.attrs.get("categories", []))

    @property
    def sources_meta(self) -> list[dict]:
        return list(self.attrs.get("sources", []))

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.attrs)

    def _meta_array(self, name: str) -> np.ndarray:
        a = self._meta.get(name)
        if a is None:
            try:
                a = np.asarray(self._group[name][: self.count])
            except KeyError as e:
                raise StoreError(f"store {str(self.path)!r}: missing the {name!r} array") from e
            a.setflags(write=False)  # shared cache: callers must not modify it in place
            self._meta[name] = a
        return a

    @property
    def sharpness(self) -> np.ndarray:
        """float64 [N], Laplacian variance on the 0..255 scale."""
        return self._meta_array("sharpness")

    @property
    def complexity(self) -> np.ndarray:
        """float64 [N], multiscale structural complexity (0..1 values)."""
        return self._meta_array("complexity")

    @property
    def source(self) -> np.ndarray:
        """int32 [N], index into ``attrs['sources']`` (-1: unknown)."""
        return self._meta_array("source")

    @property
    def origin(self) -> np.ndarray:
        """int32 [N, 2], (y, x) of each patch's top-left corner in its source image."""
        return self._meta_array("origin")

    @property
    def category(self) -> np.ndarray:
        """int16 [N], code into ``categories``."""
        return self._meta_array("category")

    # -- patch reads ---------------------------------------------------------------------------------------------
    def _check_indices(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1:
            raise ValueError(f"indices: expected a 1-d array of store indices, got shape {idx.shape}")
        if idx.size == 0:
            return idx.astype(np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices: expected integer store indices, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.count:
            bad = lo if lo < 0 else hi
            raise IndexError(f"indices: store index {bad} out of range for store {str(self.path)!r} with "
                             f"{self.count} patches (valid 0..{self.count - 1})")
        return idx

    def _fd(self, chunk: int) -> int:
        """Read-only descriptor of a chunk file, from a small per-thread LRU: threads never share descriptors, so
        eviction cannot close one another thread is reading from. The cache closes its descriptors when dropped
        (thread end, store garbage-collected, or replaced in a forked child, whose inherited copies are its own to
        close)."""
        loc = self._local
        if getattr(loc, "pid", None) != os.getpid():
            loc.pid, loc.fds = os.getpid(), LRUCache(FD_CACHE_SIZE, on_evict=_close_quietly)
        fds: LRUCache[int, int] = loc.fds
        fd = fds.get(chunk)
        if fd is not None:
            return fd
        f = self.path / "patches" / "c" / str(chunk) / "0" / "0" / "0"
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError as e:
            raise StoreError(f"store {str(self.path)!r}: damaged: chunk file {f} is missing") from e
        fds.put(chunk, fd)
        return fd

    def close(self) -> None:
        """Close cached file descriptors of this thread (others close when their thread's cache is dropped)."""
        loc = self._local
        if getattr(loc, "pid", None) == os.getpid():
            loc.fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def read(self, indices: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Patches at ``indices`` (any order, repeats allowed) as uint8 [n, P, P, 3] (NHWC, 0..255), in the order
        given. ``out``: optional C-contiguous uint8 [n, P, P, 3] buffer to fill (e.g. pinned memory).

        Fast path: positional reads of the raw chunk files, sorted by store index so each run of consecutive
        indices is a single ``preadv`` scattering straight into ``out`` rows (no intermediate copies).
        """
        idx = self._check_indices(indices)
        n, P = len(idx), self.patch_size
        if out is None:
            out = np.empty((n, P, P, 3), dtype=np.uint8)
        elif (out.shape != (n, P, P, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous):
            raise ValueError(f"out: expected a C-contiguous uint8 array of shape {(n, P, P, 3)}, got "
                             f"{out.dtype} {out.shape}")
        if n == 0:
            return out
        if not self._raw:
            uniq, inv = np.unique(idx, return_inverse=True)
            out[:] = np.asarray(self.patches.oindex[uniq])[inv]
            return out
        pb = P * P * 3
        C = self.chunk_patches
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        # a run ends where the next sorted index is not exactly +1 or crosses into another chunk file
        brk = np.flatnonzero((np.diff(sidx) != 1) | (sidx[1:] // C != sidx[:-1] // C)) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [n]))
        flat = out.reshape(n, pb)
        rows = [memoryview(flat[j]) for j in order.tolist()]
        iov_max = 1024  # POSIX guarantees at least this many buffers per preadv
        for a, b in zip(starts.tolist(), ends.tolist()):
            i0 = int(sidx[a])
            fd = self._fd(i0 // C)
            off = (i0 % C) * pb
            for s in range(a, b, iov_max):
                e = min(b, s + iov_max)
                want = (e - s) * pb
                got = os.preadv(fd, rows[s:e], off + (s - a) * pb)
                if got != want:
                    raise StoreError(f"store {str(self.path)!r}: damaged: chunk {i0 // C} is truncated "
                                     f"(read {got} of {want} bytes at offset {off})")
        return out

    def views(self, indices: Any) -> list[np.ndarray] | None:
        """Read-only uint8 [P, P, 3] views of the patches at ``indices`` straight into memory maps of the chunk
        files (no copy: the page cache itself), in the order given; None when the store's layout does not allow it
        (not the raw layout, or an incomplete store whose files still change). The maps live as long as any view
        of them; the store keeps up to ``MAP_CACHE_SIZE`` chunk maps per process.

        Why: a loader that copies each patch anyway (DALI copies every sample of a batch into its own buffers) then
        reads with one copy instead of two (``read`` copies from the page cache with ``preadv``).
        """
        if not (self._raw and self.complete):
            return None
        idx = self._check_indices(indices)
        pb = self.patch_size * self.patch_size * 3
        shape = (self.patch_size, self.patch_size, 3)
        C = self.chunk_patches
        out = []
        for i in idx.tolist():
            flat = self._map(i // C)
            off = (i % C) * pb
            if off + pb > flat.size:
                raise StoreError(f"store {str(self.path)!r}: damaged: chunk {i // C} is truncated "
                                 f"({flat.size} bytes, patch {i} ends at {off + pb})")
            out.append(flat[off:off + pb].reshape(shape))
        return out

    def _map(self, chunk: int) -> np.ndarray:
        """The chunk file as a read-only uint8 array over a memory map, from a per-process LRU of ``MAP_CACHE_SIZE``
        maps (a forked child maps again). An evicted map stays alive as long as a view of it does."""
        if self._maps_pid != os.getpid():
            self._maps_pid, self._maps = os.getpid(), LRUCache(MAP_CACHE_SIZE)
        flat = self._maps.get(chunk)
        if flat is not None:
            return flat
        fd = self._fd(chunk)
        size = os.fstat(fd).st_size
        if size == 0:
            raise StoreError(f"store {str(self.path)!r}: damaged: chunk {chunk} is empty")
        flat = np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ), dtype=np.uint8)
        self._maps.put(chunk, flat)
        return flat

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Patches ``start..stop-1`` as uint8 [n, P, P, 3] (sequential read)."""
        if not (0 <= start <= stop <= self.count):
            raise IndexError(f"read_range: [{start}, {stop}) out of range for a store of {self.count} patches")
        return self.read(np.arange(start, stop, dtype=np.int64))

    def read_all(self) -> np.ndarray:
        """Every patch, uint8 [N, P, P, 3]."""
        return self.read_range(0, self.count)

    def iter_chunks(self, batch: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, patches)`` blocks in store order, ``batch`` patches at a time (default: one chunk)."""
        step = batch or self.chunk_patches
        for s in range(0, self.count, step):
            yield s, self.read_range(s, min(self.count, s + step))


def open_store(path: str | os.PathLike, *, allow_incomplete: bool = False) -> PatchStore:
    """Open a rainsweep store for reading. Raises StoreError for a path that is not a rainsweep store, a store of
    another schema version, or an incomplete store (unless ``allow_incomplete``)."""
    if isinstance(path, PatchStore):
        return path
    return PatchStore(path, allow_incomplete=allow_incomplete)


# ----------------------------------------------------------------------------------------------------------------
# writing

def create_layout(path: str | os.PathLike, patch_size: int, info: dict, *,
                  chunk_patches: int = CHUNK_PATCHES, capacity: int = 0):
    """Create an empty store directory (group, arrays of length ``capacity``, attributes ``info``) and return
    the zarr group. Used by ``write_store`` and by precompute, which grows the arrays as it goes."""
    import zarr

    P = int(patch_size)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    cfg = {"write_empty_chunks": True}  # see writable()
    group.create_array("patches", shape=(capacity, P, P, 3), dtype="uint8", chunks=(chunk_patches, P, P, 3),
                       compressors=None, fill_value=0, config=cfg, dimension_names=["n", "y", "x", "c"])
    for name, (dtype, tail) in META_ARRAYS.items():
        group.create_array(name, shape=(capacity, *tail), dtype=dtype, chunks=(META_CHUNK, *tail),
                           fill_value=0, config=cfg,
                           dimension_names=["n", "yx"] if tail else ["n"])
    group.attrs[ATTR_KEY] = info
    return group


def writable(group, name: str):
    """Array ``name`` of ``group`` for writing. ``write_empty_chunks`` is a runtime setting that zarr does not
    persist, so every writer must ask for it: with it every chunk file exists (even an all-black one), which is
    what lets verify and the raw reader tell a lost chunk from fill values."""
    return group[name].with_config({"write_empty_chunks": True})


def write_meta(group, meta: dict[str, np.ndarray], n: int) -> None:
    """Resize the metadata arrays to ``n`` rows and write them whole."""
    for name, (dtype, tail) in META_ARRAYS.items():
        arr = writable(group, name)
        arr.resize((n, *tail))
        if n:
            arr[:] = np.asarray(meta[name], dtype=dtype)


def _as_meta(n: int, P: int, patches: np.ndarray, sharpness, complexity, source, origin, category,
             categories) -> tuple[dict[str, np.ndarray], list[str]]:
    from engine import metrics

    def vec(x, name, dtype, tail=()):
        a = np.asarray(x)
        if a.shape != (n, *tail):
            raise ValueError(f"{name}: expected shape {(n, *tail)} to match {n} patches, got {a.shape}")
        return a.astype(dtype)

    def computed(fn) -> np.ndarray:  # batches of 256 bound the metrics' temporary memory
        return np.concatenate([np.zeros(0)] + [np.asarray(fn(patches[s:s + 256]), np.float64)
                                               for s in range(0, n, 256)])

    meta: dict[str, np.ndarray] = {}
    meta["sharpness"] = (vec(sharpness, "sharpness", np.float64) if sharpness is not None
                         else computed(metrics.sharpness))
    meta["complexity"] = (vec(complexity, "complexity", np.float64) if complexity is not None
                          else computed(metrics.complexity))
    meta["source"] = vec(source, "source", np.int32) if source is not None else np.full(n, -1, np.int32)
    meta["origin"] = vec(origin, "origin", np.int32, (2,)) if origin is not None else np.zeros((n, 2), np.int32)
    if category is None:
        categories = list(categories) if categories else ["default"]
        meta["category"] = np.zeros(n, np.int16)
    else:
        cat = np.asarray(category)
        if cat.dtype.kind in "US":  # names given per patch: codes in order of first appearance
            names = list(categories) if categories else list(dict.fromkeys(cat.tolist()))
            lookup = {c: i for i, c in enumerate(names)}
            missing = sorted(set(cat.tolist()) - set(lookup))
            if missing:
                raise ValueError(f"category: names {missing} are not in categories {names}")
            meta["category"] = np.array([lookup[c] for c in cat.tolist()], dtype=np.int16).reshape(cat.shape)
            categories = names
            vec(meta["category"], "category", np.int16)
        else:
            meta["category"] = vec(cat, "category", np.int16)
            if categories is None:
                raise ValueError("categories: required (a list of names) when category is given as integer codes")
            categories = list(categories)
            if n and (meta["category"].min() < 0 or meta["category"].max() >= len(categories)):
                raise ValueError(f"category: codes must lie in 0..{len(categories) - 1} (len(categories)), "
                                 f"got {int(meta['category'].min())}..{int(meta['category'].max())}")
    return meta, [str(c) for c in categories]


def write_store(path: str | os.PathLike, patches: np.ndarray, *, sharpness=None, complexity=None, source=None,
                origin=None, category=None, categories: list[str] | None = None,
                sources_meta: list[dict] | None = None, params: dict | None = None,
                chunk_patches: int = CHUNK_PATCHES, overwrite: bool = False) -> PatchStore:
    """Create a complete store at ``path`` from in-memory arrays and return it opened.

    ``patches``: uint8 [N, P, P, 3] (NHWC, 0..255, square patches). ``sharpness``/``complexity``: float64 [N]
    (computed with engine.metrics when None). ``source``: int [N] (default -1, unknown), ``origin``: int [N, 2]
    (y, x; default 0), ``category``: int codes [N] with ``categories`` names, or names [N] (default: all
    "default"). ``sources_meta``: list of dicts describing the sources; ``params``: free-form dict recorded in
    the attributes. The store is built in a temporary sibling directory and renamed into place, so a failure
    never leaves a half-written store at ``path``. Raises FileExistsError if ``path`` exists (unless
    ``overwrite``).
    """
    from engine.arrays import check_nhwc_uint8

    patches = np.asarray(patches)
    check_nhwc_uint8(patches, "patches")
    n, h, w, _ = patches.shape
    if h != w:
        raise ValueError(f"patches: expected square patches [N, P, P, 3], got {h} x {w}")
    if chunk_patches < 1:
        raise ValueError(f"chunk_patches: expected a positive number of patches per chunk, got {chunk_patches}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"store {str(path)!r} already exists (pass overwrite=True to replace it)")
    meta, categories = _as_meta(n, h, patches, sharpness, complexity, source, origin, category, categories)
    digests = [chunk_digest(patches[s:s + chunk_patches]) for s in range(0, n, chunk_patches)]
    info = {
        "schema": SCHEMA_VERSION,
        "complete": True,
        "count": int(n),
        "patch_size": int(h),
        "stride": None,
        "chunk_patches": int(chunk_patches),
        "categories": categories,
        "sources": list(sources_meta or []),
        "params": dict(params or {}),
        "counts": {"patches": int(n)},
        "patches_digest": combine_digests(digests),
        "meta_sha256": meta_digest(meta),
        "rainsweep_version": rainsweep_version(),
        "run": {},
    }

    def build(tmp: Path) -> None:
        group = create_layout(tmp, h, {**info, "complete": False}, chunk_patches=chunk_patches, capacity=n)
        if n:
            writable(group, "patches")[:] = patches
        write_meta(group, meta, n)
        group.attrs[ATTR_KEY] = info

    build_dir(path, build, replace=overwrite)  # with overwrite, the old store goes only once the new one is complete
    return open_store(path)


# ----------------------------------------------------------------------------------------------------------------
# summary and verification

def summarize(store: PatchStore) -> dict:
    """Summary of a store for ``rainsweep info``: counts, sources, categories, metric quantiles."""
    info = store.attrs
    qs = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]
    out: dict[str, Any] = {
        "path": str(store.path),
        "complete": store.complete,
        "count": store.count,
        "patch_size": store.patch_size,
        "stride": info.get("stride"),
        "fingerprint": store.fingerprint,
        "schema": info.get("schema"),
        "rainsweep_version": info.get("rainsweep_version"),
        "sources": len(info.get("sources", [])),
        "counts": info.get("counts", {}),
    }
    cat = store.category if store.count else np.zeros(0, np.int16)
    out["categories"] = {name: int((cat == i).sum()) for i, name in enumerate(store.categories)}
    for name in ("sharpness", "complexity"):
        v = getattr(store, name) if store.count else np.zeros(0)
        out[name] = {f"q{int(q * 100)}": float(np.quantile(v, q)) for q in qs} if len(v) else {}
    if store.count:
        s = store.sharpness
        out["sharpness_bands"] = {"low (<50)": int((s < 50).sum()),
                                  "medium (500..1000)": int(((s >= 500) & (s <= 1000)).sum()),
                                  "high (>5000)": int((s > 5000).sum())}
    return out


def verify(path: str | os.PathLike, *, progress: bool = False) -> list[str]:
    """Check a store end to end; return a list of problems (empty when it is sound).

    Reads every chunk of every array, checks that array lengths agree with the ``count`` attribute, that codes
    and indices lie in range, that metrics are finite, and that the patch and metadata bytes hash to the digests
    recorded at write time (catches lost, truncated or altered chunks).
    """
    problems: list[str] = []
    try:
        store = open_store(path, allow_incomplete=True)
    except StoreError as e:
        return [str(e)]
    info = store.attrs
    if not store.complete:
        problems.append("store is incomplete (interrupted precompute): re-run the same precompute command")
    n, P = store.count, store.patch_size
    if tuple(store.patches.shape) != (n, P, P, 3):
        problems.append(f"patches: shape {tuple(store.patches.shape)} != attributes {(n, P, P, 3)}")
        return problems
    meta: dict[str, np.ndarray] = {}
    for name, (dtype, tail) in META_ARRAYS.items():
        try:
            arr = store._group[name]
        except KeyError:
            problems.append(f"{name}: array missing")
            continue
        if tuple(arr.shape) != (n, *tail):
            problems.append(f"{name}: shape {tuple(arr.shape)} != expected {(n, *tail)} (count {n})")
            continue
        try:
            meta[name] = np.asarray(arr[:])
        except Exception as e:
            problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    if len(meta) == len(META_ARRAYS):
        if meta_digest(meta) != info.get("meta_sha256"):
            problems.append("metadata arrays do not match the recorded meta_sha256 (altered or damaged)")
        for name in ("sharpness", "complexity"):
            if not np.isfinite(meta[name]).all():
                problems.append(f"{name}: non-finite values")
        ncat = len(store.categories)
        if n and (meta["category"].min() < 0 or meta["category"].max() >= ncat):
            problems.append(f"category: codes outside 0..{ncat - 1}")
        nsrc = len(info.get("sources", []))
        if n and (meta["source"].min() < -1 or meta["source"].max() >= nsrc):
            problems.append(f"source: indices outside -1..{nsrc - 1} (the sources attribute has {nsrc})")
        counts = info.get("counts", {})
        if "patches" in counts and counts["patches"] != n:
            problems.append(f"counts.patches {counts['patches']} != count {n}")
        srcs = info.get("sources", [])
        if srcs and n and all("patches" in s for s in srcs):
            per = np.bincount(meta["source"][meta["source"] >= 0], minlength=len(srcs))
            want = np.array([s["patches"] for s in srcs])
            if len(per) != len(want) or (per != want).any():
                problems.append("source: per-source patch counts disagree with the sources attribute")
    C = store.chunk_patches
    digests = []
    it = range(0, n, C)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="verify", unit="chunk", total=(n + C - 1) // C)
    for s in it:
        try:
            block = store.read_range(s, min(n, s + C))
        except Exception as e:
            problems.append(f"patches: chunk {s // C} unreadable ({type(e).__name__}: {e})")
            digests.append(b"")
            continue
        digests.append(chunk_digest(block))
    if combine_digests(digests) != info.get("patches_digest"):
        problems.append("patches do not match the recorded patches_digest (altered or damaged chunks)")
    return problems
