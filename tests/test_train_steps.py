"""engine.loader.steps: the training stream's positions, the gluing of small subsets, disjoint shards, and a resumed
stream that yields exactly the batches of an uninterrupted one."""
from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.store import write_store
from engine.loader import LoaderError, epoch_order
from engine.loader.steps import Position, TrainingStream, training_steps

P = 16
N = 20
SEED = 7


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Patch ``i`` is filled with the value ``10 * i`` in every channel, so a clean batch names its store indices."""
    patches = np.repeat((np.arange(N, dtype=np.uint8) * 10)[:, None, None, None], P * P * 3, axis=1)
    path = tmp_path_factory.mktemp("steps") / "s.zarr"
    write_store(path, patches.reshape(N, P, P, 3), source=np.arange(N) % 5)
    return str(path)


def indices_of(clean: torch.Tensor) -> list[int]:
    """Store indices of a clean NCHW float32 0..1 batch of the fixture's store."""
    return [int(v) // 10 for v in (clean[:, 0, 0, 0] * 255).round().to(torch.int64)]


def stream(store: str, indices, batch: int, rank: int = 0, world: int = 1) -> TrainingStream:
    return TrainingStream(store, indices, batch, rank, world, rain="medium", seed=SEED, device="cpu", mode="resident")


def test_positions_count_steps_within_each_epoch(store: str) -> None:
    s = stream(store, np.arange(2, 16), 4)               # 14 patches, 4 per step: 3 steps, 2 patches dropped
    assert (s.steps_per_epoch, s.loader_epochs_per_step, s.per_rank) == (3, 1, 4)
    got = [step.position for step in islice(s.steps(), 7)]
    assert got == [Position(0, 1), Position(0, 2), Position(1, 0), Position(1, 1), Position(1, 2), Position(2, 0),
                   Position(2, 1)]


def test_each_step_takes_the_next_patches_of_the_epoch_order(store: str) -> None:
    idx = np.arange(2, 16)
    got = [indices_of(step.clean) for step in islice(stream(store, idx, 4).steps(), 6)]
    for e in range(2):
        order = epoch_order(idx, SEED, e).tolist()
        assert got[3 * e:3 * e + 3] == [order[0:4], order[4:8], order[8:12]]


def test_small_subsets_glue_loader_epochs_into_one_step(store: str) -> None:
    idx = np.array([3, 5, 11])                           # 3 patches at batch 8: ceil(8 / 3) = 3 loader epochs a step
    s = stream(store, idx, 8)
    assert (s.steps_per_epoch, s.loader_epochs_per_step) == (1, 3)
    steps = list(islice(s.steps(), 2))
    assert [st.position for st in steps] == [Position(1, 0), Position(2, 0)]
    for e, st in enumerate(steps):
        glued = sum((epoch_order(idx, SEED, 3 * e + j).tolist() for j in range(3)), [])
        assert indices_of(st.clean) == glued[:8]
        assert st.rainy.shape == st.clean.shape == (8, 3, P, P) and st.rainy.dtype == torch.float32
    # the same patch in two loader epochs of one step gets different rain
    first = steps[0]
    order = sum((epoch_order(idx, SEED, j).tolist() for j in range(3)), [])
    a, b = order.index(3), order.index(3, 3)
    assert not torch.equal(first.rainy[a], first.rainy[b])


@pytest.mark.parametrize("idx,batch", [(np.arange(N), 4), (np.array([1, 4, 9]), 8)])
def test_ranks_hold_disjoint_shares_of_the_single_process_step(store: str, idx: np.ndarray, batch: int) -> None:
    whole = list(islice(stream(store, idx, batch).steps(), 3))
    parts = [list(islice(stream(store, idx, batch, rank=r, world=2).steps(), 3)) for r in range(2)]
    for k in range(3):
        r0, r1 = parts[0][k], parts[1][k]
        assert r0.position == r1.position == whole[k].position
        assert r0.clean.shape[0] == r1.clean.shape[0] == batch // 2
        torch.testing.assert_close(torch.cat([r0.clean, r1.clean]), whole[k].clean, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([r0.rainy, r1.rainy]), whole[k].rainy, rtol=0, atol=0)
        if len(idx) >= batch:                             # without gluing, no patch appears twice in a step
            assert not set(indices_of(r0.clean)) & set(indices_of(r1.clean))


@pytest.mark.parametrize("start", [Position(0, 0), Position(0, 2), Position(1, 1), Position(2, 0)])
def test_a_resumed_stream_equals_the_uninterrupted_one(store: str, start: Position) -> None:
    idx = np.arange(1, 18)                               # 17 patches, 4 per step: 4 steps an epoch
    full = list(islice(stream(store, idx, 4).steps(), 12))
    skip = start.epoch * 4 + start.offset
    assert skip == 0 or full[skip - 1].position == start
    resumed = list(islice(training_steps(store, idx, 4, rain="medium", seed=SEED, device="cpu", mode="resident",
                                         start_epoch=start.epoch, start_offset=start.offset), 12 - skip))
    for a, b in zip(full[skip:], resumed, strict=True):
        assert a.position == b.position
        assert torch.equal(a.rainy, b.rainy) and torch.equal(a.clean, b.clean)


def test_bad_arguments_fail_when_the_stream_is_made(store: str) -> None:
    with pytest.raises(LoaderError, match="multiple of the 2 ranks"):
        stream(store, np.arange(8), 5, world=2)
    with pytest.raises(LoaderError, match="non-empty"):
        stream(store, np.array([], dtype=np.int64), 4)
    with pytest.raises(LoaderError, match="rank 2 of world 2"):
        stream(store, np.arange(8), 4, rank=2, world=2)
    with pytest.raises(LoaderError, match="mode"):
        TrainingStream(store, np.arange(8), 4, mode="nope")
    with pytest.raises(LoaderError, match="offset in 0..1"):
        next(stream(store, np.arange(8), 4).steps(Position(0, 2)))
