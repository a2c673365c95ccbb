"""Training steps from loader epochs: each rank's batch of every step, sharded, with a resumable position.

A trainer counts in *steps* of ``global_batch`` patches, split evenly over ``world`` data-parallel ranks
(``global_batch / world`` patches each). A *trainer epoch* is one pass over the subset as the loader
(``engine.loader.batches``) deals it out:

- Subset at least as large as the global batch (``loader_epochs_per_step == 1``): the loader's epoch ``e`` is cut
  into batches of ``global_batch / world`` with ``drop_last``; batch ``b`` goes to rank ``b % world``, so at every
  step the ranks together hold ``global_batch`` consecutive patches of the epoch's order. An epoch has
  ``(n // per_rank) // world`` steps (the left-over patches are dropped, so every rank takes the same number of steps).
- Subset smaller than the global batch (e.g. 8 backgrounds at batch 16): one step glues
  ``k = ceil(global_batch / n)`` whole loader epochs ``e * k .. e * k + k - 1`` end to end and rank ``r`` takes rows
  ``r * per_rank .. (r + 1) * per_rank - 1`` of the first ``global_batch`` of them. A repeated patch gets fresh rain,
  since the rain key holds the loader epoch. A trainer epoch is then one step.

Every batch is a pure function of ``(seed, loader epoch)`` (see ``engine.loader``), so a stream started at
``Position(epoch, offset)`` yields exactly what an uninterrupted stream yields from that point: resuming skips the
first ``offset`` steps of the epoch (computing and dropping them), which costs at most one epoch's batches.

Tensors are those of ``engine.loader.Batch``: rainy and clean images float32 NCHW on the 0..1 scale on ``device``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from engine.loader import LoaderError, batches


def step_layout(n: int, global_batch: int, world: int = 1) -> tuple[int, int]:
    """``(loader epochs glued into one step, steps per trainer epoch)`` for a subset of ``n`` patches split over
    ``world`` ranks at ``global_batch`` patches per step (module docstring)."""
    if n >= global_batch:
        return 1, (n // (global_batch // world)) // world
    return math.ceil(global_batch / n), 1


def check_start(start: "Position", steps_per_epoch: int, name: str = "start") -> None:
    """Raise ``LoaderError`` unless ``start`` lies inside an epoch of ``steps_per_epoch`` steps."""
    if start.epoch < 0 or not 0 <= start.offset < steps_per_epoch:
        raise LoaderError(f"{name}: expected epoch >= 0 and offset in 0..{steps_per_epoch - 1}, got {start}")


@dataclass(frozen=True)
class Position:
    """Where a stream stands: the next step is step ``offset`` (0-based) of trainer epoch ``epoch``."""

    epoch: int = 0
    offset: int = 0


class Step(NamedTuple):
    """One training step of one rank.

    Attributes
    ----------
    rainy, clean : torch.Tensor
        float32 NCHW [global_batch / world, 3, P, P] on the 0..1 scale, on the stream's device: the input with
        synthetic rain and its rain-free background.
    position : Position
        The position after this step, i.e. of the next step (what a checkpoint saves to resume after this step).
    """

    rainy: Any
    clean: Any
    position: Position


class TrainingStream:
    """Each rank's (rainy, clean) batch of every training step; see the module docstring for the layout.

    Parameters
    ----------
    store : str or PatchStore
        The patch store (uint8 patches [N, P, P, 3]); a path lets ``engine.loader.batches`` reuse its cached loader
        across in-process runs.
    indices : array of int
        Store indices of the training subset (non-empty).
    global_batch : int
        Patches per step over all ranks; a multiple of ``world``.
    rank, world : int
        This rank (0 .. world - 1) and the number of data-parallel ranks.
    rain : RainSpec, str or None
        Training rain (see ``engine.loader.batches``).
    seed : int
        Seeds the loader's shuffle and rain.
    device : str or torch.device
        Where the batches are built and returned.
    mode : str
        ``engine.loader`` mode: "auto", "resident" or "dali".

    Raises
    ------
    engine.loader.LoaderError
        On an empty subset, a batch that does not split over the ranks, a bad rank, mode or device (the loader is
        opened here, without reading a patch, so bad arguments fail before training starts).
    """

    def __init__(self, store: Any, indices: Any, global_batch: int, rank: int = 0, world: int = 1, rain: Any = "medium",
                 seed: int = 0, device: Any = "cpu", mode: str = "auto") -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or self.indices.size == 0:
            raise LoaderError(f"indices: expected a non-empty 1-D list of store indices, got shape "
                              f"{self.indices.shape}")
        if world < 1 or not 0 <= rank < world:
            raise LoaderError(f"rank {rank} of world {world}: expected world >= 1 and 0 <= rank < world")
        if global_batch < 1 or global_batch % world:
            raise LoaderError(f"global_batch: expected a positive multiple of the {world} ranks, got {global_batch}")
        self.store, self.global_batch, self.rank, self.world = store, int(global_batch), int(rank), int(world)
        self.per_rank = self.global_batch // self.world
        #: Loader epochs glued into one step (1 unless the subset is smaller than the global batch), and steps of
        #: one trainer epoch, the same on every rank.
        self.loader_epochs_per_step, self.steps_per_epoch = step_layout(int(self.indices.size), self.global_batch,
                                                                        self.world)
        self._common = dict(rain=rain, seed=seed, device=str(device), mode=mode)
        self._loader_epoch(0)  # opens (and caches) the loader: bad arguments fail here, no patch is read yet

    def _loader_epoch(self, loader_epoch: int):
        """The loader's batches of one loader epoch for this layout (a lazy iterator of ``engine.loader.Batch``)."""
        if self.loader_epochs_per_step == 1:
            return batches(self.store, subset=self.indices, batch_size=self.per_rank, epoch=loader_epoch,
                           drop_last=True, shard_id=self.rank, num_shards=self.world, **self._common)
        return batches(self.store, subset=self.indices, batch_size=int(self.indices.size), epoch=loader_epoch,
                       **self._common)

    def epoch(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """This rank's ``(rainy, clean)`` of each of the ``steps_per_epoch`` steps of trainer epoch ``epoch``."""
        k = self.loader_epochs_per_step
        if k == 1:
            for b in self._loader_epoch(epoch):
                yield b.rainy, b.background
            return
        parts = [next(iter(self._loader_epoch(epoch * k + j))) for j in range(k)]
        rows = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        yield torch.cat([p.rainy for p in parts])[rows], torch.cat([p.background for p in parts])[rows]

    def steps(self, start: Position = Position()) -> Iterator[Step]:
        """Every step from ``start`` on, without end: ``Step(rainy, clean, position after the step)``.

        Raises ``LoaderError`` when ``start.offset`` is not inside an epoch (0 .. steps_per_epoch - 1).
        """
        check_start(start, self.steps_per_epoch)
        epoch, skip = start.epoch, start.offset
        while True:
            for offset, (rainy, clean) in enumerate(self.epoch(epoch)):
                if offset < skip:
                    continue
                done = offset + 1 == self.steps_per_epoch
                yield Step(rainy, clean, Position(epoch + 1, 0) if done else Position(epoch, offset + 1))
            epoch, skip = epoch + 1, 0


def training_steps(store: Any, indices: Any, global_batch: int, rank: int = 0, world: int = 1, rain: Any = "medium",
                   seed: int = 0, device: Any = "cpu", mode: str = "auto", start_epoch: int = 0,
                   start_offset: int = 0) -> Iterator[Step]:
    """``TrainingStream(...).steps(Position(start_epoch, start_offset))``: every step of this rank from there on."""
    stream = TrainingStream(store, indices, global_batch, rank, world, rain=rain, seed=seed, device=device, mode=mode)
    return stream.steps(Position(start_epoch, start_offset))


__all__ = ["Position", "Step", "TrainingStream", "check_start", "step_layout", "training_steps"]
