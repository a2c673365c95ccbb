"""The convolutional encoder and decoder of VQGAN (Esser, Rombach, Ommer, *Taming Transformers for High-Resolution
Image Synthesis*, CVPR 2021), written in plain torch with the module and parameter names of the public
taming-transformers source (``taming/modules/diffusionmodules/model.py``), so that a checkpoint's state dict loads
by name: ``conv_in``, ``down.<level>.block.<i>`` / ``.attn.<i>`` / ``.downsample``, ``mid.block_1`` / ``attn_1`` /
``block_2``, ``up.<level>.block.<i>`` / ``.attn.<i>`` / ``.upsample``, ``norm_out``, ``conv_out``.

Tensors are NCHW float32 on the -1..1 scale (taming's convention); ``models.vqgan`` converts from 0..1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """taming's ``Normalize``: GroupNorm with 32 groups, eps 1e-6, affine (``groups`` smaller for tiny models)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """taming's ``nonlinearity``: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice with a skip; a 1x1 ``nin_shortcut`` when the channel count changes (the encoder and
    decoder have no time embedding, so taming's ``temb_proj`` does not exist here either)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 convolutions ``q``, ``k``, ``v``, ``proj_out``."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        k = self.k(h).reshape(b, c, hh * ww)  # b, c, hw
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # b, hw (queries), hw (keys)
        v = self.v(h).reshape(b, c, hh * ww)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after zero padding of one pixel right and bottom (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def make_level(block_in: int, block_out: int, blocks: int, attn: bool, dropout: float, groups: int) -> nn.Module:
    """One resolution level: ``block`` (``blocks`` residual blocks, the first from ``block_in`` channels) and
    ``attn`` (one attention block after each residual block when ``attn``, else empty)."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(block_in if i == 0 else block_out, block_out, dropout, groups)
                                for i in range(blocks))
    level.attn = nn.ModuleList(AttnBlock(block_out, groups) for _ in range(blocks if attn else 0))
    return level


def make_mid(channels: int, dropout: float, groups: int) -> nn.Module:
    """The middle of the encoder or decoder: ``block_1``, ``attn_1``, ``block_2``."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


def run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The residual blocks of one level, each followed by its attention block where the level has them."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The middle of the encoder or decoder: block_1, attn_1, block_2."""
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def attention_levels(resolution: int, levels: int, attn_resolutions: tuple[int, ...]) -> list[bool]:
    """Whether level ``i`` (resolution ``resolution / 2**i``) has attention blocks, as taming decides it: by the
    nominal training resolution, not the input's size, so the parameter set is fixed by the configuration."""
    return [resolution // 2 ** i in attn_resolutions for i in range(levels)]


class Encoder(nn.Module):
    """Image (NCHW, -1..1) -> latent (N, z_channels, H / 2**(L-1), W / 2**(L-1)) with L = len(ch_mult)."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, z_channels: int, in_channels: int = 3, dropout: float = 0.0,
                 double_z: bool = False, groups: int = 32) -> None:
        super().__init__()
        levels = len(ch_mult)
        attn = attention_levels(resolution, levels, attn_resolutions)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i in range(levels):
            level = make_level(ch * in_mult[i], ch * ch_mult[i], num_res_blocks, attn[i], dropout, groups)
            if i != levels - 1:
                level.downsample = Downsample(ch * ch_mult[i])
            self.down.append(level)
        block_in = ch * ch_mult[-1]
        self.mid = make_mid(block_in, dropout, groups)
        self.norm_out = normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(run_mid(self.mid, h))))


class Decoder(nn.Module):
    """Latent (N, z_channels, h, w) -> image (N, out_ch, h * 2**(L-1), w * 2**(L-1)), -1..1 scale (not clamped)."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, z_channels: int, out_ch: int = 3, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        levels = len(ch_mult)
        attn = attention_levels(resolution, levels, attn_resolutions)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = make_mid(block_in, dropout, groups)
        ups: list[nn.Module] = []
        for i in reversed(range(levels)):
            level = make_level(block_in, ch * ch_mult[i], num_res_blocks + 1, attn[i], dropout, groups)
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            ups.insert(0, level)  # up[i] is level i, as in taming's checkpoints
        self.up = nn.ModuleList(ups)
        self.norm_out = normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
