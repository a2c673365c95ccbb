"""Train K runs of one architecture together, as one fused model fed by one multi-stream batch.

Horizontal fusion after HFTA (Wang et al., "Horizontally Fused Training Array", MLSys 2021;
github.com/UofT-EcoSystem/hfta): the K networks become one network whose convolutions are grouped (``models.fused``),
the K data streams one batch ``[K, B, 3, P, P]`` (``engine.loader.multi_steps``), and the K Adam optimizers one
per-stream optimizer step. A small network that leaves a GPU idle trains K times over in about the time of one.

    python -P -m train_fused --group group.json --out groups/g0
    python -P -m train_fused --group group.json --out groups/g0 --resume

``group.json`` lists the runs. Each run is what ``train.py`` would be given for it, as its argument list or as an
object of its options (names as on train.py's command line, with or without the dashes; ``-`` or ``_``); the
optional ``"common"`` object (or argument list) holds options shared by every run, and a run's own value wins:

    {"common": {"store": "bg.zarr", "model": "resnet-s", "iters": 2000, "batch": 16, "device": "cpu"},
     "runs": [{"count": 8, "seed": 0, "out": "runs/n8"},
              ["--count", "512", "--seed", "0", "--rain", "large", "--lr", "1e-4", "--out", "runs/n512"]]}

Every run is parsed and checked by train.py's own command line (same defaults, same errors, named with the run's
place in the file). The runs must agree in ``SHARED`` (one store, architecture, step count, batch, EMA decay,
device, loader mode and logging, checkpoint and evaluation cadence); they may differ in everything else: subset or
count, sharpness, rain, seed, learning rate and its schedule, held-out set, output folder.

What each run keeps, as if it were trained alone by train.py:

- its initial weights: for each run in turn, ``train.seed_everything(seed)``, ``train.make_data`` and
  ``train.make_model`` exactly as train.py calls them; ``models.fused.from_models`` stacks the K networks;
- its batches: stream k of ``engine.loader.multi_steps.MultiTrainingStream`` is, byte for byte, the run's own
  ``TrainingStream``;
- its loss (mean L1 of its stream, ``models.fused.stream_l1``; the group minimizes the sum, whose gradient with respect to stream k's weights is
  stream k's own gradient), its Adam state and learning rate (``models.fused.StreamAdam``; the rate follows the run's
  own ``MultiStepLR``), its EMA (one ``lerp`` over the fused weights is the per-stream ``lerp``);
- its evaluation and outputs: the fused EMA is unfused into the run's ordinary model and scored and written by
  ``train.evaluate`` and ``train.finish``.

Outputs. Each run's ``--out`` gets what train.py writes there (config.json, log.jsonl, metrics.json, model.pt,
samples.png), except ckpt.pt: config.json has one more key, ``"fused_group"`` (the group folder, its size and the
run's stream), which no metric or results column reads. The group's ``--out`` holds ``config.json`` (every run's
resolved configuration) and ``ckpt.pt``, the group checkpoint (fused weights, EMA and optimizer, every run's
schedule, stream position and resolved configuration, the RNG states; written atomically), from which ``--resume``
continues the whole group. log.jsonl lines are train.py's: ``patches_per_s`` counts the run's own patches (the
group trains K times as many), ``data_wait`` is the group's.

Numerics. On the CPU (deterministic algorithms) a resumed group is bit-exact with an uninterrupted one. A fused
run's weights equal its unfused run's up to rounding only: a grouped convolution sums in another order than K
single ones. A NaN or infinite loss in any run stops the group, names the run and keeps the last good checkpoint.
Fused training runs in one process (no torchrun).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

import train  # noqa: I001  (train imports engine first, which sets up OpenMP before torch loads)
import torch

from engine.atomic import atomic_write, atomic_write_json
from engine.loader import LoaderError
from engine.loader.multi import Stream
from engine.loader.multi_steps import MultiTrainingStream
from engine.loader.steps import Position
from models.fused import StreamAdam, ema_update, from_models, stream_l1, unfuse
from train import BETAS, CKPT, Data, LogWindow, Progress, TrainConfig, TrainState

#: Options every run of a group shares: the group trains one architecture on one device from one store, takes its
#: steps, log lines, checkpoints and evaluations together, and updates one EMA over the fused weights.
SHARED = ("store", "model", "iters", "batch", "ema", "device", "loader_mode", "log_every", "ckpt_every",
          "eval_every", "threads", "stop_after")


# ---- the group file --------------------------------------------------------------------------------------------------

def option_argv(entry: Any, where: str) -> list[str]:
    """train.py's argument list for ``entry``: an argument list (returned as strings) or an object of options.

    In an object, keys are option names (``"count"``, ``"--count"``, ``"test_rain"``, ``"test-rain"``); ``true``
    gives a flag, ``false`` and ``null`` leave the option out, a list is joined with commas (``milestones``).
    Raises a click error naming ``where`` for anything else.
    """
    if isinstance(entry, list):
        return [str(a) for a in entry]
    if not isinstance(entry, dict):
        raise click.UsageError(f"{where}: expected a list of train.py arguments or an object of options, got "
                               f"{type(entry).__name__}")
    argv: list[str] = []
    for key, value in entry.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv


def parse_run(argv: Sequence[str], where: str) -> TrainConfig:
    """The checked ``TrainConfig`` of one run's train.py arguments; click errors are prefixed with ``where``."""
    try:
        options = train.main.make_context("train", list(argv)).params
        if options["resume"]:
            raise click.UsageError("--resume belongs to the group: pass it to train_fused, not to a run")
        return TrainConfig.from_options(options, world=1)
    except click.UsageError as err:
        raise click.UsageError(f"{where}: {err.format_message()}") from None


