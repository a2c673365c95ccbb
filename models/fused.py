"""Fused models: K runs of one architecture trained as ONE module (horizontal fusion as in HFTA, Wang et al., MLSys
2021, https://github.com/UofT-EcoSystem/hfta).

    >>> import torch, models.fused as mf
    >>> net = mf.build_fused("resnet-s", k=4)            # 4 freshly initialized runs, one module
    >>> y = net(torch.rand(4, 2, 3, 32, 32))              # [K, B, 3, H, W] float 0..1 -> same shape
    >>> runs = mf.unfuse("resnet-s", net.state_dict(), 4)  # 4 ordinary state dicts (models.build(...) loads each)

Layout. A fused model's parameters and buffers have the ordinary model's names, each with a leading stream axis:
``fused_state[name][k]`` is run k's ``state[name]`` bit for bit (``stream_axis`` is 0 for every tensor). Its
``forward`` takes stream-major images ``[K, B, 3, H, W]`` (what the multi-stream loader yields) and returns the
same layout; slice k is what ordinary model k returns for ``x[k]``. On CUDA (``net.fusion`` "auto" or "grouped"),
convolutions (and U-Net's transposed convolutions) are grouped convolutions with ``groups = K`` on the
channel-stacked layout ``[B, K*C, H, W]``. On CPU ("auto" -> "loop") the ordinary network runs once per stream
with that stream's views of the fused weights, because there fusing only costs: oneDNN's grouped convolutions and
K-fold activations are slower than K ordinary passes (see ``models.fused_nets.FusedNet``).
Padding, max-pool and activations act per channel; skip concatenations keep each stream's channels together; the
global residual adds each stream's own input. SwinIR's linear layers are batched matmuls (``torch.baddbmm``) over
tokens ``[K, B, H*W, C]``, its LayerNorms carry per-stream affine weights, and window attention is one
``scaled_dot_product_attention`` over all streams' windows with each stream's own relative position bias (no
``vmap``).

Training. Use ``stream_l1`` for the loss: the fused loss is the SUM over streams of each stream's mean L1, so
stream k's gradient is exactly its unfused run's gradient (a mean over streams would scale it by 1/K). Step with
``StreamAdam`` (per-stream learning rates and Adam states) and keep the EMA with ``ema_update``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import NAMES, build
from .fused_nets import check_images, fuse_module
from .fused_optim import StreamAdam, ema_update


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"name: unknown model {name!r}; valid models: {', '.join(NAMES)}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int (number of fused runs), got {k!r}")


@functools.lru_cache(maxsize=None)
def _reference_shapes(name: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of every entry of the ordinary model's state dict (built once, on the meta device: no
    memory, and torch's global RNG is left alone). Callers must not modify the returned dict."""
    with torch.device("meta"):
        ref = build(name)
    return {key: (t.shape, t.dtype) for key, t in ref.state_dict().items()}


def stream_axis(name: str, param_name: str) -> int:
    """The axis of fused tensor ``param_name`` that indexes the streams: always 0 (stream k is ``tensor[k]``).

    Raises ValueError for an unknown model or a name that is not in the model's state dict.
    """
    _check_name(name)
    if param_name not in _reference_shapes(name):
        raise ValueError(f"param_name: {param_name!r} is not a parameter or buffer of model {name!r}")
    return 0


