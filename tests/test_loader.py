"""engine.loader: epoch order, shards, modes (resident / dali) agreeing batch for batch, rain against a direct
``engine.synth.synthesize`` call, and bad input. DALI runs its CPU pipeline here (no GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from engine import loader as L
from engine.loader import Loader, LoaderError
from engine.loader.planes import unit_by_lut, unit_table
from engine.rain import RainSpec

P = 16
N = 45


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    from engine.data.store import write_store

    rng = np.random.default_rng(7)
    patches = rng.integers(0, 256, size=(N, P, P, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("loader") / "store"
    # chunks of 8 patches so batches span several chunk files; metrics are irrelevant here
    write_store(path, patches, sharpness=np.zeros(N), complexity=np.zeros(N), chunk_patches=8)
    return str(path)


@pytest.fixture(scope="module")
def store_patches(store_path) -> np.ndarray:
    """The store's patches read by plain zarr-python (independent of PatchStore.read's fast path)."""
    return np.asarray(zarr.open_group(store_path, mode="r")["patches"][:])


@pytest.fixture(scope="module")
def other_store_path(tmp_path_factory) -> str:
    from engine.data.store import write_store

    patches = np.full((10, P, P, 3), 9, dtype=np.uint8)
    path = tmp_path_factory.mktemp("loader_other") / "store"
    write_store(path, patches, sharpness=np.zeros(10), complexity=np.zeros(10))
    return str(path)


def _epoch(store_path, **kw) -> list[L.Batch]:
    kw.setdefault("rain", None)
    epoch = kw.pop("epoch", 0)
    loader = Loader(store_path, **kw)
    try:
        return list(loader.epoch(epoch))
    finally:
        loader.close()


def _order(batches: list[L.Batch]) -> np.ndarray:
    return np.concatenate([b.index.numpy() for b in batches]) if batches else np.zeros(0, np.int64)


# ---- order -------------------------------------------------------------------------------------------------------

def _reference_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The documented order, computed with numba's scalar helpers (an implementation independent of the numpy one
    the loader uses): sort by bits(patch_state(seed, ~epoch), counter(0, index)), ties by index."""
    from kernels.rng import cpu

    state = np.uint64(cpu.patch_state(np.int64(seed), np.int64(~epoch)))
    # np.uint64 around every value crossing into numba: a Python int would type as int64, and int64 + uint64 is
    # float64 in numba's typing
    keys = [(int(cpu.bits(state, np.uint64(cpu.counter(np.uint64(0), np.uint64(i))))), int(i)) for i in indices]
    return np.array([i for _, i in sorted(keys)], dtype=np.int64)


@pytest.mark.parametrize("mode", ["resident", "dali"])
def test_epoch_visits_every_subset_index_once(store_path, mode):
    subset = np.array([3, 40, 7, 0, 22, 31, 44, 12, 9, 18, 27], dtype=np.int64)
    got = _order(_epoch(store_path, subset=subset, batch_size=4, mode=mode, seed=5, epoch=2))
    assert sorted(got.tolist()) == sorted(subset.tolist())
    np.testing.assert_array_equal(got, _reference_order(subset, 5, 2))


def test_order_depends_on_seed_and_epoch_only(store_path):
    a = _order(_epoch(store_path, batch_size=7, mode="resident", seed=1, epoch=0))
    b = _order(_epoch(store_path, batch_size=7, mode="resident", seed=1, epoch=1))
    c = _order(_epoch(store_path, batch_size=7, mode="resident", seed=2, epoch=0))
    again = _order(_epoch(store_path, batch_size=5, mode="resident", seed=1, epoch=0))  # batch size is irrelevant
    assert sorted(a.tolist()) == list(range(N))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_array_equal(a, again)
    # the order of a subset is the whole store's order restricted to it, however the subset lists its indices
    sub = np.array([40, 2, 17, 33, 8], dtype=np.int64)
    got = _order(_epoch(store_path, subset=sub[::-1].copy(), batch_size=2, mode="resident", seed=1, epoch=0))
    np.testing.assert_array_equal(got, a[np.isin(a, sub)])


