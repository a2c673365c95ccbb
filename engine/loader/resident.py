"""Resident mode's data: a subset's uint8 NHWC patches read once into device memory and gathered by index.

On a CUDA device the patches live in GPU memory (30,000 patches of 128 x 128 take 1.47 GB); on the CPU in host RAM.
Data-parallel ranks each hold the whole subset, since every epoch reshuffles across shards.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.loader.reading import read_patches, reads_in_place


class ResidentData:
    """The subset's uint8 NHWC patches, loaded once into device memory (host RAM for the CPU), gathered by index.

    Parameters
    ----------
    store : PatchStore
        The store to read (uint8 [N, P, P, 3] NHWC patches, 0..255).
    indices : numpy.ndarray
        int64 store indices of the subset.
    device : torch.device
        Where the patches live.

    Attributes
    ----------
    sorted : numpy.ndarray
        int64 [n], the subset's store indices in increasing order: row ``r`` of ``data`` holds ``sorted[r]``.
    data : numpy.ndarray or torch.Tensor
        uint8 [n, P, P, 3] NHWC: a numpy array for the CPU (numpy's ``take`` and the kernels read it in place;
        torch's CPU ``index_select`` on uint8 images is ~100x slower), a torch tensor on a GPU.
    """

    #: Patches read from the store per step while loading (bounds the host memory used on the way to a GPU).
    LOAD_CHUNK = 4096

    def __init__(self, store: Any, indices: np.ndarray, device: Any) -> None:
        import torch

        self.sorted = np.sort(np.asarray(indices, dtype=np.int64))
        p = store.patch_size
        n = self.sorted.size
        host = np.empty((n, p, p, 3), dtype=np.uint8) if device.type == "cpu" else None
        self.data = host if host is not None else torch.empty((n, p, p, 3), dtype=torch.uint8, device=device)
        in_place = reads_in_place(store)
        for start in range(0, n, self.LOAD_CHUNK):
            stop = min(n, start + self.LOAD_CHUNK)
            part = host[start:stop] if host is not None else np.empty((stop - start, p, p, 3), dtype=np.uint8)
            read_patches(store, self.sorted[start:stop], part, in_place)
            if host is None:
                self.data[start:stop].copy_(torch.from_numpy(part))

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows of ``data`` holding the given store indices (int64, same order)."""
        return np.searchsorted(self.sorted, index)

    def gather(self, rows: Any) -> Any:
        """uint8 [n, P, P, 3] NHWC batch of ``rows`` (a device int64 tensor) on the GPU. The CPU loader does not
        gather: its kernels read the resident rows in place (``finish_batch``'s ``rows``)."""
        return self.data.index_select(0, rows)


__all__ = ["ResidentData"]
