"""The toy's own-cell ordering (paper section V): does a network trained on a more complex curve score a higher MSE
on its own training setting (``O=1 < O=4 < O=8`` on N(0, 1)), and by how many standard errors?

Works on the records ``engine.experiments.toy.SettingResult.records`` produces (MSE in squared y units). Test
curves are drawn with common random numbers (every order of one noise shares x positions and noise values), so the
difference of two own cells is judged curve by curve: its standard error is that of the per-curve differences,
much smaller than the two cells' errors combined.

``linear_filter_floor`` is the analytical reference the own cells are read against: the smallest MSE any linear
filter of the network's receptive field reaches from the noisy y alone. A network at that floor has learned the
noise (a filter); one far below it has learned the curve from x.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: a step of the ordering counts as shown when the difference is at least this many standard errors
MIN_Z = 2.0


def linear_filter_floor(order: float, sigma: float = 1.0, field: int = 21, points: int = 1000) -> float:
    """The smallest MSE of a linear filter that denoises ``y = 10 cos(order * pi * x / 10)`` from ``field`` noisy
    y samples around the point it estimates (the Wiener filter), y units squared.

    The curve is treated as a sinusoid of random phase (amplitude 10, so variance 50) sampled at the mean spacing
    of ``points`` uniform x on [-10, 10] (``20 / (points + 1)``), with white noise of standard deviation
    ``sigma``. With autocovariance ``C_ij = 50 cos(w (i - j) h) + sigma^2 delta_ij`` and cross-covariance
    ``c_i = 50 cos(w i h)`` the floor is ``50 - c^T C^-1 c``. For a constant curve (order 0) it is
    ``50 sigma^2 / (sigma^2 + 50 field)``, about ``sigma^2 / field``: plain averaging.

    Parameters
    ----------
    order : float
        Cosine order (>= 0).
    sigma : float
        Noise standard deviation, y units (> 0).
    field : int
        Taps of the filter, odd (a five-layer network of kernel k sees ``4 (k - 1) + 1`` points).
    points : int
        Points per curve on [-10, 10] (sets the spacing).
    """
    if order < 0 or sigma <= 0 or field < 1 or field % 2 == 0 or points < 1:
        raise ValueError(f"need order >= 0, sigma > 0, an odd field >= 1 and points >= 1, got {order=}, {sigma=}, "
                         f"{field=}, {points=}")
    w, h = order * np.pi / 10.0, 20.0 / (points + 1)
    k = np.arange(field, dtype=np.float64) - field // 2
    cov = 50.0 * np.cos(w * h * (k[:, None] - k[None, :])) + sigma ** 2 * np.eye(field)
    cross = 50.0 * np.cos(w * h * k)
    return float(50.0 - cross @ np.linalg.solve(cov, cross))


@dataclass(frozen=True)
class OwnCell:
    """The MSE of the network trained on ``order`` on its own training cell, its standard error and, when known,
    the cell's ``linear_filter_floor``."""

    order: int
    mse: float
    se: float
    floor: float | None = None


@dataclass(frozen=True)
class Step:
    """``higher``'s own-cell MSE minus ``lower``'s (``diff``, y units squared) and the difference's standard error;
    ``paired`` says whether the error comes from per-curve differences on shared draws."""

    lower: int
    higher: int
    diff: float
    se: float
    paired: bool

    @property
    def z(self) -> float:
        """The difference in standard errors (inf for a nonzero difference with a zero error, NaN when the error
        is unknown)."""
        if math.isnan(self.se) or self.se > 0:
            return self.diff / self.se
        return math.copysign(math.inf, self.diff) if self.diff else 0.0


@dataclass(frozen=True)
class Ordering:
    """Own cells in ascending training order and the steps between neighbours."""

    cells: tuple[OwnCell, ...]
    steps: tuple[Step, ...]

    @property
    def holds(self) -> bool:
        """Every step goes up by at least ``MIN_Z`` standard errors."""
        return all(step.z >= MIN_Z for step in self.steps)

    def text(self) -> str:
        """One paragraph for a terminal or a report."""
        cells = ", ".join(f"O={c.order} {c.mse:.4g} ± {c.se:.2g}"
                          + ("" if c.floor is None else f" (linear-filter floor {c.floor:.4g})") for c in self.cells)
        steps = "; ".join(
            f"O={s.higher} minus O={s.lower}: {s.diff:+.3g} ± {s.se:.2g} ({s.z:.1f} SE"
            f"{', paired over shared test draws' if s.paired else ''})" for s in self.steps)
        verdict = ("holds" if self.holds else
                   f"does not hold (a step under {MIN_Z:g} standard errors or going down)")
        return (f"Own-cell ordering on N(0,1), mse ± standard error: {cells}. {steps}. "
                f"The paper's ordering (a more complex training curve, a higher error on its own cell) {verdict}.")


def _own_record(records: Sequence[dict], order: int, noise: tuple[float, float]) -> dict | None:
    for r in records:
        if (r["train_order"] == order and r["test_order"] == order
                and tuple(r["train_noise"]) == tuple(noise) and tuple(r["test_noise"]) == tuple(noise)):
            return r
    return None


def _step(lower: dict, higher: dict) -> Step:
    a, b = lower.get("mse_per_curve"), higher.get("mse_per_curve")
    if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
        d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
        return Step(lower["train_order"], higher["train_order"], float(d.mean()),
                    float(d.std(ddof=1) / np.sqrt(len(d))), True)
    se = math.hypot(lower.get("mse_se", math.nan), higher.get("mse_se", math.nan))
    return Step(lower["train_order"], higher["train_order"], higher["mse"] - lower["mse"], se, False)


def own_cell_ordering(records: Sequence[dict], noise: tuple[float, float] = (0.0, 1.0), field: int | None = None,
                      points: int = 1000) -> Ordering | None:
    """The ordering of the networks trained with ``noise`` on their own cells (same order, same noise).

    Parameters
    ----------
    records : sequence of dict
        Toy records: ``train_order``, ``train_noise``, ``test_order``, ``test_noise``, ``mse`` and, when present,
        ``mse_se`` and ``mse_per_curve`` (squared y units).
    noise : (float, float)
        The training and test noise ``(mu, sigma)`` of the cells compared.
    field, points : int, optional
        The networks' receptive field and the curves' points: with ``field``, every cell carries its
        ``linear_filter_floor`` (for zero-mean noise only).

    Returns
    -------
    Ordering or None
        None when fewer than two training orders have their own cell in ``records``.
    """
    orders = sorted({r["train_order"] for r in records})
    own = [rec for rec in (_own_record(records, o, noise) for o in orders) if rec is not None]
    if len(own) < 2:
        return None
    def floor(order: int) -> float | None:
        if field is None or noise[0] != 0 or noise[1] <= 0:
            return None
        return linear_filter_floor(order, noise[1], field, points)

    cells = tuple(OwnCell(r["train_order"], float(r["mse"]), float(r.get("mse_se", math.nan)),
                          floor(r["train_order"])) for r in own)
    steps = tuple(_step(lo, hi) for lo, hi in zip(own, own[1:]))
    return Ordering(cells, steps)