def test_batch_sizes_and_drop_last(store_path):
    sizes = [len(b) for b in _epoch(store_path, batch_size=10, mode="resident")]
    assert sizes == [10, 10, 10, 10, 5]
    sizes = [len(b) for b in _epoch(store_path, batch_size=10, mode="resident", drop_last=True)]
    assert sizes == [10, 10, 10, 10]
    assert [b.step for b in _epoch(store_path, batch_size=10, mode="resident")] == [0, 1, 2, 3, 4]
    assert len(Loader(store_path, batch_size=10, rain=None, mode="resident")) == 5


# ---- shards ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_are_disjoint_and_cover_the_epoch(store_path, drop_last):
    bs, shards = 4, 3
    full = _order(_epoch(store_path, batch_size=bs, mode="resident", seed=9, epoch=3))
    parts = [_epoch(store_path, batch_size=bs, mode="resident", seed=9, epoch=3, drop_last=drop_last,
                    shard_id=s, num_shards=shards) for s in range(shards)]
    orders = [_order(p) for p in parts]
    everything = np.concatenate(orders)
    assert np.unique(everything).size == everything.size  # disjoint
    if drop_last:
        # every shard has the same number of full batches: 45 // 4 = 11 batches, 11 // 3 = 3 per shard
        assert [len(p) for p in parts] == [3, 3, 3]
        assert all(len(b) == bs for p in parts for b in p)
        assert sorted(everything.tolist()) == sorted(full[:9 * bs].tolist())
    else:
        assert sorted(everything.tolist()) == list(range(N))
        # strided batches: batch k of the epoch goes to shard k % 3
        for s, p in enumerate(parts):
            for j, b in enumerate(p):
                k = s + j * shards
                np.testing.assert_array_equal(b.index.numpy(), full[k * bs:(k + 1) * bs])


# ---- modes agree, contents are right ----------------------------------------------------------------------------

