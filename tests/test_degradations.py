"""Degradations beyond rain (``kernels.noise``): the "gaussian-noise" and "salt-pepper" families against independent
references (binomial bounds on the salt and pepper fractions, the moments and exact CDF of the rounded Gaussian),
the counter-RNG contract (per (seed, key), CPU = numpy reference = CUDA simulator), the fused plane path, the
loader's modes, the decoupled metrics on their masks, the spec syntax, and train.py end to end."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.metrics import decoupled
from engine.rain import FAMILY_PRESETS, PRESETS, RainSpec
from engine.synth import synthesize, synthesize_planes_cpu
from kernels import params as P
from kernels.families import family
from kernels.noise import draw_table, gaussian_table

Z = 5.0  # width of every confidence bound in standard deviations: a false alarm has odds below 1 in 10**6


def _binomial_ok(count: int, n: int, p: float) -> bool:
    """``count`` successes of ``n`` trials within Z standard deviations of Binomial(n, p) (plus one for rounding)."""
    return abs(count - n * p) <= Z * math.sqrt(n * p * (1 - p)) + 1


def _interior(rng, shape) -> np.ndarray:
    """Backgrounds in 1..254, so a salted (255) or peppered (0) channel is always a changed one."""
    return rng.integers(1, 255, size=shape, dtype=np.uint8)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


# ---- salt and pepper -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("salt,pepper", [(0.02, 0.02), (0.1, 0.05)])
def test_salt_pepper_fractions_per_channel_and_mask(rng, salt, pepper):
    bg = _interior(rng, (8, 48, 48, 3))
    spec = RainSpec.parse(f"salt-pepper,salt={salt},pepper={pepper}")
    r = synthesize(bg, spec, seed=5, backend="cpu")
    rainy = np.asarray(r.rainy)
    salted, peppered = rainy == 255, rainy == 0
    kept = ~(salted | peppered)
    n = bg.size
    assert _binomial_ok(int(salted.sum()), n, salt) and _binomial_ok(int(peppered.sum()), n, pepper)
    assert np.array_equal(rainy[kept], bg[kept])             # a value is replaced, or left exactly as it was
    for k in range(3):                                       # every channel draws at the same rates
        m = bg[..., k].size
        assert _binomial_ok(int(salted[..., k].sum()), m, salt)
        assert _binomial_ok(int(peppered[..., k].sum()), m, pepper)
    # independence across channels: joint hit rates are products of the marginals
    hit = ~kept
    p = salt + pepper
    pixels = bg.shape[0] * bg.shape[1] * bg.shape[2]
    assert _binomial_ok(int((hit[..., 0] & hit[..., 1]).sum()), pixels, p * p)
    assert _binomial_ok(int((hit[..., 1] & hit[..., 2]).sum()), pixels, p * p)
    assert _binomial_ok(int((salted[..., 0] & peppered[..., 2]).sum()), pixels, salt * pepper)
    assert _binomial_ok(int(hit.all(axis=-1).sum()), pixels, p ** 3)
    # mask: a pixel with any corrupted channel; layer: the largest change over the channels
    assert np.array_equal(r.mask, hit.any(axis=-1))
    assert _binomial_ok(int(r.mask.sum()), pixels, 1 - (1 - p) ** 3)
    assert np.array_equal(r.rain, np.abs(rainy.astype(int) - bg).max(axis=-1))
    assert np.array_equal(r.beta, np.ones(8))


def test_salt_pepper_mask_counts_replacements_that_change_nothing():
    bg = np.full((4, 32, 32, 3), 255, dtype=np.uint8)       # salt on white leaves the value, but was drawn
    r = synthesize(bg, "salt-pepper,salt=0.3,pepper=0", seed=1, backend="cpu")
    assert np.array_equal(r.rainy, bg) and not r.rain.any()
    assert _binomial_ok(int(r.mask.sum()), 4 * 32 * 32, 1 - 0.7 ** 3)


# ---- Gaussian -------------------------------------------------------------------------------------------------------

def test_gaussian_moments_and_exact_distribution():
    sigma, mu = 30.0, 4.0
    bg = np.full((8, 48, 48, 3), 128, dtype=np.uint8)       # clipping needs |n| > 127: about 2e-5 of the draws
    r = synthesize(bg, RainSpec.parse(f"gaussian-noise,sigma={sigma:g},mu={mu:g}"), seed=2, backend="cpu")
    d = np.asarray(r.rainy).astype(np.float64) - 128
    d = d[(d > -128) & (d < 127)]                            # unclipped
    n = d.size
    var = sigma ** 2 + 1 / 12                                # rounding to whole values adds 1/12 (Sheppard)
    assert abs(d.mean() - mu) <= Z * math.sqrt(var / n)
    assert abs(d.var() - var) <= Z * var * math.sqrt(2 / n)
    # the whole distribution: floor(mu + sigma z + 1/2), its CDF computed here from erfc
    values = np.arange(-40, 48)
    emp = np.searchsorted(np.sort(d), values, side="right") / n
    exact = np.array([_phi((v + 0.5 - mu) / sigma) for v in values])
    assert np.abs(emp - exact).max() <= Z * 0.5 / math.sqrt(n)  # a DKW-style bound
    assert r.mask.all()
    assert np.array_equal(r.rain, np.abs(np.asarray(r.rainy).astype(int) - bg).max(axis=-1))


@pytest.mark.parametrize("level", [8, 247])
def test_gaussian_clips_at_0_and_255(level):
    sigma = 30.0
    bg = np.full((4, 48, 48, 3), level, dtype=np.uint8)
    rainy = np.asarray(synthesize(bg, "gaussian-30", seed=3, backend="cpu").rainy).astype(int)
    n = rainy.size
    # I = clip(B + n): P(I = 0) = P(n <= -B), P(I = 255) = P(n >= 255 - B)
    assert _binomial_ok(int((rainy == 0).sum()), n, _phi((-level + 0.5) / sigma))
    assert _binomial_ok(int((rainy == 255).sum()), n, 1 - _phi((255 - level - 0.5) / sigma))


def test_gaussian_table_is_the_rounded_normal_cdf():
    t = gaussian_table(30.0, 0.0)
    assert t.dtype == np.uint64 and t.shape == (510,) and np.all(np.diff(t.astype(np.int64)) >= 0)
    assert int(t[255]) == round(2 ** 32 * _phi(0.5 / 30))   # P(n <= 0)
    with pytest.raises(ValueError, match="not a noise family"):
        draw_table(RainSpec.preset("medium").to_vector())


# ---- the counter-RNG contract ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["gaussian-30", "salt-pepper-2"])
def test_same_key_same_noise_in_any_batch(rng, spec):
    bg = _interior(rng, (6, 20, 24, 3))
    keys = np.array([5, 9, 2 ** 41 + 3, -7, 0, 12], dtype=np.int64)
    full = synthesize(bg, spec, seed=8, keys=keys, backend="cpu")
    order = np.array([3, 0, 5])
    part = synthesize(bg[order], spec, seed=8, keys=keys[order], backend="cpu")
    for f in ("rainy", "rain", "mask"):
        assert np.array_equal(getattr(full, f)[order], getattr(part, f)), f
    # the noise depends on the pixel's position, not on the patch size: a crop sees the same draws
    crop = synthesize(np.ascontiguousarray(bg[:, :11, :13]), spec, seed=8, keys=keys, backend="cpu")
    assert np.array_equal(crop.rainy, full.rainy[:, :11, :13])


def test_keys_and_seeds_give_independent_noise():
    bg = np.full((2, 64, 64, 3), 128, dtype=np.uint8)
    a = synthesize(bg, "gaussian-30", seed=1, keys=np.array([10, 11]), backend="cpu").rainy.astype(np.float64) - 128
    b = synthesize(bg, "gaussian-30", seed=2, keys=np.array([10, 11]), backend="cpu").rainy.astype(np.float64) - 128
    n = a[0].size
    for x, y in ((a[0], a[1]), (a[0], b[0]), (a[0][..., 0], a[0][..., 1])):   # keys, seeds, channels
        corr = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert abs(corr) <= Z / math.sqrt(x.size) and not np.array_equal(x, y)
    assert n == 64 * 64 * 3


@pytest.mark.parametrize("spec", ["gaussian-noise,sigma=12,mu=-3,prob=0.6", "salt-pepper,salt=0.2,pepper=0.1,prob=0.6"])
def test_cpu_equals_reference_and_cuda_simulator(rng, spec):
    bg = rng.integers(0, 256, size=(5, 9, 13, 3), dtype=np.uint8)   # odd sides; 0 and 255 present
    keys = np.arange(100, 105, dtype=np.int64)
    cpu = synthesize(bg, spec, seed=4, keys=keys, backend="cpu")
    backends = ["reference"]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        backends.append("cuda")                                    # tests/conftest.py switches the simulator on
    assert 0 < cpu.mask.any(axis=(1, 2)).sum() < 5                 # some patches drew no noise
    for backend in backends:
        other = synthesize(bg, spec, seed=4, keys=keys, backend=backend)
        for f in ("rainy", "rain", "mask", "beta"):
            assert np.array_equal(getattr(cpu, f), getattr(other, f)), (backend, f)
    off = ~cpu.mask.any(axis=(1, 2))
    assert np.array_equal(cpu.rainy[off], bg[off]) and not cpu.rain[off].any()


def _planes(name: str, n: int, h: int, w: int):
    storage = {"float32": np.float32, "uint8": np.uint8}[name]
    return (np.full((n, 3, h, w), 7, storage), np.full((n, 3, h, w), 7, storage), np.full((n, 1, h, w), 7, storage),
            np.ones((n, h, w), bool), np.full((n, h, w), 7, np.uint8))


def _as_planes(u8: np.ndarray, name: str) -> np.ndarray:
    """uint8 values in the plane format ``name`` (float32: ``v / 255``)."""
    return u8 if name == "uint8" else u8.astype(np.float32) / np.float32(255)


@pytest.mark.parametrize("name", ["float32", "uint8"])  # the other formats share kernels.finish.convert (test_finish)
@pytest.mark.parametrize("spec", ["gaussian-30,prob=0.7", "salt-pepper-2"])
def test_planes_equal_synthesize_then_conversion(rng, spec, name):
    store = _interior(rng, (7, 12, 10, 3))
    rows = np.array([6, 1, 1, 3])
    keys = np.array([4, 8, 15, 16], dtype=np.int64)
    ob, oy, orain, mask, layer = _planes(name, 4, 12, 10)
    beta = synthesize_planes_cpu(store, spec, 9, keys, layer, ob, oy, orain, mask, rows)
    ref = synthesize(store[rows], spec, seed=9, keys=keys, backend="reference")
    assert np.array_equal(ob, _as_planes(store[rows].transpose(0, 3, 1, 2), name))
    assert np.array_equal(oy, _as_planes(ref.rainy.transpose(0, 3, 1, 2), name))
    assert np.array_equal(orain, _as_planes(ref.rain[:, None], name))
    assert np.array_equal(layer, ref.rain) and np.array_equal(mask, ref.mask) and np.array_equal(beta, ref.beta)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["gaussian-30,prob=0.7", "salt-pepper-2"])
def test_real_gpu_equals_cpu(rng, spec):
    cupy = pytest.importorskip("cupy")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("numba's CUDA simulator cannot launch on CuPy arrays (run with RAINSWEEP_REAL_GPU=1)")
    bg = rng.integers(0, 256, size=(16, 64, 48, 3), dtype=np.uint8)
    keys = np.arange(16, dtype=np.int64) * 7919
    gpu = synthesize(cupy.asarray(bg), spec, seed=6, keys=keys)
    cpu = synthesize(bg, spec, seed=6, keys=keys, backend="cpu")
    for f in ("rainy", "rain", "mask", "beta"):
        assert np.array_equal(cupy.asnumpy(getattr(gpu, f)), getattr(cpu, f)), f
    t = synthesize(torch.from_numpy(bg).cuda(), spec, seed=6, keys=keys)    # torch CUDA in, torch CUDA out
    assert t.rainy.is_cuda and np.array_equal(t.rainy.cpu().numpy(), cpu.rainy)


def test_layer_only_renderers_refuse():
    fam = family("gaussian-noise")
    assert fam.mode == "add-signed-rgb" and family("salt-pepper").mode == "replace"
    assert family("streak").mode == "add-layer"
    with pytest.raises(ValueError, match="no background-free rain layer"):
        fam.render_cpu(PRESETS["gaussian-30"].to_vector(), np.zeros(1, np.uint64), np.ones(1, np.uint8),
                       np.zeros((1, 4, 4), np.uint8))


def test_bad_arguments_are_named(rng):
    fam = family("salt-pepper")
    p = PRESETS["salt-pepper-2"].to_vector()
    bg = _interior(rng, (2, 4, 4, 3))
    st, act = np.zeros(2, np.uint64), np.ones(2, np.uint8)
    with pytest.raises(ValueError, match="rainy"):
        fam.render_composite_cpu(p, st, act, bg, np.zeros(2, np.int64), 0, np.zeros((2, 4, 4), np.uint8),
                                 np.zeros((2, 4, 4, 4), np.uint8), np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="states"):
        fam.render_composite_cpu(p, st[:1], act, bg, np.zeros(2, np.int64), 0, np.zeros((2, 4, 4), np.uint8),
                                 np.zeros_like(bg), np.zeros((2, 4, 4), bool))


# ---- metrics, loader, trainer ---------------------------------------------------------------------------------------

def test_decoupled_metrics_on_noise_masks(rng):
    bg = _interior(rng, (3, 24, 24, 3))
    out = rng.uniform(0, 255, size=bg.shape).astype(np.float32)
    for spec in ("salt-pepper-2", "gaussian-30"):
        r = synthesize(bg, spec, seed=1, backend="cpu")
        got = decoupled(out, r.rainy, bg, r.mask)
        m = np.broadcast_to(r.mask[..., None], bg.shape)
        o, i, b = out.astype(np.float64), r.rainy.astype(np.float64), bg.astype(np.float64)
        er = [np.sqrt(((o[j] - i[j]) ** 2)[m[j]].mean()) for j in range(3)]
        np.testing.assert_allclose(got["E_R"], er, rtol=1e-9)
        if spec == "gaussian-30":                           # every pixel corrupted: no clean pixel for E_B
            assert np.isnan(got["E_B"]).all()
        else:
            eb = [np.sqrt(((o[j] - b[j]) ** 2)[~m[j]].mean()) for j in range(3)]
            np.testing.assert_allclose(got["E_B"], eb, rtol=1e-9)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    from engine.data.store import write_store

    g = np.random.default_rng(3)
    small = g.integers(0, 256, size=(24, 4, 4, 3)).astype(np.float64)
    patches = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2).astype(np.uint8)   # 16 px, smooth
    path = tmp_path_factory.mktemp("noise_store") / "s.zarr"
    write_store(path, patches, source=np.arange(24) % 6, chunk_patches=8)
    return path


def test_loader_batches_carry_the_noise(tiny_store):
    import zarr

    from engine.loader import Loader
    from engine.loader.dali import dali_problem

    patches = np.asarray(zarr.open_group(str(tiny_store), mode="r")["patches"][:])
    modes = ["resident"] + ([] if dali_problem() else ["dali"])
    for spec in ("gaussian-30", "salt-pepper-2"):
        epochs = {}
        for mode in modes:
            loader = Loader(str(tiny_store), batch_size=8, rain=spec, seed=5, mode=mode, workers=0)
            try:
                epochs[mode] = list(loader.epoch(2))
            finally:
                loader.close()
        for b in epochs["resident"]:
            idx = b.index.numpy()
            ref = synthesize(patches[idx], spec, seed=5, keys=(2 << 40) | idx)
            np.testing.assert_array_equal(b.rainy.numpy(), ref.rainy.transpose(0, 3, 1, 2) / np.float32(255))
            np.testing.assert_array_equal(b.rain.numpy(), ref.rain[:, None] / np.float32(255))
            np.testing.assert_array_equal(b.mask.numpy(), ref.mask[:, None])
        for mode in modes[1:]:
            for x, y in zip(epochs["resident"], epochs[mode], strict=True):
                for f in ("index", "background", "rainy", "rain", "mask"):
                    assert torch.equal(getattr(x, f), getattr(y, f)), (mode, f)


@pytest.mark.slow
def test_train_on_gaussian_test_on_salt_pepper(tiny_store, tmp_path):
    from click.testing import CliRunner

    import train

    torch.set_num_threads(1)
    out = tmp_path / "run"
    res = CliRunner().invoke(train.main, ["--store", str(tiny_store), "--model", "resnet-s", "--batch", "4",
                                          "--count", "8", "--test-count", "6", "--iters", "3", "--device", "cpu",
                                          "--rain", "gaussian-30", "--test-rain", "salt-pepper-2", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(np.isfinite(metrics[k]) for k in ("E_R", "E_B", "PSNR"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rain"] == "gaussian-30" and cfg["test_rain"] == "salt-pepper-2"
    assert "salt 0.02, pepper 0.02" in cfg["heldout"]["rain_spec"]


# ---- the spec syntax ------------------------------------------------------------------------------------------------

def test_presets_and_family_words():
    g, s = RainSpec.preset("gaussian-30"), RainSpec.preset("salt-pepper-2")
    assert (g.family, g.sigma, g.mu) == ("gaussian-noise", 30.0, 0.0)
    assert (s.family, s.salt, s.pepper) == ("salt-pepper", 0.02, 0.02)
    assert RainSpec.parse("gaussian-noise") == g and RainSpec.parse("salt-pepper") == s
    assert RainSpec.parse("gaussian-noise,sigma=30").sigma == 30.0
    assert RainSpec.parse("family=salt-pepper,salt=0.02,pepper=0.02").pepper == 0.02
    c = RainSpec.parse("gaussian-noise,sigma=15,mu=-2,prob=0.5")
    assert (c.sigma, c.mu, c.rain_prob, c.name) == (15.0, -2.0, 0.5, "custom")
    v = c.to_vector()
    assert v.shape == (P.SIZE,) and (v[P.FAMILY], v[P.SIGMA], v[P.MU]) == (P.FAMILY_IDS["gaussian-noise"], 15, -2)
    assert set(FAMILY_PRESETS) == {f for f, m in P.FAMILY_MODES.items() if m != "add-layer"}
    assert "sigma 30" in g.describe() and "per channel" in s.describe()


@pytest.mark.parametrize("text,key", [
    ("gaussian-noise,width=3", "'width'"), ("salt-pepper,sigma=2", "'sigma'"), ("medium,salt=0.1", "'salt'"),
    ("gaussian-noise,beta=0.5", "'beta'"), ("gaussian-noise,t=10", "'t'"), ("gaussian-noise,sigma=x", "'sigma'"),
    ("gaussian-noise,sigma=0", "sigma"), ("gaussian-noise,mu=300", "mu"), ("salt-pepper,salt=0.8,pepper=0.5", "salt"),
    ("salt-pepper,pepper=-1", "pepper"), ("family=pink-noise", "family"),
])
def test_parse_errors_name_the_bad_key(text, key):
    with pytest.raises(ValueError, match=key):
        RainSpec.parse(text)


def test_noise_fields_belong_to_their_family():
    with pytest.raises(ValueError, match="only the gaussian-noise family uses sigma"):
        RainSpec(family="streak", sigma=3.0)
    with pytest.raises(ValueError, match="only the salt-pepper family uses salt"):
        RainSpec(family="gaussian-noise", sigma=3.0, salt=0.1)
