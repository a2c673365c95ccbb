"""The analogous experiment (paper section V): a 1-D CNN denoises ``y = 10 cos(O * pi * x / 10)``.

A network trained on a simple curve (low order) can lower its loss by learning the curve itself, which it can
compute from x alone, and then it removes any noise, including noise it never saw. On a complex curve (high order)
learning the curve is harder than learning the noise, so the network learns to remove the training noise and fails
on other noise. ``run_grid`` trains one network per training setting (order x noise) and tests every cell of a
test grid; ``write_results`` / ``write_figures`` store the outcome (see ``rainsweep toy``).

How x is carried: the network sees two channels, x and the noisy y, and outputs two channels, x and the denoised
y; the target's x channel is the input's x, and the loss covers both channels (the paper maps ``(x, y + n)`` to
``(x, y)``). The x input is what lets a network "learn the background": the clean y is a function of x. Reported
MSE is on the y channel only (the quantity of interest), in squared y units.

Everything is in the curve's own units (x in [-10, 10], y in [-10, 10] plus noise); the network scales its input
by 1/10 and its output by 10 internally so that its activations stay O(1).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.experiments.toy_data import (
    DEFAULT_POINTS,
    DEFAULT_SEGMENTS,
    PURPOSE_TEST_CURVE,
    PURPOSE_TRAIN_DATA,
    PURPOSE_TRAIN_INIT,
    SEGMENT_LEN,
    Noise,
    check_order,
    make_curve,
    make_segments,
    stream_seed,
)

#: y-unit scale the network divides its input by and multiplies its output by
UNIT_SCALE = 10.0
LOSSES = ("l1", "l2")


class ToyNet(nn.Module):
    """Five 1-D convolutions with LeakyReLU between them: float32 ``(N, 2, L)`` -> ``(N, 2, L)``, any ``L``.

    Channels: 0 = x, 1 = y, in curve units. With the defaults (width 120, kernel 9) it has 393,602 parameters
    (the paper's "about 400k") and a receptive field of 41 points. 'same' zero padding keeps the length.
    """

    def __init__(self, width: int = 120, kernel: int = 9, layers: int = 5, negative_slope: float = 0.2) -> None:
        super().__init__()
        if width < 1 or layers < 2 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"need width >= 1, layers >= 2 and an odd kernel, got {width=}, {kernel=}, {layers=}")
        mods: list[nn.Module] = []
        cin = 2
        for i in range(layers):
            cout = 2 if i == layers - 1 else width
            mods.append(nn.Conv1d(cin, cout, kernel, padding=kernel // 2))
            if i < layers - 1:
                mods.append(nn.LeakyReLU(negative_slope))
            cin = cout
        self.body = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 3 or z.shape[1] != 2:
            raise ValueError(f"ToyNet expects (N, 2, L) input (channels x, y), got shape {tuple(z.shape)}")
        return self.body(z / UNIT_SCALE) * UNIT_SCALE


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ToyConfig:
    """Settings of one experiment. ``iters`` optimizer steps of ``batch`` segments each; Adam at ``lr`` with a
    cosine decay to 0. Sizes in points; ``loss`` is "l1" (the paper's default) or "l2"."""

    iters: int = 1200
    batch: int = 16
    lr: float = 2e-3
    segments: int = DEFAULT_SEGMENTS
    points: int = DEFAULT_POINTS
    seg_len: int = SEGMENT_LEN
    width: int = 120
    kernel: int = 9
    loss: str = "l1"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("iters", "batch", "segments", "points", "seg_len", "width", "kernel"):
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
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass
class Trained:
    """A trained network and how its training went (``final_loss``: mean loss of the last 10% of steps)."""

    model: ToyNet
    final_loss: float
    seconds: float


@dataclass
class CurveResult:
    """One test cell: the curve (float32 ``(P,)`` each: x, noisy y, clean y, predicted y) and its MSEs."""

    x: np.ndarray
    noisy: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    mse: float  # prediction vs truth, y channel
    mse_input: float  # noisy input vs truth: what the identity map scores


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
    torch.manual_seed(_seed_int(stream_seed(cfg.seed, PURPOSE_TRAIN_INIT, order, noise)))
    model = ToyNet(cfg.width, cfg.kernel).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters)
    loss_fn = nn.L1Loss() if cfg.loss == "l1" else nn.MSELoss()
    batch_rng = np.random.default_rng(batch_ss)
    batch = min(cfg.batch, cfg.segments)
    perm = batch_rng.permutation(cfg.segments)
    pos = 0
    tail = max(1, cfg.iters // 10)
    tail_sum = 0.0
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.iters):
        if pos + batch > cfg.segments:  # new epoch: reshuffle, drop the incomplete remainder
            perm, pos = batch_rng.permutation(cfg.segments), 0
        idx = torch.from_numpy(perm[pos:pos + batch]).to(device)
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xin[idx]), xtg[idx])
        loss.backward()
        opt.step()
        sched.step()
        if step >= cfg.iters - tail:
            tail_sum += float(loss.detach())
    model.eval()
    return Trained(model, tail_sum / tail, time.perf_counter() - t0)


