"""Patch metrics (temporary numpy version; replaced by the kernel-backed module).

sharpness(x): uint8 NHWC -> float64 [N], variance of the 4-neighbour Laplacian of BT.601 gray (0..255 scale,
reflect-101 borders), as cv2.Laplacian(gray_float64, cv2.CV_64F).var().
complexity(x): uint8 NHWC -> float64 [N], multiscale structural complexity (Bagrov et al. 2020) on 0..1 values.
"""
from __future__ import annotations

import numpy as np


def sharpness(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    gray = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    p = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * gray
    return lap.reshape(len(x), -1).var(axis=1)


def complexity(x: np.ndarray) -> np.ndarray:
    f = np.asarray(x, dtype=np.float64) / 255.0
    total = np.zeros(len(f))
    while f.shape[1] > 1 and f.shape[2] > 1:
        h, w = f.shape[1] // 2 * 2, f.shape[2] // 2 * 2
        f = f[:, :h, :w]
        c = f.reshape(len(f), h // 2, 2, w // 2, 2, -1).mean(axis=(2, 4))
        up = np.repeat(np.repeat(c, 2, axis=1), 2, axis=2)
        total += ((f - up) ** 2).mean(axis=(1, 2)).sum(axis=-1) / 2
        f = c
    return total
