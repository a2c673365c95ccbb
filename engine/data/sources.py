"""Image sources for precompute: discovery, decoding, conversion to RGB uint8, patch cutting, built-in sources.

Source specs (``rainsweep precompute SRC...``), expanded in the order given, each in sorted path order:

- an image file (PNG, JPEG, TIFF, BMP, WebP); any other file named explicitly is tried and skipped if unreadable;
- a folder: every file below it, recursively (hidden files and folders ignored); files without an image extension
  are counted as skipped ("non-image file") without being opened;
- a glob (``*``, ``?``, ``[``; ``**`` recurses);
- ``builtin:skimage``: scikit-image's pictures that ship with the wheel (no download; ``engine.data.builtin``),
  in sorted name order, or ``builtin:skimage/NAME`` for one ``skimage.data`` picture;
- ``builtin:procedural``: deterministic dead-leaves images (``engine.data.builtin.procedural_image``;
  ``PROC_IMAGES`` of ``PROC_SIZE`` pixels by default, 3,072 patches of 128 x 128) at ``PROC_LEVELS`` texture/blur
  levels whose patch sharpness spans the low (< 50), medium (500..1000) and high (> 5000) bands of
  ``engine.data.select``; ``builtin:procedural?images=N&size=S`` for other sizes.

Decoding uses Pillow for the file formats and numpy for 16-bit and alpha arithmetic. Conversions, counted per
image and reason: ``gray`` (L, 1, I;16...), ``palette`` (P), ``alpha`` (RGBA, LA, PA: composited on black, i.e.
``rgb * a / 255`` rounded), ``16-bit`` (scaled to 8-bit: ``round(v * 255 / 65535)`` for 16-bit gray; Pillow reduces
16-bit RGB PNG/TIFF to 8 bits by taking the high byte), ``cmyk`` and ``other mode`` (Pillow's RGB conversion).
Skips, counted by reason: see ``SKIP_*``.
"""
from __future__ import annotations

import glob as globmod
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from engine.data.builtin import (PROC_IMAGES, PROC_LEVELS, PROC_SIZE, SKIMAGE_NAMES, procedural_image,
                                 skimage_picture)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".bmp", ".webp"}
#: Pillow format names we accept (MPO is what Pillow calls many camera JPEGs)
IMAGE_FORMATS = {"PNG", "JPEG", "MPO", "TIFF", "BMP", "DIB", "WEBP"}

SKIP_CORRUPT = "corrupt or truncated"
SKIP_NOT_IMAGE = "non-image file"
SKIP_SMALL = "smaller than the patch"
SKIP_FORMAT = "unsupported format"
SKIP_MODE = "unsupported pixel mode"
SKIP_UNREADABLE = "unreadable file"
SKIP_TOO_LARGE = "too large (decompression bomb guard)"
SKIP_UNAVAILABLE = "builtin not available offline"

CONV_GRAY, CONV_PALETTE, CONV_ALPHA, CONV_16BIT = "gray", "palette", "alpha", "16-bit"
CONV_CMYK, CONV_OTHER, CONV_FLOAT = "cmyk", "other mode", "float"

class SourceError(ValueError):
    """A source spec that names nothing usable (missing path, empty glob, unknown builtin)."""


@dataclass(frozen=True)
class SourceItem:
    """One input image. ``path``: file path as spelled (joined under the folder or glob given) or a builtin id
    (``builtin:skimage/astronaut``, ``builtin:procedural/0007?size=512&texture=40&blur=0``). ``kind``: "file",
    "skimage" or "procedural". ``category``: name recorded for its patches. ``skip``: a skip reason decided at
    discovery (non-image extension inside a folder), else None."""

    path: str
    kind: str
    category: str
    skip: str | None = None
    arg: tuple = ()


@dataclass
class Decoded:
    """A decoded image: ``rgb`` uint8 [H, W, 3] (0..255) or None when skipped (``skip`` says why)."""

    rgb: np.ndarray | None
    size: int
    sha256: str
    conversions: list[str] = field(default_factory=list)
    skip: str | None = None
    detail: str = ""


# ----------------------------------------------------------------------------------------------------------------
# discovery

