"""Fused versions of the project's networks and the one converter that fuses a module (``fuse_module``).

A fused network keeps the ordinary network's module tree and parameter names; each parameter gains a leading
stream axis of size K (see ``models.fused_layers``). Its ``forward`` takes and returns stream-major images
``[K, B, 3, H, W]`` (float, 0..1 in, not clamped out); inside, convolutions run on the channel-stacked layout
``[B, K*C, H, W]`` and SwinIR's token layers on ``[K, B, H*W, C]`` (or, with ``FusedNet.fusion = "loop"``, the
ordinary network runs once per stream).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fused_layers import (FusedConv2d, FusedConvTranspose2d, FusedLayerNorm, FusedLinear, cat_streams, from_stacked,
                           stacked_to_tokens, to_stacked, tokens_to_stacked)
from .resnet import ResidualBlock, ResNet
from .swinir import RSTB, SwinBlock, SwinIR, WindowAttention, window_partition, window_reverse
from .unet import UNet


def _copy_children(dst: nn.Module, src: nn.Module, k: int) -> None:
    """Register the fused version of each child of ``src`` on ``dst`` under the same name and in the same order
    (so that ``parameters()`` lists the same tensors in the same order as the ordinary model)."""
    for name, child in src.named_children():
        dst.add_module(name, fuse_module(child, k))


def check_images(x: torch.Tensor, k: int, channels: int) -> None:
    """Raise ValueError unless ``x`` is a float tensor ``[K, B, channels, H, W]`` with this model's K."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor [K, B, C, H, W], got {type(x).__name__}")
    if x.dim() != 5 or x.shape[0] != k or x.shape[2] != channels or not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor [K={k}, B, C={channels}, H, W] (stream-major, 0..1), got "
                         f"{x.dtype} of shape {tuple(x.shape)}")


