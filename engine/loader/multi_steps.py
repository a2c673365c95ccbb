"""Training steps of K streams at once: the multi-stream counterpart of ``engine.loader.steps`` for a fused model.

Each stream keeps its own trainer epochs, exactly as ``engine.loader.steps.TrainingStream`` (one rank, world 1) lays
them out for its subset: a subset at least as large as the batch is cut into ``n // B`` full batches of its loader
epoch's order; a smaller one glues ``ceil(B / n)`` whole loader epochs per step. Stream k's slice of every step,
and its position, equal what ``TrainingStream(store, subset_k, B, rain=rain_k, seed=seed_k)`` yields at that step.
Streams of different sizes roll over to their next epoch at different steps; a stream's epoch boundary only
changes which of its patches the next step holds (no stall, no partial batch, no wait for the others).

Every step renders through ``engine.loader.multi.MultiLoader``: one gather (or one DALI batch) of the K * B patches
and one renderer call per run of consecutive streams with equal rain spec (see ``engine.loader.multi``). Resume:
``positions`` (one ``Position`` per stream, as saved from ``MultiStep.positions``) restarts every stream where it
stood; the patches skipped are not rendered (plans are pure functions of seed and epoch).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from engine.loader.api import DEFAULT_MEMORY_BUDGET
from engine.loader.args import LoaderError, check_int
from engine.loader.multi import MultiLoader, Stream
from engine.loader.order import MAX_EPOCH, epoch_order, rain_keys
from engine.loader.steps import Position, check_start, step_layout


class MultiStep(NamedTuple):
    """One training step of K streams.

    Attributes
    ----------
    rainy, clean : torch.Tensor
        [K, B, 3, P, P] (stream, batch, NCHW) of the stream's dtype (float32 0..1 by default) on its device: the
        inputs with synthetic rain and their rain-free backgrounds.
    positions : list of Position
        Each stream's position after this step (what a checkpoint saves to resume after it).
    """

    rainy: Any
    clean: Any
    positions: list


def stream_plan(indices: np.ndarray, seed: int, batch: int, start: Position) -> Iterator[tuple]:
    """One stream's ``(store indices [B], rain keys [B], position after the step)`` of every step from ``start``,
    without end, in ``TrainingStream``'s layout (world 1)."""
    glued, steps_per_epoch = step_layout(int(indices.size), batch, 1)
    epoch, skip = start.epoch, start.offset
    while True:
        if (epoch + 1) * glued - 1 > MAX_EPOCH:
            raise LoaderError(f"epoch: trainer epoch {epoch} needs loader epochs beyond {MAX_EPOCH}")
        if glued == 1:
            order = epoch_order(indices, seed, epoch)
            keys = rain_keys(epoch, order)
            for s in range(skip, steps_per_epoch):
                after = Position(epoch + 1, 0) if s + 1 == steps_per_epoch else Position(epoch, s + 1)
                yield order[s * batch:(s + 1) * batch], keys[s * batch:(s + 1) * batch], after
        else:
            orders = [epoch_order(indices, seed, epoch * glued + j) for j in range(glued)]
            keys = np.concatenate([rain_keys(epoch * glued + j, o) for j, o in enumerate(orders)])
            yield np.concatenate(orders)[:batch], keys[:batch], Position(epoch + 1, 0)
        epoch, skip = epoch + 1, 0


class MultiTrainingStream:
    """Every training step of K streams, each on its own epochs; see the module docstring.

    Parameters
    ----------
    store : str or PatchStore
        The patch store (uint8 patches [N, P, P, 3] NHWC, 0..255).
    streams : sequence of Stream
        K >= 1 streams: each run's subset (non-empty), rain and seed.
    global_batch : int
        Patches per stream per step (B; one rank).
    device : str or torch.device
        One device for all streams.
    mode : str
        "auto", "resident" (the union of the subsets held once) or "dali".
    dtype : str or torch.dtype
        Output type (``engine.loader.DTYPES``); float32 (0..1) is what ``TrainingStream`` yields.
    positions : list of Position, optional
        Where each stream starts (default ``Position()`` for all).
    memory_budget, workers, threads
        As in ``engine.loader.Loader``.

    Attributes
    ----------
    loader : MultiLoader
        The loader (``loader.mode``, ``loader.union``, ``loader.resident``).
    loader_epochs_per_step, steps_per_epoch : list of int
        Per stream, as ``TrainingStream``'s attributes.

    Raises
    ------
    engine.loader.LoaderError
        No streams, an empty subset, indices outside the store, a bad batch, mode or device, positions not one per
        stream or outside an epoch (all before any patch is read).
    """

    def __init__(self, store: Any, streams: Sequence[Stream], global_batch: int, device: Any = "cpu",
                 mode: str = "auto", dtype: Any = "float32", positions: Sequence[Position] | None = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, workers: int | None = None, threads: int = 2) -> None:
        self.global_batch = check_int("global_batch", global_batch, 1)
        self.loader = MultiLoader(store, streams, device=device, mode=mode, dtype=dtype,
                                  memory_budget=memory_budget, workers=workers, threads=threads)
        layouts = [step_layout(int(s.indices.size), self.global_batch, 1) for s in self.loader.streams]
        self.loader_epochs_per_step = [g for g, _ in layouts]
        self.steps_per_epoch = [s for _, s in layouts]
        self.positions = self._check_positions(positions)

    def __len__(self) -> int:
        """K, the number of streams."""
        return len(self.loader)

    def _check_positions(self, positions: Sequence[Position] | None) -> list[Position]:
        k = len(self.loader)
        if positions is None:
            return [Position()] * k
        positions = list(positions)
        if len(positions) != k:
            raise LoaderError(f"positions: expected {k} positions (one per stream), got {len(positions)}")
        for i, (p, spe) in enumerate(zip(positions, self.steps_per_epoch)):
            if not isinstance(p, Position):
                raise LoaderError(f"positions[{i}]: expected an engine.loader.steps.Position, got {p!r}")
            check_start(p, spe, f"positions[{i}]")
        return positions

    def steps(self, positions: Sequence[Position] | None = None) -> Iterator[MultiStep]:
        """Every step from ``positions`` (default: the constructor's) on, without end."""
        starts = self.positions if positions is None else self._check_positions(positions)
        plans = [stream_plan(s.indices, s.seed, self.global_batch, p) for s, p in zip(self.loader.streams, starts)]
        after: deque = deque()

        def plan() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            while True:
                parts = [next(p) for p in plans]
                after.append([part[2] for part in parts])
                yield np.stack([part[0] for part in parts]), np.stack([part[1] for part in parts])

        for batch in self.loader.run(plan()):
            # the loader may plan ahead (DALI chunks): positions come in step order
            yield MultiStep(batch.rainy, batch.background, after.popleft())

    def __iter__(self) -> Iterator[MultiStep]:
        return self.steps()

    def close(self) -> None:
        """Free the resident union and stop DALI."""
        self.loader.close()


__all__ = ["MultiStep", "MultiTrainingStream", "stream_plan"]
