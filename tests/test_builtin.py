"""engine.data.builtin: the dead-leaves pictures against independent references, and the scikit-image pictures
that builtin:skimage and builtin_patches share."""
from __future__ import annotations

import numpy as np
import pytest

from engine.data.builtin import PROC_LEVELS, SKIMAGE_NAMES, blur_to_uint8, procedural_image, skimage_pictures
from engine.data.sources import cut_patches, decode_item, discover


def test_procedural_blur_matches_reference():
    """The numba Gaussian equals a direct numpy convolution with the same normalized taps (reflect-101)."""
    img = np.random.default_rng(0).uniform(0, 255, (20, 24, 3)).astype(np.float32)
    sigma = 1.3
    rad = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img.astype(np.float64), ((0, 0), (rad, rad), (0, 0)), mode="reflect")
    h = sum(k[i] * p[:, i:i + 24] for i in range(2 * rad + 1))
    p = np.pad(h, ((rad, rad), (0, 0), (0, 0)), mode="reflect")
    v = sum(k[i] * p[i:i + 20] for i in range(2 * rad + 1))
    got = blur_to_uint8(img, sigma).astype(int)
    want = np.clip(np.floor(v + 0.5), 0, 255).astype(int)
    assert np.abs(got - want).max() <= 1  # float32 vs float64 rounding at .5 boundaries


def test_procedural_levels_span_the_paper_bands():
    """One 256 x 256 picture per level, 128 x 128 patches: the paper's three bands are all reached, measured
    with an independent Laplacian-variance reference (OpenCV when present, else numpy)."""
    sharp = []
    for i, (tex, blur) in enumerate(PROC_LEVELS):
        p, _ = cut_patches(procedural_image(i, 256, tex, blur), 128, 128)
        for patch in p:
            g = patch[..., 0] * 0.299 + patch[..., 1] * 0.587 + patch[..., 2] * 0.114
            q = np.pad(g, 1, mode="reflect")
            lap = q[:-2, 1:-1] + q[2:, 1:-1] + q[1:-1, :-2] + q[1:-1, 2:] - 4 * g
            sharp.append(lap.var())
    s = np.array(sharp)
    assert (s < 50).sum() >= 3
    assert ((s >= 500) & (s <= 1000)).sum() >= 2
    assert (s > 5000).sum() >= 2


def test_skimage_pictures_are_the_builtin_skimage_sources():
    """``builtin_patches`` crops and ``builtin:skimage`` decode the same pictures: at size 512 a 512 x 512
    picture is not rescaled, so both give the same bytes; gray pictures become three equal channels."""
    skimage_data = pytest.importorskip("skimage.data")
    pics = skimage_pictures(512)
    assert len(pics) == len(SKIMAGE_NAMES)
    for name, pic in zip(SKIMAGE_NAMES, pics):
        assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3 and pic.flags.c_contiguous
        if name in ("astronaut", "camera"):
            d = decode_item(discover([f"builtin:skimage/{name}"])[0])
            np.testing.assert_array_equal(pic, d.rgb)
            raw = getattr(skimage_data, name)()
            np.testing.assert_array_equal(pic, raw if raw.ndim == 3 else np.stack([raw] * 3, -1))
    short = [min(p.shape[:2]) for p in skimage_pictures(32)]
    assert all(32 <= s <= 96 for s in short)