class FusedNet(nn.Module):
    """Base of the fused networks: K streams of ``src``'s architecture (same child names, fused), the input check,
    and how the streams are computed.

    Attributes
    ----------
    k : int
        Number of streams.
    fusion : str
        How the K streams are computed:

        - ``"grouped"``: one grouped convolution per layer on ``[B, K*C, H, W]`` (HFTA's layout);
        - ``"loop"``: the ordinary network once per stream (``torch.func.functional_call`` with stream k's views
          of the fused weights), so that activations stay the size of one run's;
        - ``"auto"`` (the default): ``"grouped"`` on CUDA, ``"loop"`` elsewhere.

        Why not grouped on CPU: oneDNN runs a grouped convolution with 16 channels per group about 3x slower than
        the K ordinary ones (its ``jit:avx512_core`` / ``gemm:jit`` grouped kernels against the ``brg_conv``
        kernels of ordinary convolutions); and K-fold activations (33.5 MB for K = 8 ``resnet-s`` at 16 x 64 x 64)
        pass glibc's largest mmap threshold (32 MB), so every step maps, faults and zeroes them afresh.
    memory_format : torch.memory_format
        Layout in memory of the images inside the network: ``torch.contiguous_format`` (NCHW, the default) or
        ``torch.channels_last`` (NHWC strides: oneDNN's grouped convolutions run without reorders and never fall
        back to its im2col kernel).

    Results agree to rounding for every ``layout`` and ``memory_format``.
    """

    def __init__(self, src: nn.Module, k: int, in_channels: int) -> None:
        super().__init__()
        self.k, self.in_channels = k, in_channels
        self.fusion = "auto"
        self.memory_format = torch.contiguous_format
        _copy_children(self, src, k)
        # The ordinary network that "loop" calls with each stream's weights; in a list, so that it is not a
        # submodule (no state-dict entries, no parameters of its own in ``parameters()``).
        self._ordinary = [copy.deepcopy(src).requires_grad_(False)]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to(), .cuda(), .double() ... move the ordinary network (its non-persistent buffers are used) as well
        super()._apply(fn, recurse)
        self._ordinary[0]._apply(fn, recurse)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[K, B, C, H, W]`` float, 0..1 -> ``[K, B, C, H, W]`` (contiguous); slice k is ordinary model k's
        output for ``x[k]``."""
        check_images(x, self.k, self.in_channels)
        name = self.fusion
        if name == "auto":
            name = "grouped" if x.device.type == "cuda" else "loop"
        if name == "loop":
            return self._loop(x)
        if name != "grouped":
            raise ValueError(f"fusion: expected 'auto', 'grouped' or 'loop', got {self.fusion!r}")
        return from_stacked(self.grouped_forward(to_stacked(x, self.memory_format)), self.k)

    def grouped_forward(self, xs: torch.Tensor) -> torch.Tensor:
        """The fused computation on channel-stacked images ``[B, K*C, H, W]``, returning the same layout."""
        raise NotImplementedError

    def _loop(self, x: torch.Tensor) -> torch.Tensor:
        net = self._ordinary[0].train(self.training)
        # unbind: one view per stream, whose backward is a single stack (indexing K times would zero-fill K copies)
        per_stream = {name: t.unbind(0) for name, t in self.state_dict(keep_vars=True).items()}
        outs = [torch.func.functional_call(net, {name: v[i] for name, v in per_stream.items()},
                                           (x[i].contiguous(memory_format=self.memory_format),))
                for i in range(self.k)]
        return torch.stack(outs)


class FusedResNet(FusedNet):
    """K ``ResNet`` (MSRResNet without upsampling) as one network of grouped convolutions."""

    def __init__(self, src: ResNet, k: int) -> None:
        super().__init__(src, k, src.conv_first.in_channels)

    def grouped_forward(self, xs: torch.Tensor) -> torch.Tensor:
        feat = self.act(self.conv_first(xs))
        out = self.conv_last(self.act(self.conv_hr(self.body(feat))))
        return xs + out  # the global residual adds each stream's own input


def _pad_to_multiple(xs: torch.Tensor, m: int) -> torch.Tensor:
    """Pad the bottom and right of ``[B, C, H, W]`` to multiples of ``m`` as the ordinary models do (reflect, or
    replicate where the pad would reach past the image). Padding acts per channel, so streams stay apart."""
    h, w = xs.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(xs, (0, pw, 0, ph), mode=mode) if ph or pw else xs


class FusedUNet(FusedNet):
    """K ``UNet``: grouped convolutions and transposed convolutions, per-channel max-pool, and skip concatenations
    that keep each stream's channels together (``cat_streams``)."""

    def __init__(self, src: UNet, k: int) -> None:
        super().__init__(src, k, src.inc[0].in_channels)
        self.levels = src.levels

    def grouped_forward(self, xs: torch.Tensor) -> torch.Tensor:
        h, w = xs.shape[-2:]
        xp = _pad_to_multiple(xs, 2 ** self.levels)
        skips = [self.inc(xp)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(cat_streams([up(y), skips.pop()], self.k))
        return (xp + self.out(y))[..., :h, :w]


class FusedWindowAttention(nn.Module):
    """K ``WindowAttention``: batched qkv/proj matmuls and one attention call over all streams' windows, each
    stream with its own relative position bias table ``[K, (2ws-1)^2, heads]``."""

    def __init__(self, src: WindowAttention, k: int) -> None:
        super().__init__()
        self.k, self.heads, self.ws = k, src.heads, src.ws
        self.bias_table = nn.Parameter(torch.empty(k, *src.bias_table.shape, dtype=src.bias_table.dtype,
                                                   device=src.bias_table.device))
        self.register_buffer("rel_index", src.rel_index.clone(), persistent=False)
        _copy_children(self, src, k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: ``[K, B*nW, N, C]`` window tokens; mask: ``(nW, N, N)`` additive (0 or -100) or None."""
        k, bw, n, c = x.shape
        heads = self.heads
        # (3, K, B*nW, heads, N, C/heads): the attention's batch axes are (K, B*nW), so each stream's bias applies
        # to its own windows only, by broadcasting (no per-window copy of the bias).
        q, kt, v = self.qkv(x).view(k, bw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.bias_table[:, self.rel_index.view(-1)].view(k, n, n, heads).permute(0, 3, 1, 2)
        if mask is None:
            out = F.scaled_dot_product_attention(q, kt, v, attn_mask=bias.unsqueeze(1).to(q.dtype))
        else:
            nw = mask.shape[0]
            attn_mask = (bias.view(k, 1, 1, heads, n, n) + mask.view(1, 1, nw, 1, n, n)).to(q.dtype)
            shape = (k, bw // nw, nw, heads, n, c // heads)
            out = F.scaled_dot_product_attention(q.reshape(shape), kt.reshape(shape), v.reshape(shape),
                                                 attn_mask=attn_mask).reshape(k, bw, heads, n, c // heads)
        return self.proj(out.transpose(2, 3).reshape(k, bw, n, c))


class FusedSwinBlock(SwinBlock):
    """K ``SwinBlock`` on tokens ``[K, B, H*W, C]`` (inherits the ordinary block's shift mask)."""

    def __init__(self, src: SwinBlock, k: int) -> None:
        nn.Module.__init__(self)  # the layers come fused from ``src``, not freshly initialized
        self.k, self.ws, self.shift = k, src.ws, src.shift
        _copy_children(self, src, k)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: ``[K, B, H*W, C]`` tokens."""
        h, w = hw
        k, b, _, c = x.shape
        shift = self.shift if min(h, w) > self.ws else 0
        y = self.norm1(x).reshape(k * b, h, w, c)
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
        mask = self._mask(h, w, x.device) if shift else None
        windows = window_partition(y, self.ws)
        windows = self.attn(windows.view(k, -1, *windows.shape[1:]), mask)
        y = window_reverse(windows.flatten(0, 1), self.ws, h, w)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + y.reshape(k, b, h * w, c)
        return x + self.mlp(self.norm2(x))


class FusedRSTB(nn.Module):
    """K ``RSTB``: fused Swin blocks, a grouped 3x3 convolution, and each stream's skip."""

    def __init__(self, src: RSTB, k: int) -> None:
        super().__init__()
        self.k = k
        _copy_children(self, src, k)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: ``[K, B, H*W, C]`` tokens."""
        y = x
        for blk in self.blocks:
            y = blk(y, hw)
        return x + stacked_to_tokens(self.conv(tokens_to_stacked(y, hw)), self.k)


class FusedSwinIR(FusedNet):
    """K ``SwinIR`` (batched window attention, batched linear layers, per-stream LayerNorm, grouped convolutions)."""

    def __init__(self, src: SwinIR, k: int) -> None:
        super().__init__(src, k, src.conv_first.in_channels)
        self.window = src.window

    def grouped_forward(self, xs: torch.Tensor) -> torch.Tensor:
        h, w = xs.shape[-2:]
        xp = _pad_to_multiple(xs, self.window)
        hw = xp.shape[-2], xp.shape[-1]
        feat = self.conv_first(xp)
        t = stacked_to_tokens(feat, self.k)
        for layer in self.layers:
            t = layer(t, hw)
        t = tokens_to_stacked(self.norm(t), hw)
        y = xp + self.conv_last(self.conv_after_body(t) + feat)
        return y[..., :h, :w]


def _fuse_container(src: nn.Module, k: int) -> nn.Module:
    """A container whose forward works unchanged on channel-stacked images (Sequential, ModuleList, a residual
    block of convolutions): the same module with each child fused."""
    if next(src.parameters(recurse=False), None) is not None or next(src.buffers(recurse=False), None) is not None:
        raise TypeError(f"fuse_module: {type(src).__name__} holds its own tensors; it needs a fused class")
    # copy the container but not its children (the memo maps each child to itself), then replace each child
    dst = copy.deepcopy(src, memo={id(child): child for child in src.children()})
    _copy_children(dst, src, k)
    return dst


def _stateless(src: nn.Module, k: int) -> nn.Module:
    """Element-wise activations act on every stream alike."""
    return copy.deepcopy(src)


#: The one place that says how each module type is fused: type -> ``(module, K) -> fused module``.
FUSERS: dict[type, Callable[[nn.Module, int], nn.Module]] = {
    nn.Conv2d: FusedConv2d,
    nn.ConvTranspose2d: FusedConvTranspose2d,
    nn.Linear: FusedLinear,
    nn.LayerNorm: FusedLayerNorm,
    nn.ReLU: _stateless, nn.LeakyReLU: _stateless, nn.GELU: _stateless,
    nn.Sequential: _fuse_container, nn.ModuleList: _fuse_container, ResidualBlock: _fuse_container,
    ResNet: FusedResNet,
    UNet: FusedUNet,
    WindowAttention: FusedWindowAttention, SwinBlock: FusedSwinBlock, RSTB: FusedRSTB, SwinIR: FusedSwinIR,
}


def fuse_module(src: nn.Module, k: int) -> nn.Module:
    """The fused version of ``src`` for ``k`` streams: same module names, parameters of shape ``[K, *shape]``,
    left uninitialized (``models.fused.from_models`` loads the weights).

    Raises
    ------
    TypeError
        For a module type without an entry in ``FUSERS``.
    """
    fuser = FUSERS.get(type(src))
    if fuser is None:
        raise TypeError(f"fuse_module: no fused version of {type(src).__name__}; known: "
                        f"{', '.join(t.__name__ for t in FUSERS)}")
    return fuser(src, k)
