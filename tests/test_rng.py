"""The counter-based generator: numba CPU, CUDA (simulator) and numpy versions agree bit for bit, and its
outputs have the statistics of a good generator (uniform moments, no correlation between neighbouring keys)."""
import numpy as np
import pytest
from numba import cuda, njit

from kernels import rng



def splitmix64_reference(state: int, n: int) -> list[int]:
    """Vigna's reference splitmix64 (https://prng.di.unimi.it/splitmix64.c) in Python integers."""
    out, mask = [], (1 << 64) - 1
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_bits_is_splitmix64_stream():
    state = 123456789
    expected = splitmix64_reference(state, 5)
    got = [int(rng.bits_np(np.uint64(state), np.uint64(i))) for i in range(5)]
    assert got == expected


@njit
def _cpu_draws(seed, keys, out_u, out_i):
    for j in range(keys.size):
        st = _ps(seed, keys[j])
        out_u[j] = _un(st, _ctr(1, j))
        out_i[j] = _ri(st, _ctr(2, j), -30, 30)


_ps, _un, _ri, _ctr = rng.cpu.patch_state, rng.cpu.uniform, rng.cpu.randint, rng.cpu.counter
_gps, _gun, _gri, _gctr = rng.gpu.patch_state, rng.gpu.uniform, rng.gpu.randint, rng.gpu.counter


@cuda.jit
def _gpu_draws(seed, keys, out_u, out_i):
    j = cuda.grid(1)
    if j < keys.size:
        st = _gps(seed, keys[j])
        out_u[j] = _gun(st, _gctr(1, j))
        out_i[j] = _gri(st, _gctr(2, j), -30, 30)


def test_cpu_gpu_numpy_agree():
    keys = np.array([0, 1, 2, 7, -1, 2**40 + 5], dtype=np.int64)
    seed = np.uint64(42)
    cu, ci = np.zeros(keys.size), np.zeros(keys.size, np.int64)
    gu, gi = np.zeros(keys.size), np.zeros(keys.size, np.int64)
    _cpu_draws(seed, keys, cu, ci)
    _gpu_draws[1, 32](seed, keys, gu, gi)
    states = rng.patch_state_np(42, keys)
    idx = np.arange(keys.size)
    nu = rng.uniform_np(states, rng.counter_np(1, idx))
    ni = rng.randint_np(states, rng.counter_np(2, idx), -30, 30)
    np.testing.assert_array_equal(cu, nu)
    np.testing.assert_array_equal(gu, nu)
    np.testing.assert_array_equal(ci, ni)
    np.testing.assert_array_equal(gi, ni)


def test_uniform_and_randint_statistics():
    states = rng.patch_state_np(7, np.arange(200_000))
    u = rng.uniform_np(states, rng.counter_np(1, 0))
    assert u.min() >= 0 and u.max() < 1
    # mean 1/2 and variance 1/12 within 5 standard errors
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / u.size)
    # neighbouring keys are uncorrelated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(u.size)
    k = rng.randint_np(states, rng.counter_np(2, 0), -3, 3)
    counts = np.bincount(k + 3, minlength=7)
    assert k.min() == -3 and k.max() == 3
    expected = u.size / 7
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 22.5  # chi-square, 6 degrees of freedom, p = 0.001


def test_streams_and_seeds_are_independent():
    states = rng.patch_state_np(1, np.arange(50_000))
    a = rng.uniform_np(states, rng.counter_np(1, 0))
    b = rng.uniform_np(states, rng.counter_np(2, 0))
    c = rng.uniform_np(rng.patch_state_np(2, np.arange(50_000)), rng.counter_np(1, 0))
    for x, y in ((a, b), (a, c)):
        assert abs(np.corrcoef(x, y)[0, 1]) < 5 / np.sqrt(a.size)


@pytest.mark.parametrize("lo,hi", [(0, 0), (-60, 60), (25, 55)])
def test_randint_bounds(lo, hi):
    states = rng.patch_state_np(3, np.arange(20_000))
    k = rng.randint_np(states, rng.counter_np(1, 3), lo, hi)
    assert k.min() == lo and k.max() == hi
