"""Deraining networks by name. Every model maps NCHW float32 images on the 0..1 scale to NCHW float32 of the same
shape (any height and width) and predicts a residual on top of its input.

    >>> import models
    >>> net = models.build("resnet-s")

Paper-size models: ``resnet`` (MSRResNet, 16 blocks x 64 ch), ``unet`` (4 levels, 32 base ch), ``swinir`` (light:
depths 6,6,6,6, embed 60, heads 6, window 8, MLP ratio 2). Small variants (``-s``) train quickly on a CPU.

Content priors (``models.vqgan``, the paper's Sec. VI-B): ``vqgan-ft`` is taming-transformers' ImageNet VQGAN
(``f16-1024``) whose weights come from a prior checkpoint (``build_from_prior``) and whose encoder alone is trained;
``vqgan-noquant`` is the same encoder-decoder without vector quantization, trained from scratch (the ablation of
Fig. 18). ``-s`` variants use the ``small`` configuration. These decode their output from a latent instead of
adding a residual to the input.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .resnet import ResNet
from .swinir import SwinIR
from .unet import UNet
from .vqgan import VQGAN, LoadReport, PriorError, load_prior

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
    "vqgan-ft": lambda: VQGAN("f16-1024"),
    "vqgan-ft-s": lambda: VQGAN("small"),
    "vqgan-noquant": lambda: VQGAN("f16-1024", quantize=False),
    "vqgan-noquant-s": lambda: VQGAN("small", quantize=False),
}

#: Valid model names.
NAMES: tuple[str, ...] = tuple(_BUILDERS)
#: Models whose weights come from a prior checkpoint (``build_from_prior``) rather than from scratch.
PRIOR_MODELS: tuple[str, ...] = ("vqgan-ft", "vqgan-ft-s")


def build(name: str) -> nn.Module:
    """A freshly initialized model called ``name`` (uses torch's global RNG: seed it first for reproducibility)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(NAMES)}")
    return _BUILDERS[name]()


def build_from_prior(name: str, prior: str) -> tuple[nn.Module, LoadReport]:
    """The model ``name`` (one of ``PRIOR_MODELS``) with the weights of the checkpoint ``prior`` (a taming ``.ckpt``
    or a ``prior.pt`` of ``rainsweep prior``) and every parameter frozen except the encoder's.

    Raises ValueError for another model name, ``PriorError`` naming the keys when the checkpoint does not fit.
    """
    if name not in PRIOR_MODELS:
        raise ValueError(f"model {name!r} takes no prior; models that do: {', '.join(PRIOR_MODELS)}")
    net = build(name)
    report = load_prior(net, prior)
    net.freeze_except_encoder()
    return net, report


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["NAMES", "PRIOR_MODELS", "build", "build_from_prior", "parameter_count", "ResNet", "UNet", "SwinIR",
           "VQGAN", "LoadReport", "PriorError", "load_prior"]
