"""Tests of the analogous experiment (`rainsweep toy`): data, network, training, evaluation, command.

Sizes are tiny (narrow networks, a few hundred segments, short curves) so every test takes seconds on one core.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.cli.toy import format_table, toy
from engine.experiments.toy import (
    CurveResult,
    SettingResult,
    ToyConfig,
    ToyNet,
    Trained,
    batch_order,
    evaluate,
    n_parameters,
    run_grid,
    test_curves,
    train_network,
    write_results,
)
from engine.experiments.toy_data import Noise, ground_truth, make_curve, make_segments, stream_seed
from engine.experiments.toy_figures import mse_figure, relative_luminance, setting_figure, text_colors

TINY = dict(iters=150, batch=16, lr=3e-3, segments=256, points=200, width=16)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the results are reproducible for a fixed count, and several OpenMP threads on a busy
    shared machine spin-wait for each other (measured 60x slower for these tiny networks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------ data


def test_ground_truth_hand_values():
    x = np.array([0.0, 10.0, -10.0, 5.0, 1.25, 2.5])
    # order 1: 10 cos(pi x / 10): 10 at 0, -10 at +-10, 0 at 5
    np.testing.assert_allclose(ground_truth(x[:4], 1), [10.0, -10.0, -10.0, 0.0], atol=1e-12)
    # order 4: 10 cos(0.4 pi x): 0 at x = 1.25 (quarter period), -10 at x = 2.5 (half period)
    np.testing.assert_allclose(ground_truth(x[4:], 4), [0.0, -10.0], atol=1e-12)


def test_segments_shapes_ranges_and_targets():
    rng = np.random.default_rng(7)
    inp, tgt = make_segments(4, Noise(0.0, 1.0), 300, rng, n_points=1000, chunk=128)  # chunk < n: several chunks
    assert inp.shape == tgt.shape == (300, 2, 128)
    assert inp.dtype == tgt.dtype == np.float32
    x = inp[:, 0]
    assert x.min() >= -10.0 and x.max() <= 10.0
    assert np.all(np.diff(x, axis=1) >= 0), "segments must be sorted by x"
    np.testing.assert_array_equal(inp[:, 0], tgt[:, 0])  # x channel passes through unchanged
    # the target is the clean curve, computed here independently in float64
    np.testing.assert_allclose(tgt[:, 1], 10 * np.cos(4 * np.pi * x.astype(np.float64) / 10), atol=2e-5)


def test_segments_are_consecutive_points_of_a_sorted_curve_at_random_ranges():
    rng = np.random.default_rng(8)
    n_points, n_seg = 1000, 2000
    inp, _ = make_segments(1, Noise(0.0, 1.0), n_seg, rng, n_points=n_points)
    x = inp[:, 0].astype(np.float64)
    # 128 consecutive order statistics of n uniforms on a length-20 interval span 127 * 20 / (n + 1) on average;
    # 128 points drawn anywhere would span almost the whole interval
    span = x[:, -1] - x[:, 0]
    expected = 127 * 20 / (n_points + 1)
    assert abs(span.mean() - expected) < 0.03 * expected
    # the x-range is random: starts spread over the whole admissible interval
    assert x[:, 0].min() < -9.5 and x[:, -1].max() > 9.5
    assert np.std(x[:, 0]) > 4.0  # a uniform start on ~[-10, 7.5] has std ~5


def test_noise_statistics():
    rng = np.random.default_rng(9)
    inp, tgt = make_segments(8, Noise(3.0, 2.0), 400, rng, n_points=500)
    n = (inp[:, 1].astype(np.float64) - tgt[:, 1])
    assert abs(n.mean() - 3.0) < 0.05 and abs(n.std() - 2.0) < 0.05
    # sigma = 0: a constant shift
    inp0, tgt0 = make_segments(1, Noise(-2.0, 0.0), 5, rng, n_points=200)
    np.testing.assert_allclose(inp0[:, 1] - tgt0[:, 1], -2.0, atol=1e-5)


def test_whole_curve():
    inp, tgt = make_curve(8, Noise(10.0, 5.0), 1000, np.random.default_rng(3))
    assert inp.shape == tgt.shape == (2, 1000) and inp.dtype == np.float32
    assert np.all(np.diff(inp[0]) >= 0)
    assert -10 <= inp[0].min() < -9.9 and 9.9 < inp[0].max() <= 10  # the whole curve, end to end
    resid = inp[1].astype(np.float64) - tgt[1]
    assert abs(resid.mean() - 10) < 0.6 and abs(resid.std() - 5) < 0.5


def test_data_determinism():
    a = make_segments(4, Noise(0, 1), 50, np.random.default_rng(stream_seed(5, 1, 4, Noise(0, 1))), n_points=300)
    b = make_segments(4, Noise(0, 1), 50, np.random.default_rng(stream_seed(5, 1, 4, Noise(0, 1))), n_points=300)
    c = make_segments(4, Noise(0, 1), 50, np.random.default_rng(stream_seed(6, 1, 4, Noise(0, 1))), n_points=300)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # the stream depends on every part of its key, and 0:1 and 0.0:1.0 are the same noise
    seeds = {tuple(stream_seed(5, p, o, n).generate_state(2)) for p in (1, 3) for o in (1, 4)
             for n in (Noise(0, 1), Noise(0, 2), Noise(1, 1))}
    assert len(seeds) == 12
    assert stream_seed(5, 1, 4, Noise.parse("0.0:1.0")).entropy == stream_seed(5, 1, 4, Noise(0, 1)).entropy


@pytest.mark.parametrize("text,expected", [("0:1", (0.0, 1.0)), (" 10:5 ", (10.0, 5.0)), ("-2.5:0", (-2.5, 0.0))])
def test_noise_parse(text, expected):
    n = Noise.parse(text)
    assert (n.mu, n.sigma) == expected


@pytest.mark.parametrize("text", ["0-1", "0:1:2", "a:1", "0:", "0:-1", "nan:1"])
def test_noise_parse_rejects(text):
    with pytest.raises(ValueError, match="MU:SIGMA|sigma|finite"):
        Noise.parse(text)


@pytest.mark.parametrize("order", [0, -1, 1.5])
def test_bad_order_rejected(order):
    with pytest.raises(ValueError, match="order"):
        make_segments(order, Noise(0, 1), 4, np.random.default_rng(0), n_points=200)


# --------------------------------------------------------------------------------------------------- network


def test_network_size_and_shapes():
    net = ToyNet()
    # independent count: five convs 2->163->163->163->163->2, kernel 5, with biases
    chans = [2, 163, 163, 163, 163, 2]
    expected = sum(a * b * 5 + b for a, b in zip(chans[:-1], chans[1:]))
    assert n_parameters(net) == expected
    assert 350_000 <= expected <= 450_000  # the paper's "about 400k"
    assert sum(isinstance(m, torch.nn.Conv1d) for m in net.modules()) == 5
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net.modules()) == 4
    for length in (1, 128, 1000):
        assert net(torch.zeros(3, 2, length)).shape == (3, 2, length)
    with pytest.raises(ValueError, match=r"\(N, 2, L\)"):
        net(torch.zeros(2, 1, 128))


def test_network_scales_its_inputs_and_output():
    torch.manual_seed(0)
    net = ToyNet(width=6, kernel=3, y_in_scale=40.0, x_in_scale=2.5)
    z = torch.randn(2, 2, 17) * 10
    # reference: the same convolutions applied by hand to (x / 2.5, y / 40), output times 10
    h = torch.stack([z[:, 0] / 2.5, z[:, 1] / 40], 1)
    for mod in net.body:
        h = mod(h)
    torch.testing.assert_close(net(z), h * 10, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="y_in_scale"):
        ToyNet(y_in_scale=0)
    with pytest.raises(ValueError, match="x_in_scale"):
        ToyNet(x_in_scale=-1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="loss"):
        ToyConfig(loss="l3")
    with pytest.raises(ValueError, match="seg_len"):
        ToyConfig(points=100)
    with pytest.raises(ValueError, match="iters"):
        ToyConfig(iters=0)
    with pytest.raises(ValueError, match="y_in_scale"):
        ToyConfig(y_in_scale=-1.0)
    with pytest.raises(ValueError, match="x_in_scale"):
        ToyConfig(x_in_scale=0.0)


# ------------------------------------------------------------------------------------------------- training


def test_batch_order_walks_whole_batches_of_fresh_permutations():
    rng = np.random.default_rng(3)
    order = batch_order(10, 3, 7, rng)
    assert order.shape == (7, 3) and order.dtype == np.int64
    # 10 segments in batches of 3: three batches per epoch, the tenth segment of each epoch is left out
    for epoch in (order[0:3], order[3:6]):
        flat = epoch.ravel()
        assert len(set(flat.tolist())) == 9 and flat.min() >= 0 and flat.max() <= 9
    # the same draws as taking permutations one epoch at a time
    ref = np.random.default_rng(3)
    expected = np.concatenate([ref.permutation(10)[:9] for _ in range(3)]).reshape(-1, 3)[:7]
    np.testing.assert_array_equal(order, expected)


def test_training_is_deterministic():
    cfg = ToyConfig(**{**TINY, "iters": 20})
    a = train_network(4, Noise(0, 1), cfg)
    b = train_network(4, Noise(0, 1), cfg)
    sa, sb = _state(a.model), _state(b.model)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    assert a.final_loss == b.final_loss
    c = train_network(4, Noise(0, 1), ToyConfig(**{**TINY, "iters": 20, "seed": 1}))
    assert not np.array_equal(_state(c.model)["body.0.weight"], sa["body.0.weight"])


def test_grid_is_deterministic_and_independent_of_grid_composition():
    cfg = ToyConfig(**{**TINY, "iters": 15})
    grid = run_grid([1, 4], [Noise(0, 1)], [1, 4], [Noise(0, 1), Noise(2, 1)], cfg)
    again = run_grid([1, 4], [Noise(0, 1)], [1, 4], [Noise(0, 1), Noise(2, 1)], cfg)
    alone = run_grid([4], [Noise(0, 1)], [4], [Noise(2, 1)], cfg)
    recs = [r for s in grid for r in s.records()]
    assert recs == [r for s in again for r in s.records()]
    assert len(recs) == 2 * 4
    # the order-4 network and its (4, N(2,1)) test cell do not depend on what else is in the grid
    cell = (4, Noise(2, 1))
    assert alone[0].cells[cell].mse == grid[1].cells[cell].mse
    # every network is tested on the same curve
    np.testing.assert_array_equal(grid[0].cells[cell].noisy, grid[1].cells[cell].noisy)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_trained_network_beats_identity_on_its_training_distribution(loss):
    cfg = ToyConfig(**{**TINY, "iters": 300}, loss=loss)
    noise = Noise(0, 1)
    trained = train_network(1, noise, cfg)
    res = evaluate(trained.model, *test_curves(1, noise, cfg))
    # the identity map scores about sigma^2 = 1; a denoiser must do clearly better
    assert 0.7 < res.mse_input < 1.3
    assert res.mse < 0.5 * res.mse_input, (res.mse, res.mse_input)


@pytest.mark.slow
def test_order1_network_ignores_mean_shifted_noise_that_the_order8_network_follows():
    """The paper's finding on a tiny problem: the order-1 network learns its curve from x and removes unseen
    N(10, 5) noise; the order-8 network learns to filter the noise and lets most of the shifted noise through."""
    cfg = ToyConfig(iters=600, batch=16, lr=3e-3, segments=512, points=300, width=24, test_curves=4)
    passed = {}
    for order in (1, 8):
        trained = train_network(order, Noise(0, 1), cfg)
        res = evaluate(trained.model, *test_curves(order, Noise(10, 5), cfg))
        passed[order] = res.mse / res.mse_input  # fraction of the noise's MSE left in the output
    assert passed[8] > 0.3, passed
    assert passed[1] < passed[8] / 10, passed


def test_evaluate_scores_y_channel_against_reference():
    class Fixed(torch.nn.Module):  # outputs x and a constant 1 for y
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z):
            return torch.stack([z[:, 0], torch.ones_like(z[:, 1])], 1)

    inp, tgt = make_curve(2, Noise(1, 0.5), 300, np.random.default_rng(1))
    res = evaluate(Fixed(), inp, tgt)
    np.testing.assert_allclose(res.mse, np.mean((1.0 - tgt[1].astype(np.float64)) ** 2), rtol=1e-6)
    np.testing.assert_allclose(res.mse_input, np.mean((inp[1].astype(np.float64) - tgt[1]) ** 2), rtol=1e-6)


def test_evaluate_averages_over_curves_and_scores_the_training_curve():
    class Shift(torch.nn.Module):  # outputs x and y + 1
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z):
            return torch.stack([z[:, 0], z[:, 1] + 1], 1)

    rng = np.random.default_rng(2)
    pairs = [make_curve(4, Noise(0, s), 200, rng) for s in (0.5, 2.0)]
    inp, tgt = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    res = evaluate(Shift(), inp, tgt, train_order=1)
    noise = inp[:, 1].astype(np.float64) - tgt[:, 1]
    # equal-length curves: the mean over all points is the mean of the per-curve MSEs
    np.testing.assert_allclose(res.mse, np.mean([np.mean((n + 1) ** 2) for n in noise]), rtol=1e-6)
    np.testing.assert_allclose(res.mse_input, (np.mean(noise[0] ** 2) + np.mean(noise[1] ** 2)) / 2, rtol=1e-6)
    own = 10 * np.cos(np.pi * inp[:, 0].astype(np.float64) / 10)
    np.testing.assert_allclose(res.mse_train_curve, np.mean((inp[:, 1] + 1.0 - own) ** 2), rtol=1e-5)
    np.testing.assert_array_equal(res.x, inp[0, 0])  # the figures show the first curve
    per = [np.mean((n + 1) ** 2) for n in noise]
    np.testing.assert_allclose(res.mse_per_curve, per, rtol=1e-6)
    np.testing.assert_allclose(res.mse_se, abs(per[0] - per[1]) / 2, rtol=1e-6)  # std(ddof=1) / sqrt(2) of two
    assert math.isnan(evaluate(Shift(), inp[0], tgt[0]).mse_se)  # one curve: no spread to estimate from
    assert evaluate(Shift(), inp[0], tgt[0]).mse_train_curve is None
    with pytest.raises(ValueError, match="shape"):
        evaluate(Shift(), inp[:, :1], tgt[:, :1])


def test_test_curves_are_independent_draws_and_extend_consistently():
    cfg = ToyConfig(**{**TINY, "test_curves": 3})
    inp, tgt = test_curves(4, Noise(0, 1), cfg)
    assert inp.shape == tgt.shape == (3, 2, TINY["points"])
    assert not np.array_equal(inp[0, 0], inp[1, 0])
    more, _ = test_curves(4, Noise(0, 1), ToyConfig(**{**TINY, "test_curves": 5}))
    np.testing.assert_array_equal(more[:3], inp)


def test_test_curves_share_x_and_noise_across_orders():
    """Common random numbers: curve r of every order has the same x and the same noise; only the cosine differs."""
    cfg = ToyConfig(**{**TINY, "test_curves": 3})
    in4, tg4 = test_curves(4, Noise(10, 5), cfg)
    in8, tg8 = test_curves(8, Noise(10, 5), cfg)
    np.testing.assert_array_equal(in4[:, 0], in8[:, 0])
    x = in4[:, 0].astype(np.float64)
    np.testing.assert_allclose(tg4[:, 1], 10 * np.cos(0.4 * np.pi * x), atol=2e-5)
    np.testing.assert_allclose(tg8[:, 1], 10 * np.cos(0.8 * np.pi * x), atol=2e-5)
    np.testing.assert_allclose(in4[:, 1] - tg4[:, 1], in8[:, 1] - tg8[:, 1], atol=1e-4)
    other, _ = test_curves(4, Noise(0, 1), cfg)  # another noise: other draws
    assert not np.array_equal(other[:, 0], in4[:, 0])


# -------------------------------------------------------------------------------------------------- command

CLI_TINY = ["--iters", "10", "--batch", "8", "--segments", "64", "--points", "200", "--width", "8",
            "--threads", "1"]


def test_command_outputs_exist_and_parse(tmp_path):
    out = tmp_path / "toy"
    result = CliRunner().invoke(toy, ["--train-order", "1,8", "--train-noise", "0:1", "--test-order", "1,4",
                                      "--test-noise", "0:1,10:5", "--out", str(out), *CLI_TINY])
    assert result.exit_code == 0, result.output
    assert result.output.count("train order") == 2  # one progress line per network
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 2 * 4
    keys = {"train_order", "train_noise", "test_order", "test_noise", "mse"}
    assert all(keys <= r.keys() for r in records)
    cells = {(r["train_order"], tuple(r["train_noise"]), r["test_order"], tuple(r["test_noise"])) for r in records}
    assert cells == {(a, (0.0, 1.0), b, n) for a in (1, 8) for b in (1, 4) for n in ((0.0, 1.0), (10.0, 5.0))}
    assert all(math.isfinite(r["mse"]) and r["mse"] >= 0 for r in records)
    # the identity's score on N(10, 5) noise is about mu^2 + sigma^2 = 125
    assert all(80 < r["mse_input"] < 170 for r in records if r["test_noise"] == [10.0, 5.0])
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    for row, rec in zip(rows, records):
        assert int(row["train_order"]) == rec["train_order"] and int(row["test_order"]) == rec["test_order"]
        assert [float(row["test_mu"]), float(row["test_sigma"])] == rec["test_noise"]
        assert float(row["mse"]) == rec["mse"]
    config = json.loads((out / "config.json").read_text())
    assert config["iters"] == 10 and config["threads"] == 1
    from PIL import Image

    for name in ("train_order1_noise0_1.png", "train_order8_noise0_1.png", "mse.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    for rec in records:  # the printed table holds every cell's value
        assert f"{rec['mse']:.4g}" in result.output


def test_command_epochs_override_iters(tmp_path):
    result = CliRunner().invoke(toy, ["--train-order", "2", "--test-order", "2", "--test-noise", "0:1",
                                      "--out", str(tmp_path), "--no-figures", *CLI_TINY, "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "config.json").read_text())["iters"] == 2 * (64 // 8)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("option,value,message", [
    ("--train-noise", "0-1", "MU:SIGMA"),
    ("--train-noise", "0:-1", "sigma"),
    ("--test-noise", "0:1,x:2", "MU:SIGMA"),
    ("--train-order", "0", ">= 1"),
    ("--test-order", "1,-4", ">= 1"),
    ("--train-order", "1,a", "integer"),
    ("--train-order", "1,,4", "integers"),
    ("--test-order", "4,4", "repeat"),
])
def test_command_bad_input(tmp_path, option, value, message):
    result = CliRunner().invoke(toy, ["--out", str(tmp_path / "o"), option, value, *CLI_TINY])
    assert result.exit_code == 2, result.output
    assert option in result.output and message in result.output
    assert not (tmp_path / "o").exists()  # nothing written before the arguments are checked


def test_write_results_is_complete_and_atomic(tmp_path):
    records = [{"train_order": 1, "train_noise": [0.0, 1.0], "test_order": 4, "test_noise": [10.0, 5.0],
                "mse": 0.25, "mse_input": 125.0, "mse_train_curve": 40.5}]
    write_results(tmp_path, records, {"seed": 0})
    assert json.loads((tmp_path / "results.json").read_text()) == records
    assert (tmp_path / "results.csv").read_text().splitlines()[1] == "1,0.0,1.0,4,10.0,5.0,0.25,nan,125.0,40.5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "results.csv", "results.json"]


def test_format_table_lists_every_cell():
    records = [{"train_order": o, "train_noise": [0.0, 1.0], "test_order": t, "test_noise": [0.0, 2.0],
                "mse": 0.1 * o + t} for o in (1, 8) for t in (1, 4)]
    text = format_table(records)
    assert "O=1 N(0,1)" in text and "O=4 N(0,2)" in text
    for r in records:
        assert f"{r['mse']:.4g}" in text


@pytest.mark.slow
def test_worker_processes_train_the_same_networks_as_one_process():
    cfg = ToyConfig(**{**TINY, "iters": 15})
    args = ([1, 8], [Noise(0, 1)], [1, 4], [Noise(0, 1), Noise(10, 5)], cfg)
    alone = run_grid(*args, jobs=1)  # this process, one thread (fixture)
    parallel = run_grid(*args, jobs=2, threads=1)
    assert [r for s in parallel for r in s.records()] == [r for s in alone for r in s.records()]
    for a, b in zip(alone, parallel):
        assert a.trained.final_loss == b.trained.final_loss
        for k, v in a.trained.model.state_dict().items():
            torch.testing.assert_close(b.trained.model.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_training_and_evaluation_agree_with_the_cpu():
    """On a real GPU: a network evaluates to the CPU's numbers, and a tiny grid trained on CUDA denoises like the
    CPU's (trajectories differ in rounding, so the comparison is of quality, not of bits)."""
    cfg = ToyConfig(**{**TINY, "iters": 300})
    cells = [(1, Noise(0, 1)), (8, Noise(10, 5))]
    cpu = run_grid([1], [Noise(0, 1)], [c[0] for c in cells], [Noise(0, 1), Noise(10, 5)], cfg)[0]
    model = cpu.trained.model
    for order, noise in cells:
        inp, tgt = test_curves(order, noise, cfg)
        on_gpu = evaluate(model.to("cuda"), inp, tgt, train_order=1)
        on_cpu = evaluate(model.to("cpu"), inp, tgt, train_order=1)
        assert on_gpu.mse == pytest.approx(on_cpu.mse, rel=1e-4)
    gpu = run_grid([1], [Noise(0, 1)], [1], [Noise(0, 1)], ToyConfig(**{**cfg.__dict__, "device": "cuda"}))[0]
    mse_gpu, mse_cpu = gpu.cells[(1, Noise(0, 1))].mse, cpu.cells[(1, Noise(0, 1))].mse
    assert mse_gpu < 0.5 * gpu.cells[(1, Noise(0, 1))].mse_input
    assert 0.5 < mse_gpu / mse_cpu < 2.0, (mse_gpu, mse_cpu)


