"""Zarr patch stores: the on-disk format, opening, fast reads and whole-store writes.

Store format (schema version 1)
-------------------------------
A store is a Zarr v3 group in a directory (zarr-python's LocalStore); any zarr-python >= 3 user can open it with
``zarr.open_group(path, mode="r")``. Arrays, all with the same length N along the first axis:

==============  ================  ==========================================================================
array           dtype, shape      meaning
==============  ================  ==========================================================================
``patches``     uint8 [N,P,P,3]   RGB patches, NHWC, 0..255. Chunks of 64 patches (64 x P x P x 3), no
                                  compression, no sharding.
``sharpness``   float64 [N]       Var(Laplacian(BT.601 gray)) on the 0..255 scale (``engine.metrics``).
``complexity``  float64 [N]       multiscale structural complexity of the patch scaled to 0..1
                                  (``engine.metrics``).
``source``      int32 [N]         index into the ``sources`` attribute list; -1 when unknown.
``origin``      int32 [N, 2]      (y, x) of the patch's top-left corner in its source image, pixels.
``category``    int16 [N]         code into the ``categories`` attribute list.
``complexity_   float64 [N, L]    per-level terms of the complexity (``engine.metrics.complexity_profile``),
profile``                         ``L = floor(log2(P))``; they add up to ``complexity``. Stores written
                                  before it was stored lack it (they still open; rebuild with precompute to
                                  select by a band of scales).
==============  ================  ==========================================================================

Group attributes live under one key, ``"rainsweep"``:
``schema`` (int, 1), ``complete`` (bool; False while a precompute is running or was interrupted), ``count`` (N),
``patch_size`` (P), ``stride`` (pixels, or null for stores written from arrays), ``chunk_patches`` (64),
``categories`` (list of names), ``sources`` (list of dicts: ``path``, ``size`` in bytes, ``sha256``,
``category``, ``status`` "ok" or the skip reason, ``height``/``width``, ``patches``), ``params`` (the arguments
that produced the store), ``counts`` (images read, skipped by reason, converted by reason, patches),
``patches_digest`` (sha256 over the big-endian CRC-32 of each chunk's valid patch bytes, chunk by chunk of
``chunk_patches`` patches), ``meta_sha256`` (sha256 of the metadata arrays' little-endian bytes,
in the order sharpness, complexity, source, origin, category, complexity_profile when present), ``rainsweep_version``, and ``run`` (timing
fields: seconds, started/finished UTC; the only fields that differ between identical runs).

Why this chunk layout: zarr-python's per-chunk overhead dominates small chunks, so sharded one-patch chunks are
slow to write and slow to read through zarr, random reads included. Uncompressed, unsharded 64-patch chunks are
fast through zarr *and* let ``PatchStore.read`` bypass zarr: with the plain ``bytes`` codec a chunk file is the raw
C-order array, so patch i is ``P*P*3`` bytes at offset ``(i % 64) * P*P*3`` in file ``patches/c/<i // 64>/0/0/0``
and a random batch is one ``preadv`` per run of consecutive indices straight into the output. Natural-image
patches compress poorly (about 1.3-2x) and decompression would cost more than the disk saves on page-cached
reads. Every chunk file exists (``write_empty_chunks``), so a missing file means damage, not zeros.
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
#: The ``kind`` attribute of paired test stores (``engine.data.paired_store``); patch stores have no ``kind``.
PAIRED_KIND = "paired"
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
#: per-level complexity terms, float64 [N, profile_levels(P)]; optional when reading (older stores lack it)
PROFILE_ARRAY = "complexity_profile"
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
    """The installed rainsweep package version, or ``"unknown"`` when running from a source tree."""
    try:
        from importlib.metadata import version

        return version("rainsweep")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# hashing helpers (shared by writers and verify)

def chunk_digest(patches: np.ndarray) -> bytes:
    """Checksum of one chunk's valid patches (uint8 [n, P, P, 3], C order): CRC-32, 4 bytes big-endian.

    CRC-32 rather than sha256: it is about three times faster, which matters next to the cost of the metrics
    computed for every patch, and it only has to catch damage; content identity comes from the sha256 of
    ``combine_digests``."""
    return zlib.crc32(np.ascontiguousarray(patches, dtype=np.uint8).data).to_bytes(4, "big")


def combine_digests(digests: list[bytes]) -> str:
    """The store's ``patches_digest``: sha256 over the concatenated per-chunk checksums."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def profile_levels(patch_size: int) -> int:
    """Number of levels ``L`` of a P x P patch's complexity profile, ``floor(log2(P))`` (as
    ``kernels.complexity.num_levels(P, P)``)."""
    return max(int(patch_size).bit_length() - 1, 0)


