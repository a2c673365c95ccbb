"""Built-in pictures that need no download: scikit-image's bundled pictures and procedural images.

- ``skimage_picture(name)``: one picture of ``skimage.data`` that ships inside the scikit-image wheel (van der Walt
  et al., "scikit-image: image processing in Python", PeerJ 2:e453, 2014, doi:10.7717/peerj.453);
  ``skimage_pictures(size)``: the whole ``SKIMAGE_NAMES`` set as RGB, rescaled for patches of ``size`` pixels.
- ``procedural_image(index, size, texture, blur)``: deterministic dead-leaves images (the occlusion model of Lee,
  Mumford and Huang, "Occlusion models for natural images: a statistical study of a scale-invariant dead leaves
  model", IJCV 41:35-59, 2001, doi:10.1023/A:1011109015675) at ``PROC_LEVELS`` texture/blur levels; the
  ``builtin:procedural`` source of precompute.
- ``procedural_patches(n, size, seed)``: small synthetic textures (gradient, stripes, discs, 1/f noise), the
  fallback backgrounds of ``engine.data.builtin_images.builtin_patches`` when scikit-image is missing.

Every function returns RGB uint8 arrays on 0..255 and gives the same bytes for the same arguments on every machine
(for the scikit-image pictures: the same scikit-image pictures).
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from numba import njit

from kernels import rng as _rng

#: scikit-image pictures that ship inside the wheel (natural photographs and scans; no pooch download). ``cat`` is
#: the same picture as ``chelsea`` and is left out so no background appears twice. Order matters for
#: ``builtin_patches``: patch i comes from picture i % len(SKIMAGE_NAMES); ``builtin:skimage`` sorts them.
SKIMAGE_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "brick",
    "grass", "gravel", "camera", "moon", "coins", "clock", "cell",
)

PROC_IMAGES = 192
PROC_SIZE = 512
#: kernels.rng seed of the procedural images (key = image index); fixed so builtin:procedural is the same everywhere
PROC_SEED = 0x5EED_DEAD_1EAF
#: (texture amplitude 0..255, Gaussian blur sigma in pixels) per level; image i uses level i % len. Measured
#: median patch sharpness (128 x 128 patches of 512 x 512 images): about 8,400 / 3,400 / 3,400 / 850 / 730 / 105 /
#: 28 / 12, so the low (< 50), medium (500..1000) and high (> 5000) sharpness bands are all well populated (see
#: tests/test_sources.py).
PROC_LEVELS: tuple[tuple[float, float], ...] = (
    (120.0, 0.0), (40.0, 0.0), (0.0, 0.0), (0.0, 0.5), (40.0, 0.6), (0.0, 0.9), (0.0, 1.4), (0.0, 2.2),
)
PROC_RMIN, PROC_RMAX = 3.0, 256.0


# ----------------------------------------------------------------------------------------------------------------
# scikit-image pictures

def skimage_picture(name: str) -> np.ndarray | None:
    """The ``skimage.data`` picture ``name`` as scikit-image returns it, or None when it cannot be loaded offline.

    Parameters
    ----------
    name : str
        A ``skimage.data`` function name, e.g. ``"astronaut"``.

    Returns
    -------
    numpy.ndarray or None
        The picture unchanged (dtype and shape as scikit-image gives them: uint8 [H, W] gray or [H, W, 3] RGB
        for ``SKIMAGE_NAMES``); None for a picture that needs a download (pooch), is missing from this install,
        or is not an array.

    Raises
    ------
    ImportError
        scikit-image is not installed.
    """
    import skimage.data

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = getattr(skimage.data, name)()
    except Exception:  # pictures that need a download (pooch) or are missing from this install
        return None
    return a if isinstance(a, np.ndarray) else None


@functools.lru_cache(maxsize=8)
def skimage_pictures(size: int) -> tuple[np.ndarray, ...]:
    """The ``SKIMAGE_NAMES`` pictures that load, as RGB for cutting patches of ``size`` pixels.

    Each is rescaled so its shorter side lies between ``size`` and ``3 * size`` (large pictures shrink with a box
    filter, so a patch shows a recognizable part of the scene rather than a flat close-up; pictures shorter than
    ``size`` grow with a bicubic filter). Gray pictures are replicated to three channels. Cached per ``size``.

    Parameters
    ----------
    size : int
        Patch side in pixels.

    Returns
    -------
    tuple of numpy.ndarray
        uint8 [H, W, 3] (HWC, RGB, 0..255, C-contiguous), in ``SKIMAGE_NAMES`` order, skipping pictures that do not
        load or are not uint8; empty when scikit-image or Pillow is not installed.
    """
    try:
        from PIL import Image

        loaded = [skimage_picture(name) for name in SKIMAGE_NAMES]
    except ImportError:  # scikit-image or Pillow is not installed
        return ()
    pictures = []
    for img in loaded:
        if img is None or img.dtype != np.uint8:
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


# ----------------------------------------------------------------------------------------------------------------
# procedural dead-leaves images

_patch_state = _rng.cpu.patch_state
_uniform = _rng.cpu.uniform
_counter = _rng.cpu.counter


@njit(cache=True)
def _dead_leaves(H, W, seed, key, rmin, rmax, tex_amp, max_discs):  # pragma: no cover - numba
    """Dead-leaves image, float32 [H, W, 3] on 0..255 (+/- texture). Discs are drawn front to back (each one only
    paints pixels no earlier disc covered, which is the occlusion model) with radius density ~ r^-3 on
    [rmin, rmax] (scale invariant, like natural images), uniform random colour, and an oriented sine grating of
    random amplitude 0..tex_amp, period 2.5..12 px (fine texture). Every draw is rng(seed, key, stream 3)."""
    st = _patch_state(seed, key)
    img = np.zeros((H, W, 3), np.float32)
    cov = np.zeros((H, W), np.bool_)
    left = H * W
    a = 1.0 / (rmin * rmin) - 1.0 / (rmax * rmax)
    for k in range(max_discs):
        c = 16 * k
        r = 1.0 / math.sqrt(1.0 / (rmin * rmin) - _uniform(st, _counter(3, c)) * a)
        cy = -rmax + _uniform(st, _counter(3, c + 1)) * (H + 2 * rmax)
        cx = -rmax + _uniform(st, _counter(3, c + 2)) * (W + 2 * rmax)
        cr = _uniform(st, _counter(3, c + 3)) * 255.0
        cg = _uniform(st, _counter(3, c + 4)) * 255.0
        cb = _uniform(st, _counter(3, c + 5)) * 255.0
        amp = tex_amp * _uniform(st, _counter(3, c + 6))
        theta = _uniform(st, _counter(3, c + 7)) * math.pi
        lam = 2.5 + 9.5 * _uniform(st, _counter(3, c + 8))
        phase = _uniform(st, _counter(3, c + 9)) * 2.0 * math.pi
        fy = math.sin(theta) * 2.0 * math.pi / lam
        fx = math.cos(theta) * 2.0 * math.pi / lam
        y0 = max(0, int(math.floor(cy - r)))
        y1 = min(H - 1, int(math.ceil(cy + r)))
        x0 = max(0, int(math.floor(cx - r)))
        x1 = min(W - 1, int(math.ceil(cx + r)))
        r2 = r * r
        for y in range(y0, y1 + 1):
            dy = y + 0.5 - cy
            for x in range(x0, x1 + 1):
                if cov[y, x]:
                    continue
                dx = x + 0.5 - cx
                if dx * dx + dy * dy <= r2:
                    cov[y, x] = True
                    t = amp * math.sin(fy * y + fx * x + phase) if amp > 0 else 0.0
                    img[y, x, 0] = cr + t
                    img[y, x, 1] = cg + t
                    img[y, x, 2] = cb + t
                    left -= 1
        if left == 0:
            break
    return img


@njit(cache=True)
def blur_to_uint8(img, sigma):  # pragma: no cover - numba
    """Separable Gaussian blur, then round half up and clip to uint8.

    Taps reach 3 sigma and are normalized to sum 1; borders reflect without repeating the edge pixel (reflect-101,
    OpenCV's default). Rows are processed as flat W*3 float32 runs so the inner loops are contiguous (vectorized
    by LLVM).

    Parameters
    ----------
    img : numpy.ndarray
        float32 [H, W, C] (HWC), values on the 0..255 scale (may lie outside it).
    sigma : float
        Standard deviation in pixels; 0 for no blur (only rounding and clipping).

    Returns
    -------
    numpy.ndarray
        uint8 [H, W, C] on 0..255.
    """
    H, W, C = img.shape
    rad = int(math.ceil(3.0 * sigma)) if sigma > 0 else 0
    k = np.empty(2 * rad + 1, np.float32)
    s = 0.0
    for i in range(-rad, rad + 1):
        k[i + rad] = math.exp(-0.5 * (i / sigma) ** 2) if sigma > 0 else 1.0
        s += k[i + rad]
    for i in range(2 * rad + 1):
        k[i] /= s
    src = img.reshape(H, W * C)
    tmp = np.zeros((H, W * C), np.float32)
    for y in range(H):  # horizontal pass: whole-row shifted adds, borders patched per tap
        row = src[y]
        out_row = tmp[y]
        for i in range(-rad, rad + 1):
            kv = k[i + rad]
            lo = max(0, -i)
            hi = min(W, W - i)
            for j in range(lo * C, hi * C):
                out_row[j] += kv * row[j + i * C]
            for x in range(0, lo):
                xx = -(x + i)
                for c in range(C):
                    out_row[x * C + c] += kv * row[xx * C + c]
            for x in range(hi, W):
                xx = 2 * W - 2 - (x + i)
                for c in range(C):
                    out_row[x * C + c] += kv * row[xx * C + c]
    out = np.empty((H, W * C), np.uint8)
    acc = np.empty(W * C, np.float32)
    for y in range(H):  # vertical pass: weighted sum of whole rows
        acc[:] = 0.0
        for i in range(-rad, rad + 1):
            yy = y + i
            if yy < 0:
                yy = -yy
            if yy >= H:
                yy = 2 * H - 2 - yy
            kv = k[i + rad]
            r = tmp[yy]
            for j in range(W * C):
                acc[j] += kv * r[j]
        for j in range(W * C):
            out[y, j] = np.uint8(min(255.0, max(0.0, math.floor(acc[j] + 0.5))))
    return out.reshape(H, W, C)


def procedural_image(index: int, size: int = PROC_SIZE, texture: float = 0.0, blur: float = 0.0) -> np.ndarray:
    """Dead-leaves picture number ``index``; same arguments, same bytes, on every machine.

    Parameters
    ----------
    index : int
        Picture number (the kernels.rng key under ``PROC_SEED``).
    size : int
        Side in pixels; the largest disc radius scales with it (``PROC_RMAX`` at ``PROC_SIZE``).
    texture : float
        Largest amplitude of the sine grating inside each disc, on the 0..255 scale.
    blur : float
        Gaussian sigma in pixels applied to the whole picture (``blur_to_uint8``).

    Returns
    -------
    numpy.ndarray
        uint8 [size, size, 3] (HWC, RGB, 0..255).
    """
    rmax = PROC_RMAX * size / PROC_SIZE
    img = _dead_leaves(size, size, PROC_SEED, int(index), PROC_RMIN, max(rmax, 2 * PROC_RMIN), float(texture),
                       400_000)
    return blur_to_uint8(img, float(blur))


# ----------------------------------------------------------------------------------------------------------------
# procedural textures (fallback backgrounds)

def procedural_patches(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Synthetic textures with edges and texture at several scales: a colour gradient, oriented stripes, a few soft
    discs and 1/f noise.

    Parameters
    ----------
    n : int
        Number of patches.
    size : int
        Patch side in pixels.
    seed : int
        Same seed, same patches; patch i does not depend on ``n``.

    Returns
    -------
    numpy.ndarray
        uint8 [n, size, size, 3] (NHWC, RGB, 0..255).
    """
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
