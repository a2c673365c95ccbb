"""Deraining networks by name. Every model maps NCHW float32 images on the 0..1 scale to NCHW float32 of the same
shape (any height and width) and predicts a residual on top of its input.

    >>> import models
    >>> net = models.build("resnet-s")

Paper-size models: ``resnet`` (MSRResNet, 16 blocks x 64 ch), ``unet`` (4 levels, 32 base ch), ``swinir`` (light:
depths 6,6,6,6, embed 60, heads 6, window 8, MLP ratio 2). Small variants (``-s``) train quickly on a CPU.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .resnet import ResNet
from .swinir import SwinIR
from .unet import UNet

_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: ResNet(blocks=16, channels=64),
    "unet": lambda: UNet(base=32, levels=4),
    "swinir": lambda: SwinIR(depths=(6, 6, 6, 6), embed=60, heads=6, window=8, mlp_ratio=2.0),
    # Small variants: same architecture families, sized for a few hundred CPU steps in a demo or test. swinir-s uses
    # 2 heads of 12 channels: CPU attention over many tiny heads is dominated by per-matmul overhead (4 heads of 6
    # channels ran at half the speed).
    "resnet-s": lambda: ResNet(blocks=4, channels=16),
    "unet-s": lambda: UNet(base=8, levels=3),
    "swinir-s": lambda: SwinIR(depths=(2, 2), embed=24, heads=2, window=8, mlp_ratio=2.0),
}

#: Valid model names.
NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build(name: str) -> nn.Module:
    """A freshly initialized model called ``name`` (uses torch's global RNG: seed it first for reproducibility)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(NAMES)}")
    return _BUILDERS[name]()


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["NAMES", "build", "parameter_count", "ResNet", "UNet", "SwinIR"]
