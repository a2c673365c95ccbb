"""engine.synth.synthesize: backends agree exactly, the randomness contract holds, compositing and masks are
exact, inputs are validated, and outputs come back in the input's library."""
import numpy as np
import pytest
import torch

from engine import synth
from engine.rain import RainSpec
from engine.synth import synthesize
from kernels import composite
from kernels.families import FAMILIES, family
from kernels.params import FAMILY_IDS


@pytest.fixture
def backgrounds(rng):
    return rng.integers(0, 256, size=(6, 24, 40, 3), dtype=np.uint8)


def _same(a, b):
    for f in ("rainy", "rain", "mask"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert np.array_equal(a.beta, b.beta)


@pytest.mark.parametrize("spec", ["small", "medium", "large", "random", "medium,prob=0.5,t=30",
                                  "large,pad=8"])
def test_cpu_equals_reference(backgrounds, spec):
    _same(synthesize(backgrounds, spec, seed=3, backend="cpu"),
          synthesize(backgrounds, spec, seed=3, backend="reference"))


def test_cuda_equals_cpu_tiny(backgrounds):
    # numba.cuda kernels on numpy arrays: the CUDA simulator in CI
    for spec in ("medium", "amount=0.02:0.03,width=1|3,length=5:9,angle=-60:60"):
        _same(synthesize(backgrounds[:2], spec, seed=4, backend="cuda"),
              synthesize(backgrounds[:2], spec, seed=4, backend="cpu"))


def test_outputs_and_composite_formula(backgrounds):
    spec = RainSpec.preset("medium", threshold=40)
    r = synthesize(backgrounds, spec, seed=9)
    assert r.rainy.dtype == np.uint8 and r.rainy.shape == backgrounds.shape
    assert r.rain.dtype == np.uint8 and r.rain.shape == backgrounds.shape[:3]
    assert r.mask.dtype == np.bool_ and np.array_equal(r.mask, r.rain > 40)
    assert r.beta.dtype == np.float64 and r.beta.shape == (6,)
    assert np.all((r.beta >= 0.7) & (r.beta <= 1.0)) and np.array_equal(r.beta * 1024, np.round(r.beta * 1024))
    # exact fixed point: floor(B + beta R) clipped, which is within 1 of the float formula
    expected = np.clip(np.floor(backgrounds + r.beta[:, None, None, None] * r.rain[..., None]), 0, 255)
    assert np.array_equal(r.rainy, expected.astype(np.uint8))


def test_composite_kernels_equal_reference(rng):
    n, h, w = 5, 13, 17
    b = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    r = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    bq = rng.integers(0, 4 * 1024, n).astype(np.int64)       # beta up to 4 (RainSpec's limit) saturates often
    exp_rainy, exp_mask = composite.composite_reference(b, r, bq, 77)
    for fn in (composite.composite_cpu, composite.composite_gpu):
        rainy = np.zeros_like(b)
        mask = np.zeros((n, h, w), bool)
        fn(b, r, bq, 77, rainy, mask)
        assert np.array_equal(rainy, exp_rainy) and np.array_equal(mask, exp_mask)


def test_composite_argument_errors(rng):
    b = np.zeros((2, 4, 4, 3), np.uint8)
    r = np.zeros((2, 4, 4), np.uint8)
    ok = dict(rainy=np.zeros_like(b), mask=np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="rain: expected uint8 NHW"):
        composite.composite_cpu(b, r[:, :3], np.zeros(2, np.int64), 50, **ok)
    with pytest.raises(ValueError, match="beta_q"):
        composite.composite_cpu(b, r, np.zeros(2, np.float64), 50, **ok)
    with pytest.raises(ValueError, match="mask"):
        composite.composite_cpu(b, r, np.zeros(2, np.int64), 50, ok["rainy"], np.zeros((2, 4, 4), np.uint8))


# ---- randomness contract -------------------------------------------------------------------------------------------

def test_same_key_same_rain_across_batches_and_orders(backgrounds):
    keys = np.array([10, 11, 12, 13, 14, 15], dtype=np.int64)
    full = synthesize(backgrounds, "random", seed=5, keys=keys)
    perm = np.array([4, 2, 0, 5, 1, 3])
    shuffled = synthesize(backgrounds[perm], "random", seed=5, keys=keys[perm])
    for f in ("rainy", "rain", "mask", "beta"):
        assert np.array_equal(getattr(shuffled, f), getattr(full, f)[perm])
    one = synthesize(backgrounds[3:4], "random", seed=5, keys=keys[3:4])
    assert np.array_equal(one.rain[0], full.rain[3]) and one.beta[0] == full.beta[3]
    # the rain does not depend on the background
    other = synthesize(backgrounds[::-1].copy(), "random", seed=5, keys=keys)
    assert np.array_equal(other.rain, full.rain)


def test_keys_and_seeds_change_rain(backgrounds):
    a = synthesize(backgrounds, "medium", seed=1, keys=np.arange(6))
    b = synthesize(backgrounds, "medium", seed=1, keys=np.arange(6) + 100)
    c = synthesize(backgrounds, "medium", seed=2, keys=np.arange(6))
    for i in range(6):
        assert not np.array_equal(a.rain[i], b.rain[i])
        assert not np.array_equal(a.rain[i], c.rain[i])
    # patches of one batch differ from each other too
    assert len({a.rain[i].tobytes() for i in range(6)}) == 6


def test_rain_probability(rng):
    n = 4000
    _, active, _ = synth.common_draws(RainSpec.preset("medium", rain_prob=0.9), 0, np.arange(n))
    p = active.mean()
    assert abs(p - 0.9) < 5 * np.sqrt(0.9 * 0.1 / n)
    b = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    r = synthesize(b, RainSpec.preset("small", rain_prob=0.5), seed=0)
    off = ~r.rain.reshape(64, -1).any(axis=1)
    assert 10 < off.sum() < 54
    assert np.array_equal(r.rainy[off], b[off]) and not r.mask[off].any()


def test_default_keys_are_arange(backgrounds):
    _same(synthesize(backgrounds, "small", seed=8), synthesize(backgrounds, "small", seed=8, keys=np.arange(6)))


# ---- input forms --------------------------------------------------------------------------------------------------

def test_torch_cpu_in_torch_out(backgrounds):
    t = torch.from_numpy(backgrounds)
    r = synthesize(t, "medium", seed=2)
    assert isinstance(r.rainy, torch.Tensor) and isinstance(r.mask, torch.Tensor) and isinstance(r.beta, torch.Tensor)
    assert r.mask.dtype == torch.bool and r.rain.dtype == torch.uint8
    _same(synth.SynthResult(*(x.numpy() for x in (r.rainy, r.rain, r.beta, r.mask))),
          synthesize(backgrounds, "medium", seed=2))


def test_non_contiguous_input(backgrounds):
    view = backgrounds[:, ::2, ::2]
    _same(synthesize(view, "small", seed=1), synthesize(np.ascontiguousarray(view), "small", seed=1))


def test_out_argument_reuses_buffers(backgrounds):
    n, h, w, _ = backgrounds.shape
    out = synth.SynthResult(rainy=np.empty_like(backgrounds), rain=np.empty((n, h, w), np.uint8),
                            beta=np.empty(n), mask=np.empty((n, h, w), bool))
    got = synthesize(backgrounds, "large", seed=6, out=out)
    assert got is out
    _same(out, synthesize(backgrounds, "large", seed=6))


def test_out_argument_mixed_torch_numpy(backgrounds):
    """As the loader uses it: torch CPU input and buffers, a numpy mask from a pool."""
    n, h, w, _ = backgrounds.shape
    out = synth.SynthResult(rainy=torch.empty((n, h, w, 3), dtype=torch.uint8),
                            rain=torch.empty((n, h, w), dtype=torch.uint8), beta=torch.empty(n, dtype=torch.float64),
                            mask=np.empty((n, h, w), bool))
    synthesize(torch.from_numpy(backgrounds), "medium", seed=2, out=out)
    _same(synth.SynthResult(out.rainy.numpy(), out.rain.numpy(), out.beta.numpy(), out.mask),
          synthesize(backgrounds, "medium", seed=2))
    bad = synth.SynthResult(rainy=torch.empty((n, h, w, 3), dtype=torch.uint8), rain=torch.empty((n, w, h),
                            dtype=torch.uint8).transpose(1, 2), beta=torch.empty(n, dtype=torch.float64),
                            mask=np.empty((n, h, w), bool))
    with pytest.raises(ValueError, match="out.rain: expected a C-contiguous"):
        synthesize(torch.from_numpy(backgrounds), "medium", out=bad)


def test_spec_object_and_string_agree(backgrounds):
    _same(synthesize(backgrounds, RainSpec.preset("small"), seed=1), synthesize(backgrounds, "small", seed=1))


@pytest.mark.parametrize("family", ["layered", "sparse"])
def test_dispatches_other_families(backgrounds, family):
    r = synthesize(backgrounds[:2], f"heldout-{family}", seed=1)
    assert r.rain.shape == (2, 24, 40) and r.rain.any()


def test_cupy_device_roundtrip():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
        import os
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            pytest.skip("numba's CUDA simulator cannot launch on CuPy arrays")
    except Exception:
        pytest.skip("no CUDA device")
    b = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    r = synthesize(cupy.asarray(b), "medium", seed=3)
    assert isinstance(r.rain, cupy.ndarray)
    _same(synth.SynthResult(*(cupy.asnumpy(x) for x in (r.rainy, r.rain, r.beta, r.mask))),
          synthesize(b, "medium", seed=3))


# ---- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), "NHWC"),
    (np.zeros((2, 3, 8, 8), np.uint8), "NCHW"),
    (np.zeros((2, 8, 8, 4), np.uint8), "3 channels"),
])
def test_bad_backgrounds(bad, match):
    with pytest.raises(ValueError, match=match):
        synthesize(bad, "medium")