def read_group(path: str | os.PathLike) -> list[TrainConfig]:
    """The runs of the group file at ``path`` (see the module docstring), each checked by train.py's options and
    all of them by ``check_group``.

    Raises
    ------
    click.UsageError
        Naming the file (and the run) when the file is unreadable, not of the documented form, a run's options do
        not work for train.py, or the runs cannot share a group.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise click.BadParameter(f"{path}: {err}", param_hint="--group") from None
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, list) or not runs:
        raise click.BadParameter(f"{path}: expected an object whose \"runs\" is a non-empty list of runs",
                                 param_hint="--group")
    common = option_argv(doc.get("common", {}), f"\"common\" of {path}")
    cfgs = [parse_run(common + option_argv(run, f"run {i} of {path}"), f"run {i} of {path}")
            for i, run in enumerate(runs, 1)]
    check_group(cfgs, str(path))
    return cfgs


def check_group(cfgs: Sequence[TrainConfig], where: str = "the group") -> None:
    """Raise a click error when the runs differ in a ``SHARED`` option or two of them write to one folder."""
    first = cfgs[0]
    for i, cfg in enumerate(cfgs[1:], 2):
        for key in SHARED:
            a, b = getattr(first, key), getattr(cfg, key)
            if key == "store":
                a, b = Path(a).resolve(), Path(b).resolve()
            if a != b:
                why = ("a fused group trains one architecture" if key == "model"
                       else f"the runs of a fused group share {', '.join('--' + k.replace('_', '-') for k in SHARED)}")
                raise click.UsageError(f"{where}: runs 1 and {i} differ in --{key.replace('_', '-')} ({a} vs {b}); "
                                       f"{why}")
    outs = [Path(c.out).resolve() for c in cfgs]
    for i, o in enumerate(outs):
        if o in outs[:i]:
            raise click.UsageError(f"{where}: runs {outs.index(o) + 1} and {i + 1} both write to {o}")


# ---- the group -------------------------------------------------------------------------------------------------------

@dataclass
class Member:
    """One run of the group.

    Attributes
    ----------
    cfg : TrainConfig
        Its options.
    data : Data
        Its store, training subset and held-out set (``train.make_data``).
    state : TrainState
        Its ordinary model (``train.make_model``): ``net`` and ``ema`` receive the unfused weights for evaluation
        and ``finish``; ``scheduler`` (on ``optimizer``, which never steps itself) gives its learning rate.
    config : dict
        Its resolved configuration (config.json).
    """

    cfg: TrainConfig
    data: Data
    state: TrainState
    config: dict


@dataclass
class Fused:
    """The group's trained objects: fused network and EMA (NCHW per stream, ``[K, B, 3, P, P]`` in and out) and
    the per-stream Adam over the network's parameters."""

    net: torch.nn.Module
    ema: torch.nn.Module
    optimizer: StreamAdam


