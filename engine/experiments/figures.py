"""Labeled image grids: patches side by side under column titles, upscaled so a reader can see them.

``write_grid`` draws rows of patches (NHWC uint8, 0..255) into one PNG: a header with one title per column (a title
may hold several lines, e.g. a model's name and its E_R / E_B), then the patches, nearest-neighbour upscaled by a
whole factor so each is at least ``MIN_TILE`` pixels on a side. The PNG records its layout in a text chunk
(``LAYOUT_KEY``), so ``read_grid_rows`` can cut the header and the first rows back out (the sweep's sample sheet
does). ``visible_patches`` picks patches a reader can see something in: high contrast and fine detail, not flat
tiles. Used for train.py's ``samples.png``, the sweep's sample sheet and the demo's ``comparison.png``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from engine.atomic import atomic_write

#: Smallest side, in pixels, of a patch as drawn.
MIN_TILE = 128
#: PNG text-chunk key holding the grid's layout (``GridLayout`` as JSON).
LAYOUT_KEY = "rainsweep-grid"
#: Title font size in pixels.
FONT_SIZE = 14
#: Blank pixels around the grid, between patch rows and between columns (wider: titles must not run together).
PAD = 6
GAP = 4
COL_GAP = 12
#: Vertical pixels per title line.
LINE = FONT_SIZE + 4


@dataclass(frozen=True)
class GridLayout:
    """Where everything lies in a grid image (pixels; x to the right, y down).

    Attributes
    ----------
    rows, cols : int
        Patch rows and columns.
    tile : int
        Side of a drawn patch (``patch * scale``).
    scale : int
        Nearest-neighbour upscaling factor.
    header : int
        Height of the title band at the top; the first patch row starts at ``y = header``.
    col_x : list of int
        Left edge of each drawn patch.
    width, height : int
        Image size.
    """

    rows: int
    cols: int
    tile: int
    scale: int
    header: int
    col_x: list[int]
    width: int
    height: int

    def row_y(self, row: int) -> int:
        """Top edge of patch row ``row``."""
        return self.header + row * (self.tile + GAP)


def upscale_factor(patch: int, minimum: int = MIN_TILE) -> int:
    """The smallest whole factor that makes a ``patch``-pixel side at least ``minimum`` pixels (1 if it already is)."""
    if patch < 1:
        raise ValueError(f"patch: expected a positive side in pixels, got {patch}")
    return max(1, -(-minimum // patch))


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``images`` (..., H, W, C) by a whole ``factor`` along H and W."""
    if factor == 1:
        return images
    return np.repeat(np.repeat(images, factor, axis=-3), factor, axis=-2)


