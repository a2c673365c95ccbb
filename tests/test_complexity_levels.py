"""Per-level complexity terms (the profile) and ``complexity(x, levels=(start, steps))``: against a plain-numpy
computation written here from the definition (block average, then half the mean squared difference per level)."""
from __future__ import annotations

import numpy as np
import pytest

from engine import metrics
from kernels import complexity as kcx


def profile_from_definition(x: np.ndarray) -> np.ndarray:
    """[N, L]: per level, crop to even size, average 2 x 2 blocks, mean over the cropped grid of |f - up(coarse)|^2
    (summed over RGB) / 2."""
    rows = []
    for patch in x:
        f = patch.astype(np.float64) / 255.0
        terms = []
        while f.shape[0] >= 2 and f.shape[1] >= 2:
            h, w = f.shape[0] // 2 * 2, f.shape[1] // 2 * 2
            f = f[:h, :w]
            coarse = (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2]) / 4
            up = coarse.repeat(2, axis=0).repeat(2, axis=1)
            terms.append(((f - up) ** 2).sum(axis=-1).mean() / 2)
            f = coarse
        rows.append(terms)
    return np.array(rows, dtype=np.float64).reshape(len(x), -1)


SHAPES = [(16, 24), (32, 32), (17, 9), (33, 50), (5, 64), (1, 8), (2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_profile_matches_definition_and_backends(rng, shape):
    x = rng.integers(0, 256, (3, *shape, 3), dtype=np.uint8)
    want = profile_from_definition(x)
    cpu = metrics.complexity_profile(x, backend="cpu")
    assert cpu.shape == (3, kcx.num_levels(*shape)) == want.shape
    assert cpu.dtype == np.float64
    np.testing.assert_allclose(cpu, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(metrics.complexity_profile(x, backend="reference"), cpu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(metrics.complexity_profile(x, backend="cuda"), cpu, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [(16, 24), (32, 32), (48, 40), (33, 50)])
def test_profile_sums_to_complexity(rng, shape):
    x = rng.integers(0, 256, (4, *shape, 3), dtype=np.uint8)
    prof = metrics.complexity_profile(x, backend="cpu")
    # the CPU kernel adds the same terms in the same order either way: exact
    np.testing.assert_array_equal(kcx.sum_levels(prof), metrics.complexity(x, backend="cpu"))
    np.testing.assert_array_equal(metrics.complexity(x, backend="cpu", levels=(0, prof.shape[1])),
                                  metrics.complexity(x, backend="cpu"))
    np.testing.assert_allclose(prof.sum(axis=1), metrics.complexity(x), rtol=1e-12)
    np.testing.assert_allclose(metrics.complexity(x, backend="cuda", levels=(0, prof.shape[1])),
                               metrics.complexity(x, backend="cuda"), rtol=1e-12)


def test_levels_sum_a_band_of_the_profile(rng):
    x = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    prof = profile_from_definition(x)
    assert prof.shape == (3, 6)
    for k0, k1 in [(0, 1), (2, 3), (0, 4), (5, 1), (1, 5)]:
        np.testing.assert_allclose(metrics.complexity(x, levels=(k0, k1)), prof[:, k0:k0 + k1].sum(axis=1),
                                   rtol=1e-12)
    # the Python port's setting for N x N patches, log2(N) - 2 levels
    np.testing.assert_allclose(metrics.complexity(x, levels=(0, 4)), prof[:, :4].sum(axis=1), rtol=1e-12)


def test_full_sum_is_half_the_variance(rng):
    x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(metrics.complexity_profile(x).sum(axis=1), f.var(axis=(1, 2)).sum(axis=-1) / 2,
                               rtol=1e-9)


def test_hand_case_one_level():
    # 2 x 2 checkerboard of 0 / 255 in every channel: one level, mean |f0 - f1|^2 = 3 * 0.25, term 3 / 8
    x = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    x[0, 0, 0] = x[0, 1, 1] = 255
    np.testing.assert_allclose(metrics.complexity_profile(x), [[3 / 8]], rtol=1e-12)


def test_num_levels():
    assert [kcx.num_levels(h, w) for h, w in [(1, 5), (2, 2), (3, 3), (4, 9), (16, 24), (128, 128), (255, 300)]] \
        == [0, 1, 1, 2, 4, 7, 7]


@pytest.mark.parametrize("levels, match", [
    ((-1, 2), "start >= 0"), ((0, 0), "steps >= 1"), ((3, 2), "only 4 levels"), ((0, 5), "only 4 levels"),
    ((0.5, 1), "pair"), ((True, 1), "pair"), ("0:2", "pair"), ((1, 2, 3), "pair"),
])
def test_levels_validation(rng, levels, match):
    x = rng.integers(0, 256, (1, 16, 24, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        metrics.complexity(x, levels=levels)


def test_empty_batch_profile():
    for backend in ("cpu", "cuda", "reference"):
        assert metrics.complexity_profile(np.zeros((0, 16, 16, 3), np.uint8), backend=backend).shape == (0, 4)