def make_members(cfgs: Sequence[TrainConfig], device: torch.device, group_out: Path) -> list[Member]:
    """Each run's data and freshly initialized model, built by train.py's own functions in train.py's order (seed,
    data, model), so each starts from exactly the weights train.py would give it."""
    members = []
    for k, cfg in enumerate(cfgs):
        train.seed_everything(cfg.seed, cfg.threads, device)
        data = train.make_data(cfg, device, 0, 1)
        state = train.make_model(cfg, device)
        # The run's own Adam never steps: StreamAdam does. Stepping it once without gradients changes nothing and
        # marks it as stepped, so its MultiStepLR does not warn that the schedule runs ahead of the optimizer.
        state.optimizer.step()
        config = {**train.run_config(cfg, data, state, device, 1),
                  "fused_group": {"out": str(group_out.resolve()), "runs": len(cfgs), "stream": k}}
        members.append(Member(cfg, data, state, config))
    return members


def make_fused(members: Sequence[Member], device: torch.device) -> Fused:
    """The members' networks and EMAs stacked into fused ones, and StreamAdam with every run's learning rate."""
    name = members[0].cfg.model
    net = from_models(name, [m.state.net for m in members]).to(device)
    ema = from_models(name, [m.state.ema for m in members]).to(device)
    ema.requires_grad_(False)
    optimizer = StreamAdam(net.parameters(), len(members), lr=[m.cfg.lr for m in members], betas=BETAS)
    return Fused(net, ema, optimizer)


def make_stream(members: Sequence[Member], positions: Sequence[Position], device: torch.device) -> MultiTrainingStream:
    """The multi-stream batches of the members from ``positions``; a click error when the loader cannot run."""
    cfg = members[0].cfg
    streams = [Stream(m.data.train_indices, m.cfg.train_rain, m.cfg.seed) for m in members]
    try:
        # The loader gets the path: it caches loaders by store path (as train.make_data does).
        return MultiTrainingStream(str(Path(cfg.store).resolve()), streams, cfg.batch, device=device,
                                   mode=cfg.loader_mode, dtype="float32", positions=list(positions))
    except LoaderError as err:
        raise click.UsageError(f"the loader cannot run with these options: {err}") from None


def unfuse_into(fused: Fused, members: Sequence[Member]) -> None:
    """Copy each stream's weights and EMA into its member's ordinary model (for evaluation and ``finish``)."""
    name, k = members[0].cfg.model, len(members)
    for m, net, ema in zip(members, unfuse(name, fused.net.state_dict(), k), unfuse(name, fused.ema.state_dict(), k)):
        m.state.net.load_state_dict(net)
        m.state.ema.load_state_dict(ema)


# ---- one step --------------------------------------------------------------------------------------------------------

def fused_step(fused: Fused, members: Sequence[Member], rainy: torch.Tensor, clean: torch.Tensor, ema_decay: float,
               poison: Sequence[bool] = ()) -> torch.Tensor:
    """One optimizer step of every stream on ``(rainy, clean)`` (float32 ``[K, B, 3, P, P]``, 0..1), then every
    run's schedule step and the EMA update; returns the detached per-stream losses ``[K]``, left on the device.

    ``poison[k]`` makes stream k's loss NaN (a test hook, train.py's ``--fault-at``).
    """
    with train.autocast(rainy.device):
        losses = stream_l1(fused.net(rainy), clean)
    if any(poison):
        losses = losses * torch.tensor([float("nan") if p else 1.0 for p in poison], device=losses.device)
    fused.optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    fused.optimizer.step()
    for m in members:
        m.state.scheduler.step()
    fused.optimizer.set_lr([m.state.optimizer.param_groups[0]["lr"] for m in members])
    ema_update(fused.ema, fused.net, ema_decay)
    return losses.detach()