def _assert_same_batches(xs: list[L.Batch], ys: list[L.Batch]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for f in ("index", "background", "rainy", "rain", "mask"):
            a, b = getattr(x, f), getattr(y, f)
            assert a.dtype == b.dtype and a.shape == b.shape, f
            assert torch.equal(a.cpu(), b.cpu()), f


@pytest.mark.parametrize("workers", [0, 1, None])
def test_dali_and_resident_give_identical_batches(store_path, workers):
    kw = dict(subset=np.arange(3, 40), batch_size=8, rain="medium", seed=11, epoch=4)
    res = _epoch(store_path, mode="resident", **kw)
    dali = _epoch(store_path, mode="dali", workers=workers, **kw)
    _assert_same_batches(res, dali)
    assert any(b.mask.any() for b in res)  # rain was actually drawn


def test_batches_match_store_and_direct_synthesis(store_path, store_patches):
    from engine.synth import synthesize

    spec = RainSpec.preset("medium")
    seed, epoch = 3, 6
    for mode in ("resident", "dali"):
        for b in _epoch(store_path, batch_size=16, rain=spec, seed=seed, epoch=epoch, mode=mode):
            idx = b.index.numpy()
            bg = store_patches[idx]
            assert b.background.dtype == torch.float32 and b.background.shape == (len(idx), 3, P, P)
            assert b.background.is_contiguous() and b.rainy.is_contiguous()
            expect_bg = bg.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
            np.testing.assert_array_equal(b.background.numpy(), expect_bg)
            keys = np.array([epoch * 2**40 + int(i) for i in idx], dtype=np.int64)
            ref = synthesize(bg.copy(), spec, seed=seed, keys=keys)
            rainy = np.asarray(ref.rainy).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
            rain = np.asarray(ref.rain)[:, None].astype(np.float32) / np.float32(255)
            np.testing.assert_array_equal(b.rainy.numpy(), rainy)
            np.testing.assert_array_equal(b.rain.numpy(), rain)
            np.testing.assert_array_equal(b.mask.numpy(), np.asarray(ref.mask)[:, None])
            assert b.rain.shape == (len(idx), 1, P, P) and b.mask.dtype == torch.bool
            assert 0.0 <= float(b.rainy.min()) and float(b.rainy.max()) <= 1.0


def test_device_conversion_equals_true_division():
    """The conversion the GPU path uses, run on CPU tensors: exact float32 quotients v / 255 (a multiplication by
    1/255 would be off in the last bit for about half of the values), in NCHW, from an NHWC view."""
    x = torch.from_numpy(np.arange(2 * 4 * 8 * 3, dtype=np.int64).reshape(2, 4, 8, 3).astype(np.uint8) * 5)
    got = unit_by_lut(x.permute(0, 3, 1, 2), unit_table(torch.device("cpu")))
    want = x.numpy().transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (2, 3, 4, 8)
    np.testing.assert_array_equal(got.numpy(), want)
    every = torch.arange(256, dtype=torch.uint8)
    np.testing.assert_array_equal(unit_by_lut(every, unit_table(torch.device("cpu"))).numpy(),
                                  np.arange(256, dtype=np.float32) / np.float32(255))


def test_no_rain_means_rainy_is_background(store_path, store_patches):
    for b in _epoch(store_path, batch_size=20, rain=None, mode="resident"):
        assert torch.equal(b.rainy, b.background) and b.rainy is not b.background
        assert not b.mask.any() and float(b.rain.abs().max()) == 0.0


def test_output_buffers_are_recycled_only_after_release(store_path, store_patches):
    loader = Loader(store_path, batch_size=5, rain="medium", mode="resident")
    held = list(loader.epoch(0))  # the caller keeps every batch: no two may share memory
    ptrs = [t.data_ptr() for b in held for t in (b.background, b.rainy, b.rain, b.mask)]
    assert len(set(ptrs)) == len(ptrs)
    for b in held:  # nothing was overwritten by the batches produced after it
        expect = store_patches[b.index.numpy()].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(b.background.numpy(), expect)
    view = held[0].rainy[:, :1].clone(), held[1].background.numpy()  # a numpy view keeps its batch's buffer
    kept = held[1].background.data_ptr()
    del held, b
    seen = set()
    for b in loader.epoch(1):
        seen.add(b.background.data_ptr())
        del b
    assert kept not in seen
    assert len(seen) < len(loader)  # released buffers came back
    del view


def test_abandoned_dali_epoch_does_not_leak_into_the_next(store_path):
    loader = Loader(store_path, batch_size=4, rain=None, mode="dali", workers=1, seed=2)
    try:
        it = loader.epoch(0)
        next(it)
        it.close()  # stop after one batch; DALI has prefetched more
        got = _order(list(loader.epoch(1)))
        want = _order(_epoch(store_path, batch_size=4, mode="resident", seed=2, epoch=1))
        np.testing.assert_array_equal(got, want)
    finally:
        loader.close()


def test_one_dali_epoch_at_a_time(store_path):
    loader = Loader(store_path, batch_size=4, rain=None, mode="dali")
    try:
        first = loader.epoch(0)
        next(first)
        with pytest.raises(RuntimeError, match="still being iterated"):
            next(loader.epoch(1))
        assert 1 + len(list(first)) == len(loader)  # the refused call left the epoch in progress intact
        assert len(list(loader.epoch(1))) == len(loader)
    finally:
        loader.close()


# ---- subsets and stores as arguments ----------------------------------------------------------------------------

def test_subset_objects_paths_and_store_objects(store_path, tmp_path):
    from engine.data.select import Subset
    from engine.data.store import open_store

    store = open_store(store_path)
    idx = np.array([1, 5, 9, 30, 44], dtype=np.int64)
    sub = Subset(indices=idx, query={}, seed=0, store_path=store_path, store_fingerprint=store.fingerprint)
    sub.save(tmp_path / "sub.json")
    want = _order(_epoch(store_path, subset=idx, batch_size=2, mode="resident"))
    for s in (sub, tmp_path / "sub.json", str(tmp_path / "sub.json"), torch.from_numpy(idx)):
        np.testing.assert_array_equal(_order(_epoch(store, subset=s, batch_size=2, mode="resident")), want)


def test_subset_of_another_store_is_refused(store_path, other_store_path):
    from engine.data.select import Subset, SubsetError
    from engine.data.store import open_store

    other = open_store(other_store_path)
    sub = Subset(indices=np.arange(3), query={}, seed=0, store_path=other_store_path,
                 store_fingerprint=other.fingerprint)
    with pytest.raises(SubsetError, match="fingerprint"):
        Loader(store_path, subset=sub, rain=None)


def test_batches_function_reuses_its_loader(store_path):
    L.clear_cache()
    a = _order(list(L.batches(store_path, batch_size=6, rain=None, seed=4, epoch=1, mode="resident")))
    assert len(L.cached_loaders()) == 1
    loader = L.cached_loaders()[0]
    resident = loader.resident
    b = _order(list(L.batches(store_path, batch_size=6, rain=None, seed=4, epoch=2, mode="resident")))
    assert len(L.cached_loaders()) == 1 and loader.resident is resident  # loaded once
    np.testing.assert_array_equal(a, _reference_order(np.arange(N), 4, 1))
    np.testing.assert_array_equal(b, _reference_order(np.arange(N), 4, 2))
    L.clear_cache()
    assert not L.cached_loaders()


class _ReturningStore:
    """A store whose ``read(index)`` takes no ``out`` buffer and returns the patches (as another store type may),
    converted to ``dtype``."""

    def __init__(self, path: str, dtype=np.uint8) -> None:
        from engine.data.store import open_store

        self._store = open_store(path)
        self.count, self.patch_size, self.dtype = self._store.count, self._store.patch_size, dtype

    def read(self, index):
        return self._store.read(index).astype(self.dtype)


def test_stores_without_read_out_are_checked_and_copied(store_path):
    kw = dict(batch_size=7, rain="medium", seed=3, epoch=1)
    want = _epoch(store_path, mode="resident", **kw)
    for mode in ("resident", "dali"):
        _assert_same_batches(want, _epoch(_ReturningStore(store_path), mode=mode, **kw))
    with pytest.raises(LoaderError, match=r"store: read\(\): expected dtype uint8"):
        _epoch(_ReturningStore(store_path, np.float32), mode="resident")


# ---- mode choice -------------------------------------------------------------------------------------------------

def test_auto_mode_follows_the_memory_budget(store_path, monkeypatch):
    subset_bytes = 10 * P * P * 3
    small = Loader(store_path, subset=np.arange(10), rain=None, mode="auto", memory_budget=subset_bytes)
    big = Loader(store_path, subset=np.arange(10), rain=None, mode="auto", memory_budget=subset_bytes - 1)
    assert small.mode == "resident" and big.mode == "dali"
    assert "resident" in small.note and "dali" in big.note
    import engine.loader.dali as LD

    monkeypatch.setattr(LD, "dali_problem", lambda: "NVIDIA DALI is not importable (test)")
    with pytest.warns(RuntimeWarning, match="falling back to resident"):
        fallback = Loader(store_path, subset=np.arange(10), rain=None, mode="auto", memory_budget=0)
    assert fallback.mode == "resident" and "falling back" in fallback.note and "not importable" in fallback.note
    with pytest.raises(LoaderError, match="mode: 'dali' cannot run: NVIDIA DALI is not importable"):
        Loader(store_path, rain=None, mode="dali")


# ---- output dtypes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "uint8"])
def test_output_dtypes_are_the_float32_batch_cast(store_path, store_patches, dtype):
    """Every mode gives the same batches for each dtype; the 16-bit floats equal the float32 batch rounded by torch
    (nearest even); uint8 holds the store patches and the direct synthesis output themselves (independent of the
    float path), and ``to_unit`` turns them back into the float32 batch exactly."""
    from engine.synth import synthesize

    kw = dict(subset=np.arange(2, 41), batch_size=8, rain="medium", seed=5, epoch=3)
    f32 = _epoch(store_path, mode="resident", **kw)
    res = _epoch(store_path, mode="resident", dtype=dtype, **kw)
    _assert_same_batches(res, _epoch(store_path, mode="dali", workers=0, dtype=dtype, **kw))
    want_dtype = getattr(torch, dtype)
    for a, b in zip(f32, res):
        assert torch.equal(a.index, b.index) and torch.equal(a.mask, b.mask)
        for f in ("background", "rainy", "rain"):
            x, y = getattr(a, f), getattr(b, f)
            assert y.dtype == want_dtype and y.shape == x.shape and y.is_contiguous(), f
            if dtype == "uint8":
                assert torch.equal(L.to_unit(y), x), f
                assert torch.equal(L.to_unit(y, "float16"), x.to(torch.float16)), f
            else:
                assert torch.equal(y, x.to(want_dtype)), f
        if dtype == "uint8":
            idx = b.index.numpy()
            bg = store_patches[idx]
            ref = synthesize(bg.copy(), "medium", seed=5, keys=np.array([3 * 2**40 + int(i) for i in idx]))
            np.testing.assert_array_equal(b.background.numpy(), bg.transpose(0, 3, 1, 2))
            np.testing.assert_array_equal(b.rainy.numpy(), np.asarray(ref.rainy).transpose(0, 3, 1, 2))
            np.testing.assert_array_equal(b.rain.numpy(), np.asarray(ref.rain)[:, None])
    assert any(b.mask.any() for b in res)


def test_uint8_rain_layers_are_not_overwritten_by_later_batches(store_path):
    """With uint8 output the rain layer is synthesized straight into the batch's buffer: batches the caller keeps
    must still hold their own rain (compared with a float32 run, whose rain is a separate copy)."""
    kw = dict(batch_size=6, rain="large", seed=2, epoch=1, mode="resident")
    held = _epoch(store_path, dtype="uint8", **kw)
    ptrs = [t.data_ptr() for b in held for t in (b.background, b.rainy, b.rain, b.mask)]
    assert len(set(ptrs)) == len(ptrs)
    for a, b in zip(_epoch(store_path, **kw), held):
        assert torch.equal(L.to_unit(b.rain), a.rain) and b.rain.is_contiguous()
    assert any(b.rain.any() for b in held)


def _every_value_batch() -> torch.Tensor:
    """uint8 [1, 16, 16, 3] NHWC holding every value 0..255 in each channel (channel c shifted by 85 * c)."""
    v = (np.arange(256)[:, None] + 85 * np.arange(3)) % 256
    return torch.from_numpy(v.astype(np.uint8).reshape(1, 16, 16, 3))


_BITS = {"float32": torch.int32, "bfloat16": torch.int16, "float16": torch.int16, "uint8": torch.uint8}


def _torch_conversion(nchw: torch.Tensor, dtype: str) -> torch.Tensor:
    """torch's own conversion of uint8 ``nchw``: float32 v / 255 (IEEE quotient) rounded by ``Tensor.to``."""
    return nchw.clone() if dtype == "uint8" else (nchw.to(torch.float32) / 255).to(getattr(torch, dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "uint8"])
def test_every_uint8_value_converts_like_torch(dtype):
    """Each uint8 value v, through the CPU kernels (``finish_batch``) and through ``to_unit``, against torch's own
    conversion, compared bit for bit (a last-place rounding difference fails); the 16-bit references are checked
    against round-to-nearest-even by hand (bfloat16: bit arithmetic on the float32 pattern; float16: numpy)."""
    u8 = _every_value_batch()
    nchw = u8.permute(0, 3, 1, 2)
    want = _torch_conversion(nchw, dtype)
    bits = _BITS[dtype]
    b = L.finish_batch(u8, np.array([7]), None, seed=0, epoch=0, step=0, dtype=dtype)
    for got in (b.background, b.rainy, L.to_unit(nchw, dtype)):
        assert got.dtype == want.dtype and got.shape == (1, 3, 16, 16) and got.is_contiguous()
        assert torch.equal(got.view(bits), want.view(bits))
    f32 = np.arange(256, dtype=np.float32) / np.float32(255)
    every = _torch_conversion(torch.arange(256, dtype=torch.uint8), dtype)
    if dtype == "bfloat16":
        u = f32.view(np.uint32).astype(np.uint64)
        rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        np.testing.assert_array_equal(every.view(torch.int16).numpy().view(np.uint16), rne)
    elif dtype == "float16":
        np.testing.assert_array_equal(every.numpy(), f32.astype(np.float16))
    elif dtype == "float32":
        np.testing.assert_array_equal(every.numpy(), f32)


def test_to_unit_refuses_float_input():
    with pytest.raises(LoaderError, match="x: expected a uint8 torch tensor"):
        L.to_unit(torch.zeros(2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "uint8"])
def test_every_uint8_value_converts_like_torch_on_the_gpu(dtype):
    """The GPU conversion (``finish_batch`` on a CUDA batch, ``to_unit``) gives torch's CPU values bit for bit."""
    u8 = _every_value_batch()
    nchw = u8.permute(0, 3, 1, 2)
    want = _torch_conversion(nchw, dtype)
    bits = _BITS[dtype]
    b = L.finish_batch(u8.cuda(), np.array([7]), None, seed=0, epoch=0, step=0, dtype=dtype)
    for got in (b.background, b.rainy, L.to_unit(nchw.cuda(), dtype)):
        assert got.is_cuda and torch.equal(got.cpu().view(bits), want.view(bits))


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_no_rain_in_every_dtype(store_path, store_patches, dtype):
    for b in _epoch(store_path, batch_size=20, rain=None, mode="resident", dtype=dtype):
        assert b.background.dtype == getattr(torch, dtype)
        assert torch.equal(b.rainy, b.background) and not b.mask.any() and not b.rain.any()
        scale = 1 if dtype == "uint8" else 255
        np.testing.assert_array_equal(np.rint(b.background.float().numpy() * scale),
                                      store_patches[b.index.numpy()].transpose(0, 3, 1, 2))


def test_batches_function_passes_dtype(store_path):
    got = list(L.batches(store_path, batch_size=16, rain=None, mode="resident", dtype=torch.bfloat16))
    assert all(b.background.dtype == torch.bfloat16 for b in got)
    L.clear_cache()


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size: expected an integer >= 1"),
    (dict(batch_size=2.5), "batch_size: expected an integer"),
    (dict(shard_id=2, num_shards=2), r"shard_id: expected an integer in 0\.\.1"),
    (dict(shard_id=-1), "shard_id"),
    (dict(num_shards=0), "num_shards"),
    (dict(mode="fast"), "mode: expected one of auto, resident, dali"),
    (dict(device="tpu"), "device: expected 'cpu', 'cuda' or 'cuda:N'"),
    (dict(rain="drizzle"), "rain: unknown rain preset 'drizzle'"),
    (dict(rain=3), "rain: expected a RainSpec"),
    (dict(subset=np.array([0, 45])), r"subset: store indices must lie in 0\.\.44"),
    (dict(subset=np.array([-1, 2])), "subset: store indices must lie"),
    (dict(subset=np.array([1, 1])), "subset: holds duplicate"),
    (dict(subset=np.array([], dtype=np.int64)), "subset: is empty"),
    (dict(subset=np.array([0.5])), "subset: expected integer"),
    (dict(subset=np.zeros((2, 2), dtype=np.int64)), "subset: expected a 1-d"),
    (dict(dtype="float64"), "dtype: expected one of float32, bfloat16, float16, uint8"),
    (dict(dtype=torch.int32), "dtype: expected one of"),
])
def test_bad_arguments_raise_clear_errors(store_path, kwargs, match):
    kwargs.setdefault("rain", None)
    with pytest.raises(LoaderError, match=match):
        Loader(store_path, **kwargs)


