"""The CPU streak renderer's kernel bank (kernels/streak/bank.py): rendering through the bank gives the same bytes as
building every kernel per patch (and as the numpy reference), the bank holds exactly the kernels the batches
needed, and the fallbacks (grid too large, byte cap reached, bank off) still render correctly."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from engine.rain import RainSpec
from kernels import rng
from kernels.composite import composite_reference
from kernels.simd import BLOCK
from kernels.streak import bank as sb
from kernels.streak import cpu as sc
from kernels.streak import kernel
from kernels.streak import reference as ref
from kernels.streak.tables import GAUSS, TRIG, kernel_size


@pytest.fixture(autouse=True)
def _fresh_banks(monkeypatch):
    """Every test starts without banks and with the module's limits restored afterwards."""
    monkeypatch.setattr(sb, "ENABLED", True)
    sb.clear()
    yield
    sb.clear()


@pytest.fixture
def threads():
    """Set numba's thread count for one test (1: serial path; 2: the parallel kernel), restored afterwards."""
    before = numba.get_num_threads()
    yield lambda t: numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(before)


def _states(seed: int, n: int, first: int = 0) -> np.ndarray:
    return rng.patch_state_np(seed, np.arange(first, first + n))


def _render(spec: RainSpec, states: np.ndarray, active: np.ndarray, h: int, w: int, bank: bool) -> np.ndarray:
    out = np.full((states.shape[0], h, w), 7, np.uint8)    # not zeros: every byte must be written
    old = sb.ENABLED
    sb.ENABLED = bank
    try:
        sc.render_cpu(spec.to_vector(), states, active, out)
    finally:
        sb.ENABLED = old
    return out


def _combos(spec: RainSpec, states: np.ndarray, active: np.ndarray) -> set[tuple[int, int, int]]:
    """(length, angle, width) of the active patches, drawn by the numpy reference (independent of the bank)."""
    p = spec.to_vector()
    return {ref.streak_draws(p, int(s))[1:] for s, a in zip(states, active) if a}


@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("spec,h,w", [
    (RainSpec.preset("medium"), 40, 56),
    (RainSpec.preset("small"), 32, 32),
    (RainSpec.preset("large", canvas_pad=10), 24, 37),                 # padded canvas, width not a multiple of 8
    (RainSpec.preset("table1-medium"), 19, 64),
    (RainSpec.parse("amount=0.05:0.1,width=1|3,length=3:9,angle=-90:90"), 17, 9),   # dense, any angle
    (RainSpec.parse("amount=0.01:0.02,width=5|31,length=60:128,angle=-5:5"), 6, 5),  # kernel >> canvas
    (RainSpec.parse("amount=0.3:0.5,width=1,length=1:2,angle=0:0"), 2, 2),       # smallest canvas
])
def test_bank_equals_per_patch_build(spec, h, w, t, threads):
    threads(t)
    n = 9
    st = _states(21, n)
    act = (np.arange(n) % 5 != 3).astype(np.uint8)
    without = _render(spec, st, act, h, w, bank=False)
    assert sb.stats()["banks"] == 0
    first = _render(spec, st, act, h, w, bank=True)         # fills the bank (all misses)
    again = _render(spec, st, act, h, w, bank=True)         # reads it (all hits)
    assert sb.stats(spec.to_vector())["built"] == len(_combos(spec, st, act)) > 0
    assert np.array_equal(first, without) and np.array_equal(again, without)


def test_bank_equals_reference_and_composite():
    spec = RainSpec.preset("medium", rain_prob=0.7, threshold=30)
    n, h, w = 4, 24, 40
    p = spec.to_vector()
    st = _states(4, n)
    act = np.array([1, 0, 1, 1], np.uint8)
    exp = np.empty((n, h, w), np.uint8)
    ref.render_reference(p, st, act, exp)
    assert np.array_equal(_render(spec, st, act, h, w, bank=True), exp)
    gen = np.random.default_rng(0)
    bg = gen.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    bq = gen.integers(0, 2048, n).astype(np.int64)
    rain = np.empty((n, h, w), np.uint8)
    rainy = np.empty((n, h, w, 3), np.uint8)
    mask = np.empty((n, h, w), bool)
    sc.render_composite_cpu(p, st, act, bg, bq, spec.threshold, rain, rainy, mask)
    exp_rainy, exp_mask = composite_reference(bg, exp, bq, spec.threshold)
    assert np.array_equal(rain, exp) and np.array_equal(rainy, exp_rainy) and np.array_equal(mask, exp_mask)


