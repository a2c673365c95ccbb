"""Preview grids: for each rain spec, rows of (background, rain layer, rainy image, mask) on built-in patches.

People judge rain by eye; this renders what ``engine.synth.synthesize`` makes, labelled with the spec's one-line
description, as an RGB uint8 image (Pillow). Every spec is applied to the same backgrounds with the same seed and
keys, so rows can be compared across specs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.atomic import atomic_write
from engine.rain import PRESETS, RainSpec

#: Tile columns, left to right.
COLUMNS: tuple[str, ...] = ("background", "rain", "rainy", "mask")
COLUMN_TITLES = {"background": "background B", "rain": "rain layer R", "rainy": "rainy I = B + beta R",
                 "mask": "mask R > t"}
GAP = 4            # pixels between tiles and around the grid
PAD = 3            # pixels around text
FONT_SIZE = 12
BACKDROP = (24, 24, 24)
TEXT = (235, 235, 235)
TITLE = (255, 210, 120)


@dataclass(frozen=True)
class PreviewLayout:
    """Where everything went in a preview image.

    Attributes
    ----------
    width, height : int
        Image size in pixels.
    tiles : dict
        ``(spec index, row, column name) -> (x0, y0, x1, y1)``: pixel box of each ``size x size`` tile (x1, y1
        exclusive); column names are ``COLUMNS``.
    labels : dict
        ``spec index -> (x0, y0, x1, y1)``: box of that spec's label band.
    """

    width: int
    height: int
    tiles: dict[tuple[int, int, str], tuple[int, int, int, int]]
    labels: dict[int, tuple[int, int, int, int]]


def resolve_rain(text: str) -> list[RainSpec]:
    """The rain specs a ``--rain`` value names.

    Parameters
    ----------
    text : str
        ``"all"`` (every preset), preset names separated by commas (``"small,medium"``), or anything else as one
        ``RainSpec.parse`` string (e.g. ``"medium,width=9"`` or ``"amount=0.005:0.007,length=35:45"``).

    Returns
    -------
    list of RainSpec

    Raises
    ------
    ValueError
        For an unknown name, listing the valid presets.
    """
    text = text.strip()
    if text == "all":
        return [RainSpec.preset(n) for n in PRESETS]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all(p in PRESETS for p in parts):
        return [RainSpec.preset(p) for p in parts]
    return [RainSpec.parse(text)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels (a longer single word stays whole)."""
    lines: list[str] = []
    for para in text.split("\n"):
        words, line = para.split(" "), ""
        for w in words:
            trial = f"{line} {w}" if line else w
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = w
            else:
                line = trial
        lines.append(line)
    return lines


def _line_height(font) -> int:
    box = font.getbbox("Ag|")
    return int(box[3] - min(box[1], 0)) + 2


