"""A training batch, and how a uint8 NHWC batch becomes one: rain synthesized and planes converted on the batch's
device, by the same code in every loader mode.

On the CPU one numba pass over the batch renders each patch's rain and, while that is in cache, writes the patch's
planes of the output type (``engine.synth.synthesize_planes_cpu``, ``kernels.finish``): no uint8 rainy image in
between and no second pass over the batch. On a GPU, ``engine.synth.synthesize`` runs there, then the planes are
converted by table look-up with torch ops (``engine.loader.planes.unit_by_lut``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.arrays import check_nhwc_uint8
from engine.loader.args import LoaderError
from engine.loader.order import rain_keys
from engine.loader.planes import STORAGE, Scratch, torch_dtype, unit_by_lut, unit_table


@dataclass
class Batch:
    """One batch of training pairs.

    Attributes
    ----------
    index : torch.Tensor
        int64 [N] store indices of the patches, on the CPU (so logging never syncs the GPU).
    background : torch.Tensor
        [N, 3, P, P] NCHW, contiguous, on the loader's device: float32 0..1 (store uint8 / 255) by default;
        bfloat16 / float16 0..1 (that float32 value rounded to nearest even) or uint8 0..255 (the store value
        itself) with the loader's ``dtype``.
    rainy : torch.Tensor
        [N, 3, P, P] NCHW, same dtype and scale as ``background``: ``clip(B + beta * R, 0, 255)`` (/ 255 for float
        types), or the noisy image of a noise family (``kernels.noise``); equals ``background`` when the loader
        has no rain or a patch drew no rain.
    rain : torch.Tensor
        [N, 1, P, P] N1HW, same dtype and scale: the rain layer ``R`` (/ 255 for float types) before beta (zeros
        without rain); for a noise family, ``max over channels of |rainy - background|`` (on 0..255, then / 255).
    mask : torch.Tensor
        bool [N, 1, P, P] N1HW: ``R > threshold`` on the 0..255 scale (all False without rain); for a noise family,
        the corrupted pixels (every pixel of a noisy patch for gaussian-noise, those with any channel replaced for
        salt-pepper).
    epoch : int
        The epoch the batch belongs to.
    step : int
        The batch's number within this shard's epoch (0, 1, ...).
    """

    index: Any
    background: Any
    rainy: Any
    rain: Any
    mask: Any
    epoch: int
    step: int

    def __len__(self) -> int:
        return int(self.index.shape[0])


def finish_batch(background_u8, index: np.ndarray, rain, seed: int, epoch: int, step: int,
                 scratch: Scratch | None = None, dtype: str = "float32", rows: np.ndarray | None = None) -> Batch:
    """Synthesize the rain of a uint8 batch and convert everything to a ``Batch``, on the batch's device.

    Parameters
    ----------
    background_u8 : torch.Tensor
        uint8 [N, P, P, 3] NHWC (0..255) backgrounds on the CPU or a GPU; with ``rows``, an array they are picked
        from (e.g. the resident subset).
    index : numpy.ndarray
        int64 [N] store indices of the patches; rain keys are ``epoch << 40 | index``.
    rain : RainSpec or None
        The rain (or noise family) to synthesize; None for none.
    seed, epoch, step : int
        The loader's seed, and the batch's epoch and step (recorded in the ``Batch``).
    scratch : Scratch, optional
        Host memory reused across the batches of one loader (CPU only; a fresh one when None).
    dtype : str
        Output type of the images and rain layer, a name in ``DTYPES``.
    rows : numpy.ndarray, optional
        CPU only: int64 [N] rows of ``background_u8`` holding the batch's patches, in order (no gathered copy).

    Returns
    -------
    Batch
        On ``background_u8``'s device; ``index`` on the CPU.
    """
    check_nhwc_uint8(background_u8, "background_u8")
    index = np.ascontiguousarray(index, dtype=np.int64)
    if background_u8.device.type == "cpu":
        return _finish_batch_cpu(background_u8, index, rain, seed, epoch, step, scratch or Scratch(), dtype, rows)
    if rows is not None:
        raise LoaderError("rows: only for CPU batches; gather GPU batches first")
    return _finish_batch_gpu(background_u8, index, rain, seed, epoch, step, dtype)


def _finish_batch_cpu(background_u8, index: np.ndarray, rain, seed: int, epoch: int, step: int, scratch: Scratch,
                      dtype: str, rows: np.ndarray | None) -> Batch:
    """The host path: one numba pass renders each patch's rain and writes its planes (``synthesize_planes_cpu``)
    into pooled buffers. No torch operation runs here (numpy and numba only), so torch's thread pool stays idle."""
    import torch

    from engine.synth import synthesize_planes_cpu

    _, h, w, c = (int(v) for v in background_u8.shape)
    n = int(index.size)
    storage = STORAGE[dtype]
    tdt = torch_dtype(dtype)
    pool = scratch.pool

    def planes(shape: tuple):
        """(torch tensor of ``dtype``, numpy view of its storage) of a pooled buffer."""
        t = pool.empty(shape, storage)
        return (t if t.dtype == tdt else t.view(tdt)), t.numpy()

    bg, bg_np = planes((n, c, h, w))
    rainy, rainy_np = planes((n, c, h, w))
    mask = pool.empty((n, 1, h, w), np.bool_)
    rain_t, rain_np = planes((n, 1, h, w))
    if dtype == "uint8":
        # the uint8 rain layer is the rain plane itself (NHW viewed as N1HW): rendered in place, no copy
        layer, rain_out = rain_np.reshape(n, h, w), np.empty((0, 1, 1, 1), dtype=storage)
    else:
        layer, rain_out = scratch.rain(n, h, w), rain_np
    synthesize_planes_cpu(background_u8.numpy(), rain, seed, rain_keys(epoch, index), layer,
                          bg_np, rainy_np, rain_out, mask.numpy().reshape(n, h, w), rows)
    return Batch(index=torch.from_numpy(index.copy()), background=bg, rainy=rainy, rain=rain_t, mask=mask,
                 epoch=epoch, step=step)


def _finish_batch_gpu(background_u8, index: np.ndarray, rain, seed: int, epoch: int, step: int,
                      dtype: str) -> Batch:
    """The device path: ``synthesize`` on the batch's GPU, then conversion by table look-up there."""
    import torch

    n, h, w, c = (int(v) for v in background_u8.shape)
    dev = background_u8.device
    tdt = torch_dtype(dtype)
    res = None
    if rain is not None:
        from engine.synth import synthesize

        res = synthesize(background_u8, rain, seed=seed, keys=rain_keys(epoch, index))
    if dtype == "uint8":
        conv = lambda t: t.contiguous()  # noqa: E731 - raw values, only the layout changes
    else:
        lut = unit_table(dev, dtype)
        conv = lambda t: unit_by_lut(t, lut)  # noqa: E731
    bg = conv(background_u8.permute(0, 3, 1, 2))
    if res is None:
        rainy = bg.clone()
        rain_f = torch.zeros((n, 1, h, w), dtype=tdt, device=dev)
        mask = torch.zeros((n, 1, h, w), dtype=torch.bool, device=dev)
    else:
        rainy = conv(res.rainy.permute(0, 3, 1, 2))
        rain_f = conv(res.rain.unsqueeze(1))
        mask = res.mask.unsqueeze(1)
    return Batch(index=torch.from_numpy(index.copy()), background=bg, rainy=rainy, rain=rain_f, mask=mask,
                 epoch=epoch, step=step)


__all__ = ["Batch", "finish_batch"]