def test_bad_epoch_store_and_cuda(store_path, tmp_path):
    loader = Loader(store_path, rain=None, mode="resident")
    with pytest.raises(LoaderError, match="epoch: expected an integer in 0"):
        loader.epoch(-1)
    from engine.data.store import StoreError

    with pytest.raises(StoreError):
        Loader(tmp_path / "nothing-here", rain=None)
    with pytest.raises(LoaderError, match="store: expected a store path"):
        Loader(42, rain=None)
    if not torch.cuda.is_available():
        with pytest.raises(LoaderError, match="no CUDA GPU"):
            Loader(store_path, rain=None, device="cuda")


# ---- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_modes_match_cpu(store_path):
    kw = dict(batch_size=8, rain="medium", seed=1, epoch=2)
    cpu = _epoch(store_path, mode="resident", device="cpu", **kw)
    for mode in ("resident", "dali"):
        gpu = _epoch(store_path, mode=mode, device="cuda", **kw)
        assert all(b.background.is_cuda and b.rainy.is_cuda and b.rain.is_cuda and b.mask.is_cuda for b in gpu)
        _assert_same_batches(cpu, gpu)
    for dtype in ("bfloat16", "float16", "uint8"):  # the device conversion gives the host kernel's values
        cpu = _epoch(store_path, mode="resident", device="cpu", dtype=dtype, **kw)
        _assert_same_batches(cpu, _epoch(store_path, mode="dali", device="cuda", dtype=dtype, **kw))