def test_curve(order: int, noise: Noise, cfg: ToyConfig) -> tuple[np.ndarray, np.ndarray]:
    """The whole noisy test curve of one cell and its target, float32 ``(2, cfg.points)``; the same for every
    network evaluated with the same ``cfg.seed`` and ``cfg.points``."""
    rng = np.random.default_rng(stream_seed(cfg.seed, PURPOSE_TEST_CURVE, order, noise))
    return make_curve(order, noise, cfg.points, rng)


test_curve.__test__ = False  # not a pytest test despite the name


@torch.no_grad()
def evaluate(model: ToyNet, inputs: np.ndarray, targets: np.ndarray) -> CurveResult:
    """Run ``model`` on one whole curve (float32 ``(2, P)`` input and target) and score the y channel."""
    device = next(model.parameters()).device
    out = model(torch.from_numpy(inputs)[None].to(device))[0].cpu().numpy()
    truth, noisy, pred = targets[1], inputs[1], out[1]
    mse = float(np.mean((pred.astype(np.float64) - truth) ** 2))
    mse_input = float(np.mean((noisy.astype(np.float64) - truth) ** 2))
    return CurveResult(inputs[0].copy(), noisy.copy(), truth.copy(), pred.copy(), mse, mse_input)


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
                "mse_input": res.mse_input,
            }
            for (order, noise), res in self.cells.items()
        ]


def run_grid(
    train_orders: Sequence[int],
    train_noises: Sequence[Noise],
    test_orders: Sequence[int],
    test_noises: Sequence[Noise],
    cfg: ToyConfig,
    log: Callable[[str], None] = lambda s: None,
    on_setting: Callable[[SettingResult], None] = lambda r: None,
) -> list[SettingResult]:
    """Train one network per (train order, train noise), test it on every (test order, test noise) cell.

    ``log`` gets one progress line per network; ``on_setting`` is called after each network (e.g. to write
    results so far). Returns the settings in grid order (orders outer, noises inner).
    """
    if not (train_orders and train_noises and test_orders and test_noises):
        raise ValueError("every order and noise list must be non-empty")
    settings = [(check_order(o), n) for o in train_orders for n in train_noises]
    cells = [(check_order(o), n) for o in test_orders for n in test_noises]
    tests = {cell: test_curve(cell[0], cell[1], cfg) for cell in cells}
    results: list[SettingResult] = []
    with deterministic(cfg.device):
        for i, (order, noise) in enumerate(settings, 1):
            trained = train_network(order, noise, cfg)
            scored = {cell: evaluate(trained.model, *tests[cell]) for cell in cells}
            res = SettingResult(order, noise, trained, scored)
            results.append(res)
            worst = max(scored.items(), key=lambda kv: kv[1].mse)
            log(
                f"[{i}/{len(settings)}] train order {order} noise {noise.label()}: {cfg.iters} steps in "
                f"{trained.seconds:.1f} s, final {cfg.loss} loss {trained.final_loss:.3f}; test mse "
                f"{min(r.mse for r in scored.values()):.3f}..{worst[1].mse:.3f} "
                f"(worst: order {worst[0][0]} {worst[0][1].label()})"
            )
            on_setting(res)
    return results


# ---------------------------------------------------------------------------------------------------- writing


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


CSV_FIELDS = ("train_order", "train_mu", "train_sigma", "test_order", "test_mu", "test_sigma", "mse", "mse_input")


