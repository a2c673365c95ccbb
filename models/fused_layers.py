"""Horizontally fused layers: K independent copies of one layer computed together (HFTA, Wang et al., MLSys 2021,
"Horizontally Fused Training Array", https://github.com/UofT-EcoSystem/hfta).

Every fused parameter holds the K streams along a new leading axis: ``fused.weight[k]`` is stream k's
``weight`` of the ordinary layer, bit for bit, so fusing and unfusing weights is stacking and indexing.

Activation layouts (float, any dtype the ordinary layer takes):

- images, ``GROUPED``: channel-stacked NCHW ``[B, K*C, H, W]``, stream-major (channels ``k*C .. (k+1)*C - 1`` are
  stream k's), as ONE grouped convolution (``groups = K``) reads and writes them (HFTA's layout);
- images, ``STREAMS``: batch-stacked NCHW ``[K*B, C, H, W]`` (rows ``k*B .. (k+1)*B - 1`` are stream k's); each
  stream's slice is contiguous, so the fused convolutions run one ordinary convolution per stream on it. oneDNN's
  grouped convolutions on CPU are slower than K ordinary ones (see ``FusedNet``), so this is the CPU layout.
- tokens: ``[K, ..., C]``, stream first, as batched matmuls (``torch.baddbmm``) read and write them.

The fused convolutions tell the two image layouts apart by the channel count (``K*Cin`` or ``Cin``; the same thing
when K = 1).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GROUPED:
    """Channel-stacked images ``[B, K*C, H, W]`` (the layout of grouped convolutions)."""

    @staticmethod
    def pack(x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """Stream-major ``[K, B, C, H, W]`` -> ``[B, K*C, H, W]`` (one copy), laid out in memory as
        ``memory_format`` (``torch.channels_last``: NHWC strides)."""
        k, b, c, h, w = x.shape
        if memory_format == torch.channels_last:
            return x.permute(1, 3, 4, 0, 2).reshape(b, h, w, k * c).permute(0, 3, 1, 2)
        return x.transpose(0, 1).reshape(b, k * c, h, w)

    @staticmethod
    def unpack(x: torch.Tensor, k: int) -> torch.Tensor:
        """``[B, K*C, H, W]`` -> stream-major ``[K, B, C, H, W]`` (contiguous, as an ordinary model's output)."""
        b, kc, h, w = x.shape
        return x.reshape(b, k, kc // k, h, w).transpose(0, 1).contiguous()

    @staticmethod
    def cat(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        """Channel concatenation that keeps the stream-major grouping: stream k's block of the result is the
        concatenation of stream k's blocks (what ``torch.cat(dim=1)`` does for each ordinary model)."""
        b, _, h, w = tensors[0].shape
        return torch.cat([t.reshape(b, k, -1, h, w) for t in tensors], dim=2).reshape(b, -1, h, w)

    @staticmethod
    def to_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
        """``[B, K*C, H, W]`` -> tokens ``[K, B, H*W, C]``."""
        b, kc, h, w = x.shape
        return x.reshape(b, k, kc // k, h * w).permute(1, 0, 3, 2)

    @staticmethod
    def from_tokens(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[K, B, H*W, C]`` -> ``[B, K*C, H, W]``."""
        k, b, _, c = t.shape
        return t.permute(1, 0, 3, 2).reshape(b, k * c, *hw)


class STREAMS:
    """Batch-stacked images ``[K*B, C, H, W]`` (one ordinary convolution per stream)."""

    @staticmethod
    def pack(x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """Stream-major ``[K, B, C, H, W]`` -> ``[K*B, C, H, W]`` (a view where the layout allows)."""
        return x.flatten(0, 1).contiguous(memory_format=memory_format)

    @staticmethod
    def unpack(x: torch.Tensor, k: int) -> torch.Tensor:
        """``[K*B, C, H, W]`` -> stream-major ``[K, B, C, H, W]`` (contiguous)."""
        return x.contiguous().unflatten(0, (k, -1))

    @staticmethod
    def cat(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
        """Channel concatenation (each row is one stream's image already)."""
        return torch.cat(tensors, dim=1)

    @staticmethod
    def to_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
        """``[K*B, C, H, W]`` -> tokens ``[K, B, H*W, C]``."""
        kb, c, h, w = x.shape
        return x.reshape(k, kb // k, c, h * w).transpose(2, 3)

    @staticmethod
    def from_tokens(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[K, B, H*W, C]`` -> ``[K*B, C, H, W]``."""
        k, b, _, c = t.shape
        return t.transpose(2, 3).reshape(k * b, c, *hw)


#: The image layouts by name.
LAYOUTS: dict[str, type] = {"grouped": GROUPED, "streams": STREAMS}


def _per_stream(op: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                k: int) -> torch.Tensor:
    """``op(x_k, weight[k], bias[k])`` for each stream's rows of batch-stacked ``x`` ``[K*B, ...]``, concatenated."""
    biases = [None] * k if bias is None else bias.unbind(0)
    parts = x.unflatten(0, (k, -1)).unbind(0)
    return torch.cat([op(p, w, b) for p, w, b in zip(parts, weight.unbind(0), biases)], dim=0)


def _check_channels(layer: str, x: torch.Tensor, k: int, cin: int) -> bool:
    """True for channel-stacked input (``K*cin`` channels), False for batch-stacked (``cin``); else ValueError."""
    if x.dim() == 4 and x.shape[1] == k * cin:
        return True
    if x.dim() == 4 and x.shape[1] == cin:
        return False
    raise ValueError(f"{layer}: expected [B, {k}*{cin}, H, W] or [{k}*B, {cin}, H, W] input, got {tuple(x.shape)}")


def _stacked_parameter(src: torch.Tensor | None, k: int) -> nn.Parameter | None:
    """An uninitialized parameter of shape ``[K, *src.shape]`` (weights are loaded afterwards with ``fuse``)."""
    if src is None:
        return None
    return nn.Parameter(torch.empty(k, *src.shape, dtype=src.dtype, device=src.device),
                        requires_grad=src.requires_grad)


class FusedConv2d(nn.Module):
    """K ``nn.Conv2d``: one grouped convolution on ``[B, K*Cin, H, W]`` -> ``[B, K*Cout, H', W']``, or one
    convolution per stream on ``[K*B, Cin, H, W]`` -> ``[K*B, Cout, H', W']``.

    ``weight`` is ``[K, Cout, Cin/g, kh, kw]``; flattening its first two axes gives the grouped convolution's weight
    with ``groups = K*g`` (stream k's output channels come from stream k's input channels only).
    """

    def __init__(self, src: nn.Conv2d, k: int) -> None:
        super().__init__()
        if src.padding_mode != "zeros":
            raise ValueError(f"FusedConv2d: padding_mode {src.padding_mode!r} is not supported; expected 'zeros'")
        self.k, self.in_channels, self.src_groups = k, src.in_channels, src.groups
        self.stride, self.padding, self.dilation = src.stride, src.padding, src.dilation
        self.weight = _stacked_parameter(src.weight, k)
        self.bias = _stacked_parameter(src.bias, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, K*Cin, H, W]`` (one grouped convolution) or ``[K*B, Cin, H, W]`` (one convolution per stream)."""
        if _check_channels("FusedConv2d", x, self.k, self.in_channels):
            bias = None if self.bias is None else self.bias.flatten()
            return F.conv2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation,
                            self.src_groups * self.k)
        return _per_stream(lambda xk, w, b: F.conv2d(xk, w, b, self.stride, self.padding, self.dilation,
                                                     self.src_groups), x, self.weight, self.bias, self.k)


class FusedConvTranspose2d(nn.Module):
    """K ``nn.ConvTranspose2d``: one grouped transposed convolution on ``[B, K*Cin, H, W]``, or one per stream on
    ``[K*B, Cin, H, W]``.

    ``weight`` is ``[K, Cin, Cout/g, kh, kw]`` (the ordinary layer's weight is input-channel first).
    """

    def __init__(self, src: nn.ConvTranspose2d, k: int) -> None:
        super().__init__()
        if src.padding_mode != "zeros":
            raise ValueError(f"FusedConvTranspose2d: padding_mode {src.padding_mode!r} is not supported")
        self.k, self.in_channels, self.src_groups = k, src.in_channels, src.groups
        self.stride, self.padding, self.dilation = src.stride, src.padding, src.dilation
        self.output_padding = src.output_padding
        self.weight = _stacked_parameter(src.weight, k)
        self.bias = _stacked_parameter(src.bias, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[B, K*Cin, H, W]`` (one grouped convolution) or ``[K*B, Cin, H, W]`` (one per stream)."""
        if _check_channels("FusedConvTranspose2d", x, self.k, self.in_channels):
            bias = None if self.bias is None else self.bias.flatten()
            return F.conv_transpose2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding,
                                      self.output_padding, self.src_groups * self.k, self.dilation)
        return _per_stream(lambda xk, w, b: F.conv_transpose2d(xk, w, b, self.stride, self.padding,
                                                               self.output_padding, self.src_groups, self.dilation),
                           x, self.weight, self.bias, self.k)


class FusedLinear(nn.Module):
    """K ``nn.Linear`` as one batched matmul: ``[K, ..., in]`` -> ``[K, ..., out]``; ``weight`` is ``[K, out, in]``."""

    def __init__(self, src: nn.Linear, k: int) -> None:
        super().__init__()
        self.k = k
        self.weight = _stacked_parameter(src.weight, k)
        self.bias = _stacked_parameter(src.bias, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, lead, n_in = x.shape[0], x.shape[1:-1], x.shape[-1]
        flat = x.reshape(k, -1, n_in)
        w = self.weight.transpose(1, 2)
        out = torch.bmm(flat, w) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), flat, w)
        return out.view(k, *lead, -1)


class FusedLayerNorm(nn.Module):
    """K ``nn.LayerNorm`` over the last axis of ``[K, ..., C]``, each stream with its own affine ``[K, C]``."""

    def __init__(self, src: nn.LayerNorm, k: int) -> None:
        super().__init__()
        if len(src.normalized_shape) != 1:
            raise ValueError(f"FusedLayerNorm: normalized_shape {src.normalized_shape} is not supported; "
                             "expected one axis")
        self.k, self.eps, self.normalized_shape = k, src.eps, src.normalized_shape
        self.weight = _stacked_parameter(src.weight, k)
        self.bias = _stacked_parameter(src.bias, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, eps=self.eps)
        shape = (self.k,) + (1,) * (x.dim() - 2) + (-1,)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y
