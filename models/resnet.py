"""MSRResNet-style deraining network (Wang et al.'s SRResNet without batch norm, as in BasicSR's MSRResNet), with no
upscaling and a global residual: the body predicts ``output - input``.

Input and output: NCHW float32 images on the 0..1 scale, any height and width (all convolutions are 3x3, padding 1).
"""
from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv-ReLU-conv with an identity skip; no batch norm (it hurts restoration, as in EDSR/MSRResNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        # MSRResNet scales the initial weights of residual branches by 0.1 so a deep stack starts near identity.
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class ResNet(nn.Module):
    """MSRResNet without upsampling.

    Args:
        blocks: number of residual blocks (MSRResNet: 16).
        channels: feature channels (MSRResNet: 64).
        in_channels: image channels (3 for RGB).
    """

    def __init__(self, blocks: int = 16, channels: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.conv_hr = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_last = nn.Conv2d(channels, in_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW float, 0..1 -> NCHW float, same shape (not clamped: metrics see the raw output)."""
        feat = self.act(self.conv_first(x))
        out = self.body(feat)
        out = self.conv_last(self.act(self.conv_hr(out)))
        return x + out
