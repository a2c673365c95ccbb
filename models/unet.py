"""A plain U-Net for image restoration (Ronneberger et al. 2015, as used by the paper's UNet baseline): double
3x3 conv blocks, 2x2 max-pool down, transposed-conv up, skip concatenation, and a global residual.

Input and output: NCHW float32 on the 0..1 scale, any height and width: inputs are reflect-padded to a multiple of
``2 ** levels`` and the output is cropped back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``levels`` down-samplings; channels double per level from ``base``.

    Args:
        base: channels at full resolution (paper-size: 32).
        levels: number of 2x down-samplings (4 -> bottleneck at 1/16 resolution).
        in_channels: image channels.
    """

    def __init__(self, base: int = 32, levels: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.levels = levels
        chans = [base * 2 ** i for i in range(levels + 1)]
        self.inc = _double_conv(in_channels, chans[0])
        self.down = nn.ModuleList(_double_conv(chans[i], chans[i + 1]) for i in range(levels))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
                                for i in reversed(range(levels)))
        self.dec = nn.ModuleList(_double_conv(2 * chans[i], chans[i]) for i in reversed(range(levels)))
        self.out = nn.Conv2d(chans[0], in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW float, 0..1 -> NCHW float, same shape."""
        h, w = x.shape[-2:]
        m = 2 ** self.levels
        ph, pw = (-h) % m, (-w) % m
        # reflect padding needs pad < size; replicate is the safe fallback for tiny inputs
        mode = "reflect" if ph < h and pw < w else "replicate"
        xp = F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x
        skips = [self.inc(xp)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        y = xp + self.out(y)
        return y[..., :h, :w]