def test_run_grid_rejects_bad_jobs():
    cfg = ToyConfig(**{**TINY, "iters": 1})
    with pytest.raises(ValueError, match="jobs"):
        run_grid([1], [Noise(0, 1)], [1], [Noise(0, 1)], cfg, jobs=0)
    with pytest.raises(ValueError, match="jobs"):
        run_grid([1, 4], [Noise(0, 1)], [1], [Noise(0, 1)], ToyConfig(**{**TINY, "device": "cuda"}), jobs=2)


# --------------------------------------------------------------------------------------------------- figures


def _fake_setting(train_order: int, cells: dict[tuple[int, Noise], float]) -> SettingResult:
    """A SettingResult without training: the prediction is the truth plus a constant offset whose square is the
    cell's MSE."""
    scored = {}
    for (order, noise), mse in cells.items():
        inp, tgt = make_curve(order, noise, 50, np.random.default_rng(order))
        pred = tgt[1] + np.float32(np.sqrt(mse))
        scored[(order, noise)] = CurveResult(inp[0], inp[1], tgt[1], pred, mse, 1.0)
    return SettingResult(train_order, Noise(0, 1), Trained(ToyNet(width=2, kernel=1), 0.0, 0.0), scored)


def test_relative_luminance_hand_values():
    np.testing.assert_allclose(relative_luminance([[1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 0, 0.5]]), [1.0, 0.0, 0.7152])
    # sRGB 0.5 is 0.214 linear (the standard transfer function)
    np.testing.assert_allclose(relative_luminance([0.5, 0.5, 0.5]), 0.21404, atol=1e-5)
    assert list(text_colors(np.array([[1, 1, 0.2], [0.2, 0.0, 0.3]]))) == ["black", "white"]


def test_mse_map_numbers_are_dark_on_light_cells_and_light_on_dark_cells():
    cells = {(1, Noise(0, 1)): 0.001, (8, Noise(10, 5)): 100.0}
    fig = mse_figure([_fake_setting(1, cells), _fake_setting(8, {k: v * 0.5 for k, v in cells.items()})])
    ax = fig.axes[0]
    texts = {t.get_text(): t.get_color() for t in ax.texts}
    # log scale from 0.0005 to 100: the smallest value sits on viridis' dark purple, the largest on its yellow
    assert texts["0.0005"] == "white" and texts["100"] == "black"
    assert len(texts) == 4


def test_setting_figure_labels_every_panel():
    noises = [Noise(0, 1), Noise(10, 5)]
    res = _fake_setting(1, {(o, n): 0.5 for o in (1, 8) for n in noises})
    fig = setting_figure(res)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 4
    for ax in panels:
        assert ax.get_xlabel() == "x" and ax.get_ylabel() == "y"
        assert "mse 0.5" in ax.get_title() and "test O=" in ax.get_title()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"noisy input", "ground truth", "prediction", "training curve (O=1)"} <= set(legend)
    assert "order 1" in fig.get_suptitle()