def render_preview(specs: Sequence[RainSpec], backgrounds: np.ndarray, seed: int = 0,
                   backend: str = "auto") -> tuple[Image.Image, PreviewLayout]:
    """Render the preview grid of ``specs`` on ``backgrounds``.

    Per spec: a label band (``spec.describe()``), then one row per background with the background, the rain layer
    (gray, 0..255, before beta), the rainy image and the mask (white where ``rain > t``). Keys are the row indices,
    so the same ``seed`` gives the same rain.

    Parameters
    ----------
    specs : sequence of RainSpec
        At least one spec.
    backgrounds : np.ndarray
        uint8 NHWC ``[count >= 1, size, size, 3]`` square patches on 0..255.
    seed : int
        Rain seed.
    backend : str
        Synthesis backend (``auto``, ``cpu``, ``cuda`` or ``reference``).

    Returns
    -------
    PIL.Image.Image
        The RGB image.
    PreviewLayout
        Where every tile and label is.
    """
    from engine.synth import synthesize

    bg = np.asarray(backgrounds)
    if bg.dtype != np.uint8 or bg.ndim != 4 or bg.shape[3] != 3 or bg.shape[1] != bg.shape[2] or len(bg) == 0:
        raise ValueError(f"backgrounds: expected uint8 NHWC [count >= 1, size, size, 3] square patches, got "
                         f"{bg.dtype} {bg.shape}")
    if not specs:
        raise ValueError("specs: expected at least one RainSpec")
    count, size = bg.shape[0], bg.shape[1]
    font = _font(FONT_SIZE)
    line_h = _line_height(font)
    width = len(COLUMNS) * size + (len(COLUMNS) + 1) * GAP
    text_w = width - 2 * PAD

    # Plan the layout first (label heights depend on wrapping), then paint.
    col_lines = [_wrap(COLUMN_TITLES[c], font, size) for c in COLUMNS]
    y = GAP + max(len(ls) for ls in col_lines) * line_h + PAD
    tiles: dict[tuple[int, int, str], tuple[int, int, int, int]] = {}
    labels: dict[int, tuple[int, int, int, int]] = {}
    spec_lines = []
    for s, spec in enumerate(specs):
        lines = _wrap(spec.describe(), font, text_w)
        spec_lines.append(lines)
        band = len(lines) * line_h + 2 * PAD
        labels[s] = (0, y, width, y + band)
        y += band
        for r in range(count):
            for c, name in enumerate(COLUMNS):
                x0 = GAP + c * (size + GAP)
                tiles[(s, r, name)] = (x0, y, x0 + size, y + size)
            y += size + GAP
    height = y + GAP
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[...] = BACKDROP

    keys = np.arange(count, dtype=np.int64)
    for s, spec in enumerate(specs):
        out = synthesize(bg, spec, seed=seed, keys=keys, backend=backend)
        rain, rainy, mask = (_host(a) for a in (out.rain, out.rainy, out.mask))
        for r in range(count):
            content = {"background": bg[r], "rain": np.repeat(rain[r][..., None], 3, axis=2),
                       "rainy": rainy[r], "mask": np.repeat((mask[r].astype(np.uint8) * 255)[..., None], 3, axis=2)}
            for name in COLUMNS:
                x0, y0, x1, y1 = tiles[(s, r, name)]
                canvas[y0:y1, x0:x1] = content[name]

    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    for c, lines in enumerate(col_lines):
        x0 = GAP + c * (size + GAP)
        for i, line in enumerate(lines):
            draw.text((x0, GAP + i * line_h), line, fill=TEXT, font=font)
    for s, lines in enumerate(spec_lines):
        y0 = labels[s][1] + PAD
        for i, line in enumerate(lines):
            draw.text((PAD, y0 + i * line_h), line, fill=TITLE if i == 0 else TEXT, font=font)
    return img, PreviewLayout(width, height, tiles, labels)


def _host(a) -> np.ndarray:
    """numpy view of a synthesize output (numpy, CuPy or torch)."""
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    if type(a).__module__.split(".")[0] == "torch":
        return a.detach().cpu().numpy()
    return np.asarray(a)


def save_png_atomic(img: Image.Image, path: str | os.PathLike) -> None:
    """Write ``img`` as PNG to ``path`` through ``engine.atomic.atomic_write`` (no half-written file at ``path``)."""
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def write_preview(path: str | os.PathLike, rain: str | Sequence[RainSpec] = "all", size: int = 128, count: int = 4,
                  seed: int = 0, backend: str = "auto", source: str = "auto") -> PreviewLayout:
    """Render ``rain`` on built-in background patches and write the grid as a PNG, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        PNG file to write (its folder is created).
    rain : str or sequence of RainSpec
        The specs, or a string for ``resolve_rain`` (``"all"``, preset names, or one spec string).
    size : int
        Patch side in pixels.
    count : int
        Background patches (rows) per spec, at least 1.
    seed : int
        Rain seed and crop positions of the built-in pictures: the same seed gives the same image.
    backend : str
        Synthesis backend (``auto``, ``cpu``, ``cuda`` or ``reference``).
    source : str
        Built-in pictures: ``auto``, ``skimage`` or ``procedural`` (see ``engine.data.builtin_images``).

    Returns
    -------
    PreviewLayout
        Where every tile and label of the written image is.
    """
    from engine.data.builtin_images import builtin_patches

    if count < 1:
        raise ValueError(f"count: expected at least 1 row per spec, got {count}")
    specs = resolve_rain(rain) if isinstance(rain, str) else list(rain)
    img, layout = render_preview(specs, builtin_patches(count, size, seed=seed, source=source), seed=seed,
                                 backend=backend)
    save_png_atomic(img, path)
    return layout


__all__ = ["COLUMNS", "PreviewLayout", "render_preview", "resolve_rain", "save_png_atomic", "write_preview"]
