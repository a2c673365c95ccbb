"""Built-in background patches: scikit-image's bundled pictures (offline), with a procedural fallback.

``builtin_patches(n, size)`` returns ``n`` RGB uint8 patches in NHWC layout (0..255), the same for the same
arguments on every machine that has the same scikit-image pictures. Used by ``rainsweep preview`` and the
benchmarks; no download, no network.
"""
from __future__ import annotations

import functools
import warnings
from typing import Literal

import numpy as np

#: scikit-image pictures that ship with the wheel (no pooch download) and are natural photographs or scans.
#: Gray ones are replicated to three channels. Order matters: patch i comes from picture i % len(...).
SKIMAGE_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "brick",
    "grass", "gravel", "camera", "moon", "coins", "clock", "cell",
)

Source = Literal["auto", "skimage", "procedural"]


def builtin_patches(n: int, size: int = 128, seed: int = 0, source: Source = "auto") -> np.ndarray:
    """``n`` background patches, uint8 NHWC ``[n, size, size, 3]`` on 0..255.

    Args:
        n: number of patches (>= 0).
        size: patch side in pixels (>= 8).
        seed: picks the crop positions (and the procedural patterns); same seed, same patches.
        source: ``"skimage"`` (bundled pictures; raises if none loads), ``"procedural"`` (deterministic synthetic
            textures), or ``"auto"`` (pictures when scikit-image is importable and at least one loads, else
            procedural with a warning).
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected a patch count >= 0, got {n!r}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size: expected a patch side in pixels >= 8, got {size!r}")
    if source not in ("auto", "skimage", "procedural"):
        raise ValueError(f"source: expected 'auto', 'skimage' or 'procedural', got {source!r}")
    n, size = int(n), int(size)
    if source != "procedural":
        pictures = _skimage_pictures(size)
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


@functools.lru_cache(maxsize=8)
def _skimage_pictures(size: int) -> tuple[np.ndarray, ...]:
    """The bundled pictures as RGB uint8, rescaled so the shorter side is between ``size`` and ``3 * size``
    (large pictures shrink, so a patch shows a recognizable part of the scene rather than a flat close-up)."""
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        return ()
    pictures = []
    for name in SKIMAGE_NAMES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a picture that needs a download (or a renamed one) is simply skipped
            continue
        if img.dtype != np.uint8:
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3]
        short = min(img.shape[:2])
        scale = max(size / short, min(1.0, 3 * size / short))
        if scale != 1.0:
            h, w = (max(size, round(d * scale)) for d in img.shape[:2])
            img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX if scale < 1 else
                                                           Image.Resampling.BICUBIC))
        pictures.append(np.ascontiguousarray(img))
    return tuple(pictures)


def procedural_patches(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Deterministic synthetic textures, uint8 NHWC ``[n, size, size, 3]`` on 0..255: a color gradient, oriented
    stripes, a few soft discs and 1/f noise, so patches have edges and texture at several scales."""
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    radius = np.sqrt(fy ** 2 + fx ** 2)
    radius[0, 0] = 1.0
    for i in range(n):
        g = np.random.default_rng([seed, i, 7])
        c0, c1 = g.uniform(20, 235, 3), g.uniform(20, 235, 3)
        t = (xx * np.cos(g.uniform(0, np.pi)) + yy * np.sin(g.uniform(0, np.pi)) + 1) / 2
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        theta, freq = g.uniform(0, np.pi), g.uniform(3, 12)
        img += 25 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))[..., None]
        for _ in range(int(g.integers(2, 6))):
            cy, cx, r = g.uniform(0, 1), g.uniform(0, 1), g.uniform(0.05, 0.3)
            # clip the exponent: far from the disc it is huge, and exp would overflow to inf (harmless but noisy)
            z = np.clip(((yy - cy) ** 2 + (xx - cx) ** 2 - r * r) / (0.02 * r), -50, 50)
            disc = 1 / (1 + np.exp(z))
            img = img * (1 - disc[..., None]) + g.uniform(0, 255, 3) * disc[..., None]
        spectrum = (g.standard_normal((size, size)) + 1j * g.standard_normal((size, size))) / radius
        noise = np.real(np.fft.ifft2(spectrum))
        noise = noise / (noise.std() + 1e-12)
        img += 12 * noise[..., None]
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out
