"""The analogous experiment (paper section V): a 1-D CNN denoises ``y = 10 cos(O * pi * x / 10)``.

A network trained on a simple curve (low order) can lower its loss by learning the curve itself, which it can
compute from x alone, and then it removes any noise, including noise it never saw. On a complex curve (high order)
learning the curve is harder than learning the noise, so the network learns to remove the training noise and fails
on other noise. ``run_grid`` trains one network per training setting (order x noise) and tests every cell of a
test grid; ``write_results`` and ``engine.experiments.toy_figures`` store the outcome (see ``rainsweep toy``).

How x is carried: the network sees two channels, x and the noisy y, and outputs two channels, x and the denoised
y; the target's x channel is the input's x, and the loss covers both channels (the paper maps ``(x, y + n)`` to
``(x, y)``). The x input is what lets a network "learn the background": the clean y is a function of x. Data,
targets and reported MSE are in the curve's own units (x in [-10, 10], y in [-10, 10] plus noise); MSE is on the
y channel only, in squared y units.

The default regime (``ToyConfig()``, what ``rainsweep toy`` runs without options) and why:

- Network: five convolutions of kernel 5 and 163 channels (402,449 parameters, the paper's "about 400k") with
  LeakyReLU; receptive field 21 points. A network that denoises from y alone is a filter over its receptive field;
  the best linear one (``toy_ordering.linear_filter_floor``) scores 0.0476 / 0.0487 / 0.0521 on orders 1 / 4 / 8
  with N(0, 1): about 1/21, the paper's figure for its order-8 network (0.047), and higher on a more curved
  cosine, which the filter must follow. A wider field (kernel 9: 41 points) makes that filter twice as good and
  holds the order-1 network in it for thousands of steps longer.
- Input scales: x enters divided by ``x_in_scale`` = 2.5 (into [-4, 4]), the noisy y divided by ``y_in_scale`` =
  200; the output is multiplied by 10. Every first-layer unit mixes x and y, so a network that fits the curve from
  x can still carry y inside its features and cancel it only over the y values it was trained on (about
  [-13, 13]). Mean-shifted noise N(10, 5) moves y to about [-5, 35], past kinks that training never constrained,
  and the output bends (with y scaled like x: mse about 7 under N(10, 5) for an order-1 network that scores 0.001
  on its own cell). With y entering at a twentieth of x's scale the response to y stays close to linear over that
  whole range, so the insensitivity learned in range holds out of range and the order-1 network's output stops
  depending on the noisy y, as the paper reports. Networks that need y (orders 4 and 8) still learn to use it and
  follow shifted noise. x at four times the scale of [-1, 1] brings the order-4 and order-8 filters to their
  floors within the 6,000 steps (own-cell mse over 100 test curves, seeds 0 / 1 / 2: order 4 0.0485 / 0.0483 /
  0.0488, order 8 0.0539 / 0.0528 / 0.0527; with x / 10, seeds 0 / 1: 0.0533 / 0.0504 and 0.0555 / 0.0568) and
  the order-1 network closer to the paper under N(10, 5) (0.31 against 0.115; paper 0.354).
- Training: Adam at lr 2e-3, cosine-decayed to 0, 6,000 steps of 16 segments (9.6 passes over the 10,000
  segments), L1 loss (the paper's) on both channels. The order-1 network fits the cosine from x to about 1e-3 mse
  only in the late, low-learning-rate steps.
- Test: 100 whole curves of 1,000 points per cell, with the same x positions and noise values for every order of
  one noise (common random numbers), so the own-cell ordering O=1 < O=4 < O=8 is judged on per-curve differences
  (``engine.experiments.toy_ordering``): the order-4 / order-8 difference is about 0.004-0.006 and its paired
  standard error 0.0004 (11-17 standard errors over the seeds above). With 10 independent curves per cell the
  same difference was within the estimate's noise.
- CPU: one worker process per network (``run_grid(jobs=...)``), one torch thread each. Convolutions this small gain
  little from a second thread, while independent networks use every core.
"""
from __future__ import annotations