def write_results(out: Path, records: list[dict], config: dict) -> None:
    """Write ``results.json`` (the records), ``results.csv`` (the same, noise split into mu / sigma columns) and
    ``config.json`` (the settings that produced them) into ``out``, atomically."""
    _atomic_write_bytes(out / "results.json", (json.dumps(records, indent=1) + "\n").encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in records:
        w.writerow([
            r["train_order"], *r["train_noise"], r["test_order"], *r["test_noise"],
            repr(r["mse"]), repr(r["mse_input"]),
        ])
    _atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    _atomic_write_bytes(out / "config.json", (json.dumps(config, indent=1) + "\n").encode())


def config_record(cfg: ToyConfig, train_orders, train_noises, test_orders, test_noises, threads: int) -> dict:
    """The settings of a run, for ``config.json``."""
    return {
        **asdict(cfg),
        "train_order": list(train_orders),
        "train_noise": [n.as_list() for n in train_noises],
        "test_order": list(test_orders),
        "test_noise": [n.as_list() for n in test_noises],
        "threads": threads,
        "parameters": n_parameters(ToyNet(cfg.width, cfg.kernel)),
        "torch": torch.__version__,
        "mse": "mean squared error of the predicted y channel against the clean curve, y units squared",
        "mse_input": "the same for the noisy input (the identity map's score)",
    }


def _noise_tag(noise: Noise) -> str:
    return f"{noise.mu:g}_{noise.sigma:g}"


def figure_name(order: int, noise: Noise) -> str:
    """File name of one training setting's figure, e.g. ``train_order4_noise0_1.png``."""
    return f"train_order{order}_noise{_noise_tag(noise)}.png"


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write_bytes(path, buf.getvalue())


def write_setting_figure(out: Path, res: SettingResult) -> Path:
    """One PNG per training setting, laid out like the paper's Figs. 11-14: rows = test order, columns = test
    noise; each panel shows the noisy test points, the ground truth and the network's prediction."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    orders = sorted({o for o, _ in res.cells})
    noises = list(dict.fromkeys(n for _, n in res.cells))
    fig = Figure(figsize=(3.6 * len(noises), 2.6 * len(orders)), layout="constrained")
    axes = fig.subplots(len(orders), len(noises), squeeze=False, sharex=True)
    for r, order in enumerate(orders):
        for c, noise in enumerate(noises):
            ax = axes[r][c]
            cell = res.cells.get((order, noise))
            if cell is None:
                ax.set_axis_off()
                continue
            ax.scatter(cell.x, cell.noisy, s=1.5, color="0.6", label="noisy input", rasterized=True)
            ax.plot(cell.x, cell.truth, color="tab:green", lw=1.2, label="ground truth")
            ax.plot(cell.x, cell.pred, color="tab:red", lw=1.0, label="prediction")
            seen = order == res.train_order and noise == res.train_noise
            ax.set_title(
                f"test O={order}, {noise.label()}{' (train)' if seen else ''}\nmse {cell.mse:.3g} "
                f"(input {cell.mse_input:.3g})",
                fontsize=8,
            )
            ax.tick_params(labelsize=7)
            if r == len(orders) - 1:
                ax.set_xlabel("x", fontsize=8)
            if c == 0:
                ax.set_ylabel("y", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower left", markerscale=4)
    fig.suptitle(f"trained on order {res.train_order}, noise {res.train_noise.label()}", fontsize=10)
    path = out / figure_name(res.train_order, res.train_noise)
    _save_figure(fig, path)
    return path


def write_mse_figure(out: Path, results: Sequence[SettingResult]) -> Path:
    """``mse.png``: a heat map of log10 MSE, rows = training settings, columns = test cells."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    cells = list(results[0].cells)
    mse = np.array([[res.cells[c].mse for c in cells] for res in results])
    fig = Figure(figsize=(1.0 + 0.9 * len(cells), 1.2 + 0.5 * len(results)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(mse, norm=LogNorm(vmin=max(mse.min(), 1e-6), vmax=max(mse.max(), 1e-5)), cmap="viridis")
    for i in range(mse.shape[0]):
        for j in range(mse.shape[1]):
            ax.text(j, i, f"{mse[i, j]:.2g}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(cells)), [f"O={o}\n{n.label()}" for o, n in cells], fontsize=7)
    ax.set_yticks(range(len(results)), [f"O={r.train_order} {r.train_noise.label()}" for r in results], fontsize=7)
    ax.set_xlabel("test cell")
    ax.set_ylabel("training setting")
    fig.colorbar(im, ax=ax, label="mse (y units²)")
    path = out / "mse.png"
    _save_figure(fig, path)
    return path