def test_bank_hits_and_misses_across_batches(threads):
    threads(2)
    spec = RainSpec.preset("medium")
    p = spec.to_vector()
    a = _states(3, 40)
    b = _states(3, 40, first=20)                             # half of a, half new patches
    act = np.ones(40, np.uint8)
    act[::7] = 0                                             # inactive patches need no kernel
    _render(spec, a, act, 16, 16, bank=True)
    seen = _combos(spec, a, act)
    assert sb.stats(p)["built"] == len(seen)
    _render(spec, a, act, 16, 16, bank=True)                 # all hits: nothing built
    assert sb.stats(p)["built"] == len(seen)
    _render(spec, b, act, 16, 16, bank=True)                 # only b's new combinations are built
    seen |= _combos(spec, b, act)
    assert sb.stats(p)["built"] == len(seen)
    # a spec differing only in amount, beta and padding shares the bank (same kernels, same combination grid)
    other = RainSpec.preset("medium", amount=(0.001, 0.002), beta=(0.2, 0.3), canvas_pad=4)
    _render(other, a, act, 16, 16, bank=True)
    assert sb.stats()["banks"] == 1 and sb.stats(other.to_vector())["built"] == len(seen | _combos(other, a, act))


def test_banked_kernels_equal_fresh_builds():
    """Each banked kernel (meta, rows, padded taps) is what build_kernel + pad_rows make for its
    (length, angle, width)."""
    spec = RainSpec.preset("large")
    p = spec.to_vector()
    st = _states(9, 30)
    act = np.ones(30, np.uint8)
    combos, meta, rinfo, taps = sb.prepare(p, st, act)
    ks = kernel_size(p)
    for i in range(30):
        aq, length, angle, width = ref.streak_draws(p, int(st[i]))
        ci = combos[i]
        assert meta[ci, 0] == 1
        kb = np.zeros((4, ks, ks), np.int64)
        ext = np.zeros((7, ks), np.int64)
        rows = np.zeros((4, ks), np.int64)
        vals = np.zeros(ks * ks, np.int64)
        plan = kernel.cpu.build_kernel(length, angle, width, TRIG, GAUSS, kb, ext, rows, vals)
        ri = np.zeros((ks, 4), np.int64)
        tp = np.zeros(ks * ks + BLOCK * (ks + 1))
        t_end = sb.pad_rows(rows, vals, plan[0], ri, 0, tp, 0)
        assert tuple(meta[ci, 1:6]) == tuple(plan)
        r0 = meta[ci, 6]
        n_rows = plan[0]
        first = rinfo[r0, 3] - BLOCK                     # the kernel's padded taps start BLOCK before row 0
        assert np.array_equal(rinfo[r0:r0 + n_rows, :3], ri[:n_rows, :3])
        assert np.array_equal(rinfo[r0:r0 + n_rows, 3] - first, ri[:n_rows, 3])
        assert np.array_equal(taps[first:first + t_end], tp[:t_end])


def test_no_bank_when_the_grid_is_too_large(monkeypatch):
    spec = RainSpec.preset("random")                         # 31 x 121 x 5 = 18,755 combinations
    p = spec.to_vector()
    assert sb.grid_size(p) > sb.MAX_COMBOS
    n, h, w = 3, 30, 20
    st = _states(5, n)
    act = np.ones(n, np.uint8)
    got = _render(spec, st, act, h, w, bank=True)
    assert sb.stats() == {"banks": 0, "bytes": 0, "built": 0}
    exp = np.empty((n, h, w), np.uint8)
    ref.render_reference(p, st, act, exp)
    assert np.array_equal(got, exp)
    monkeypatch.setattr(sb, "MAX_COMBOS", 100)                # the limit is what decides
    _render(RainSpec.preset("medium"), st, act, h, w, bank=True)
    assert sb.stats()["banks"] == 0


@pytest.mark.parametrize("t", [1, 2])
def test_byte_cap_keeps_the_rest_per_patch(monkeypatch, threads, t):
    threads(t)
    spec = RainSpec.preset("medium")
    p = spec.to_vector()
    n = 40
    st = _states(6, n)
    act = np.ones(n, np.uint8)
    # room for meta and a few kernels only (a medium kernel is ~7 KB)
    monkeypatch.setattr(sb, "MAX_BYTES", 2 * (sb.grid_size(p) * 64 + 40_000))
    got = _render(spec, st, act, 32, 24, bank=True)
    s = sb.stats(p)
    assert 0 < s["built"] < len(_combos(spec, st, act)) and s["bytes"] <= sb.MAX_BYTES
    assert np.array_equal(got, _render(spec, st, act, 32, 24, bank=False))
    again = _render(spec, _states(6, n, first=n), act, 32, 24, bank=True)    # full: nothing more is built
    assert sb.stats(p)["built"] == s["built"]
    assert np.array_equal(again, _render(spec, _states(6, n, first=n), act, 32, 24, bank=False))


def test_least_recently_used_banks_go_first(monkeypatch):
    monkeypatch.setattr(sb, "MAX_BANKS", 2)
    st = _states(1, 3)
    act = np.ones(3, np.uint8)
    names = ["small", "medium", "large"]
    for name in names:
        _render(RainSpec.preset(name), st, act, 8, 8, bank=True)
    assert sb.stats()["banks"] == 2
    assert sb.stats(RainSpec.preset("small").to_vector())["banks"] == 0
    assert all(sb.stats(RainSpec.preset(x).to_vector())["banks"] == 1 for x in names[1:])