def meta_arrays(patch_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The metadata arrays a store of P x P patches is written with: ``META_ARRAYS`` and ``PROFILE_ARRAY``
    (name -> (dtype, trailing shape))."""
    return {**META_ARRAYS, PROFILE_ARRAY: ("float64", (profile_levels(patch_size),))}


def meta_digest(meta: dict[str, np.ndarray]) -> str:
    """``meta_sha256``: sha256 of the metadata arrays' little-endian bytes in META_ARRAYS order, then
    ``PROFILE_ARRAY`` when ``meta`` has it."""
    h = hashlib.sha256()
    names = [(name, dtype) for name, (dtype, _) in META_ARRAYS.items()]
    if PROFILE_ARRAY in meta:
        names.append((PROFILE_ARRAY, "float64"))
    for name, dtype in names:
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
    """An opened store (format: this module's docstring). Metadata arrays load lazily, once; patches are read on
    demand.

    Picklable (zarr handles and file descriptors are reopened in the new process), so it can be handed to
    worker processes (DALI external sources, multiprocessing). Reads are thread-safe: each thread keeps its own
    file descriptors.

    Parameters
    ----------
    path : str or os.PathLike
        The store folder.
    allow_incomplete : bool
        Open a store whose precompute is unfinished (``complete`` False); its arrays may still change.

    Attributes
    ----------
    path : Path
        The store folder.
    attrs : dict
        The ``rainsweep`` group attributes (see the module docstring).
    patches : zarr.Array
        The patches array, uint8 [N, P, P, 3], for zarr-level access; ``read`` is faster.
    count : int
        N, the number of patches.
    patch_size : int
        P, the patch side in pixels.
    chunk_patches : int
        Patches per chunk file.

    Raises
    ------
    StoreError
        Not a rainsweep store, another schema version, incomplete (unless ``allow_incomplete``), or damaged.
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
        if info.get("kind") == PAIRED_KIND:
            raise StoreError(f"store {str(p)!r}: a paired test store (rainsweep precompute-pairs), not a patch store: "
                             f"score on it with train.py --test-store or `rainsweep evaluate --store`")
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
    def raw_layout(self) -> bool:
        """True when chunk files are raw C-order bytes read directly (``read`` with ``preadv``, ``views``); False
        for a layout zarr must decode (e.g. compressed), which ``read`` then reads through zarr."""
        return self._raw

    @property
    def complete(self) -> bool:
        """Whether the store is finished (False while a precompute is running or after an interrupted one)."""
        return bool(self.attrs.get("complete", False))

    @property
    def categories(self) -> list[str]:
        """Category names; ``category`` codes index this list."""
        return list(self.attrs.get("categories", []))

    @property
    def sources_meta(self) -> list[dict]:
        """One dict per source image (``path``, ``size``, ``sha256``, ``status``, ...); ``source`` indexes it."""
        return list(self.attrs.get("sources", []))

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the store's content (attributes without the timing fields); subsets record
        it to detect a different or rebuilt store."""
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
        """float64 [N], read-only: Var(Laplacian(gray)) of each patch on the 0..255 scale."""
        return self._meta_array("sharpness")

    @property
    def complexity(self) -> np.ndarray:
        """float64 [N], read-only: multiscale structural complexity of each patch scaled to 0..1."""
        return self._meta_array("complexity")

    @property
    def complexity_profile(self) -> np.ndarray:
        """float64 [N, L], read-only: per-level complexity terms of each patch (``engine.metrics.
        complexity_profile``, ``L = floor(log2(P))``); they add up to ``complexity``.

        Raises
        ------
        StoreError
            The store was written without the array (before it was stored): rebuild it with precompute.
        """
        if PROFILE_ARRAY not in self._meta and PROFILE_ARRAY not in self._group:
            raise StoreError(f"store {str(self.path)!r}: has no {PROFILE_ARRAY!r} array (written before per-level "
                             f"complexity was stored); rebuild it with precompute (rainsweep precompute) to query "
                             f"complexity by levels")
        return self._meta_array(PROFILE_ARRAY)

    @property
    def source(self) -> np.ndarray:
        """int32 [N], read-only: index into ``sources_meta`` (-1: unknown)."""
        return self._meta_array("source")

    @property
    def origin(self) -> np.ndarray:
        """int32 [N, 2], read-only: (y, x) of each patch's top-left corner in its source image, in pixels."""
        return self._meta_array("origin")

    @property
    def category(self) -> np.ndarray:
        """int16 [N], read-only: code into ``categories``."""
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
        """Close this thread's cached file descriptors (other threads' close when their cache is dropped); later
        reads reopen them."""
        loc = self._local
        if getattr(loc, "pid", None) == os.getpid():
            loc.fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def read(self, indices: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Read patches by store index.

        Reads the raw chunk files directly: indices are sorted so each run of consecutive indices within a chunk is
        one ``preadv`` scattering straight into the rows of ``out`` (no intermediate copy). Stores in another
        layout are read through zarr.

        Parameters
        ----------
        indices : array_like of int
            1-d store indices in 0..N-1, any order, repeats allowed.
        out : numpy.ndarray, optional
            C-contiguous uint8 [n, P, P, 3] buffer to fill (e.g. pinned memory); a new array when None.

        Returns
        -------
        numpy.ndarray
            uint8 [n, P, P, 3] (NHWC, RGB, 0..255), row k holding patch ``indices[k]``; ``out`` when given.

        Raises
        ------
        ValueError
            ``indices`` not a 1-d integer array, or ``out`` of the wrong shape, dtype or layout.
        IndexError
            An index outside 0..N-1.
        StoreError
            A chunk file is missing or truncated.
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
        """Zero-copy views of patches: arrays over memory maps of the chunk files (the page cache itself).

        For a consumer that copies each patch anyway (DALI copies every sample of a batch into its own buffers):
        one copy instead of the two of ``read`` plus that copy. The maps live as long as any view of them; the
        store keeps up to ``MAP_CACHE_SIZE`` chunk maps per process.

        Parameters
        ----------
        indices : array_like of int
            1-d store indices in 0..N-1, any order, repeats allowed.

        Returns
        -------
        list of numpy.ndarray or None
            One read-only uint8 [P, P, 3] (HWC, RGB, 0..255) view per index, in the order given; None when the
            layout does not allow views (not ``raw_layout``, or an incomplete store whose files still change).

        Raises
        ------
        IndexError
            An index outside 0..N-1.
        StoreError
            A chunk file is missing, empty or truncated.
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
        """Patches ``start`` to ``stop - 1`` as uint8 [stop - start, P, P, 3] (NHWC, RGB, 0..255).

        Raises
        ------
        IndexError
            Unless 0 <= start <= stop <= N.
        """
        if not (0 <= start <= stop <= self.count):
            raise IndexError(f"read_range: [{start}, {stop}) out of range for a store of {self.count} patches")
        return self.read(np.arange(start, stop, dtype=np.int64))

    def read_all(self) -> np.ndarray:
        """Every patch, in store order.

        Returns
        -------
        numpy.ndarray
            uint8 [N, P, P, 3] (NHWC, RGB, 0..255); N x P x P x 3 bytes of memory.
        """
        return self.read_range(0, self.count)

    def iter_chunks(self, batch: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, patches)`` blocks in store order: ``patches`` is uint8 [n, P, P, 3] (NHWC, 0..255) for
        store indices ``start`` to ``start + n - 1``, ``batch`` patches at a time (default: one chunk)."""
        step = batch or self.chunk_patches
        for s in range(0, self.count, step):
            yield s, self.read_range(s, min(self.count, s + step))


def open_store(path: str | os.PathLike, *, allow_incomplete: bool = False) -> PatchStore:
    """Open a rainsweep store for reading.

    Parameters
    ----------
    path : str, os.PathLike or PatchStore
        The store folder (format: this module's docstring); an open ``PatchStore`` is returned as it is.
    allow_incomplete : bool
        Also open a store whose precompute is unfinished.

    Returns
    -------
    PatchStore

    Raises
    ------
    StoreError
        The path is not a rainsweep store, is a store of another schema version, is incomplete (unless
        ``allow_incomplete``) or is damaged.
    """
    if isinstance(path, PatchStore):
        return path
    return PatchStore(path, allow_incomplete=allow_incomplete)


# ----------------------------------------------------------------------------------------------------------------
# writing

def create_layout(path: str | os.PathLike, patch_size: int, info: dict, *,
                  chunk_patches: int = CHUNK_PATCHES, capacity: int = 0):
    """Create an empty store folder and return its zarr group (used by ``write_store`` and by precompute, which
    grows the arrays as it goes).

    Parameters
    ----------
    path : str or os.PathLike
        The folder to create (replaced if it exists).
    patch_size : int
        P, the patch side in pixels.
    info : dict
        The ``rainsweep`` attributes to set.
    chunk_patches : int
        Patches per chunk file of ``patches``.
    capacity : int
        Initial length N of every array.
    """
    import zarr

    P = int(patch_size)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    cfg = {"write_empty_chunks": True}  # see writable()
    group.create_array("patches", shape=(capacity, P, P, 3), dtype="uint8", chunks=(chunk_patches, P, P, 3),
                       compressors=None, fill_value=0, config=cfg, dimension_names=["n", "y", "x", "c"])
    for name, (dtype, tail) in meta_arrays(P).items():
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
    """Resize the metadata arrays of ``group`` to ``n`` rows and write them whole from ``meta`` (name -> array,
    see ``meta_arrays`` for dtypes and shapes)."""
    for name, (dtype, tail) in meta_arrays(group["patches"].shape[1]).items():
        arr = writable(group, name)
        arr.resize((n, *tail))
        if n:
            arr[:] = np.asarray(meta[name], dtype=dtype)


def _as_meta(n: int, P: int, patches: np.ndarray, sharpness, complexity, complexity_profile, source, origin,
             category, categories) -> tuple[dict[str, np.ndarray], list[str]]:
    from engine import metrics

    def vec(x, name, dtype, tail=()):
        a = np.asarray(x)
        if a.shape != (n, *tail):
            raise ValueError(f"{name}: expected shape {(n, *tail)} to match {n} patches, got {a.shape}")
        return a.astype(dtype)

    def computed(fn, tail=()) -> np.ndarray:  # batches of 256 bound the metrics' temporary memory
        return np.concatenate([np.zeros((0, *tail))] + [np.asarray(fn(patches[s:s + 256]), np.float64)
                                                        for s in range(0, n, 256)])

    meta: dict[str, np.ndarray] = {}
    meta["sharpness"] = (vec(sharpness, "sharpness", np.float64) if sharpness is not None
                         else computed(metrics.sharpness))
    meta["complexity"] = (vec(complexity, "complexity", np.float64) if complexity is not None
                          else computed(metrics.complexity))
    levels = (profile_levels(P),)
    meta[PROFILE_ARRAY] = (vec(complexity_profile, PROFILE_ARRAY, np.float64, levels)
                           if complexity_profile is not None else computed(metrics.complexity_profile, levels))
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


def write_store(path: str | os.PathLike, patches: np.ndarray, *, sharpness=None, complexity=None,
                complexity_profile=None, source=None, origin=None, category=None, categories: list[str] | None = None,
                sources_meta: list[dict] | None = None, params: dict | None = None,
                chunk_patches: int = CHUNK_PATCHES, overwrite: bool = False) -> PatchStore:
    """Create a complete store at ``path`` from in-memory arrays and return it opened.

    The store is built in a temporary sibling folder and renamed into place, so a failure never leaves a
    half-written store at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The store folder to create.
    patches : numpy.ndarray
        uint8 [N, P, P, 3] (NHWC, RGB, 0..255), square patches.
    sharpness, complexity : array_like of float, optional
        [N] metrics on the 0..255 and 0..1 scales; computed with ``engine.metrics`` when None.
    complexity_profile : array_like of float, optional
        [N, floor(log2(P))] per-level complexity terms (``engine.metrics.complexity_profile``); computed when None.
    source : array_like of int, optional
        [N] index into ``sources_meta`` (default -1, unknown).
    origin : array_like of int, optional
        [N, 2] (y, x) of each top-left corner in its source, pixels (default 0).
    category : array_like, optional
        [N] integer codes into ``categories``, or [N] names (codes then follow ``categories`` when given, else
        the order of first appearance); default: every patch in category "default".
    categories : list of str, optional
        Category names; required with integer codes.
    sources_meta : list of dict, optional
        Descriptions of the sources, stored as the ``sources`` attribute.
    params : dict, optional
        Free-form arguments recorded as the ``params`` attribute.
    chunk_patches : int
        Patches per chunk file (>= 1).
    overwrite : bool
        Replace an existing store at ``path`` (removed only once the new one is complete).

    Returns
    -------
    PatchStore

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False, or another writer created it meanwhile.
    ValueError
        Arrays of the wrong dtype or shape, or category codes outside ``categories``.
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
    meta, categories = _as_meta(n, h, patches, sharpness, complexity, complexity_profile, source, origin, category,
                                categories)
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
    """Summary of a store for ``rainsweep info``: counts, sources, categories, metric quantiles (q0, q5, q25, q50,
    q75, q95, q100) and sharpness-band counts (low < 50, medium 500..1000, high > 5000, on the 0..255 scale)."""
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
    """Check a store end to end.

    Reads every chunk of every array, checks that array lengths agree with the ``count`` attribute, that codes
    and indices lie in range, that metrics are finite, and that the patch and metadata bytes hash to the digests
    recorded at write time (catches lost, truncated or altered chunks).

    Parameters
    ----------
    path : str or os.PathLike
        The store folder.
    progress : bool
        Show a progress bar over chunks.

    Returns
    -------
    list of str
        One sentence per problem found; empty when the store is sound. A path that is not a store gives one
        problem, not an exception.
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
    expected = dict(META_ARRAYS)
    if PROFILE_ARRAY in store._group:  # optional: stores written before it was stored lack it
        expected[PROFILE_ARRAY] = meta_arrays(P)[PROFILE_ARRAY]
    for name, (dtype, tail) in expected.items():
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
    if len(meta) == len(expected):
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
