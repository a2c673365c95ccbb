"""Scoring a network on a held-out set: its outputs, the decoupled metrics, the E_R ceiling and a sample sheet.

One implementation for train.py's evaluations and for ``rainsweep evaluate``. Networks take NCHW float32 on the
0..1 scale; outputs come back float32 NHWC on the 0..255 scale, unquantized and unclipped, and are scored by
``engine.metrics.decoupled`` as they are. Evaluation runs in full float32 (TF32 off), so the same weights always
score the same.

A held-out set whose items all fill their arrays (synthetic held-out sets, paired stores of patches or of whole
images of one size) is scored in one pass. A set with per-item sizes (``HeldOut.sizes``: whole images of several
sizes on one canvas, ``engine.data.paired_store``) is scored group by group of items with the same sizes: the network
sees each item's ``input_sizes`` region (the image padded to a multiple of the stride) and the metrics and the
ceiling cover its ``sizes`` region (the image itself) only. Each metric is a mean over images of per-image values.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine.experiments.figures import visible_patches, write_grid
from engine.metrics import decoupled

#: Column titles of a sample sheet.
SAMPLE_TITLES = ("rainy input", "output", "clean")


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Matmuls and convolutions in full float32 on CUDA (TF32 off), restoring torch's flags afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def per_image_mean(metrics: dict) -> dict:
    """Mean over images of each per-image metric (NaN-safe: images without rain have no E_R; all NaN -> NaN)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, dtype=np.float64)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() or np.isinf(v).any() else float("nan")
    return out


@torch.no_grad()
def predict(net: torch.nn.Module, rainy_nhwc_255: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    """Run ``net`` on NHWC images on the 0..255 scale; returns float32 NHWC on 0..255, unquantized and unclipped
    (the decoupled metrics score exactly what the network produced)."""
    outs = []
    for i in range(0, len(rainy_nhwc_255), batch):
        x = torch.from_numpy(np.ascontiguousarray(rainy_nhwc_255[i:i + batch])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        outs.append(net(x).float().mul_(255.0).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(outs)


def size_groups(held) -> list[tuple[np.ndarray, tuple[int, int], tuple[int, int]]]:
    """The items of ``held`` grouped by their regions.

    Returns
    -------
    list of tuple
        ``(indices, (h, w), (input h, input w))`` per group: int64 item indices, the scored region and the region
        the network sees, both at the top left of the arrays. One group of every item and the full array size when
        ``held.sizes`` is None.
    """
    sizes = getattr(held, "sizes", None)
    if sizes is None:
        full = tuple(int(s) for s in held.rainy.shape[1:3])
        return [(np.arange(len(held.rainy), dtype=np.int64), full, full)]
    inputs = held.input_sizes if held.input_sizes is not None else sizes
    keys = np.concatenate([np.asarray(sizes), np.asarray(inputs)], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    return [(np.flatnonzero(inverse.ravel() == g).astype(np.int64), (int(k[0]), int(k[1])), (int(k[2]), int(k[3])))
            for g, k in enumerate(uniq)]


def score(net: torch.nn.Module, held, device: torch.device, batch: int) -> tuple[dict, np.ndarray]:
    """Decoupled metrics of ``net`` on ``held`` (means over its images) and its outputs; in full float32.

    Parameters
    ----------
    net : torch.nn.Module
        Maps NCHW float32 0..1 to the same; its training mode is restored afterwards.
    held : engine.experiments.heldout.HeldOut
        The set: uint8 NHWC ``rainy`` and ``background``, bool NHW ``mask``, optional ``sizes`` / ``input_sizes``.
    device : torch.device
        Where the network runs.
    batch : int
        Images per forward pass.

    Returns
    -------
    metrics : dict
        ``E_R``, ``E_B``, ``rain_residual`` and ``PSNR`` (``engine.metrics.decoupled``), each a mean over images.
    output : numpy.ndarray
        float32 NHWC like ``held.rainy``, 0..255 (zero outside each item's ``input_sizes`` region).
    """
    was_training = net.training
    net.eval()
    groups = size_groups(held)
    try:
        if len(groups) == 1 and getattr(held, "sizes", None) is None:
            with full_float32():
                out = predict(net, held.rainy, device, batch)
            return per_image_mean(decoupled(out, held.rainy, held.background, held.mask)), out
        out = np.zeros(held.rainy.shape, np.float32)
        per_image: dict[str, np.ndarray] = {}
        for idx, (h, w), (hi, wi) in groups:
            with full_float32():
                o = predict(net, held.rainy[idx, :hi, :wi], device, batch)
            out[idx, :hi, :wi] = o
            m = decoupled(np.ascontiguousarray(o[:, :h, :w]), *crop(held, idx, h, w))
            for k, v in m.items():
                per_image.setdefault(k, np.full(len(held.rainy), np.nan))[idx] = v
        return per_image_mean(per_image), out
    finally:
        net.train(was_training)


def crop(held, idx: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rainy, background, mask)`` of items ``idx`` of ``held`` cut to their top-left ``h`` x ``w`` region,
    contiguous."""
    return tuple(np.ascontiguousarray(a[idx, :h, :w]) for a in (held.rainy, held.background, held.mask))


def _ceilings(rainy: np.ndarray, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.sqrt((mask[..., None] * (rainy.astype(np.float64) - background) ** 2).sum(axis=(1, 2, 3))
                   / np.maximum(mask.sum(axis=(1, 2)) * 3, 1))


def rain_ceiling(held) -> float:
    """The E_R of a perfect output (the clean background): mean over images of the RMS of background - rainy over
    the rain mask (on each image's scored region), on the 0..255 scale; the highest E_R a model can reach on this
    set."""
    if getattr(held, "sizes", None) is None:
        return per_image_mean({"E_R": _ceilings(held.rainy, held.background, held.mask)})["E_R"]
    values = np.full(len(held.rainy), np.nan)
    for idx, (h, w), _ in size_groups(held):
        values[idx] = _ceilings(*crop(held, idx, h, w))
    return per_image_mean({"E_R": values})["E_R"]


def save_samples(path: Path, held, output: np.ndarray, n: int = 4, fsync: bool = True) -> None:
    """PNG of ``n`` held-out images with visible content (``engine.experiments.figures.visible_patches``), one row
    each, under the column titles rainy input | output | clean; upscaled so a patch is at least 128 pixels, the
    output (float32 NHWC 0..255) clipped and rounded for display. Images of a set with per-item sizes show on the
    full canvas (black beyond their padded region)."""
    pick = visible_patches(held.background, n)
    tiles = np.stack([np.asarray(held.rainy[pick], dtype=np.float32), output[pick],
                      held.background[pick].astype(np.float32)], axis=1)
    write_grid(path, tiles, SAMPLE_TITLES, fsync=fsync)


__all__ = ["SAMPLE_TITLES", "crop", "full_float32", "per_image_mean", "predict", "rain_ceiling", "save_samples",
           "score", "size_groups"]
