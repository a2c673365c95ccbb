"""The DALI side of the loader: an NVIDIA DALI pipeline fed by ``fn.external_source`` reading the patch store.

What keeps it fast (random patches through zarr-python decode a whole 64-patch chunk each, ~1,200 patches/s per
core):

- Batch granularity: one source call per batch returns the whole uint8 NHWC batch (a dense array, or the list of
  its patches' views), not one call per sample.
- Zero-copy reads: for a complete store the source hands DALI ``PatchStore.views``: per-patch views into memory
  maps of the chunk files, so the only copy is the one DALI makes of every sample anyway. Otherwise it calls
  ``PatchStore.read``, which bypasses zarr for the store's raw 64-patch chunks (``os.preadv`` of each run of
  consecutive indices straight into the batch buffer: a random patch costs one 49 KB read from the page cache
  instead of decoding its whole chunk), into a ring of batch buffers reused in turn and handed to DALI with
  ``no_copy`` (no allocation or page faults), each batch read by several threads (see ``BatchSource``).
- Parallel workers: with ``workers > 0`` the source runs in DALI's worker processes (``parallel=True``), so reading
  overlaps with the rain synthesis of the previous batch in the main process. Workers are forked before anything
  touches CUDA (``pipe.start_py_workers()`` before ``build()``); when CUDA is already initialized in this process
  they are spawned instead (slower start; the source is a picklable module-level class).

The pipeline only moves uint8 NHWC batches (and their store indices): with a GPU it ends in ``.gpu()`` so the batch
arrives in device memory, where the loader synthesizes rain and converts to float. The plan of each epoch (which
store indices form which batch, ``engine.loader.order``) is handed to the source through shared memory, which
worker processes read too.

The pipeline uses DALI's pipelined executor (``exec_dynamic=False``), whose output buffers are reused: the dynamic
executor allocates fresh ones every batch, and their page faults cost a third of the reader's CPU time.
"""
from __future__ import annotations

import os
from multiprocessing import shared_memory
from typing import Any, Iterator

import numpy as np

from engine.loader.reading import read_patches, reads_in_place


