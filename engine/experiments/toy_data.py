"""Data of the analogous experiment (paper section V): denoising the curve ``y = 10 cos(O * pi * x / 10)``.

The cosine plays the background image, its order ``O`` the background complexity, and additive Gaussian noise
``n ~ N(mu, sigma)`` the rain. Units are the function's own (x in [-10, 10], y in [-10, 10] before noise); nothing
is rescaled here.

Layout of every sample: float32 ``(2, L)``, channel 0 = x (sorted ascending), channel 1 = y. Inputs carry the noisy
``y + n`` in channel 1, targets the clean ``y``; channel 0 is the same x in both. Batches are ``(N, 2, L)``
(NCL, what ``torch.nn.Conv1d`` takes).

Randomness: every draw comes from a ``numpy.random.Generator`` the caller passes in; ``stream_seed`` derives
independent, order-free seeds from ``(seed, purpose, order, mu, sigma)`` so a network or a test curve is the same
whichever grid it is part of.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

X_MIN, X_MAX = -10.0, 10.0
AMPLITUDE = 10.0
#: points in one training segment (the paper's crop length)
SEGMENT_LEN = 128
#: points sampled on [-10, 10] for one curve (training segments are cut from such curves; a test input is one)
DEFAULT_POINTS = 1000
#: training segments per network, as in the paper
DEFAULT_SEGMENTS = 10_000

# stream purposes for stream_seed: keep the numbers stable, they are part of the reproducibility contract
PURPOSE_TRAIN_DATA = 1
PURPOSE_TRAIN_INIT = 2
PURPOSE_TEST_CURVE = 3


@dataclass(frozen=True)
class Noise:
    """Additive Gaussian noise ``N(mu, sigma)`` in y units; ``sigma`` is the standard deviation (>= 0)."""

    mu: float
    sigma: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mu) and np.isfinite(self.sigma)):
            raise ValueError(f"noise mu and sigma must be finite, got mu={self.mu}, sigma={self.sigma}")
        if self.sigma < 0:
            raise ValueError(f"noise sigma must be >= 0, got {self.sigma}")

    @classmethod
    def parse(cls, text: str) -> "Noise":
        """Parse ``"mu:sigma"``, e.g. ``"0:1"`` or ``"10:5"``."""
        parts = text.strip().split(":")
        if len(parts) != 2:
            raise ValueError(f"expected noise as MU:SIGMA (e.g. 0:1), got {text!r}")
        try:
            mu, sigma = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"expected noise as MU:SIGMA with numbers (e.g. 0:1), got {text!r}") from None
        return cls(mu, sigma)

    def label(self) -> str:
        """Short text such as ``N(0,1)``."""
        return f"N({self.mu:g},{self.sigma:g})"

    def as_list(self) -> list[float]:
        return [float(self.mu), float(self.sigma)]


def check_order(order: int) -> int:
    """Validate a cosine order (an integer >= 1) and return it as ``int``."""
    if isinstance(order, bool) or int(order) != order or order < 1:
        raise ValueError(f"cosine order must be an integer >= 1, got {order!r}")
    return int(order)


def ground_truth(x: np.ndarray, order: int) -> np.ndarray:
    """The clean curve ``10 cos(order * pi * x / 10)`` at ``x`` (same shape and float dtype as ``x``)."""
    order = check_order(order)
    return (AMPLITUDE * np.cos(order * np.pi * x / 10.0)).astype(x.dtype, copy=False)


def stream_seed(seed: int, purpose: int, order: int | None, noise: Noise) -> np.random.SeedSequence:
    """A seed sequence for one (purpose, order, noise) stream, independent of the others and of grid order.

    ``order=None`` gives a stream shared by every order (the test draws: see ``engine.experiments.toy.test_curves``).
    The noise parameters enter through their float64 bit patterns, so 0:1 and 0:1.0 give the same stream.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    bits = np.array([noise.mu, noise.sigma], dtype=np.float64).view(np.uint64)
    order_key = 0 if order is None else check_order(order)  # orders are >= 1, so 0 never names one
    return np.random.SeedSequence([int(seed), int(purpose), order_key, int(bits[0]), int(bits[1])])


def sample_x(n_points: int, rng: np.random.Generator, rows: int | None = None) -> np.ndarray:
    """``n_points`` x positions drawn uniformly on [-10, 10] and sorted ascending; float64, shape
    ``(n_points,)`` or ``(rows, n_points)``."""
    shape = (n_points,) if rows is None else (rows, n_points)
    return np.sort(rng.uniform(X_MIN, X_MAX, size=shape), axis=-1)


def make_curve(order: int, noise: Noise, n_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One whole noisy curve (a test input) and its clean target, float32 ``(2, n_points)`` each.

    x: ``n_points`` uniform samples on [-10, 10], sorted; input y = truth + noise; target y = truth.
    """
    order = check_order(order)
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    x = sample_x(n_points, rng)
    y = ground_truth(x, order)
    n = rng.normal(noise.mu, noise.sigma, size=x.shape)  # sigma = 0 is allowed: a constant shift
    inputs = np.stack([x, y + n]).astype(np.float32)
    targets = np.stack([x, y]).astype(np.float32)
    return inputs, targets


def make_segments(
    order: int,
    noise: Noise,
    n_segments: int,
    rng: np.random.Generator,
    seg_len: int = SEGMENT_LEN,
    n_points: int = DEFAULT_POINTS,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Training segments, float32 ``(n_segments, 2, seg_len)`` inputs and targets.

    Each segment, as in the paper: sample ``n_points`` x on [-10, 10], sort them, choose a random x-range (a start
    index drawn uniformly, so the range is the span of ``seg_len`` consecutive points) and keep those points, with
    fresh noise on y. Every segment comes from its own sampled curve, like patches from many images. Work is done
    ``chunk`` segments at a time to bound memory (``chunk * n_points`` float64 values).
    """
    order = check_order(order)
    if n_segments < 1:
        raise ValueError(f"n_segments must be >= 1, got {n_segments}")
    if not 1 <= seg_len <= n_points:
        raise ValueError(f"need 1 <= seg_len <= n_points, got seg_len={seg_len}, n_points={n_points}")
    inputs = np.empty((n_segments, 2, seg_len), dtype=np.float32)
    targets = np.empty_like(inputs)
    offsets = np.arange(seg_len)
    for lo in range(0, n_segments, chunk):
        rows = min(chunk, n_segments - lo)
        xs = sample_x(n_points, rng, rows=rows)
        start = rng.integers(0, n_points - seg_len + 1, size=rows)
        x = np.take_along_axis(xs, start[:, None] + offsets[None, :], axis=1)
        y = ground_truth(x, order)
        n = rng.normal(noise.mu, noise.sigma, size=x.shape)  # sigma = 0 is allowed: a constant shift
        inputs[lo:lo + rows, 0] = x
        inputs[lo:lo + rows, 1] = y + n
        targets[lo:lo + rows, 0] = x
        targets[lo:lo + rows, 1] = y
    return inputs, targets