def fuse(name: str, state_dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """K ordinary state dicts of model ``name`` -> one fused state dict (exact).

    Parameters
    ----------
    name : str
        A name in ``models.NAMES``.
    state_dicts : sequence of K dicts
        ``models.build(name).state_dict()`` of each run, all on one device.

    Returns
    -------
    dict
        The same keys; each value ``[K, *shape]``, ``torch.stack`` of the runs' tensors (new memory).

    Raises
    ------
    ValueError
        For an unknown name, no state dicts, or a state dict whose keys, shapes or dtypes differ from the model's.
    """
    _check_name(name)
    if len(state_dicts) < 1:
        raise ValueError("state_dicts: expected at least one state dict, got none")
    ref = _reference_shapes(name)
    for i, sd in enumerate(state_dicts):
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing or extra:
            raise ValueError(f"state_dicts[{i}]: not a {name!r} state dict (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        for key, (shape, dtype) in ref.items():
            if sd[key].shape != shape or sd[key].dtype != dtype:
                raise ValueError(f"state_dicts[{i}][{key!r}]: expected {dtype} of shape {tuple(shape)}, got "
                                 f"{sd[key].dtype} of shape {tuple(sd[key].shape)}")
    return {key: torch.stack([sd[key].detach() for sd in state_dicts]) for key in ref}


def unfuse(name: str, fused_state_dict: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """A fused state dict of K runs -> K ordinary state dicts; the exact inverse of ``fuse``.

    Parameters
    ----------
    name : str
        A name in ``models.NAMES``.
    fused_state_dict : dict
        A fused model's ``state_dict()`` (or ``fuse``'s result): every value ``[K, *shape]``.
    k : int
        Number of streams K.

    Returns
    -------
    list of K dicts
        Run k's state dict (contiguous copies of ``value[k]``, on the fused dict's device), which
        ``models.build(name).load_state_dict(sd, strict=True)`` accepts.

    Raises
    ------
    ValueError
        For an unknown name, k < 1, or a fused dict whose keys or shapes are not model ``name``'s with K streams.
    """
    _check_name(name)
    _check_k(k)
    ref = _reference_shapes(name)
    missing, extra = sorted(set(ref) - set(fused_state_dict)), sorted(set(fused_state_dict) - set(ref))
    if missing or extra:
        raise ValueError(f"fused_state_dict: not a fused {name!r} state dict (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for key, (shape, _) in ref.items():
        if fused_state_dict[key].shape != (k, *shape):
            raise ValueError(f"fused_state_dict[{key!r}]: expected shape {(k, *shape)} (K={k} streams), got "
                             f"{tuple(fused_state_dict[key].shape)}")
    return [{key: fused_state_dict[key][i].detach().clone() for key in ref} for i in range(k)]


def from_models(name: str, nets: Sequence[nn.Module]) -> nn.Module:
    """One fused module holding exactly the weights of ``nets``.

    Parameters
    ----------
    name : str
        A name in ``models.NAMES``.
    nets : sequence of K modules
        Ordinary models of architecture ``name`` on one device (e.g. each built after its run's
        ``torch.manual_seed``); they are not modified and share no memory with the result.

    Returns
    -------
    nn.Module
        The fused model on the nets' device and dtype, stream k being ``nets[k]``; attributes ``k`` and ``name``.
        Its ``forward`` maps ``[K, B, 3, H, W]`` to ``[K, B, 3, H, W]``.
    """
    _check_name(name)
    if len(nets) < 1:
        raise ValueError("nets: expected at least one model, got none")
    fused = fuse_module(nets[0], len(nets))
    fused.load_state_dict(fuse(name, [net.state_dict() for net in nets]), strict=True)
    fused.name = name
    return fused


def build_fused(name: str, k: int) -> nn.Module:
    """K freshly initialized models ``name`` as one fused module: stream k holds the weights of the k-th of K
    consecutive ``models.build(name)`` calls (torch's global RNG; to give each run its own seed-derived weights,
    build them yourself after ``torch.manual_seed(seed_k)`` and use ``from_models``)."""
    _check_name(name)
    _check_k(k)
    return from_models(name, [build(name) for _ in range(k)])


def stream_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-stream mean L1 loss.

    Parameters
    ----------
    pred, target : Tensor
        ``[K, B, C, H, W]`` float, one shape (images on the 0..1 scale).

    Returns
    -------
    Tensor
        ``[K]``: entry k is ``F.l1_loss(pred[k], target[k])``. Train on its SUM, so each stream's gradient equals
        its unfused run's gradient; log entry k as run k's loss.
    """
    if pred.shape != target.shape or pred.dim() != 5:
        raise ValueError(f"pred, target: expected two [K, B, C, H, W] tensors of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    return F.l1_loss(pred, target, reduction="none").flatten(1).mean(dim=1)


__all__ = ["StreamAdam", "build_fused", "check_images", "ema_update", "from_models", "fuse", "fuse_module",
           "stream_axis", "stream_l1", "unfuse"]
