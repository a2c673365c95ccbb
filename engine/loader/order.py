"""Which patches an epoch visits, in which order, on which shard, with which rain key: pure functions of the
subset's store indices, ``seed`` and ``epoch``, never of the loader's mode, device or shard count.

Epoch order: ``state = patch_state(seed, ~epoch)``; each store index ``i`` gets the 64-bit hash
``bits(state, counter(0, i))`` and the epoch visits the subset in increasing hash order (ties by index). The order
therefore does not depend on how the subset lists its indices. ``~epoch`` is negative, so the shuffle key never
equals a rain key (those are >= 0) and the shuffle is independent of every rain draw.

Batches and shards: the epoch's order is cut into consecutive batches of ``batch_size`` (the last one partial unless
``drop_last``). Batch ``b`` goes to shard ``b % num_shards`` (strided batches), so at every step the ``num_shards``
ranks together hold ``num_shards * batch_size`` consecutive patches of the epoch. With ``drop_last`` every shard
gets the same number of full batches, ``(n // batch_size) // num_shards``, so data-parallel ranks stay in step (the
few left-over full batches are dropped too); without it shards may differ by one batch and the last may be partial.

Rain: the patch with store index ``i`` in epoch ``e`` gets the rain key ``e << 40 | i`` (``e <= MAX_EPOCH``,
``i <= MAX_SHUFFLE_INDEX < 2**40``), which ``engine.synth.synthesize`` turns into its rain with the loader's
``seed``.
"""
from __future__ import annotations

import math

import numpy as np

from kernels.rng import bits_np, counter_np, patch_state_np

#: Epochs must fit the rain key ``epoch << 40 | index`` (a non-negative int64).
MAX_EPOCH = (1 << 23) - 1
#: The shuffle hashes ``counter(0, index)``, whose index field has 32 bits; this also keeps store indices within
#: the rain key's 40 bits.
MAX_SHUFFLE_INDEX = (1 << 32) - 1


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The subset's store indices in the visiting order of ``epoch``.

    Parameters
    ----------
    indices : array of int
        The subset's store indices (unique, 0..``MAX_SHUFFLE_INDEX``), in any order.
    seed : int
        The loader's seed (an int64).
    epoch : int
        0..``MAX_EPOCH``.

    Returns
    -------
    numpy.ndarray
        int64 [n]: ``indices`` sorted by ``bits(patch_state(seed, ~epoch), counter(0, i))``, ties by index.
    """
    indices = np.asarray(indices, dtype=np.int64)
    state = patch_state_np(int(seed), np.asarray([~int(epoch)], dtype=np.int64))
    h = bits_np(state, counter_np(0, indices.astype(np.uint64)))
    return indices[np.lexsort((indices, h))]


def shard_batches(n: int, batch_size: int, shard_id: int, num_shards: int, drop_last: bool) -> list[tuple[int, int]]:
    """The batches shard ``shard_id`` of ``num_shards`` yields from an epoch of ``n`` patches.

    Returns
    -------
    list of (int, int)
        ``(start, stop)`` positions in the epoch order, in the order the shard yields them.
    """
    if drop_last:
        per_shard = (n // batch_size) // num_shards
        ids = [shard_id + k * num_shards for k in range(per_shard)]
    else:
        ids = list(range(shard_id, math.ceil(n / batch_size), num_shards))
    return [(b * batch_size, min((b + 1) * batch_size, n)) for b in ids]


def rain_keys(epoch: int, index: np.ndarray) -> np.ndarray:
    """int64 rain keys ``epoch << 40 | index`` of the patches with store indices ``index`` in ``epoch``."""
    return (np.int64(epoch) << np.int64(40)) | np.asarray(index, dtype=np.int64)


__all__ = ["MAX_EPOCH", "MAX_SHUFFLE_INDEX", "epoch_order", "rain_keys", "shard_batches"]