def visible_patches(backgrounds: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` patches with the most visible content, in their original order.

    Each patch is ranked by its contrast (standard deviation of its gray values) and by its sharpness
    (``engine.metrics.sharpness``, the variance of the Laplacian); the ``n`` best by the sum of both ranks are kept,
    so neither flat tiles nor smooth gradients come first.

    Parameters
    ----------
    backgrounds : np.ndarray
        uint8 NHWC [N, P, P, 3], clean patches on the 0..255 scale.
    n : int
        How many to pick (all of them when ``n >= N``).

    Returns
    -------
    np.ndarray
        int64 [min(n, N)], sorted ascending.
    """
    from engine.metrics import sharpness  # deferred: the metrics pull in the numba kernels

    backgrounds = np.asarray(backgrounds)
    if backgrounds.ndim != 4 or backgrounds.shape[-1] != 3:
        raise ValueError(f"backgrounds: expected NHWC [N, P, P, 3], got shape {backgrounds.shape}")
    if n >= len(backgrounds):
        return np.arange(len(backgrounds), dtype=np.int64)
    gray = backgrounds.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    contrast = gray.reshape(len(gray), -1).std(axis=1)
    detail = sharpness(np.ascontiguousarray(backgrounds), backend="cpu")
    rank = np.argsort(np.argsort(-contrast, kind="stable"), kind="stable") + np.argsort(
        np.argsort(-detail, kind="stable"), kind="stable")
    return np.sort(np.argsort(rank, kind="stable")[:n]).astype(np.int64)


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def grid_image(tiles: np.ndarray, titles: Sequence[str], scale: int | None = None) -> tuple[np.ndarray, GridLayout]:
    """Draw ``tiles`` as a grid under column ``titles``.

    Parameters
    ----------
    tiles : np.ndarray
        [rows, cols, P, P, 3] patches, uint8 or float on the 0..255 scale (clipped and rounded for display).
    titles : sequence of str
        One title per column; ``"\\n"`` separates lines.
    scale : int, optional
        Upscaling factor (default: ``upscale_factor(P)``).

    Returns
    -------
    image : np.ndarray
        uint8 HWC [height, width, 3] RGB on a white background.
    layout : GridLayout
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 5 or tiles.shape[-1] != 3 or tiles.shape[2] != tiles.shape[3]:
        raise ValueError(f"tiles: expected [rows, cols, P, P, 3], got shape {tiles.shape}")
    rows, cols, patch = tiles.shape[0], tiles.shape[1], tiles.shape[2]
    if len(titles) != cols:
        raise ValueError(f"titles: expected {cols} (one per column), got {len(titles)}")
    scale = upscale_factor(patch) if scale is None else scale
    if scale < 1:
        raise ValueError(f"scale: expected a whole factor >= 1, got {scale}")
    tile = patch * scale
    font = _font()
    lines = [t.split("\n") for t in titles]
    text_w = [max(font.getbbox(s)[2] for s in ls) if any(ls) else 0 for ls in lines]
    col_w = [max(tile, w + 2) for w in text_w]
    header = PAD + LINE * max(len(ls) for ls in lines) + GAP
    width = 2 * PAD + sum(col_w) + COL_GAP * (cols - 1)
    height = header + rows * tile + GAP * (rows - 1) + PAD
    col_left = [PAD + sum(col_w[:j]) + COL_GAP * j for j in range(cols)]
    layout = GridLayout(rows=rows, cols=cols, tile=tile, scale=scale, header=header,
                        col_x=[left + (w - tile) // 2 for left, w in zip(col_left, col_w)], width=width, height=height)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    big = upscale(np.clip(np.round(tiles.astype(np.float32)), 0, 255).astype(np.uint8), scale)
    for r in range(rows):
        y = layout.row_y(r)
        for c in range(cols):
            canvas[y:y + tile, layout.col_x[c]:layout.col_x[c] + tile] = big[r, c]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for c, ls in enumerate(lines):
        for k, s in enumerate(ls):
            w = font.getbbox(s)[2]
            draw.text((col_left[c] + (col_w[c] - w) // 2, PAD + k * LINE), s, fill=(0, 0, 0), font=font)
    return np.asarray(img), layout


def write_grid(path: str | os.PathLike, tiles: np.ndarray, titles: Sequence[str], scale: int | None = None,
               fsync: bool = False) -> GridLayout:
    """Draw ``tiles`` under ``titles`` (``grid_image``) and write the PNG atomically, its layout in a text chunk.

    Parameters
    ----------
    path : str or os.PathLike
        The PNG file (its folder is created).
    tiles, titles, scale
        As in ``grid_image``.
    fsync : bool
        Flush to stable storage before the rename (``engine.atomic.atomic_write``).

    Returns
    -------
    GridLayout
    """
    image, layout = grid_image(tiles, titles, scale)
    info = PngInfo()
    info.add_text(LAYOUT_KEY, json.dumps(asdict(layout)))
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG", pnginfo=info), fsync=fsync)
    return layout


def read_layout(path: str | os.PathLike) -> GridLayout | None:
    """The layout recorded in a PNG written by ``write_grid``, or None for any other PNG."""
    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(LAYOUT_KEY)
    return None if text is None else GridLayout(**json.loads(text))


def read_grid_rows(path: str | os.PathLike, rows: int = 1) -> np.ndarray:
    """The titles and the first ``rows`` patch rows of a grid PNG, as uint8 HWC RGB.

    A PNG without a recorded layout is read as untitled square tiles, three per row, and its first ``rows`` tile
    rows are returned.
    """
    path = Path(path)
    layout = read_layout(path)
    with Image.open(path) as img:
        image = np.asarray(img.convert("RGB"))
    if layout is None:
        return image[: rows * (image.shape[1] // 3)]
    rows = min(rows, layout.rows)
    return image[: layout.row_y(rows - 1) + layout.tile]


__all__ = ["COL_GAP", "FONT_SIZE", "GAP", "GridLayout", "LAYOUT_KEY", "LINE", "MIN_TILE", "PAD", "grid_image",
           "read_grid_rows", "read_layout", "upscale", "upscale_factor", "visible_patches", "write_grid"]
