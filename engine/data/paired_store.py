"""Paired stores: the rainy and clean images of a paired test set (Rain100L and the like), with the rain layer
estimated from them, for scoring models on rain they never saw (``rainsweep precompute-pairs``).

Store format (kind ``"paired"``, schema version 1)
--------------------------------------------------
A Zarr v3 group with the conventions of patch stores (``engine.data.store``): uint8 arrays uncompressed and
unsharded, every chunk file written, attributes under ``"rainsweep"``. All arrays have length N along the first axis
(N items: whole images or patches) and share one canvas of H x W pixels:

===============  ==================  ===========================================================================
array            dtype, shape        meaning
===============  ==================  ===========================================================================
``patches``      uint8 [N, H, W, 3]  clean backgrounds B, NHWC, RGB, 0..255
``rainy``        uint8 [N, H, W, 3]  rainy inputs I, NHWC, RGB, 0..255
``rain``         uint8 [N, H, W]     the rain layer estimate ``R = max_c clip(I_c - B_c, 0, 255)``
``size``         int32 [N, 2]        (h, w) of the item's valid region, at the canvas's top left (scored)
``input_size``   int32 [N, 2]        (h, w) of the region a network sees (the valid region, padded)
``source``       int32 [N]           index into the ``pairs`` attribute
``origin``       int32 [N, 2]        (y, x) of the item's top-left corner in its source images, pixels
===============  ==================  ===========================================================================

The rain mask is not stored: it is ``M = rain > threshold``, with the ``threshold`` attribute (default 50, the
patch stores' ``t``), so a store can be scored with another threshold without rebuilding it.

Attributes: ``schema`` (1), ``kind`` ("paired"), ``complete`` (true), ``count`` (N), ``mode`` ("whole" or
"patch"), ``canvas`` ([H, W]), ``patch_size`` and ``stride`` (patch mode; null otherwise), ``multiple`` and ``fit``
(whole mode), ``threshold``, ``chunk_patches``, ``scheme`` (the naming scheme, ``engine.data.pairs``), ``pairs``
(per pair: ``key``, ``rainy`` and ``clean`` paths, ``height``, ``width``, ``rainy_sha256``, ``clean_sha256``,
``conversions``), ``params``, ``digests`` (per array: sha256 over the CRC-32 of each chunk, as the patch stores'
``patches_digest``), ``meta_sha256`` (of size, input_size, source, origin), ``rainsweep_version`` and ``run``.

Layouts
-------
- ``whole``, fit ``pad`` (the default): one item per pair. The image sits at the canvas's top left, reflect-padded
  at the bottom and right to the next multiple of ``multiple`` pixels (``input_size``); the canvas is the largest
  ``input_size`` of the set and is zero beyond an item's ``input_size``. A network runs on each image's
  ``input_size`` region and the metrics are computed on its ``size`` region only (``engine.experiments.scoring``),
  so images of different sizes (Rain100L mixes 481 x 321 and 321 x 481) are scored whole.
- ``whole``, fit ``crop``: each image centre-cropped to the largest multiple of ``multiple`` that fits
  (``origin`` is the crop's corner); ``size`` = ``input_size`` = the crop.
- ``patch``: aligned P x P patches from the same places of both images, on a ``stride`` grid
  (``engine.data.sources.cut_patches``); ``size`` = ``input_size`` = (P, P).

The rain layer estimate and synthetic rain
------------------------------------------
``engine.synth`` composites ``I_c = min(255, B_c + floor(beta_q R / 1024))`` per channel, with ``R`` the gray rain
layer before beta and ``beta_q = round(1024 beta)``. So on a synthetic pair the estimate is exactly
``R_est = min(floor(beta_q R / 1024), 255 - min_c B_c)``: the rain as it shows in the image (``beta R``, rounded
down), cut where every channel saturates. The synthetic mask is ``R > t`` before beta; the paired mask is
``R_est > t``, a subset of it; the two agree where ``beta = 1`` and the darkest channel of the background is below
``255 - t``. A real pair defines only the visible rain, so that is what a paired store's mask marks.

Writing is atomic: the store is built under a temporary sibling name and renamed into place
(``engine.data.atomic_dir``), so a killed run leaves no store (the next run removes its temporary folder and starts
again: test sets take seconds to build). A re-run with the same arguments and inputs does nothing; with other ones
it is refused unless ``overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.data import store as st
from engine.data.atomic_dir import build_dir, stale_temps
from engine.data.pairs import Pair, PairingError, check_sizes, pair_folders
from engine.data.sources import cut_patches, decode_file

PAIRED_SCHEMA_VERSION = 1
MODES = ("whole", "patch")
FITS = ("pad", "crop")
DEFAULT_THRESHOLD = 50
#: Default pixel multiple of whole images: 16 covers every model of ``models`` (UNet: 4 levels; SwinIR: window 8).
DEFAULT_MULTIPLE = 16
#: Bytes per chunk of ``patches`` / ``rainy``: as the patch stores' 64 patches of 128 x 128 x 3.
CHUNK_BYTES = 64 * 128 * 128 * 3
#: Per-item arrays: name -> (dtype, trailing shape).
ITEM_ARRAYS: dict[str, tuple[str, tuple[int, ...]]] = {
    "size": ("int32", (2,)), "input_size": ("int32", (2,)), "source": ("int32", ()), "origin": ("int32", (2,))}


class PairedStoreError(ValueError):
    """A paired store cannot be built (bad arguments, unreadable images, an existing store made otherwise) or
    opened (not a paired store, another schema version, damaged)."""


# ----------------------------------------------------------------------------------------------------------------
# the rain layer estimate

def rain_estimate(rainy: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The rain layer of a pair: ``max over channels of clip(rainy - clean, 0, 255)`` per pixel.

    Parameters
    ----------
    rainy, clean : numpy.ndarray
        uint8 [..., H, W, 3] on the 0..255 scale (HWC or NHWC), the same shape.

    Returns
    -------
    numpy.ndarray
        uint8 [..., H, W], 0..255.
    """
    rainy, clean = np.asarray(rainy), np.asarray(clean)
    if rainy.shape != clean.shape or rainy.dtype != np.uint8 or clean.dtype != np.uint8 or rainy.shape[-1:] != (3,):
        raise ValueError(f"rain_estimate: expected two uint8 [..., H, W, 3] arrays of one shape, got rainy "
                         f"{rainy.dtype}{rainy.shape} and clean {clean.dtype}{clean.shape}")
    diff = rainy.astype(np.int16) - clean.astype(np.int16)
    return np.clip(diff.max(axis=-1), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# layout: where each pair's items go

@dataclass(frozen=True)
class Layout:
    """The items of a paired store, planned from the pairs' sizes before any image is decoded.

    Attributes
    ----------
    canvas : tuple of int
        (H, W) of every stored item.
    source, size, input_size, origin : numpy.ndarray
        int32 [N], [N, 2], [N, 2], [N, 2]: the per-item arrays of the format.
    """

    canvas: tuple[int, int]
    source: np.ndarray
    size: np.ndarray
    input_size: np.ndarray
    origin: np.ndarray

    @property
    def count(self) -> int:
        return len(self.source)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_layout(sizes: list[tuple[int, int]], mode: str, patch: int | None = None, stride: int | None = None,
                multiple: int = DEFAULT_MULTIPLE, fit: str = "pad", names: list[str] | None = None) -> Layout:
    """Place every item of pairs of the given ``(height, width)`` sizes (format: the module docstring).

    Raises
    ------
    PairedStoreError
        Images smaller than the patch (patch mode) or than ``multiple`` (fit crop), named by ``names``.
    """
    rows: list[tuple[int, int, int, int, int, int, int]] = []  # source, y, x, h, w, input h, input w
    small = []
    for i, (h, w) in enumerate(sizes):
        if mode == "patch":
            if h < patch or w < patch:
                small.append(i)
                continue
            ys, xs = range(0, h - patch + 1, stride), range(0, w - patch + 1, stride)
            rows += [(i, y, x, patch, patch, patch, patch) for y in ys for x in xs]
        elif fit == "pad":
            rows.append((i, 0, 0, h, w, round_up(h, multiple), round_up(w, multiple)))
        else:
            hc, wc = h // multiple * multiple, w // multiple * multiple
            if not hc or not wc:
                small.append(i)
                continue
            rows.append((i, (h - hc) // 2, (w - wc) // 2, hc, wc, hc, wc))
    if small:
        side = f"--patch {patch}" if mode == "patch" else f"--multiple {multiple}"
        listed = ", ".join(f"{names[i] if names else i} ({sizes[i][0]}x{sizes[i][1]})" for i in small[:5])
        raise PairedStoreError(f"{len(small)} pairs are smaller than {side}: {listed}"
                               + (f" and {len(small) - 5} more" if len(small) > 5 else ""))
    a = np.array(rows, dtype=np.int32).reshape(-1, 7)
    canvas = (int(a[:, 5].max()), int(a[:, 6].max())) if len(a) else (0, 0)
    return Layout(canvas=canvas, source=a[:, 0].copy(), size=a[:, 3:5].copy(), input_size=a[:, 5:7].copy(),
                  origin=a[:, 1:3].copy())


def place(image: np.ndarray, layout: Layout, items: np.ndarray) -> np.ndarray:
    """The stored form of one pair's image: its items on the canvas.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 [h, w, 3], the decoded image (0..255).
    layout : Layout
        The store's layout.
    items : numpy.ndarray
        int [k], the layout rows of this image.

    Returns
    -------
    numpy.ndarray
        uint8 [k, H, W, 3]: each item's valid region, padded by reflection to its ``input_size``, zeros beyond.
    """
    H, W = layout.canvas
    out = np.zeros((len(items), H, W, 3), np.uint8)
    for j, i in enumerate(items):
        (y, x), (h, w), (hi, wi) = layout.origin[i], layout.size[i], layout.input_size[i]
        crop = image[y:y + h, x:x + w]
        # reflect needs a pad shorter than the side (as the models' own padding); edge copies otherwise
        mode = "reflect" if hi - h < h and wi - w < w else "edge"
        out[j, :hi, :wi] = np.pad(crop, ((0, hi - h), (0, wi - w), (0, 0)), mode=mode) if (hi, wi) != (h, w) else crop
    return out


def chunk_items(canvas: tuple[int, int]) -> int:
    """Items per chunk of a canvas: about ``CHUNK_BYTES`` of ``patches``, between 1 and 64."""
    return max(1, min(st.CHUNK_PATCHES, CHUNK_BYTES // max(1, canvas[0] * canvas[1] * 3)))


# ----------------------------------------------------------------------------------------------------------------
# writing

@dataclass
class PairedSummary:
    """What ``precompute_pairs`` did.

    Attributes
    ----------
    store : str
        The store path.
    pairs, items : int
        Pairs found; items stored (images, or patches in patch mode).
    scheme : str
        The naming scheme that paired the files.
    canvas : tuple of int
        (H, W) of the stored items.
    seconds : float
        Wall time.
    already_complete : bool
        The store existed with these arguments and inputs (nothing was done).
    """

    store: str
    pairs: int
    items: int
    scheme: str
    canvas: tuple[int, int]
    seconds: float
    already_complete: bool = False

    def format(self) -> str:
        """A few lines for a human."""
        head = "already complete with these arguments: nothing to do\n" if self.already_complete else ""
        return (f"{head}paired store: {self.store}\n{self.pairs} pairs (scheme {self.scheme}) -> {self.items} items "
                f"of {self.canvas[0]} x {self.canvas[1]} pixels in {self.seconds:.2f} s")


def _check_args(mode: str, patch: int | None, stride: int | None, multiple: int, fit: str, threshold: int) -> None:
    def positive(name: str, v: Any, lo: int) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise PairedStoreError(f"{name}: expected an integer >= {lo}, got {v!r}")

    if mode not in MODES:
        raise PairedStoreError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "patch":
        positive("--patch", patch, 2)
        positive("--stride", stride, 1)
    else:
        positive("--multiple", multiple, 1)
        if fit not in FITS:
            raise PairedStoreError(f"--fit {fit!r}: expected one of {', '.join(FITS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 <= threshold <= 254:
        raise PairedStoreError(f"--threshold: expected an integer in 0..254 (0..255 scale), got {threshold!r}")


def _decode(path: str) -> tuple[np.ndarray, Any]:
    d = decode_file(path)
    if d.rgb is None:
        raise PairedStoreError(f"{path!r}: cannot be read as an image ({d.skip}{': ' + d.detail if d.detail else ''})")
    return d.rgb, d


def _item_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in ITEM_ARRAYS:
        h.update(np.ascontiguousarray(arrays[name], dtype="<i4").data)
    return h.hexdigest()


def precompute_pairs(rainy_dir: str | os.PathLike, clean_dir: str | os.PathLike, out: str | os.PathLike, *,
                     mode: str = "whole", patch: int | None = None, stride: int | None = None,
                     multiple: int = DEFAULT_MULTIPLE, fit: str = "pad", threshold: int = DEFAULT_THRESHOLD,
                     scheme: str = "auto", overwrite: bool = False, progress: bool = True) -> PairedSummary:
    """Build the paired store ``out`` from a folder of rainy images and one of clean images.

    Parameters
    ----------
    rainy_dir, clean_dir : str or os.PathLike
        The folders (the same one for sets that keep both in one folder); pairing: ``engine.data.pairs``.
    out : str or os.PathLike
        The store folder to create.
    mode : {"whole", "patch"}
        Whole images, or aligned patches (layouts: the module docstring).
    patch, stride : int, optional
        Patch side and grid step in pixels (patch mode; ``stride`` defaults to ``patch``).
    multiple : int
        Whole mode: images are padded (or cropped) to a multiple of this many pixels.
    fit : {"pad", "crop"}
        Whole mode: pad to the next multiple (scored on the true size) or centre-crop to the last one.
    threshold : int
        Rain mask threshold on the 0..255 scale, recorded (``M = rain > threshold``).
    scheme : str
        Naming scheme (``engine.data.pairs.SCHEME_NAMES``; ``"auto"`` detects it).
    overwrite : bool
        Replace an existing store at ``out`` made with other arguments or inputs.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    PairedSummary

    Raises
    ------
    engine.data.pairs.PairingError
        The folders do not pair (unmatched or non-image files, size mismatches).
    PairedStoreError
        Bad arguments, an unreadable image, pairs too small for the layout, or ``out`` already holds something
        else (another store, other arguments) and ``overwrite`` is False.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    stride = patch if stride is None else stride
    _check_args(mode, patch, stride, multiple, fit, threshold)
    pairing = pair_folders(rainy_dir, clean_dir, scheme)
    pairs = pairing.pairs
    sizes = check_sizes(pairs)
    whole = mode == "whole"
    layout = plan_layout(sizes, mode, patch, stride, multiple, fit, names=[os.path.basename(p.rainy) for p in pairs])
    params = {"rainy_dir": str(rainy_dir), "clean_dir": str(clean_dir), "scheme": scheme, "mode": mode,
              "patch": None if whole else patch, "stride": None if whole else stride,
              "multiple": multiple if whole else None, "fit": fit if whole else None, "threshold": threshold}
    identity = [{"rainy": p.rainy, "clean": p.clean, "rainy_bytes": os.path.getsize(p.rainy),
                 "clean_bytes": os.path.getsize(p.clean)} for p in pairs]
    out = Path(out)
    summary = PairedSummary(store=str(out), pairs=len(pairs), items=layout.count, scheme=pairing.scheme.name,
                            canvas=layout.canvas, seconds=0.0)
    if _existing_is_current(out, params, identity, overwrite):
        summary.seconds, summary.already_complete = time.perf_counter() - t0, True
        return summary
    for old in stale_temps(out):  # left by a killed run (not one a live process is building)
        shutil.rmtree(old, ignore_errors=True)
    info = {"schema": PAIRED_SCHEMA_VERSION, "kind": st.PAIRED_KIND, "complete": False, "count": layout.count,
            "mode": mode, "canvas": list(layout.canvas), "patch_size": params["patch"], "stride": params["stride"],
            "multiple": params["multiple"], "fit": params["fit"], "threshold": threshold,
            "chunk_patches": chunk_items(layout.canvas), "scheme": pairing.scheme.name, "params": params,
            "identity": identity}

    def build(tmp: Path) -> None:
        _write(tmp, pairs, sizes, layout, info, progress)
        run = {"started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(time.perf_counter() - t0, 3)}
        _update_attrs(tmp, run=run)

    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for us
    try:
        build_dir(out, build, replace=overwrite)
    except FileExistsError as e:
        raise PairedStoreError(f"--out {str(out)!r}: another run created it while this one was building") from e
    summary.seconds = time.perf_counter() - t0
    return summary


def _existing_is_current(out: Path, params: dict, identity: list[dict], overwrite: bool) -> bool:
    """True when ``out`` is a complete paired store of these arguments and inputs; raises when ``out`` holds
    something else and ``overwrite`` is False."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    try:
        old = open_paired_store(out)
    except PairedStoreError as e:
        if overwrite and is_paired_store(out):
            return False
        raise PairedStoreError(f"--out {str(out)!r} exists and is not a complete paired store ({e}); choose a new "
                               f"path") from e
    if old.attrs.get("params") == params and old.attrs.get("identity") == identity:
        return True
    if overwrite:
        return False
    what = "other arguments" if old.attrs.get("params") != params else "inputs that changed since"
    raise PairedStoreError(f"--out {str(out)!r} is a paired store made with {what}; pass --overwrite to replace "
                           f"it, or choose a new --out")


def _update_attrs(path: Path, **fields: Any) -> None:
    """Set ``fields`` in the ``rainsweep`` attributes of the store at ``path``."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs[st.ATTR_KEY] = {**group.attrs[st.ATTR_KEY], **fields}


def _write(tmp: Path, pairs: list[Pair], sizes: list[tuple[int, int]], layout: Layout, info: dict,
           progress: bool) -> None:
    """Create the store at ``tmp`` and fill it, pair by pair, in whole chunks."""
    import zarr

    n, (H, W), chunk = layout.count, layout.canvas, info["chunk_patches"]
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    cfg = {"write_empty_chunks": True}  # every chunk file exists: a missing one means damage (engine.data.store)
    for name, tail, dims in (("patches", (3,), ["n", "y", "x", "c"]), ("rainy", (3,), ["n", "y", "x", "c"]),
                             ("rain", (), ["n", "y", "x"])):
        group.create_array(name, shape=(n, H, W, *tail), dtype="uint8", chunks=(chunk, H, W, *tail),
                           compressors=None, fill_value=0, config=cfg, dimension_names=dims)
    group.attrs[st.ATTR_KEY] = info
    arrays = {name: st.writable(group, name) for name in ("patches", "rainy", "rain")}
    digests: dict[str, list[bytes]] = {name: [] for name in arrays}
    records = []
    buf: list[dict[str, np.ndarray]] = []
    written = 0

    def flush(final: bool) -> None:
        nonlocal written, buf
        pending = sum(len(b["patches"]) for b in buf)
        m = pending if final else pending // chunk * chunk
        if not m:
            return
        data = {k: np.concatenate([b[k] for b in buf]) for k in arrays}
        for name, a in data.items():
            arrays[name][written:written + m] = a[:m]
            digests[name] += [st.chunk_digest(a[s:s + chunk]) for s in range(0, m, chunk)]
        buf = [{k: v[m:] for k, v in data.items()}] if m < pending else []
        written += m

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), unit="pair", desc="precompute-pairs", file=sys.stderr, dynamic_ncols=True)
    try:
        for i, p in enumerate(pairs):
            rainy, dr = _decode(p.rainy)
            clean, dc = _decode(p.clean)
            if rainy.shape != clean.shape or rainy.shape[:2] != tuple(sizes[i]):
                raise PairingError(f"{p.rainy!r} decodes to {rainy.shape[:2]} and {p.clean!r} to {clean.shape[:2]} "
                                   f"(headers said {tuple(sizes[i])}): a pair must have one size")
            items = np.flatnonzero(layout.source == i)
            placed = {"patches": place(clean, layout, items), "rainy": place(rainy, layout, items)}
            placed["rain"] = rain_estimate(placed["rainy"], placed["patches"])
            buf.append(placed)
            records.append({"key": p.key, "rainy": p.rainy, "clean": p.clean, "height": int(sizes[i][0]),
                            "width": int(sizes[i][1]), "rainy_sha256": dr.sha256, "clean_sha256": dc.sha256,
                            "conversions": sorted(set(dr.conversions) | set(dc.conversions))})
            flush(final=False)
            if bar is not None:
                bar.update(1)
        flush(final=True)
    finally:
        if bar is not None:
            bar.close()
    meta = {"size": layout.size, "input_size": layout.input_size, "source": layout.source, "origin": layout.origin}
    for name, (dtype, tail) in ITEM_ARRAYS.items():
        group.create_array(name, shape=(n, *tail), dtype=dtype, chunks=(max(n, 1), *tail), fill_value=0,
                           config=cfg, dimension_names=["n", "yx"] if tail else ["n"])
        if n:
            st.writable(group, name)[:] = meta[name]
    group.attrs[st.ATTR_KEY] = {**info, "complete": True, "pairs": records,
                                "digests": {k: st.combine_digests(v) for k, v in digests.items()},
                                "meta_sha256": _item_digest(meta), "rainsweep_version": st.rainsweep_version(),
                                "run": {}}


# ----------------------------------------------------------------------------------------------------------------
# reading

@dataclass(frozen=True)
class PairedItems:
    """Items of a paired store, host numpy arrays (format: the module docstring).

    Attributes
    ----------
    clean, rainy : numpy.ndarray
        uint8 NHWC [n, H, W, 3], 0..255.
    rain : numpy.ndarray
        uint8 NHW [n, H, W], the rain layer estimate, 0..255.
    size, input_size, origin : numpy.ndarray
        int32 [n, 2].
    source : numpy.ndarray
        int32 [n].
    """

    clean: np.ndarray
    rainy: np.ndarray
    rain: np.ndarray
    size: np.ndarray
    input_size: np.ndarray
    source: np.ndarray
    origin: np.ndarray


def _group_attrs(path: Path) -> dict | None:
    """The ``rainsweep`` attributes of the Zarr group at ``path`` read from its zarr.json, or None."""
    try:
        doc = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    info = doc.get("attributes", {}).get(st.ATTR_KEY) if isinstance(doc, dict) else None
    return info if isinstance(info, dict) else None


def is_paired_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a paired store (complete or not), judged from its attributes alone (cheap)."""
    info = _group_attrs(Path(path))
    return info is not None and info.get("kind") == st.PAIRED_KIND


class PairedStore:
    """An opened paired store (format: the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        The store folder.

    Attributes
    ----------
    path : Path
    attrs : dict
        The ``rainsweep`` attributes.
    count : int
        N, the number of items.
    mode : str
        ``"whole"`` or ``"patch"``.
    canvas : tuple of int
        (H, W) of every item.
    threshold : int
        The recorded mask threshold (0..255 scale).

    Raises
    ------
    PairedStoreError
        Not a paired store, another schema version, incomplete, or arrays whose shapes disagree with the attributes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import zarr

        self.path = p = Path(path)
        info = _group_attrs(p)
        if info is None:
            why = "no such file or directory" if not p.exists() else "not a rainsweep store (no zarr.json with " \
                                                                     "rainsweep attributes)"
            raise PairedStoreError(f"paired store {str(p)!r}: {why}; create one with `rainsweep precompute-pairs`")
        if info.get("kind") != st.PAIRED_KIND:
            raise PairedStoreError(f"{str(p)!r}: a patch store, not a paired store (create one with `rainsweep "
                                   f"precompute-pairs RAINY_DIR CLEAN_DIR`)")
        if info.get("schema") != PAIRED_SCHEMA_VERSION:
            raise PairedStoreError(f"paired store {str(p)!r}: schema version {info.get('schema')}, this rainsweep "
                                   f"reads version {PAIRED_SCHEMA_VERSION}; re-run `rainsweep precompute-pairs`")
        if not info.get("complete", False):
            raise PairedStoreError(f"paired store {str(p)!r}: incomplete; re-run `rainsweep precompute-pairs`")
        self.attrs: dict = info
        self.count = int(info["count"])
        self.mode = str(info["mode"])
        self.canvas = (int(info["canvas"][0]), int(info["canvas"][1]))
        self.threshold = int(info["threshold"])
        self._group = zarr.open_group(str(p), mode="r")
        H, W = self.canvas
        want = {"patches": (self.count, H, W, 3), "rainy": (self.count, H, W, 3), "rain": (self.count, H, W),
                **{k: (self.count, *tail) for k, (_, tail) in ITEM_ARRAYS.items()}}
        for name, shape in want.items():
            if name not in self._group:
                raise PairedStoreError(f"paired store {str(p)!r}: damaged: the {name!r} array is missing")
            if tuple(self._group[name].shape) != shape:
                raise PairedStoreError(f"paired store {str(p)!r}: damaged: {name!r} has shape "
                                       f"{tuple(self._group[name].shape)}, the attributes say {shape}")

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"PairedStore({str(self.path)!r}, count={self.count}, mode={self.mode!r}, canvas={self.canvas})"

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the store's content (``engine.data.store.fingerprint_of``)."""
        return st.fingerprint_of(self.attrs)

    @property
    def pairs(self) -> list[dict]:
        """One record per pair (``key``, ``rainy``, ``clean``, ``height``, ``width``, hashes); ``source`` indexes
        it."""
        return list(self.attrs.get("pairs", []))

    def read(self) -> PairedItems:
        """Every item (``count`` x canvas x 7 bytes of memory)."""
        g = self._group
        return PairedItems(clean=np.asarray(g["patches"][:]), rainy=np.asarray(g["rainy"][:]),
                           rain=np.asarray(g["rain"][:]), size=np.asarray(g["size"][:]),
                           input_size=np.asarray(g["input_size"][:]), source=np.asarray(g["source"][:]),
                           origin=np.asarray(g["origin"][:]))

    def describe(self) -> dict:
        """JSON-ready summary: path, fingerprint, count, mode, canvas, threshold, layout parameters, scheme."""
        a = self.attrs
        return {"store": str(self.path), "fingerprint": self.fingerprint, "count": self.count, "mode": self.mode,
                "canvas": list(self.canvas), "threshold": self.threshold, "patch_size": a.get("patch_size"),
                "stride": a.get("stride"), "multiple": a.get("multiple"), "fit": a.get("fit"),
                "scheme": a.get("scheme"), "pairs": len(a.get("pairs", []))}

    def verify(self) -> list[str]:
        """Read every chunk and compare with the recorded digests; one sentence per problem (empty: sound)."""
        problems = []
        chunk = int(self.attrs["chunk_patches"])
        for name in ("patches", "rainy", "rain"):
            arr = self._group[name]
            digests = [st.chunk_digest(np.asarray(arr[s:min(self.count, s + chunk)]))
                       for s in range(0, self.count, chunk)]
            if st.combine_digests(digests) != self.attrs.get("digests", {}).get(name):
                problems.append(f"{name}: does not match its recorded digest (altered or damaged chunks)")
        meta = {k: np.asarray(self._group[k][:]) for k in ITEM_ARRAYS}
        if _item_digest(meta) != self.attrs.get("meta_sha256"):
            problems.append("size, input_size, source, origin: do not match meta_sha256 (altered or damaged)")
        return problems


def open_paired_store(path: str | os.PathLike) -> PairedStore:
    """Open a paired store for reading (raises ``PairedStoreError`` naming the path when it cannot be used)."""
    return PairedStore(path)


__all__ = ["DEFAULT_MULTIPLE", "DEFAULT_THRESHOLD", "FITS", "ITEM_ARRAYS", "Layout", "MODES", "PAIRED_SCHEMA_VERSION",
           "PairedItems", "PairedStore", "PairedStoreError", "PairedSummary", "chunk_items", "is_paired_store",
           "open_paired_store", "place", "plan_layout", "precompute_pairs", "rain_estimate", "round_up"]
