"""Built-in background patches: crops of scikit-image's bundled pictures (offline), with a procedural fallback.

``builtin_patches(n, size)`` returns ``n`` RGB uint8 patches in NHWC layout (0..255), the same for the same
arguments on every machine that has the same scikit-image pictures. Used by ``rainsweep preview`` and the
benchmarks; no download, no network. The pictures and the fallback textures come from ``engine.data.builtin``.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from engine.data.builtin import procedural_patches, skimage_pictures

__all__ = ["Source", "builtin_patches", "procedural_patches", "skimage_pictures"]

Source = Literal["auto", "skimage", "procedural"]


def builtin_patches(n: int, size: int = 128, seed: int = 0, source: Source = "auto") -> np.ndarray:
    """``n`` background patches: crops of the bundled scikit-image pictures, or synthetic textures.

    Patch i is a crop of picture ``i % len(pictures)`` of ``engine.data.builtin.skimage_pictures(size)`` at a
    position drawn from ``numpy.random.default_rng([seed, i])``, so it does not depend on ``n``.

    Parameters
    ----------
    n : int
        Number of patches (>= 0).
    size : int
        Patch side in pixels (>= 8).
    seed : int
        Picks the crop positions (and the procedural patterns); same seed, same patches.
    source : {"auto", "skimage", "procedural"}
        ``"skimage"``: the bundled pictures (raises if none loads); ``"procedural"``: deterministic synthetic
        textures (``engine.data.builtin.procedural_patches``); ``"auto"``: the pictures when scikit-image is
        importable and at least one loads, else the textures with a ``RuntimeWarning``.

    Returns
    -------
    numpy.ndarray
        uint8 [n, size, size, 3] (NHWC, RGB, 0..255).

    Raises
    ------
    ValueError
        ``n``, ``size`` or ``source`` out of range.
    RuntimeError
        ``source="skimage"`` and no picture could be loaded.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected a patch count >= 0, got {n!r}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size: expected a patch side in pixels >= 8, got {size!r}")
    if source not in ("auto", "skimage", "procedural"):
        raise ValueError(f"source: expected 'auto', 'skimage' or 'procedural', got {source!r}")
    n, size = int(n), int(size)
    if source != "procedural":
        pictures = skimage_pictures(size)  # this module's name: a test can substitute the pictures
        if pictures:
            return _crop_patches(pictures, n, size, seed)
        if source == "skimage":
            raise RuntimeError("source='skimage': no bundled scikit-image picture could be loaded "
                               "(is scikit-image installed?)")
        warnings.warn("scikit-image pictures unavailable; using procedural backgrounds", RuntimeWarning,
                      stacklevel=2)
    return procedural_patches(n, size, seed)


def _crop_patches(pictures: tuple[np.ndarray, ...], n: int, size: int, seed: int) -> np.ndarray:
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        pic = pictures[i % len(pictures)]
        # One generator per patch, so patch i does not depend on n.
        g = np.random.default_rng([seed, i])
        y = int(g.integers(0, pic.shape[0] - size + 1))
        x = int(g.integers(0, pic.shape[1] - size + 1))
        out[i] = pic[y:y + size, x:x + size]
    return out
