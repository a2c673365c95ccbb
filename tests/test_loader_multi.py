"""engine.loader.multi and multi_steps: K streams in one batch, checked stream by stream against the single-stream
loader (``engine.loader.Loader`` / ``engine.loader.steps.TrainingStream``) as the reference, byte for byte."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.loader import Loader, LoaderError, MultiLoader, Stream, multi_batches
from engine.loader.multi import order_by_rain
from engine.loader.multi_render import finish_streams_device, rain_runs, render_streams_device
from engine.loader.multi_steps import MultiTrainingStream
from engine.loader.steps import Position, TrainingStream
from engine.rain import RainSpec

P = 16
N = 45


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    from engine.data.store import write_store

    rng = np.random.default_rng(11)
    patches = rng.integers(0, 256, size=(N, P, P, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("loader_multi") / "store"
    write_store(path, patches, sharpness=np.zeros(N), complexity=np.zeros(N), chunk_patches=8)
    return str(path)


def _subset(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(N, size=n, replace=False).astype(np.int64)


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (bfloat16 has no numpy type): what "byte for byte" compares."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    np.testing.assert_array_equal(_bytes(a), _bytes(b))


def _reference(store_path, stream: Stream, batch_size: int, epoch: int, **kw) -> list:
    with Loader(store_path, stream.subset, batch_size, stream.rain, stream.seed, **kw) as loader:
        return list(loader.epoch(epoch))


def _check_against_single(store_path, streams, batch_size, epochs, got, **kw) -> None:
    refs = [_reference(store_path, s, batch_size, e, **kw) for s, e in zip(streams, epochs)]
    assert len(got) == min(len(r) for r in refs)
    for step, mb in enumerate(got):
        assert len(mb) == len(streams) and mb.step == step
        for k, ref in enumerate(refs):
            one = mb.stream(k)
            np.testing.assert_array_equal(one.index.numpy(), ref[step].index.numpy())
            for name in ("background", "rainy", "rain", "mask"):
                _same(getattr(one, name), getattr(ref[step], name))


# ---- multi_batches against the single-stream loader ----------------------------------------------------------------

STREAMS3 = [  # different subsets, sizes (two smaller than a 2-batch epoch), rain (one held-out family) and seeds
    dict(n=20, rain="small", seed=0),
    dict(n=13, rain="heldout-layered", seed=5),
    dict(n=9, rain="medium", seed=11),
]


def _streams(spec: list[dict]) -> list[Stream]:
    return [Stream(_subset(100 + i, d["n"]), d["rain"], d["seed"]) for i, d in enumerate(spec)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
@pytest.mark.parametrize("k", [1, 3])
def test_multi_batches_equal_single_stream_batches(store_path, k, dtype):
    streams = _streams(STREAMS3[:k])
    epochs = [2, 0, 7][:k]  # one epoch per stream
    got = list(multi_batches(store_path, streams, batch_size=4, epoch=epochs, mode="resident", dtype=dtype,
                             drop_last=True))
    assert got and got[0].background.shape == (k, 4, 3, P, P) and got[0].rain.shape == (k, 4, 1, P, P)
    assert got[0].index.shape == (k, 4) and got[0].mask.dtype == torch.bool
    _check_against_single(store_path, streams, 4, epochs, got, mode="resident", dtype=dtype, drop_last=True)


def test_dali_mode_equals_single_stream_and_resident(store_path):
    pytest.importorskip("nvidia.dali")
    streams = _streams(STREAMS3)
    epochs = [1, 3, 0]
    with MultiLoader(store_path, streams, mode="dali", dtype="bfloat16") as loader:
        loader.DALI_CHUNK_STEPS = 1  # several DALI epochs within one loader epoch
        got = list(loader.epoch(4, epochs, drop_last=True))
    _check_against_single(store_path, streams, 4, epochs, got, mode="resident", dtype="bfloat16", drop_last=True)


def test_equal_subset_sizes_keep_the_partial_last_batch_and_no_rain(store_path):
    streams = [Stream(_subset(1, 10), None, 3), Stream(_subset(2, 10), "small", 3), Stream(_subset(3, 10), None, 4)]
    got = list(multi_batches(store_path, streams, batch_size=4, epoch=1, mode="resident"))
    assert [mb.background.shape[1] for mb in got] == [4, 4, 2]
    _check_against_single(store_path, streams, 4, [1, 1, 1], got, mode="resident")
    assert not got[0].mask[0].any() and torch.equal(got[0].rainy[0], got[0].background[0])


def test_unequal_batch_sizes_at_a_step_are_refused(store_path):
    streams = [Stream(_subset(1, 10), "small"), Stream(_subset(2, 9), "small")]
    with pytest.raises(LoaderError, match="drop_last"):
        multi_batches(store_path, streams, batch_size=4, mode="resident")


# ---- one pass: renderer calls and the resident union -----------------------------------------------------------------

def test_one_renderer_call_per_run_of_equal_specs(store_path):
    subsets = [_subset(i, 8) for i in range(4)]
    rains = ["small", "medium", "small", "small"]
    assert rain_runs([RainSpec.parse(r) for r in rains]) == [
        (0, 1, RainSpec.parse("small")), (1, 2, RainSpec.parse("medium")), (2, 4, RainSpec.parse("small"))]
    streams = [Stream(s, r, seed) for seed, (s, r) in enumerate(zip(subsets, rains))]
    with MultiLoader(store_path, streams, mode="resident") as loader:
        next(iter(loader.epoch(8)))
        assert loader.calls == 3
    order = order_by_rain(streams)
    assert order == [0, 2, 3, 1]
    ordered = [streams[i] for i in order]
    with MultiLoader(store_path, ordered, mode="resident") as loader:
        mb = next(iter(loader.epoch(8)))
        assert loader.calls == 2  # K streams of one spec, with different seeds: one call
    _check_against_single(store_path, ordered, 8, [0] * 4, [mb], mode="resident")


def test_resident_mode_holds_the_union_once(store_path):
    a, b = _subset(5, 30), _subset(6, 30)  # overlapping subsets of a 45-patch store
    union = np.union1d(a, b)
    streams = [Stream(a, "small", 0), Stream(b, "small", 1), Stream(a, "medium", 2)]
    with MultiLoader(store_path, streams, mode="resident") as loader:
        next(iter(loader.epoch(4)))
        data = loader.resident.data
        np.testing.assert_array_equal(loader.resident.sorted, union)
        assert data.nbytes == union.size * P * P * 3 == loader.union_nbytes
        assert loader.union_nbytes < sum(s.size for s in (a, b, a)) * P * P * 3


# ---- training steps against TrainingStream -----------------------------------------------------------------------

TRAIN = [dict(n=5, rain="small", seed=1),           # smaller than the batch: glues 2 loader epochs per step
         dict(n=11, rain="heldout-sparse", seed=2),  # one step per epoch
         dict(n=20, rain="medium", seed=3)]          # two steps per epoch


def _single_steps(store_path, stream: Stream, batch: int, count: int, start=Position()) -> list:
    ts = TrainingStream(store_path, stream.subset, batch, rain=stream.rain, seed=stream.seed, mode="resident")
    it = ts.steps(start)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("mode", ["resident", "dali"])
def test_training_steps_equal_training_streams(store_path, mode):
    if mode == "dali":
        pytest.importorskip("nvidia.dali")
    streams = _streams(TRAIN)
    steps = 5  # crosses several epoch boundaries, at different steps per stream
    mts = MultiTrainingStream(store_path, streams, 8, mode=mode)
    mts.loader.DALI_CHUNK_STEPS = 2
    assert mts.loader_epochs_per_step == [2, 1, 1] and mts.steps_per_epoch == [1, 1, 2]
    it = iter(mts)
    got = [next(it) for _ in range(steps)]
    it.close()
    for k, s in enumerate(streams):
        ref = _single_steps(store_path, s, 8, steps)
        for g, r in zip(got, ref):
            assert g.rainy.shape == (3, 8, 3, P, P)
            _same(g.rainy[k], r.rainy)
            _same(g.clean[k], r.clean)
            assert g.positions[k] == r.position
    assert [g.positions[2] for g in got[:3]] == [Position(0, 1), Position(1, 0), Position(1, 1)]
    mts.close()


def test_resume_from_positions_equals_uninterrupted(store_path):
    streams = _streams(TRAIN)
    mts = MultiTrainingStream(store_path, streams, 8, mode="resident")
    it = mts.steps()
    whole = [next(it) for _ in range(5)]
    resumed = MultiTrainingStream(store_path, streams, 8, mode="resident", positions=whole[2].positions).steps()
    for expected in whole[3:]:
        got = next(resumed)
        _same(got.rainy, expected.rainy)
        _same(got.clean, expected.clean)
        assert got.positions == expected.positions


def test_training_stream_dtype(store_path):
    streams = _streams(TRAIN[:2])
    got = next(iter(MultiTrainingStream(store_path, streams, 8, mode="resident", dtype="uint8")))
    ref = next(iter(MultiTrainingStream(store_path, streams, 8, mode="resident")))
    assert got.rainy.dtype == torch.uint8
    _same(ref.rainy, got.rainy.float() / 255)  # the CPU's IEEE division: exactly the float32 batch


# ---- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("streams, match", [
    ([], r"K = 0"),
    ([Stream(np.arange(4), "small"), Stream(np.zeros(0, np.int64), "small")], r"streams\[1\]\.subset: is empty"),
    ([Stream(np.array([0, N]), "small")], r"streams\[0\]\.subset: store indices must lie in 0\.\.44"),
    ([Stream(np.arange(4), "drizzle")], r"streams\[0\]\.rain"),
    (Stream(np.arange(4)), r"sequence of engine.loader.Stream"),
    ([np.arange(4)], r"streams\[0\]: expected an engine.loader.Stream"),
])
def test_bad_streams_raise_clear_errors(store_path, streams, match):
    with pytest.raises(LoaderError, match=match):
        MultiLoader(store_path, streams)


def test_bad_devices_epochs_and_positions(store_path):
    streams = [Stream(np.arange(10), "small", 0), Stream(np.arange(10, 20), "small", 1)]
    with pytest.raises(LoaderError, match="one device for all streams"):
        MultiLoader(store_path, streams, device=["cpu", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(LoaderError, match="no CUDA GPU"):
            MultiLoader(store_path, streams, device="cuda")
    with pytest.raises(LoaderError, match="2 epochs"):
        multi_batches(store_path, streams, 4, epoch=[0, 1, 2])
    with pytest.raises(LoaderError, match="positions: expected 2"):
        MultiTrainingStream(store_path, streams, 4, positions=[Position()])
    with pytest.raises(LoaderError, match=r"positions\[1\]: expected epoch >= 0 and offset in 0\.\.1"):
        MultiTrainingStream(store_path, streams, 4, positions=[Position(), Position(0, 2)])


# ---- the GPU path --------------------------------------------------------------------------------------------------

def test_device_rendering_equals_single_stream_synthesis(rng):
    """``render_streams_device`` (numba.cuda kernels, under the CUDA simulator in CI) gives each stream the
    rain that ``engine.synth.synthesize`` gives that stream alone on the CPU."""
    from engine.synth import synthesize

    b = 2
    specs = [RainSpec.parse("small"), RainSpec.parse("small"), None]
    seeds = [3, 8, 1]
    keys = np.array([[5, 9], [(1 << 40) | 5, 2], [0, 1]], dtype=np.int64)
    x = rng.integers(0, 256, size=(3 * b, P, P, 3), dtype=np.uint8)
    rain = np.empty((3 * b, P, P), np.uint8)
    rainy = np.empty((3 * b, P, P, 3), np.uint8)
    mask = np.empty((3 * b, P, P), np.bool_)
    assert render_streams_device(x, specs, seeds, keys, rain, rainy, mask) == 2
    for k, (spec, seed) in enumerate(zip(specs, seeds)):
        rows = slice(k * b, (k + 1) * b)
        if spec is None:
            np.testing.assert_array_equal(rainy[rows], x[rows])
            assert not rain[rows].any() and not mask[rows].any()
            continue
        ref = synthesize(x[rows], spec, seed=seed, keys=keys[k], backend="cpu")
        np.testing.assert_array_equal(rain[rows], ref.rain)
        np.testing.assert_array_equal(rainy[rows], ref.rainy)
        np.testing.assert_array_equal(mask[rows], ref.mask)


@pytest.mark.gpu
def test_gpu_multi_batches_match_cpu(store_path):
    streams = _streams(STREAMS3)
    for dtype in ("float32", "bfloat16", "uint8"):
        cpu = list(multi_batches(store_path, streams, 4, epoch=[1, 2, 3], mode="resident", dtype=dtype,
                                 drop_last=True))
        for mode in ("resident", "dali"):
            gpu = list(multi_batches(store_path, streams, 4, epoch=[1, 2, 3], mode=mode, dtype=dtype,
                                     drop_last=True, device="cuda"))
            assert len(gpu) == len(cpu) and gpu[0].rainy.is_cuda and gpu[0].mask.is_cuda
            for c, g in zip(cpu, gpu):
                for name in ("background", "rainy", "rain", "mask"):
                    _same(getattr(c, name), getattr(g, name))


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_device_path_equals_host_path(store_path, dtype):
    """The device path end to end (rendering, NHWC -> NCHW, table conversion, [K, B] views) on CPU tensors, its
    kernels in the CUDA simulator: the host path's batch."""
    streams = [Stream(np.arange(0, 4), "small", 2), Stream(np.arange(4, 8), None, 5),
               Stream(np.arange(8, 12), "small", 9)]
    with MultiLoader(store_path, streams, mode="resident", dtype=dtype) as loader:
        host = next(iter(loader.epoch(1, epoch=[3, 0, 1])))
        x = torch.from_numpy(loader.resident.data[loader.resident.rows(host.index.numpy().reshape(-1))])
    keys = np.stack([(np.int64(e) << 40) | row for e, row in zip([3, 0, 1], host.index.numpy())])
    dev = finish_streams_device(x, loader.specs, loader.seeds, host.index.numpy(), keys, dtype)
    for name in ("background", "rainy", "rain", "mask"):
        _same(getattr(dev, name), getattr(host, name))