# ---- checkpoints -----------------------------------------------------------------------------------------------------

def save_group_checkpoint(path: Path, fused: Fused, members: Sequence[Member], step: int,
                          positions: Sequence[Position], device: torch.device) -> None:
    """Write everything ``load_group_checkpoint`` needs to continue the group after ``step`` exactly (fsynced,
    atomic)."""
    ckpt = {"model": fused.net.state_dict(), "ema": fused.ema.state_dict(), "optimizer": fused.optimizer.state_dict(),
            "run_optimizers": [m.state.optimizer.state_dict() for m in members],
            "schedulers": [m.state.scheduler.state_dict() for m in members], "step": step,
            "positions": [[p.epoch, p.offset] for p in positions], "configs": [m.config for m in members],
            "rng": train.rng_states(device)}
    atomic_write(path, lambda f: torch.save(ckpt, f), fsync=True)


def load_group_checkpoint(path: Path, fused: Fused, members: Sequence[Member], device: torch.device
                          ) -> tuple[int, list[Position]]:
    """Restore the group and the RNGs from ``path``; returns the step and every stream's position of the next step.

    Refuses (click error) a checkpoint of another number of runs, of runs in another order (by their ``--out``),
    or whose run differs from its member as ``train.check_resume`` checks.
    """
    ck = torch.load(path, map_location=device, weights_only=False)
    saved = ck["configs"]
    if len(saved) != len(members):
        raise click.UsageError(f"--resume: {path} holds a group of {len(saved)} runs, the group file lists "
                               f"{len(members)}")
    for i, (s, m) in enumerate(zip(saved, members), 1):
        if Path(s["train_config"]["out"]).resolve() != Path(m.cfg.out).resolve():
            raise click.UsageError(f"--resume: run {i} writes to {m.cfg.out}, the checkpoint's run {i} to "
                                   f"{s['train_config']['out']}; list the runs in their original order")
        try:
            train.check_resume(s, m.config)
        except click.UsageError as err:
            raise click.UsageError(f"run {i} ({m.cfg.out}): {err.format_message()}") from None
    fused.net.load_state_dict(ck["model"])
    fused.ema.load_state_dict(ck["ema"])
    fused.optimizer.load_state_dict(ck["optimizer"])
    for m, opt, sched in zip(members, ck["run_optimizers"], ck["schedulers"]):
        m.state.optimizer.load_state_dict(opt)
        m.state.scheduler.load_state_dict(sched)
    train.restore_rng(ck["rng"], device)
    return ck["step"], [Position(e, o) for e, o in ck["positions"]]


def check_group_out(out: Path, resume: bool) -> None:
    """The group folder's checkpoint must exist exactly when resuming (click error otherwise)."""
    ckpt = out / CKPT
    if ckpt.exists() and not resume:
        raise click.UsageError(f"{out} already holds a group checkpoint: pass --resume to continue it, or pick a "
                               f"new --out")
    if resume and not ckpt.exists():
        raise click.UsageError(f"--resume: no group checkpoint at {ckpt}")


# ---- the loop --------------------------------------------------------------------------------------------------------

def log_windows(members: Sequence[Member], windows: Sequence[LogWindow], step: int, positions: Sequence[Position],
                group_out: Path, last_good: int | None) -> float:
    """Close every run's log window: check all runs' losses first (``train.check_finite``: a bad one stops the
    group), then append each run's train.py log line; returns the mean over runs of the windows' mean losses."""
    losses = [w.gather_losses(1) for w in windows]
    for m, lo in zip(members, losses):
        train.check_finite(lo, step, Path(m.cfg.out), last_good, True, ckpt=group_out / CKPT,
                           what=f"{m.cfg.out}: ")
    means = []
    for m, w, lo, pos in zip(members, windows, losses, positions):
        record = w.record(step, pos.epoch, lo, m.state.optimizer.param_groups[0]["lr"], m.cfg.batch)
        train.append_log(Path(m.cfg.out), record)
        means.append(record["loss_mean"])
    return float(np.mean(means))


