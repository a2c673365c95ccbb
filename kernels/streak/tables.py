"""Host-made integer tables and limits of the streak renderer, shared by its CPU, GPU and numpy versions.

The tables are made once on the host, so every backend uses the same integers: cos/sin of whole degrees
(``TRIG``) for the rotation of the streak's line, and OpenCV's Gaussian weights (``GAUSS``) for its blur.
"""
from __future__ import annotations

import numpy as np

from kernels import params as P

#: cos/sin of whole degrees as round(value * 2**TRIG_BITS); row ``d + TRIG_OFFSET`` holds (cos d, sin d).
TRIG_BITS = 16
TRIG_OFFSET = 180
#: Gaussian weights as round(weight * 2**GAUSS_BITS); row ``w // 2`` holds the ``w`` weights of odd width ``w``.
GAUSS_BITS = 12
MAX_WIDTH = 31
#: Amounts are drawn as integers ``aq`` in units of 2**-AMOUNT_BITS.
AMOUNT_BITS = 24
#: Largest tap after scaling (tap precision relative to the kernel's peak).
TAP_BITS = 20
#: Canvas limits: one 12-bit sub-stream index per row (``j < 4096`` draws per row) and >= 2 pixels for reflect-101.
MAX_CANVAS_WIDTH = 4094
MAX_CANVAS_HEIGHT = 1 << 20
#: Longest streak: the CPU's float64 accumulator stays exact while 4095 * (length + 2)**2 * 2**TAP_BITS < 2**53.
MAX_LENGTH = 1024

# OpenCV's fixed small Gaussian kernels (``small_gaussian_tab`` in imgproc/src/smooth.dispatch.cpp): used by
# ``getGaussianKernel(ksize, sigma <= 0)`` for ksize 1..9; larger sizes use the sigma rule (checked against cv2 in
# tests/test_rain_streak.py).
_OPENCV_SMALL_GAUSSIAN = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
    9: [0.015625, 0.05078125, 0.1171875, 0.19921875, 0.234375, 0.19921875, 0.1171875, 0.05078125, 0.015625],
}


def opencv_gaussian_weights(width: int) -> np.ndarray:
    """float64 weights of ``cv2.getGaussianKernel(width, 0)`` (sum 1) without importing OpenCV.

    Odd ``width`` <= 9: OpenCV's fixed tables; above: ``sigma = 0.3 * ((width - 1) * 0.5 - 1) + 0.8`` and normalized
    ``exp(-x^2 / (2 sigma^2))``.
    """
    if width < 1 or width % 2 == 0:
        raise ValueError(f"width: expected an odd integer >= 1, got {width}")
    if width in _OPENCV_SMALL_GAUSSIAN:
        return np.asarray(_OPENCV_SMALL_GAUSSIAN[width], dtype=np.float64)
    sigma = 0.3 * ((width - 1) * 0.5 - 1) + 0.8
    x = np.arange(width, dtype=np.float64) - (width - 1) * 0.5
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _make_trig() -> np.ndarray:
    rad = np.deg2rad(np.arange(-TRIG_OFFSET, TRIG_OFFSET + 1, dtype=np.float64))
    scale = float(1 << TRIG_BITS)
    return np.stack([np.round(np.cos(rad) * scale), np.round(np.sin(rad) * scale)], axis=1).astype(np.int64)


def _make_gauss() -> np.ndarray:
    table = np.zeros((MAX_WIDTH // 2 + 1, MAX_WIDTH), dtype=np.int64)
    for w in range(1, MAX_WIDTH + 1, 2):
        table[w // 2, :w] = np.round(opencv_gaussian_weights(w) * (1 << GAUSS_BITS)).astype(np.int64)
    return table


#: int64 [361, 2]: (cos, sin) of degree ``d`` at row ``d + TRIG_OFFSET``, scaled by 2**TRIG_BITS.
TRIG = _make_trig()
#: int64 [16, 31]: Gaussian weights of odd width ``w`` in row ``w // 2``, scaled by 2**GAUSS_BITS.
GAUSS = _make_gauss()


def kernel_size(params: np.ndarray) -> int:
    """Side of the scratch square that holds any streak kernel of ``params`` (length hi + 2 for the seed filter)."""
    return int(params[P.LENGTH_HI]) + 2


def check_canvas(params: np.ndarray, h: int, w: int) -> None:
    """Raise a ValueError unless the streak renderer can draw ``params`` (host float64 [P.SIZE]) on H x W patches.

    The canvas (patch + 2 * canvas_pad per side) must be at least 2 x 2 pixels (reflect-101 borders) and within
    ``MAX_CANVAS_HEIGHT`` x ``MAX_CANVAS_WIDTH`` (the seed sub-stream indices), the spec must be a streak spec, and
    streaks at most ``MAX_LENGTH`` pixels long (the CPU accumulator's exactness bound).
    """
    pad = int(params[P.CANVAS_PAD])
    hc, wc = h + 2 * pad, w + 2 * pad
    if hc < 2 or wc < 2:
        raise ValueError(f"out: the streak renderer needs a canvas of at least 2 x 2 pixels (reflect-101 borders), "
                         f"got {hc} x {wc}")
    if wc > MAX_CANVAS_WIDTH or hc > MAX_CANVAS_HEIGHT:
        raise ValueError(f"out: canvas {hc} x {wc} too large for the streak renderer (width <= {MAX_CANVAS_WIDTH}, "
                         f"height <= {MAX_CANVAS_HEIGHT}, canvas = patch + 2 * canvas_pad)")
    if int(params[P.FAMILY]) != P.FAMILY_IDS["streak"]:
        raise ValueError("params: not a streak spec (family id != 0)")
    if int(params[P.LENGTH_HI]) > MAX_LENGTH:
        raise ValueError(f"params: streak length up to {int(params[P.LENGTH_HI])}, expected at most {MAX_LENGTH} "
                         f"(the CPU accumulator's exactness bound)")
