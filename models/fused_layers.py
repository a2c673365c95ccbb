"""Horizontally fused layers: K independent copies of one layer computed by one operator (HFTA, Wang et al., MLSys
2021, "Horizontally Fused Training Array", https://github.com/UofT-EcoSystem/hfta).

Every fused parameter holds the K streams along a new leading axis: ``fused.weight[k]`` is stream k's
``weight`` of the ordinary layer, bit for bit, so fusing and unfusing weights is stacking and indexing.

Activation layouts (float, any dtype the ordinary layer takes):

- images: channel-stacked NCHW ``[B, K*C, H, W]``, stream-major (channels ``k*C .. (k+1)*C - 1`` are stream k's),
  as grouped convolutions (``groups = K``) read and write them;
- tokens: ``[K, ..., C]``, stream first, as batched matmuls (``torch.baddbmm``) read and write them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_stacked(x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Stream-major images ``[K, B, C, H, W]`` -> channel-stacked ``[B, K*C, H, W]`` (one copy), laid out in memory
    as ``memory_format`` (``torch.channels_last``: NHWC strides)."""
    k, b, c, h, w = x.shape
    if memory_format == torch.channels_last:
        return x.permute(1, 3, 4, 0, 2).reshape(b, h, w, k * c).permute(0, 3, 1, 2)
    return x.transpose(0, 1).reshape(b, k * c, h, w)


def from_stacked(x: torch.Tensor, k: int) -> torch.Tensor:
    """Channel-stacked ``[B, K*C, H, W]`` -> stream-major ``[K, B, C, H, W]`` (contiguous, as an ordinary model's
    output)."""
    b, kc, h, w = x.shape
    return x.reshape(b, k, kc // k, h, w).transpose(0, 1).contiguous()


def cat_streams(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """Channel concatenation of channel-stacked images that keeps the stream-major grouping: stream k's block of
    the result is the concatenation of stream k's blocks (what ``torch.cat(dim=1)`` does for each ordinary
    model)."""
    b, _, h, w = tensors[0].shape
    return torch.cat([t.reshape(b, k, -1, h, w) for t in tensors], dim=2).reshape(b, -1, h, w)


def stacked_to_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """Channel-stacked images ``[B, K*C, H, W]`` -> tokens ``[K, B, H*W, C]``."""
    b, kc, h, w = x.shape
    return x.reshape(b, k, kc // k, h * w).permute(1, 0, 3, 2)


def tokens_to_stacked(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Tokens ``[K, B, H*W, C]`` -> channel-stacked images ``[B, K*C, H, W]``."""
    k, b, _, c = t.shape
    return t.permute(1, 0, 3, 2).reshape(b, k * c, *hw)


def _stacked_parameter(src: torch.Tensor | None, k: int) -> nn.Parameter | None:
    """An uninitialized parameter of shape ``[K, *src.shape]`` (weights are loaded afterwards with ``fuse``)."""
    if src is None:
        return None
    return nn.Parameter(torch.empty(k, *src.shape, dtype=src.dtype, device=src.device),
                        requires_grad=src.requires_grad)


class _GroupedConv(nn.Module):
    """What K convolutions (or transposed convolutions) ``src`` turn into: their hyper-parameters, with
    ``groups = K * src.groups``, and stacked weights; ``weight.flatten(0, 1)`` is the grouped operator's weight."""

    def __init__(self, src: nn.Conv2d | nn.ConvTranspose2d, k: int) -> None:
        super().__init__()
        if src.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__}: padding_mode {src.padding_mode!r} is not supported; "
                             "expected 'zeros'")
        self.k, self.in_channels, self.groups = k, src.in_channels, src.groups * k
        self.stride, self.padding, self.dilation = src.stride, src.padding, src.dilation
        self.weight = _stacked_parameter(src.weight, k)
        self.bias = _stacked_parameter(src.bias, k)

    def grouped_bias(self, x: torch.Tensor) -> torch.Tensor | None:
        """Check that ``x`` is channel-stacked ``[B, K*Cin, H, W]``; return the grouped operator's bias."""
        if x.dim() != 4 or x.shape[1] != self.k * self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected channel-stacked input [B, {self.k}*{self.in_channels}"
                             f", H, W], got {tuple(x.shape)}")
        return None if self.bias is None else self.bias.flatten()


class FusedConv2d(_GroupedConv):
    """K ``nn.Conv2d`` as one grouped convolution on ``[B, K*Cin, H, W]`` -> ``[B, K*Cout, H', W']``.

    ``weight`` is ``[K, Cout, Cin/g, kh, kw]``; flattening its first two axes gives the grouped convolution's weight
    with ``groups = K*g`` (stream k's output channels come from stream k's input channels only).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.grouped_bias(x)
        return F.conv2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation, self.groups)


class FusedConvTranspose2d(_GroupedConv):
    """K ``nn.ConvTranspose2d`` as one grouped transposed convolution on ``[B, K*Cin, H, W]``.

    ``weight`` is ``[K, Cin, Cout/g, kh, kw]`` (the ordinary layer's weight is input-channel first).
    """

    def __init__(self, src: nn.ConvTranspose2d, k: int) -> None:
        super().__init__(src, k)
        self.output_padding = src.output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.grouped_bias(x)
        return F.conv_transpose2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


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
