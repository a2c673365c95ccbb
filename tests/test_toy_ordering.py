"""Tests of the toy's own-cell ordering verdict (engine.experiments.toy_ordering) on hand-made records."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.experiments.toy_ordering import MIN_Z, linear_filter_floor, own_cell_ordering


def _rec(train, test, per_curve, noise=(0.0, 1.0), test_noise=None):
    per = np.asarray(per_curve, dtype=np.float64)
    return {"train_order": train, "train_noise": list(noise), "test_order": test,
            "test_noise": list(test_noise or noise), "mse": float(per.mean()),
            "mse_se": float(per.std(ddof=1) / np.sqrt(len(per))), "mse_per_curve": per.tolist()}


def test_paired_steps_against_hand_computed_differences():
    o1, o4, o8 = [0.001, 0.002, 0.0015], [0.05, 0.06, 0.04], [0.052, 0.063, 0.043]
    records = [_rec(1, 1, o1), _rec(4, 4, o4), _rec(8, 8, o8),
               _rec(4, 8, [9.0, 9.0, 9.0]), _rec(1, 1, [5.0, 5.0], test_noise=(10.0, 5.0))]  # not own cells
    ordering = own_cell_ordering(records)
    assert [c.order for c in ordering.cells] == [1, 4, 8]
    assert ordering.cells[1].mse == pytest.approx(0.05)
    d = np.array(o8) - np.array(o4)  # 0.002, 0.003, 0.003
    step = ordering.steps[1]
    assert step.paired and (step.lower, step.higher) == (4, 8)
    assert step.diff == pytest.approx(d.mean())
    assert step.se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    # the paired error is far below the cells' errors combined: the spread shared by both cells cancels
    assert step.se < 0.1 * math.hypot(ordering.cells[1].se, ordering.cells[2].se)
    assert step.z > MIN_Z and ordering.holds
    assert "holds" in ordering.text() and "O=8 minus O=4" in ordering.text()


def test_a_step_down_or_within_noise_does_not_hold():
    down = own_cell_ordering([_rec(4, 4, [0.05, 0.06, 0.04]), _rec(8, 8, [0.049, 0.058, 0.041])])
    assert down.steps[0].diff < 0 and not down.holds
    assert "does not hold" in down.text()
    noisy = own_cell_ordering([_rec(4, 4, [0.05, 0.06, 0.04]), _rec(8, 8, [0.051, 0.059, 0.042])])
    assert noisy.steps[0].diff > 0 and noisy.steps[0].z < MIN_Z and not noisy.holds


def test_unpaired_records_fall_back_to_combined_errors():
    a, b = _rec(1, 1, [0.1, 0.2]), _rec(8, 8, [0.5, 0.7])
    del a["mse_per_curve"]
    step = own_cell_ordering([a, b]).steps[0]
    assert not step.paired
    assert step.se == pytest.approx(math.hypot(a["mse_se"], b["mse_se"]))
    assert step.diff == pytest.approx(0.6 - 0.15)


def test_needs_two_own_cells():
    assert own_cell_ordering([_rec(4, 4, [0.05, 0.06])]) is None
    assert own_cell_ordering([_rec(4, 8, [0.05, 0.06]), _rec(8, 4, [0.05, 0.06])]) is None


def test_linear_filter_floor_constant_curve_is_averaging():
    for sigma, field in ((1.0, 21), (2.0, 41), (0.5, 5)):
        expected = 50 * sigma ** 2 / (sigma ** 2 + 50 * field)  # hand-derived: Wiener estimate of a random constant
        assert linear_filter_floor(0, sigma, field) == pytest.approx(expected, rel=1e-9)


def test_linear_filter_floor_matches_a_least_squares_filter_fitted_to_simulated_windows():
    """Independent reference: fit the best linear filter to simulated random-phase windows by least squares and
    score it on fresh windows."""
    rng = np.random.default_rng(0)
    order, field, points = 8, 21, 1000
    h = 20.0 / (points + 1)
    k = np.arange(field) - field // 2

    def windows(n):
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
        clean = 10 * np.cos(order * np.pi / 10 * h * k[None, :] + phase)
        return clean + rng.normal(size=clean.shape), clean[:, field // 2]

    a, b = windows(200_000)
    filt = np.linalg.lstsq(a, b, rcond=None)[0]
    a2, b2 = windows(200_000)
    simulated = np.mean((a2 @ filt - b2) ** 2)
    assert linear_filter_floor(order, 1.0, field, points) == pytest.approx(simulated, rel=0.02)


def test_linear_filter_floor_rises_with_order_and_falls_with_field():
    floors = [linear_filter_floor(o) for o in (1, 4, 8)]
    assert floors[0] < floors[1] < floors[2]
    assert linear_filter_floor(8, field=41) < linear_filter_floor(8, field=21)
    with pytest.raises(ValueError, match="odd field"):
        linear_filter_floor(4, field=20)


def test_cells_carry_their_floor_when_the_field_is_given():
    records = [_rec(4, 4, [0.05, 0.06]), _rec(8, 8, [0.052, 0.063])]
    with_floor = own_cell_ordering(records, field=21, points=1000)
    assert [c.floor for c in with_floor.cells] == [linear_filter_floor(4), linear_filter_floor(8)]
    assert f"linear-filter floor {linear_filter_floor(4):.4g}" in with_floor.text()
    assert all(c.floor is None for c in own_cell_ordering(records).cells)


def test_receptive_field_of_the_toy_network_by_probing():
    """An impulse at the centre reaches exactly receptive_field(kernel) output points of the network."""
    import torch

    from engine.experiments.toy import ToyNet
    from engine.experiments.toy_config import receptive_field

    for kernel in (3, 5):
        net = ToyNet(width=4, kernel=kernel).double()
        z = torch.zeros(1, 2, 101, dtype=torch.float64, requires_grad=True)
        net(z)[0, 1, 50].backward()
        reached = torch.nonzero(z.grad[0].abs().sum(0)).flatten()
        assert len(reached) == receptive_field(kernel) == 5 * (kernel - 1) + 1