def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _default_category(spec: str, kind: str) -> str:
    if kind == "skimage":
        return "skimage"
    if kind == "procedural":
        return "procedural"
    p = Path(spec.split("*")[0].split("?")[0].split("[")[0] if _is_glob(spec) else spec)
    if kind == "folder" or (kind == "glob" and (spec.endswith("/") or p.is_dir())):
        name = p.resolve().name if str(p) in ("", ".") else p.name
    else:
        name = p.resolve().parent.name if p.parent in (Path(""), Path(".")) else p.parent.name
    return name or "default"


def discover(specs: list[str], category: str | None = None) -> list[SourceItem]:
    """Expand source specs to SourceItems in a deterministic order (spec order, then sorted paths; a file reached
    twice is kept once, first occurrence). ``category`` overrides the default category: ``skimage`` /
    ``procedural`` for builtins, else the name of the folder given (or of the file's folder)."""
    if not specs:
        raise SourceError("sources: expected at least one image file, folder, glob or builtin:NAME")
    items: list[SourceItem] = []
    seen: set[str] = set()

    def add(item: SourceItem) -> None:
        key = os.path.realpath(item.path) if item.kind == "file" else item.path
        if key not in seen:
            seen.add(key)
            items.append(item)

    for spec in specs:
        spec = str(spec)
        if spec.startswith("builtin:"):
            for it in _builtin_items(spec, category):
                add(it)
            continue
        if _is_glob(spec):
            matches = sorted(globmod.glob(spec, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            if not files:
                raise SourceError(f"source {spec!r}: the glob matches no files")
            cat = category or _default_category(spec, "glob")
            for m in files:
                add(SourceItem(m, "file", cat))
            continue
        p = Path(spec)
        if p.is_dir():
            cat = category or _default_category(spec, "folder")
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _visible(f, p))
            if not files:
                raise SourceError(f"source {spec!r}: the folder holds no files")
            for f in files:
                ok = Path(f).suffix.lower() in IMAGE_EXTENSIONS
                add(SourceItem(f, "file", cat, None if ok else SKIP_NOT_IMAGE))
        elif p.is_file():
            add(SourceItem(spec, "file", category or _default_category(spec, "file")))
        else:
            raise SourceError(f"source {spec!r}: no such file or folder (expected an image file, a folder, a glob "
                              f"or builtin:skimage / builtin:procedural)")
    return items


def _builtin_items(spec: str, category: str | None) -> list[SourceItem]:
    body = spec[len("builtin:"):]
    name, _, query = body.partition("?")
    base, _, sub = name.partition("/")
    if base == "skimage":
        if query:
            raise SourceError(f"source {spec!r}: builtin:skimage takes no options")
        names = [sub] if sub else sorted(SKIMAGE_NAMES)
        if sub:
            import skimage.data

            if not callable(getattr(skimage.data, sub, None)) or sub.startswith("_"):
                raise SourceError(f"source {spec!r}: skimage.data has no picture {sub!r} (built-in set: "
                                  f"{', '.join(sorted(SKIMAGE_NAMES))})")
        cat = category or "skimage"
        return [SourceItem(f"builtin:skimage/{n}", "skimage", cat, None, (n,)) for n in names]
    if base == "procedural":
        if sub:
            raise SourceError(f"source {spec!r}: use builtin:procedural?images=N&size=S")
        try:
            q = {k: v[-1] for k, v in parse_qs(query, strict_parsing=bool(query)).items()}
            n_img = int(q.pop("images", PROC_IMAGES))
            size = int(q.pop("size", PROC_SIZE))
        except ValueError as e:
            raise SourceError(f"source {spec!r}: expected builtin:procedural?images=N&size=S with integers "
                              f"({e})") from e
        if q:
            raise SourceError(f"source {spec!r}: unknown options {sorted(q)} (expected images, size)")
        if n_img < 1 or not 8 <= size <= 8192:
            raise SourceError(f"source {spec!r}: expected images >= 1 and 8 <= size <= 8192")
        cat = category or "procedural"
        out = []
        for i in range(n_img):
            tex, blur = PROC_LEVELS[i % len(PROC_LEVELS)]
            out.append(SourceItem(f"builtin:procedural/{i:04d}?size={size}&texture={tex:g}&blur={blur:g}",
                                  "procedural", cat, None, (i, size, tex, blur)))
        return out
    raise SourceError(f"source {spec!r}: unknown builtin (expected builtin:skimage, builtin:skimage/NAME or "
                      f"builtin:procedural)")


def describe_items(items: list[SourceItem]) -> list[dict]:
    """Cheap identity of a discovered source list (paths, kinds, file sizes) to detect changed inputs on resume."""
    out = []
    for it in items:
        d = {"path": it.path, "kind": it.kind, "category": it.category}
        if it.kind == "file":
            try:
                d["size"] = os.path.getsize(it.path)
            except OSError:
                d["size"] = -1
        out.append(d)
    return out


# ----------------------------------------------------------------------------------------------------------------
# decoding and conversion

def _scale16(a: np.ndarray) -> np.ndarray:
    """uint16-range integers -> uint8, round(v * 255 / 65535)."""
    a = a.astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _composite_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite uint8 RGB on black: round(rgb * a / 255)."""
    v = rgb.astype(np.uint32) * alpha[..., None].astype(np.uint32)
    return ((v + 127) // 255).astype(np.uint8)


def array_to_rgb8(a: np.ndarray) -> tuple[np.ndarray | None, list[str], str | None]:
    """A numpy picture (bool, uint8, uint16, float in 0..1; [H, W], [H, W, 3] or [H, W, 4]) -> (uint8 [H, W, 3],
    conversions, skip reason)."""
    conv: list[str] = []
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        return None, conv, SKIP_MODE
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = _scale16(a)
        conv.append(CONV_16BIT)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            return None, conv, SKIP_MODE
        a = np.rint(a * 255.0).astype(np.uint8)
        conv.append(CONV_FLOAT)
    elif a.dtype != np.uint8:
        return None, conv, SKIP_MODE
    if a.ndim == 2:
        conv.append(CONV_GRAY)
        return np.repeat(a[..., None], 3, axis=2), conv, None
    if a.shape[2] == 4:
        conv.append(CONV_ALPHA)
        return _composite_black(a[..., :3], a[..., 3]), conv, None
    return np.ascontiguousarray(a), conv, None


def _png_bit_depth(data: bytes) -> int:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return data[24]
    return 8


def _is_16bit_rgb(im, data: bytes) -> bool:
    """True for 16-bit-per-channel colour files, which Pillow opens as 8-bit RGB (high byte)."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    if _png_bit_depth(data) == 16:
        return True
    if im.format == "TIFF":
        bps = getattr(im, "tag_v2", {}).get(258, (8,))
        return max(bps if isinstance(bps, tuple) else (bps,)) > 8
    return False


def pil_to_rgb8(im, data: bytes = b"") -> tuple[np.ndarray | None, list[str], str | None]:
    """A Pillow image (already loaded) -> (uint8 [H, W, 3], conversions, skip reason). ``data``: the file bytes
    (to tell 16-bit PNGs from 8-bit ones)."""
    conv: list[str] = []
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy(), conv, None
    if mode in ("RGBA", "RGBa"):
        a = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _composite_black(a[..., :3], a[..., 3]), conv + [CONV_ALPHA], None
    if mode in ("L", "1"):
        g = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(g[..., None], 3, axis=2), conv + [CONV_GRAY], None
    if mode in ("LA", "La"):
        a = np.asarray(im.convert("LA"), dtype=np.uint8)
        rgb = np.repeat(a[..., :1], 3, axis=2)
        return _composite_black(rgb, a[..., 1]), conv + [CONV_GRAY, CONV_ALPHA], None
    if mode in ("P", "PA"):
        if mode == "PA" or "transparency" in im.info:
            a = np.asarray(im.convert("RGBA"), dtype=np.uint8)
            return _composite_black(a[..., :3], a[..., 3]), conv + [CONV_PALETTE, CONV_ALPHA], None
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), conv + [CONV_PALETTE], None
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(im).astype(np.int64)
        if v.size and (v.min() < 0 or v.max() > 65535):
            return None, conv, SKIP_MODE
        if mode == "I" and _png_bit_depth(data) != 16 and (not v.size or v.max() <= 255):
            g = v.astype(np.uint8)  # a 32-bit container holding 8-bit data
            return np.repeat(g[..., None], 3, axis=2), conv + [CONV_GRAY], None
        g = _scale16(v)
        return np.repeat(g[..., None], 3, axis=2), conv + [CONV_GRAY, CONV_16BIT], None
    if mode == "CMYK":
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), conv + [CONV_CMYK], None
    if mode in ("YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), conv + [CONV_OTHER], None
    return None, conv, SKIP_MODE


def decode_file(path: str) -> Decoded:
    """Read and decode one image file (bytes read once: hashed, then decoded from memory). EXIF orientation is
    applied (patches show what a viewer shows)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Decoded(None, -1, "", skip=SKIP_UNREADABLE, detail=str(e))
    size, sha = len(data), hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in IMAGE_FORMATS:
                return Decoded(None, size, sha, skip=SKIP_FORMAT, detail=str(im.format))
            im.load()  # decoding errors (truncation, bad data) surface here
            deep = _is_16bit_rgb(im, data)
            upright = ImageOps.exif_transpose(im)
            rgb, conv, skip = pil_to_rgb8(upright, data)
            if skip:
                return Decoded(None, size, sha, conv, skip, f"mode {im.mode}")
    except UnidentifiedImageError:
        return Decoded(None, size, sha, skip=SKIP_NOT_IMAGE)
    except Image.DecompressionBombError as e:
        return Decoded(None, size, sha, skip=SKIP_TOO_LARGE, detail=str(e))
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError) as e:
        # Pillow reports damaged data with a spread of exception types depending on the plugin
        return Decoded(None, size, sha, skip=SKIP_CORRUPT, detail=f"{type(e).__name__}: {e}")
    if deep:
        conv = [CONV_16BIT] + conv
    return Decoded(np.ascontiguousarray(rgb), size, sha, conv)


def decode_item(item: SourceItem) -> Decoded:
    """Decode any SourceItem to RGB uint8 (or a skip)."""
    if item.skip:
        size = os.path.getsize(item.path) if item.kind == "file" and os.path.exists(item.path) else -1
        return Decoded(None, size, "", skip=item.skip)
    if item.kind == "file":
        return decode_file(item.path)
    if item.kind == "skimage":
        a = skimage_picture(item.arg[0])
        if a is None:
            return Decoded(None, -1, "", skip=SKIP_UNAVAILABLE)
    elif item.kind == "procedural":
        a = procedural_image(*item.arg)
    else:
        raise ValueError(f"unknown source kind {item.kind!r}")
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    rgb, conv, skip = array_to_rgb8(a)
    return Decoded(rgb, int(a.nbytes), h.hexdigest(), conv, skip)


def cut_patches(rgb: np.ndarray, patch: int, stride: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patches of ``rgb`` (uint8 [H, W, 3]) on a grid: top-left corners y, x = 0, stride, ... while the patch fits,
    row-major. Returns (uint8 [n, patch, patch, 3] NHWC, int32 [n, 2] (y, x) origins), from grid index ``start``."""
    H, W = rgb.shape[:2]
    ys = np.arange(0, H - patch + 1, stride)
    xs = np.arange(0, W - patch + 1, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    origins = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int32)[start:]
    if len(origins) == 0:
        return np.empty((0, patch, patch, 3), np.uint8), origins
    # one strided view of every window, then a single copy of the grid's windows (no Python loop per patch)
    win = np.lib.stride_tricks.sliding_window_view(rgb, (patch, patch, 3))[::stride, ::stride, 0]
    out = np.ascontiguousarray(win.reshape(-1, patch, patch, 3)[start:])
    return out, origins


def patch_count(h: int, w: int, patch: int, stride: int) -> int:
    """Number of ``patch`` x ``patch`` patches on the ``stride`` grid of an ``h`` x ``w`` image (``cut_patches``)."""
    if h < patch or w < patch:
        return 0
    return ((h - patch) // stride + 1) * ((w - patch) // stride + 1)