def evaluate_all(fused: Fused, members: Sequence[Member], step: int, device: torch.device) -> None:
    """Held-out evaluation of every run's EMA weights (unfused), logged as train.py logs it."""
    unfuse_into(fused, members)
    for m in members:
        metrics, _ = train.evaluate(m.state.ema, m.data.held, device, m.cfg.batch)
        train.append_log(Path(m.cfg.out), {"step": step, "event": "eval", **metrics})


def train_group(cfgs: Sequence[TrainConfig], out: Path, device: torch.device, resume: bool) -> None:
    """Build every run and the fused model (nothing is written until all of it works), train the group to
    ``iters`` steps, then score and write every run as train.py does."""
    check_group_out(out, resume)
    cfgs = [dataclasses.replace(c, resume=resume) for c in cfgs]  # each run's config.json reads as train.py's would
    members = make_members(cfgs, device, out)
    fused = make_fused(members, device)
    cfg = cfgs[0]
    step, positions = (load_group_checkpoint(out / CKPT, fused, members, device) if resume
                       else (0, [Position()] * len(members)))
    stream = make_stream(members, positions, device)
    steps = stream.steps()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"model": cfg.model, "runs": [m.config for m in members]}, indent=2,
                      fsync=True)
    click.echo(f"{'resuming' if step else 'training'} a fused group of {len(members)} {cfg.model} runs "
               f"({members[0].config['parameters']:,} parameters each) -> {out}", err=True)
    for k, m in enumerate(members, 1):
        train.prepare_out(Path(m.cfg.out), m.config, step, resume)
        click.echo(f"  [{k}/{len(members)}] {train.start_line(m.cfg, m.data, m.config, step)}", err=True)
    windows = [LogWindow() for _ in members]
    progress = Progress(cfg.iters, cfg.batch * len(members), step)
    last_good = step if resume else None
    fused.net.train()
    try:
        while step < cfg.iters:
            t0 = time.perf_counter()
            rainy, clean, positions = next(steps)
            wait = time.perf_counter() - t0
            losses = fused_step(fused, members, rainy, clean, cfg.ema,
                                poison=[m.cfg.fault_at == step + 1 for m in members])
            step += 1
            for k, w in enumerate(windows):
                w.add(losses[k], wait)
            at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.iters
            loss = None
            if step % cfg.log_every == 0 or at_ckpt:
                loss = log_windows(members, windows, step, positions, out, last_good)
            progress.update(step, wait, loss)
            if at_ckpt:
                save_group_checkpoint(out / CKPT, fused, members, step, positions, device)
                last_good = step
                if step == cfg.stop_after:
                    return
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.iters:
                evaluate_all(fused, members, step, device)
    finally:
        progress.close()
        stream.close()
    unfuse_into(fused, members)
    for m in members:
        train.finish(m.cfg, m.data, m.state, step, device)


# ---- the command -----------------------------------------------------------------------------------------------------

@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--group", "group_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON file listing the runs (train.py options each; see the module docstring).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Group folder: the group checkpoint (ckpt.pt) and config.json. Each run writes to its own --out.")
@click.option("--resume", is_flag=True, help="Continue the group from OUT/ckpt.pt.")
def main(group_file: str, out: str, resume: bool) -> None:
    """Train the runs of --group together as one fused model; write each run's folder as train.py does."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError("fused training runs in one process; start it with python, not torchrun")
    cfgs = read_group(group_file)
    device = train.resolve_device(cfgs[0].device, 0)
    with train.torch_settings_kept():
        train_group(cfgs, Path(out), device, resume)


if __name__ == "__main__":
    main()
