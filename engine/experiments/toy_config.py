"""Settings of the analogous experiment (``rainsweep toy``), without torch so the command line can show them.

Why the defaults are what they are is documented in ``engine.experiments.toy``.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.experiments.toy_data import DEFAULT_POINTS, DEFAULT_SEGMENTS, SEGMENT_LEN

LOSSES = ("l1", "l2")
#: convolutions in the toy network (the paper's five)
LAYERS = 5


def receptive_field(kernel: int, layers: int = LAYERS) -> int:
    """Points of input one output point of ``layers`` stacked 'same' convolutions of odd ``kernel`` depends on."""
    return layers * (kernel - 1) + 1


@dataclass(frozen=True)
class ToyConfig:
    """Settings of one experiment.

    Training: ``iters`` optimizer steps of ``batch`` segments each, Adam at ``lr`` with a cosine decay to 0, loss
    ``loss`` ("l1", the paper's, or "l2") on both output channels. Network: five 1-D convolutions of ``width``
    hidden channels and an odd ``kernel``; x enters divided by ``x_in_scale``, the noisy y by ``y_in_scale``. Test:
    every cell's MSE is over ``test_curves`` independent whole curves of ``points`` points (the cells of one noise
    share them across orders). Sizes in points; ``seed`` fixes data, batch order, initial weights and test curves;
    ``device`` is a torch device ("cpu", "cuda").
    """

    iters: int = 6000
    batch: int = 16
    lr: float = 2e-3
    segments: int = DEFAULT_SEGMENTS
    points: int = DEFAULT_POINTS
    seg_len: int = SEGMENT_LEN
    width: int = 163
    kernel: int = 5
    x_in_scale: float = 2.5
    y_in_scale: float = 200.0
    test_curves: int = 100
    loss: str = "l1"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("iters", "batch", "segments", "points", "seg_len", "width", "kernel", "test_curves"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seg_len > self.points:
            raise ValueError(f"seg_len ({self.seg_len}) must not exceed points ({self.points})")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("x_in_scale", "y_in_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