def dali_problem() -> str:
    """Why DALI cannot run here ('' when it can)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising something else
        return f"NVIDIA DALI is not importable ({type(err).__name__}: {err}); pip install nvidia-dali-cuda120"
    return ""


class ReaderBusy(RuntimeError):
    """An epoch was asked of a ``DaliReader`` whose previous epoch is still being iterated."""


# ---- the batch source ----------------------------------------------------------------------------------------------

class PlanBoard:
    """The current epoch's plan in shared memory: int64 ``[dali_epoch, n_batches, offsets[n_batches + 1],
    indices[total]]``, written by the main process before each DALI epoch, read by the source (in workers too)."""

    def __init__(self, capacity: int, name: str | None = None) -> None:
        self.capacity = capacity
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=8 * (2 * capacity + 4))
            self.owner = True
        else:
            # Workers are started by multiprocessing (fork or spawn) and share the owner's resource tracker, whose
            # registry is a set: attaching registers the same name again, and only the owner's unlink removes it.
            self.shm = shared_memory.SharedMemory(name=name)
            self.owner = False
        self.name = self.shm.name
        self.buf = np.ndarray((2 * capacity + 4,), dtype=np.int64, buffer=self.shm.buf)

    def write(self, dali_epoch: int, plan: list[np.ndarray]) -> None:
        n = len(plan)
        sizes = np.fromiter((b.size for b in plan), dtype=np.int64, count=n)
        total = int(sizes.sum())
        if n + 1 + total + 2 > self.buf.size:
            raise ValueError(f"loader: a plan of {total} patches does not fit a board of {self.capacity}")
        self.buf[0] = -1  # invalid while writing
        self.buf[1] = n
        self.buf[2] = 0
        np.cumsum(sizes, out=self.buf[3:3 + n])
        if total:
            self.buf[3 + n:3 + n + total] = np.concatenate(plan)
        self.buf[0] = dali_epoch

    def cancel(self) -> None:
        self.buf[1] = 0

    def batch(self, dali_epoch: int, iteration: int) -> np.ndarray | None:
        """Store indices of batch ``iteration`` of ``dali_epoch``; None past the end (or for a stale epoch)."""
        if int(self.buf[0]) != dali_epoch:
            return None
        n = int(self.buf[1])
        if iteration >= n:
            return None
        a, b = int(self.buf[2 + iteration]), int(self.buf[3 + iteration])
        return self.buf[3 + n + a:3 + n + b].copy()

    def close(self) -> None:
        self.buf = None
        self.shm.close()
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


#: ``BatchSource`` hands DALI per-patch views of a complete store's chunk files (False: it always reads into its
#: ring of buffers, the path other stores take).
VIEWS = True

#: ``DaliReader.epoch`` schedules DALI's next iteration on a helper thread while the caller consumes a batch (False:
#: when the next batch is asked for, as ``pipe.run()`` would).
FEED_AHEAD = True


class BatchSource:
    """DALI batch source: ``(BatchInfo) -> (uint8 [n, P, P, 3] patches, int64 [n] store indices)``.

    Picklable (for spawned workers) when the store is (``PatchStore`` pickles as its path and reopens); the plan
    board is reattached by name in the worker.

    A complete store's batch is handed over as per-patch views (``PatchStore.views``: no read at all; in a DALI
    worker process, copied from them into one dense ring slot, see ``__call__``). Otherwise the source reads into
    a ring slot; DALI calls it when an iteration is scheduled (on the feed thread of ``DaliReader.epoch``, beside
    the rain kernels), and the read is split over ``read_threads`` threads (``os.preadv`` releases the GIL; one
    49 KB ``preadv`` per random patch).
    """

    #: Fewest patches per read thread: below this one thread reads the whole batch (thread hand-off costs more).
    MIN_PER_THREAD = 16

    def __init__(self, store: Any, board_name: str, capacity: int, batch_size: int, ring: int,
                 read_threads: int = 1) -> None:
        """``ring``: batch buffers reused in turn (``RING`` of ``DaliReader``): a returned batch is left untouched
        until ``ring - 1`` more batches have been returned."""
        self.store = store
        self.board_name = board_name
        self.capacity = capacity
        self.batch_size = batch_size
        self.ring = ring
        self.read_threads = max(1, int(read_threads))
        self._owner_pid = os.getpid()  # the process that feeds DALI; any other is a DALI worker
        self._reset()

    def _reset(self) -> None:
        """State of the process that reads (none of it is pickled: a worker builds its own)."""
        self._board: PlanBoard | None = None
        self._buffers: list[tuple[np.ndarray, np.ndarray]] = []
        self._turn = 0
        self._takes_out: bool | None = None
        self._pool = None        # threads splitting one read
        self.use_views = VIEWS and hasattr(self.store, "views")

    def __getstate__(self) -> dict:
        return dict(store=self.store, board_name=self.board_name, capacity=self.capacity,
                    batch_size=self.batch_size, ring=self.ring, read_threads=self.read_threads,
                    _owner_pid=self._owner_pid)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _buffer(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the next ring slot for ``n`` patches (allocated on first use)."""
        if len(self._buffers) < self.ring:
            p = self.store.patch_size
            self._buffers.append((np.empty((self.batch_size, p, p, 3), dtype=np.uint8),
                                  np.empty(self.batch_size, dtype=np.int64)))
        patches, index = self._buffers[self._turn % len(self._buffers)]
        self._turn += 1
        return patches[:n], index[:n]

    def _read_into(self, idx: np.ndarray, out: np.ndarray) -> None:
        """The patches ``idx`` into ``out`` (uint8 [n, P, P, 3]), split over ``read_threads`` threads."""
        if self._takes_out is None:
            self._takes_out = reads_in_place(self.store)
        # a store that cannot read into a buffer returns whole batches: nothing to split
        k = min(self.read_threads, idx.size // self.MIN_PER_THREAD) if self._takes_out else 1
        if k <= 1:
            read_patches(self.store, idx, out, self._takes_out)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="rainsweep-read")
        cuts = np.linspace(0, idx.size, k + 1).astype(int)
        parts = [self._pool.submit(self.store.read, idx[a:b], out[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        for part in parts:
            part.result()  # re-raises a read error here

    def __call__(self, info: Any) -> tuple[Any, np.ndarray]:
        if self._board is None:
            self._board = PlanBoard(self.capacity, name=self.board_name)
        idx = self._board.batch(info.epoch_idx, info.iteration)
        if idx is None:
            raise StopIteration
        if self.use_views:
            views = self.store.views(idx)  # no read at all: DALI copies each sample from the page cache
            if views is not None:
                if os.getpid() == self._owner_pid:
                    return views, idx
                # in a DALI worker process, DALI would write a list of views into shared memory sample by sample
                # and the main process would feed it sample by sample; one dense batch, copied from the maps, is
                # one array for both
                patches, index = self._buffer(idx.size)
                index[:] = idx
                for i, view in enumerate(views):
                    patches[i] = view
                return patches, index
            self.use_views = False
        patches, index = self._buffer(idx.size)
        index[:] = idx
        self._read_into(idx, patches)
        return patches, index

    def close(self) -> None:
        """Stop the read threads of this process."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None


def _picklable(obj: Any) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


class DaliReader:
    """A DALI pipeline that yields the uint8 NHWC batches of a plan, on the CPU or in GPU memory."""

    def __init__(self, store: Any, batch_size: int, device: Any, threads: int = 2, workers: int | None = None,
                 prefetch: int = 2, capacity: int | None = None) -> None:
        """``capacity``: the most patches one epoch's plan holds (the subset size; default the store's count)."""
        problem = dali_problem()
        if problem:
            raise RuntimeError(problem)
        import torch
        from nvidia.dali import fn, pipeline_def

        self.device = device
        self.store = store
        self.capacity = int(store.count if capacity is None else capacity)
        self.board = PlanBoard(self.capacity)
        if workers is None:
            # Reading (~100k patches/s per core) is cheap next to CPU rain synthesis, so a CPU loader reads in the
            # main process (worker IPC would cost more than it saves); a GPU loader, whose rain is on the device,
            # needs several readers to keep up.
            workers = 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))
        if workers and not _picklable(store):
            workers = 0  # worker processes need the store; read in the main process instead
        self.workers = workers
        start = "spawn" if (workers and torch.cuda.is_available() and torch.cuda.is_initialized()) else "fork"
        # The source hands DALI its ring buffers without a copy (no_copy; parallel workers imply it): the batches
        # in use at once are the one consumed, the prefetch - 1 queued behind it and the one being fed (epoch()
        # schedules an iteration while a batch is consumed), so RING = prefetch + 2 slots leave one spare.
        source = self.source = BatchSource(store, self.board.name, self.capacity, batch_size, prefetch + 2,
                                           read_threads=threads)
        device_id = device.index if device.type == "cuda" else None
        on_gpu = device.type == "cuda"

        # exec_dynamic=False: DALI's default (dynamic) executor allocates fresh output buffers every iteration, and
        # the page faults of filling them cost a third of the pipeline's CPU time (perf on the 2-core machine); the
        # pipelined executor keeps fixed output buffers.
        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                      prefetch_queue_depth=prefetch, py_num_workers=max(workers, 1), py_start_method=start,
                      exec_dynamic=False)
        def pipe_def():
            patches, index = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                                parallel=workers > 0, no_copy=True, layout=["HWC", None])
            if on_gpu:
                patches = patches.gpu()
            return patches, index

        self.pipe = pipe_def()
        if workers > 0:
            self.pipe.start_py_workers()
        self.pipe.build()
        self._dali_epoch = 0
        self._active = False
        self._copied = None
        self._ahead = None       # the helper thread of ``epoch``

    def epoch(self, plan: list[np.ndarray]) -> Iterator[tuple[Any, np.ndarray]]:
        """Yield ``(uint8 NHWC torch tensor on the device, int64 store indices)`` for each batch of ``plan``.

        On the CPU the tensor is a view of DALI's output buffer, valid only until the next batch is requested:
        consume (or copy) it first.

        DALI's scheduled API (``schedule_run`` / ``share_outputs`` / ``release_outputs``) rather than ``run()``, so
        that scheduling the next iteration (the source call and DALI's feed of it, per-sample Python: ~15 % of the
        DALI loader's CPU time in cProfile) happens on a helper thread while the caller consumes the batch (the
        rain kernels release the GIL; see ``FEED_AHEAD``). Only one thread touches the pipeline at a time: the
        helper's call is waited for before the batch's buffers are released and the next batch is taken.
        """
        if self._active:
            raise ReaderBusy("loader: an epoch of this loader is still being iterated; finish or close it first")
        self._active = True
        self.board.write(self._dali_epoch, plan)
        pipe = self.pipe
        finished = shared = False
        ahead = None
        try:
            pipe.schedule_run()  # an epoch's first call fills DALI's prefetch queue
            for _ in range(len(plan)):
                patches, index = pipe.share_outputs()
                shared = True
                batch = self._to_torch(patches), np.array(index.as_tensor()).reshape(-1).astype(np.int64)
                ahead = self._helper().submit(pipe.schedule_run) if FEED_AHEAD else None
                yield batch
                if ahead is not None:
                    ahead.result()  # re-raises the source's error (a damaged store) here
                    ahead = None
                else:
                    pipe.schedule_run()
                self._release()
                shared = False
            try:
                pipe.share_outputs()  # the source raised StopIteration past the plan's end: nothing is left
                shared = True
                raise RuntimeError("loader: DALI produced more batches than planned")
            except StopIteration:
                finished = True
        finally:
            if ahead is not None:
                ahead.exception()  # wait; an error of the abandoned epoch's read-ahead is not the caller's concern
            if shared:
                self._release()
            if not finished:  # abandoned mid-epoch: drain what DALI prefetched, so the next epoch starts clean
                self.board.cancel()
                try:
                    while True:
                        pipe.share_outputs()
                        pipe.release_outputs()
                        pipe.schedule_run()
                except StopIteration:
                    pass
            pipe.reset()
            self._dali_epoch += 1
            self._active = False

    def _helper(self):
        """The one thread that schedules DALI's next iteration while a batch is consumed."""
        if self._ahead is None:
            from concurrent.futures import ThreadPoolExecutor

            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="rainsweep-dali-feed")
        return self._ahead

    def _to_torch(self, patches: Any):
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = patches.as_tensor()
        if self.device.type == "cuda":
            out = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=self.device)
            stream = torch.cuda.current_stream(self.device)
            feed_ndarray(t, out, cuda_stream=stream)
            # DALI may reuse this output buffer once released: remember when the copy is done
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        else:
            # zero-copy view of DALI's output buffer: valid until it is released (when the next batch is asked for),
            # and the loader consumes each batch (rain synthesis and conversion into new tensors) before that
            return torch.from_numpy(np.asarray(t))
        return out

    def _release(self) -> None:
        """Hand the shared batch's buffers back to DALI (after its device copy, if any, has finished)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        self.pipe.release_outputs()

    def close(self) -> None:
        ahead, self._ahead = getattr(self, "_ahead", None), None
        if ahead is not None:
            ahead.shutdown(wait=True)  # first: a scheduling call in flight still uses the pipeline
        pipe, self.pipe = getattr(self, "pipe", None), None
        if pipe is not None:
            del pipe  # DALI stops its workers when the pipeline is freed
        source = getattr(self, "source", None)
        if source is not None:
            source.close()  # the in-process read threads
        if getattr(self, "board", None) is not None:
            self.board.close()
            self.board = None