import contextlib
import csv
import io
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.atomic import atomic_write_json, atomic_write_text
from engine.experiments.toy_config import LAYERS, ToyConfig
from engine.experiments.toy_data import (
    PURPOSE_TEST_CURVE,
    PURPOSE_TRAIN_DATA,
    PURPOSE_TRAIN_INIT,
    Noise,
    check_order,
    ground_truth,
    make_curve,
    make_segments,
    stream_seed,
)

#: the network's x and y outputs are multiplied by this (O(1) -> curve units)
UNIT_SCALE = 10.0


class ToyNet(nn.Module):
    """Five 1-D convolutions with LeakyReLU (slope 0.2) between them: float32 ``(N, 2, L)`` -> ``(N, 2, L)``, any
    ``L``, channels 0 = x and 1 = y in curve units.

    The input x is divided by ``x_in_scale`` and the input y by ``y_in_scale``; the output (x, y) is the last
    convolution's output times 10. With the defaults (width 163, kernel 5) it has 402,449 parameters (the paper's
    "about 400k") and a receptive field of 21 points; 'same' zero padding keeps the length.
    """

    def __init__(self, width: int = 163, kernel: int = 5, y_in_scale: float = 200.0, layers: int = LAYERS,
                 negative_slope: float = 0.2, x_in_scale: float = 2.5) -> None:
        super().__init__()
        if width < 1 or layers < 2 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"need width >= 1, layers >= 2 and an odd kernel, got {width=}, {kernel=}, {layers=}")
        if not (x_in_scale > 0 and y_in_scale > 0):
            raise ValueError(f"x_in_scale and y_in_scale must be > 0, got {x_in_scale=}, {y_in_scale=}")
        mods: list[nn.Module] = []
        cin = 2
        for i in range(layers):
            cout = 2 if i == layers - 1 else width
            mods.append(nn.Conv1d(cin, cout, kernel, padding=kernel // 2))
            if i < layers - 1:
                mods.append(nn.LeakyReLU(negative_slope))
            cin = cout
        self.body = nn.Sequential(*mods)
        self.register_buffer("in_scale", torch.tensor([1.0 / x_in_scale, 1.0 / y_in_scale]).view(1, 2, 1),
                             persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 3 or z.shape[1] != 2:
            raise ValueError(f"ToyNet expects (N, 2, L) input (channels x, y), got shape {tuple(z.shape)}")
        return self.body(z * self.in_scale) * UNIT_SCALE


def n_parameters(model: nn.Module) -> int:
    """Number of trainable values in ``model``."""
    return sum(p.numel() for p in model.parameters())


def build_network(cfg: ToyConfig) -> ToyNet:
    """The ToyNet that ``cfg`` describes (on the CPU, freshly initialized from torch's current seed)."""
    return ToyNet(cfg.width, cfg.kernel, cfg.y_in_scale, x_in_scale=cfg.x_in_scale)


@dataclass
class Trained:
    """A trained network and how its training went (``final_loss``: mean loss of the last 10% of steps)."""

    model: ToyNet
    final_loss: float
    seconds: float


@dataclass
class CurveResult:
    """One test cell: its first test curve (float32 ``(P,)`` each: x, noisy y, clean y, predicted y), for the
    figures, and MSEs of the y channel (y units squared) over all its test curves.

    ``mse_per_curve`` holds each test curve's MSE (float64 ``(R,)``), ``mse_se`` the standard error of their mean
    (NaN with one curve).
    """

    x: np.ndarray
    noisy: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    mse: float  # prediction vs truth
    mse_input: float  # noisy input vs truth: what the identity map scores
    mse_train_curve: float | None = None  # prediction vs the clean curve of the network's training order
    mse_per_curve: np.ndarray | None = None
    mse_se: float = float("nan")


@contextlib.contextmanager
def deterministic(device: str) -> Iterator[None]:
    """Deterministic torch algorithms on CPU for the duration (restores the previous setting)."""
    if device != "cpu":
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _seed_int(ss: np.random.SeedSequence) -> int:
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))  # torch.manual_seed wants < 2**63 to be safe


def batch_order(n_segments: int, batch: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Segment indices of every training step, int64 ``(iters, batch)``: epochs of ``rng.permutation``, each cut
    into whole batches (an epoch's incomplete remainder is dropped, the next epoch reshuffles)."""
    per_epoch = n_segments // batch
    epochs = -(-iters // per_epoch)
    perms = [rng.permutation(n_segments)[:per_epoch * batch] for _ in range(epochs)]
    return np.concatenate(perms).reshape(-1, batch)[:iters]


def train_network(order: int, noise: Noise, cfg: ToyConfig) -> Trained:
    """Train one ToyNet on ``cfg.segments`` segments of the curve of ``order`` with ``noise``.

    Deterministic for a given ``cfg`` (and thread count): data, batch order and initial weights come from seeds
    derived from ``(cfg.seed, order, noise)``, so the network is the same whatever grid it is trained in.
    """
    order = check_order(order)
    data_ss, batch_ss = stream_seed(cfg.seed, PURPOSE_TRAIN_DATA, order, noise).spawn(2)
    inputs, targets = make_segments(
        order, noise, cfg.segments, np.random.default_rng(data_ss), seg_len=cfg.seg_len, n_points=cfg.points
    )
    device = torch.device(cfg.device)
    xin = torch.from_numpy(inputs).to(device)
    xtg = torch.from_numpy(targets).to(device)
    batch = min(cfg.batch, cfg.segments)
    steps = torch.from_numpy(batch_order(cfg.segments, batch, cfg.iters, np.random.default_rng(batch_ss))).to(device)
    torch.manual_seed(_seed_int(stream_seed(cfg.seed, PURPOSE_TRAIN_INIT, order, noise)))
    model = build_network(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters)
    loss_fn = nn.L1Loss() if cfg.loss == "l1" else nn.MSELoss()
    tail = max(1, cfg.iters // 10)
    tail_sum = torch.zeros((), device=device)
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.iters):
        idx = steps[step]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xin[idx]), xtg[idx])
        loss.backward()
        opt.step()
        sched.step()
        if step >= cfg.iters - tail:
            tail_sum += loss.detach()  # summed on the device: no host sync per step
    model.eval()
    return Trained(model, float(tail_sum) / tail, time.perf_counter() - t0)


def test_curves(order: int, noise: Noise, cfg: ToyConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ``cfg.test_curves`` whole noisy test curves of one cell and their targets, float32
    ``(cfg.test_curves, 2, cfg.points)`` each; the same for every network evaluated with the same ``cfg.seed``,
    ``cfg.points`` and ``cfg.test_curves`` (and the first curves are the same whatever ``cfg.test_curves``).

    Cells of one noise share their draws across orders: curve ``r`` of every order has the same x positions and
    the same noise values, only the clean cosine differs. Comparing orders (the own-cell ordering) then compares
    networks on identical noise, which removes most of the draw-to-draw spread from the difference (common random
    numbers); each cell's MSE is still an unbiased estimate.
    """
    rng = np.random.default_rng(stream_seed(cfg.seed, PURPOSE_TEST_CURVE, None, noise))
    pairs = [make_curve(order, noise, cfg.points, rng) for _ in range(cfg.test_curves)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


test_curves.__test__ = False  # not a pytest test despite the name


@torch.no_grad()
def evaluate(model: ToyNet, inputs: np.ndarray, targets: np.ndarray, train_order: int | None = None) -> CurveResult:
    """Run ``model`` on whole curves (float32 input and target, ``(2, P)`` for one curve or ``(R, 2, P)`` for
    ``R``) and score the y channel over all of them; with ``train_order``, also against that order's clean curve.

    Several curves make a steadier score: a denoiser's errors are correlated over its receptive field, so one
    1,000-point curve holds only about 50 independent errors and its MSE varies by 15-20 % from curve to curve.
    The result keeps every curve's MSE and the standard error of their mean.
    """
    if inputs.ndim == 2:
        inputs, targets = inputs[None], targets[None]
    if inputs.ndim != 3 or inputs.shape[1] != 2 or targets.shape != inputs.shape:
        raise ValueError(f"expected inputs and targets of shape (2, P) or (R, 2, P), got {inputs.shape} and "
                         f"{targets.shape}")
    device = next(model.parameters()).device
    pred = model(torch.from_numpy(inputs).to(device))[:, 1].cpu().numpy()
    x, noisy, truth = inputs[:, 0], inputs[:, 1], targets[:, 1]
    per_curve = np.mean((pred.astype(np.float64) - truth) ** 2, axis=1)
    mse = float(np.mean(per_curve))
    se = float(np.std(per_curve, ddof=1) / np.sqrt(len(per_curve))) if len(per_curve) > 1 else float("nan")
    mse_input = float(np.mean((noisy.astype(np.float64) - truth) ** 2))
    mse_train = None
    if train_order is not None:
        own = ground_truth(x.astype(np.float64), train_order)
        mse_train = float(np.mean((pred.astype(np.float64) - own) ** 2))
    return CurveResult(x[0].copy(), noisy[0].copy(), truth[0].copy(), pred[0].copy(), mse, mse_input, mse_train,
                       per_curve, se)


@dataclass
class SettingResult:
    """Everything one training setting produced: its records (one per test cell) and curves for the figures."""

    train_order: int
    train_noise: Noise
    trained: Trained
    cells: dict[tuple[int, Noise], CurveResult]

    def records(self) -> list[dict]:
        return [
            {
                "train_order": self.train_order,
                "train_noise": self.train_noise.as_list(),
                "test_order": order,
                "test_noise": noise.as_list(),
                "mse": res.mse,
                "mse_se": res.mse_se,
                "mse_input": res.mse_input,
                "mse_train_curve": res.mse_train_curve,
                "mse_per_curve": None if res.mse_per_curve is None else [float(v) for v in res.mse_per_curve],
            }
            for (order, noise), res in self.cells.items()
        ]


def _train_state(order: int, noise: Noise, cfg: ToyConfig) -> tuple[dict[str, np.ndarray], float, float]:
    """Worker-process body of ``run_grid``: train one network (deterministic algorithms) and return its weights as
    numpy arrays (plain bytes across the process boundary), its final loss and its training seconds."""
    with deterministic(cfg.device):
        trained = train_network(order, noise, cfg)
    state = {k: v.detach().cpu().numpy() for k, v in trained.model.state_dict().items()}
    return state, trained.final_loss, trained.seconds


def default_jobs(n_networks: int) -> int:
    """Networks to train at once on the CPU: one per network, at most two per usable core, so that a grid of a few
    more networks than cores keeps every core busy to the end instead of training its last networks alone."""
    return max(1, min(n_networks, 2 * len(os.sched_getaffinity(0))))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _trained_networks(
    settings: list[tuple[int, Noise]], cfg: ToyConfig, jobs: int, threads: int | None
) -> Iterator[Trained]:
    """Train the networks of ``settings`` and yield them in order: in this process when ``jobs == 1``, else in
    ``jobs`` worker processes with ``threads`` torch threads each (default 1)."""
    if jobs == 1 or len(settings) == 1:
        with deterministic(cfg.device):
            for order, noise in settings:
                yield train_network(order, noise, cfg)
        return
    # spawn, not fork: a forked child inherits torch's OpenMP pool in an undefined state
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(settings)), ctx, _init_worker, (threads or 1,)) as pool:
        futures = [pool.submit(_train_state, order, noise, cfg) for order, noise in settings]
        try:
            for fut in futures:
                state, final_loss, seconds = fut.result()
                model = build_network(cfg)
                model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
                yield Trained(model.eval(), final_loss, seconds)
        finally:
            for fut in futures:
                fut.cancel()


def run_grid(
    train_orders: Sequence[int],
    train_noises: Sequence[Noise],
    test_orders: Sequence[int],
    test_noises: Sequence[Noise],
    cfg: ToyConfig,
    log: Callable[[str], None] = lambda s: None,
    on_setting: Callable[[SettingResult], None] = lambda r: None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[SettingResult]:
    """Train one network per (train order, train noise), test it on every (test order, test noise) cell.

    ``jobs > 1`` trains up to that many networks at once in worker processes (CPU only), each with ``threads``
    torch threads (default 1); ``jobs == 1`` trains them one after another in this process with its current
    thread count. A network depends only on ``cfg``, its setting and the thread count it was trained with, not on
    the grid or on ``jobs``. ``log`` gets one progress line per network; ``on_setting`` is called after each
    network in grid order (e.g. to write results so far). Returns the settings in grid order (orders outer,
    noises inner).
    """
    if not (train_orders and train_noises and test_orders and test_noises):
        raise ValueError("every order and noise list must be non-empty")
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    if jobs > 1 and cfg.device != "cpu":
        raise ValueError(f"jobs > 1 trains in CPU worker processes; with device {cfg.device!r} use jobs=1")
    settings = [(check_order(o), n) for o in train_orders for n in train_noises]
    cells = [(check_order(o), n) for o in test_orders for n in test_noises]
    tests = {cell: test_curves(cell[0], cell[1], cfg) for cell in cells}
    results: list[SettingResult] = []
    networks = _trained_networks(settings, cfg, jobs, threads)
    for i, ((order, noise), trained) in enumerate(zip(settings, networks), 1):
        scored = {cell: evaluate(trained.model, *tests[cell], train_order=order) for cell in cells}
        res = SettingResult(order, noise, trained, scored)
        results.append(res)
        worst = max(scored.items(), key=lambda kv: kv[1].mse)
        log(
            f"[{i}/{len(settings)}] train order {order} noise {noise.label()}: {cfg.iters} steps in "
            f"{trained.seconds:.1f} s, final {cfg.loss} loss {trained.final_loss:.4f}; test mse "
            f"{min(r.mse for r in scored.values()):.4g}..{worst[1].mse:.4g} "
            f"(worst: order {worst[0][0]} {worst[0][1].label()})"
        )
        on_setting(res)
    return results


# ---------------------------------------------------------------------------------------------------- writing


CSV_FIELDS = (
    "train_order", "train_mu", "train_sigma", "test_order", "test_mu", "test_sigma", "mse", "mse_se", "mse_input",
    "mse_train_curve",
)


def write_results(out: Path, records: list[dict], config: dict) -> None:
    """Write ``results.json`` (the records), ``results.csv`` (the same but the per-curve MSEs, noise split into mu /
    sigma columns) and ``config.json`` (the settings that produced them) into ``out``, atomically."""
    atomic_write_json(out / "results.json", records, indent=1)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in records:
        w.writerow([
            r["train_order"], *r["train_noise"], r["test_order"], *r["test_noise"],
            repr(r["mse"]), repr(r.get("mse_se", float("nan"))), repr(r["mse_input"]), repr(r["mse_train_curve"]),
        ])
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_json(out / "config.json", config, indent=1)


def config_record(cfg: ToyConfig, train_orders, train_noises, test_orders, test_noises, threads: int) -> dict:
    """The settings of a run, for ``config.json``."""
    return {
        **asdict(cfg),
        "train_order": list(train_orders),
        "train_noise": [n.as_list() for n in train_noises],
        "test_order": list(test_orders),
        "test_noise": [n.as_list() for n in test_noises],
        "threads": threads,
        "parameters": n_parameters(build_network(cfg)),
        "torch": torch.__version__,
        "mse": "mean squared error of the predicted y channel against the clean curve, y units squared",
        "mse_se": "standard error of mse: the spread of the per-curve MSEs (mse_per_curve) over sqrt(test_curves)",
        "mse_input": "the same for the noisy input (the identity map's score)",
        "mse_train_curve": "mean squared error of the predicted y against the clean curve of the training order at "
                           "the test x: small on other orders when a network draws its own training curve",
    }