def test_bad_keys_backend_spec(backgrounds):
    with pytest.raises(ValueError, match="keys: expected 6"):
        synthesize(backgrounds, "medium", keys=np.arange(5))
    with pytest.raises(ValueError, match="keys: expected integers"):
        synthesize(backgrounds, "medium", keys=np.linspace(0, 1, 6))
    with pytest.raises(ValueError, match="backend"):
        synthesize(backgrounds, "medium", backend="tpu")
    with pytest.raises(ValueError, match="amount"):
        synthesize(backgrounds, "amount=oops")
    with pytest.raises(TypeError, match="spec"):
        synthesize(backgrounds, 3)
    with pytest.raises(ValueError, match="no renderer for rain family 'nosuch'"):
        family("nosuch")


def test_every_family_id_has_a_renderer():
    assert set(FAMILIES) == set(FAMILY_IDS)
    assert all(FAMILIES[name].name == name for name in FAMILIES)


def test_empty_batch():
    r = synthesize(np.zeros((0, 16, 20, 3), np.uint8), "medium", keys=np.zeros(0, np.int64))
    assert r.rainy.shape == (0, 16, 20, 3) and r.rain.shape == (0, 16, 20) and r.mask.shape == (0, 16, 20)
    assert r.beta.shape == (0,)
    r = synthesize(torch.zeros((0, 16, 20, 3), dtype=torch.uint8), "medium")
    assert tuple(r.rain.shape) == (0, 16, 20)


@pytest.mark.parametrize("spec", [RainSpec.preset("medium"), RainSpec.preset("small", rain_prob=0.3, beta=(0.0, 4.0))])
def test_common_draws_equal_numpy_formulation(spec):
    keys = np.random.default_rng(1).integers(-2 ** 62, 2 ** 62, 500)
    for seed in (0, 7, -5, 2 ** 62):
        got = synth.common_draws(spec, seed, keys)
        want = synth.common_draws_np(spec, seed, keys)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and np.array_equal(a, b)