@pytest.mark.parametrize("views", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dali_batches_read_by_several_threads(store_path, store_patches, threads, views, monkeypatch):
    # views: the source hands DALI views into the chunk files' memory maps; without them it reads into a ring of
    # buffers, each batch of 40 split over the read threads (>= BatchSource.MIN_PER_THREAD patches each). A
    # stale, overlapping or early-recycled part would show against plain zarr reads
    import engine.loader.dali as D

    monkeypatch.setattr(D, "VIEWS", views)
    kw = dict(batch_size=40, seed=2, epoch=1, threads=threads)
    for b in _epoch(store_path, mode="dali", rain=None, **kw):
        expect = store_patches[b.index.numpy()].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(b.background.numpy(), expect)
    _assert_same_batches(_epoch(store_path, mode="resident", rain="medium", **kw),
                         _epoch(store_path, mode="dali", rain="medium", **kw))


@pytest.mark.parametrize("ahead, views, workers", [(True, True, 0), (True, False, 0), (False, True, 0),
                                                   (False, False, 0), (True, True, 1)])
def test_dali_batch_untouched_while_the_next_is_scheduled(store_path, store_patches, views, ahead, workers,
                                                         monkeypatch):
    # DaliReader.epoch schedules the next DALI iteration on a helper thread while the caller holds a batch (a view
    # of DALI's buffer on the CPU): holding it a while, then comparing it with plain zarr reads, would show a buffer
    # that the read-ahead (or a worker's ring) recycled too early
    import time

    import engine.loader.dali as D
    from engine.data.store import open_store

    monkeypatch.setattr(D, "VIEWS", views)
    monkeypatch.setattr(D, "FEED_AHEAD", ahead)
    store = open_store(store_path)
    # workers=1: the source runs in a DALI worker process, which copies views into dense ring slots
    reader = D.DaliReader(store, batch_size=5, device=torch.device("cpu"), prefetch=2, workers=workers)
    try:
        plan = [np.arange(k, k + 5) * 7 % N for k in range(0, 40, 5)]
        got = []
        for u8, idx in reader.epoch(plan):
            time.sleep(0.02)  # the helper has long finished scheduling the next iteration
            np.testing.assert_array_equal(u8.numpy(), store_patches[idx])
            got.append(idx)
        assert [g.tolist() for g in got] == [p.tolist() for p in plan]
    finally:
        reader.close()


def test_dali_read_error_reaches_the_caller(tmp_path):
    # a chunk file damaged after the store was written is found by the source on DALI's feed thread; the error must
    # surface in the caller's loop (naming the store), and the loader must be usable for a new epoch afterwards
    from engine.data.store import StoreError, write_store

    patches = np.random.default_rng(3).integers(0, 256, size=(24, P, P, 3), dtype=np.uint8)
    path = tmp_path / "store"
    write_store(path, patches, sharpness=np.zeros(24), complexity=np.zeros(24), chunk_patches=8)
    chunk = sorted(p for p in (path / "patches").rglob("*") if p.is_file() and p.name != "zarr.json")[-1]
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated: the last chunk file's patches are gone
    with Loader(str(path), batch_size=4, rain=None, mode="dali") as ld:
        with pytest.raises(StoreError, match="truncated"):
            for _ in ld.epoch(0):
                pass
        with pytest.raises(StoreError, match="truncated"):
            list(ld.epoch(1))


def test_resident_cpu_batches_read_rows_in_place(store_path, store_patches):
    # the CPU resident path hands the whole resident array plus row numbers to the kernels (no gathered copy):
    # backgrounds must still be the batch's own patches, for every batch of several epochs
    with Loader(store_path, subset=np.arange(5, 45, 3), batch_size=6, rain="small", mode="resident") as ld:
        for e in range(3):
            for b in ld.epoch(e):
                expect = store_patches[b.index.numpy()].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
                np.testing.assert_array_equal(b.background.numpy(), expect)


def test_dali_ring_survives_abandoned_epochs(store_path, store_patches, monkeypatch):
    # an epoch left after its first batch leaves prefetched ring slots behind; the next epochs must not receive them
    import engine.loader.dali as D

    monkeypatch.setattr(D, "VIEWS", False)
    with Loader(store_path, batch_size=5, rain=None, mode="dali", seed=4) as ld:
        for e in range(3):
            it = ld.epoch(e)
            next(it)
            it.close()
            batches = list(ld.epoch(e + 10))
            assert [b.index.numpy().tolist() for b in batches] == [p.tolist() for p in ld.plan(e + 10)]
            for b in batches:
                expect = store_patches[b.index.numpy()].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
                np.testing.assert_array_equal(b.background.numpy(), expect)
