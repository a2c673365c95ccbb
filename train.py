"""Train one deraining model on a background subset with synthetic rain; score it on held-out rain.

From the repository root, or from anywhere once rainsweep is installed (``pip install -e .`` installs this file as
the module ``train``):

    python train.py --store S --count 64 --rain medium --model resnet --iters 100000 --out runs/r64
    python -m train --store S --count 64 --rain medium --model resnet --iters 100000 --out runs/r64
    torchrun --nproc_per_node 2 train.py --store S --count 64 ... --out runs/r64-ddp

Reads top to bottom: the options (``TrainConfig``) -> data (``make_data``: store, training subset, held-out set,
training stream) -> model (``make_model``: network, EMA, optimizer, schedule) -> ``load_checkpoint`` on ``--resume``
-> the loop (``train``: ``train_step``, log, ``save_checkpoint``, ``evaluate``) -> the final evaluation. The
authors' recipe: L1 loss, Adam (betas 0.9, 0.99), multi-step learning-rate decay (halve the rate at 50 % and 75 % of
the steps by default; ``--milestones``), an EMA (0.999) of the weights used for evaluation, rain on 90 % of
training patches, bf16 autocast on GPU.

Images are NCHW float32 on the 0..1 scale inside the network; metrics are computed on the 0..255 scale by
``engine.metrics.decoupled`` on the unquantized output. ``--batch`` is the global batch: with N processes each
takes ``batch / N`` patches of its shard (``engine.loader.steps``).

Every option is checked, and the data and model are built, before anything is written: a usage error leaves no
``--out`` folder behind. While training, rank 0 shows a progress line on stderr (step, loss, patches/s, data wait,
ETA): redrawn in place on a terminal, one plain line at a time when stderr is a pipe (``demo``, ``sweep``, CI).

Outputs under ``--out`` (rank 0 writes; log.jsonl is appended to, every other file is written under a temporary name
and renamed):
  config.json   the resolved configuration ("train_config": the options as given)
  log.jsonl     one line per ``--log-every`` steps: step, loss, lr, patches_per_s, data_wait (fraction of time
                spent waiting for the loader); eval lines carry the held-out metrics
  ckpt.pt       the last good checkpoint (model, EMA, optimizer, scheduler, loader position, RNG states, options)
  model.pt      final EMA weights;  metrics.json  final held-out metrics;  samples.png  titled columns rainy input |
                output | clean

Reproducibility: on the CPU every run is bit-exact (deterministic algorithms), so ``--resume`` gives exactly the
weights of an uninterrupted run. On CUDA a resumed run sees the same batches, rain and RNG states, but cuDNN and
cuBLAS may sum in a different order from run to run, so weights agree only to rounding; evaluation runs in full
float32 (no TF32), so the same weights always score the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import click
import numpy as np

# engine first: engine.runtime sets OMP_WAIT_POLICY=PASSIVE, which torch's OpenMP runtime reads once, when torch is
# imported; with spinning OpenMP threads numba's and torch's pools take each other's cores (CPU steps ~10x slower).
import engine  # noqa: E402,F401,I001
import numba
import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
from engine.atomic import atomic_write, atomic_write_json, atomic_write_text
from engine.data.paired_store import is_paired_store
from engine.data.select import SubsetError, check_subset, load_subset, select
from engine.data.store import PatchStore, open_store
from engine.experiments.heldout import HeldOut, HeldOutError, build_heldout, build_paired_heldout
# full_float32, predict, per_image_mean and SAMPLE_TITLES stay reachable as train.<name>
from engine.experiments.scoring import (SAMPLE_TITLES, full_float32, per_image_mean, predict,  # noqa: F401
                                        rain_ceiling, save_samples, score)
from engine.loader import MODES, LoaderError
from engine.loader.steps import Position, TrainingStream
from engine.rain import RainSpec
from engine.runtime import limit_cpu_threads

CKPT = "ckpt.pt"
LOG = "log.jsonl"
BETAS = (0.9, 0.99)
#: Options a resumed run must share with its checkpoint (the loader position means nothing otherwise).
RESUME_KEYS = ("store_fingerprint", "train_patches", "rain_spec", "seed", "batch", "world_size")


# ---- options ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run, as given on the command line (``main``'s help describes each one).

    Built and checked once by ``from_options``; saved as ``"train_config"`` in config.json and the checkpoint.
    ``milestones`` holds fractions of ``iters``; ``rain`` and ``test_rain`` hold the preset names or specs.
    """

    store: str
    subset: str | None
    count: int | None
    sharpness: str | None
    rain: str
    rain_prob: float
    test_rain: str
    test_store: str | None
    test_count: int
    test_seed: int
    heldout_exclude_count: int
    model: str
    iters: int
    batch: int
    lr: float
    milestones: tuple[float, ...]
    gamma: float
    ema: float
    seed: int
    out: str
    device: str
    loader_mode: str
    eval_every: int
    ckpt_every: int
    log_every: int
    threads: int
    resume: bool
    fault_at: int
    stop_after: int
    prior: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any], world: int) -> "TrainConfig":
        """The config of the command line's ``options`` for ``world`` processes; raises click errors that name the
        offending option (checks that need the store's contents are in ``make_data``)."""
        text = options["milestones"]
        try:
            fractions = tuple(sorted(float(m) for m in text.split(",") if m.strip()))
        except ValueError:
            raise click.BadParameter(f"{text!r}: expected comma-separated fractions in (0, 1)",
                                     param_hint="--milestones") from None
        cfg = cls(**{**options, "milestones": fractions})
        cfg.check(world)
        return cfg

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainConfig":
        """The config saved as ``"train_config"`` in config.json or a checkpoint."""
        return cls(**{**saved, "milestones": tuple(saved["milestones"])})

    def check(self, world: int) -> None:
        """Raise a click error naming the first option that cannot work."""
        if self.model not in models.NAMES:
            raise click.BadParameter(f"unknown model {self.model!r}; valid models: {', '.join(models.NAMES)}",
                                     param_hint="--model")
        if self.model in models.PRIOR_MODELS and not self.prior:
            raise click.BadParameter(f"{self.model} fine-tunes a prior: pass --prior (a prior.pt of rainsweep prior "
                                     f"or a taming-transformers checkpoint)", param_hint="--prior")
        if self.prior and self.model not in models.PRIOR_MODELS:
            raise click.BadParameter(f"{self.model} takes no prior; models that do: {', '.join(models.PRIOR_MODELS)}",
                                     param_hint="--prior")
        parse_rain(self.rain, "--rain")
        parse_rain(self.test_rain, "--test-rain")
        if self.subset and self.count:
            raise click.UsageError("give either --subset or --count, not both")
        if self.count is not None and self.count < 1:
            raise click.BadParameter(f"{self.count}: expected a positive number of training patches",
                                     param_hint="--count")
        if self.batch % world:
            raise click.BadParameter(f"{self.batch} is not divisible by the {world} processes", param_hint="--batch")
        if not self.lr > 0 or not np.isfinite(self.lr):
            raise click.BadParameter(f"{self.lr}: expected a positive learning rate", param_hint="--lr")
        if not self.gamma > 0 or not np.isfinite(self.gamma):
            raise click.BadParameter(f"{self.gamma}: expected a positive factor", param_hint="--gamma")
        if any(not 0 < m < 1 for m in self.milestones):
            raise click.BadParameter(f"{','.join(map(str, self.milestones))!r}: fractions must lie in (0, 1)",
                                     param_hint="--milestones")
        if self.device not in ("auto", "cpu", "cuda"):
            raise click.BadParameter(f"{self.device!r}: expected auto, cpu or cuda", param_hint="--device")
        if self.loader_mode not in MODES:
            raise click.BadParameter(f"{self.loader_mode!r}: expected one of {', '.join(MODES)}",
                                     param_hint="--loader-mode")
        ckpt = Path(self.out) / CKPT
        if ckpt.exists() and not self.resume:
            raise click.UsageError(f"{self.out} already holds a checkpoint: pass --resume to continue it, or pick a "
                                   f"new --out")
        if self.resume and not ckpt.exists():
            raise click.UsageError(f"--resume: no checkpoint at {ckpt}")

    @property
    def train_rain(self) -> RainSpec:
        """The training rain, applied to a fraction ``rain_prob`` of the patches."""
        return dataclasses.replace(parse_rain(self.rain, "--rain"), rain_prob=self.rain_prob)

    @property
    def test_rain_spec(self) -> RainSpec:
        return parse_rain(self.test_rain, "--test-rain")

    @property
    def milestone_steps(self) -> list[int]:
        """The steps after which the learning rate is multiplied by ``gamma``."""
        return sorted({max(1, round(m * self.iters)) for m in self.milestones})


def parse_rain(text: str, option: str) -> RainSpec:
    try:
        return RainSpec.parse(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=option) from None


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The torch device of ``--device`` (auto, cpu or cuda) for the process with ``local_rank`` on its machine."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, threads: int, device: torch.device) -> None:
    """Seed torch and numpy; deterministic algorithms on the CPU, so a resumed run is bit-exact there.

    ``threads`` (0: the libraries' defaults) limits torch and numba alike (``engine.runtime.limit_cpu_threads``).
    """
    limit_cpu_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


# ---- data ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Data:
    """What a run trains and is scored on.

    Attributes
    ----------
    store : PatchStore
        The training store (uint8 NHWC patches).
    train_indices : np.ndarray
        int64 [n], store indices of the training patches.
    held : HeldOut
        The held-out set (``engine.experiments.heldout``).
    stream : TrainingStream
        This rank's training batches (``engine.loader.steps``).
    """

    store: PatchStore
    train_indices: np.ndarray
    held: HeldOut
    stream: TrainingStream


def make_data(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> Data:
    """Open the store, choose the training patches, build the held-out set and the training stream.

    Raises click errors naming the option when the store, the subset or the held-out set cannot work.
    """
    store = open_store_option(cfg.store, "--store")
    # A paired test store (rainsweep precompute-pairs) is scored on its stored rainy images: no synthesis.
    paired = bool(cfg.test_store) and is_paired_store(cfg.test_store)
    test_store = open_store_option(cfg.test_store, "--test-store") if cfg.test_store and not paired else None
    train_indices = training_indices(cfg, store)
    excluded = heldout_exclusion(cfg, store, train_indices)
    try:
        held = build_paired_heldout(cfg.test_store) if paired else build_heldout(
            store, excluded, cfg.test_rain_spec, count=cfg.test_count, seed=cfg.test_seed, test_store=test_store)
    except HeldOutError as err:
        raise click.UsageError(str(err)) from None
    if not cfg.test_store and np.isin(held.indices, train_indices).any():
        raise RuntimeError("held-out patches overlap the training subset")  # guarded by build_heldout; be sure
    try:
        # The loader gets the path: it caches loaders by store path, which stays valid across in-process runs.
        stream = TrainingStream(str(Path(cfg.store).resolve()), train_indices, cfg.batch, rank, world,
                                rain=cfg.train_rain, seed=cfg.seed, device=device, mode=cfg.loader_mode)
    except LoaderError as err:
        raise click.UsageError(f"the loader cannot run with these options: {err}") from None
    return Data(store=store, train_indices=train_indices, held=held, stream=stream)


def open_store_option(path: str, option: str) -> PatchStore:
    """The store at ``path``, or a click error naming ``option``."""
    try:
        return open_store(path)
    except ValueError as err:
        raise click.BadParameter(f"{path}: {err}", param_hint=option) from None


def select_kwargs(cfg: TrainConfig) -> dict:
    return {} if cfg.sharpness is None else {"sharpness": cfg.sharpness}


def training_indices(cfg: TrainConfig, store: PatchStore) -> np.ndarray:
    """int64 store indices of the training patches: ``--subset``, ``--count`` of them, or the whole store (only
    with ``--test-store``: otherwise no patch would be left for the held-out set)."""
    if cfg.subset:
        try:
            subset = load_subset(cfg.subset)
        except SubsetError as err:
            raise click.BadParameter(str(err), param_hint="--subset") from None
        try:
            check_subset(store, subset)
        except ValueError as err:
            raise click.UsageError(f"--subset {cfg.subset} does not belong to --store {cfg.store}: {err}") from None
    elif cfg.count:
        if cfg.count >= store.count and not cfg.test_store:
            fits = "all of them" if cfg.count == store.count else "more than it has"
            raise click.BadParameter(f"{cfg.count}: --store {cfg.store} has {store.count} patches and training on "
                                     f"{fits} leaves none for the held-out set; {room_hint(store.count, cfg)}",
                                     param_hint="--count")
        try:
            subset = select(store, cfg.count, seed=cfg.seed, **select_kwargs(cfg))
        except ValueError as err:
            raise click.UsageError(f"--count {cfg.count}: {err}") from None
    else:
        if not cfg.test_store:
            raise click.UsageError(f"neither --count nor --subset was given, so training would use all {store.count} "
                                   f"patches of --store {cfg.store} and leave none for the held-out set; "
                                   f"{room_hint(store.count, cfg)}")
        return np.arange(store.count, dtype=np.int64)
    indices = np.asarray(subset.indices, dtype=np.int64)
    if len(indices) == 0:
        raise click.UsageError("the training subset is empty")
    if not cfg.test_store and len(indices) >= store.count:
        raise click.BadParameter(f"{cfg.subset} holds all {store.count} patches of --store {cfg.store}, leaving none "
                                 f"for the held-out set; pass a smaller subset, or a separate --test-store for the "
                                 f"held-out backgrounds", param_hint="--subset")
    return indices


def room_hint(n: int, cfg: TrainConfig) -> str:
    """How to leave room for the held-out set in a store of ``n`` patches."""
    test_store = "a separate --test-store for the held-out backgrounds"
    if n < 2:
        return f"pass {test_store}"
    example = n - cfg.test_count if n > cfg.test_count else n // 2
    return f"pass --count smaller than {n} (e.g. --count {example}), or {test_store}"


def heldout_exclusion(cfg: TrainConfig, store: PatchStore, train_indices: np.ndarray) -> np.ndarray:
    """Store indices the held-out set must avoid: the training patches and, with ``--heldout-exclude-count``, the
    patches of the larger selection (selection is nested, so a sweep's runs share one held-out set)."""
    if not (cfg.heldout_exclude_count and cfg.count) or cfg.test_store:
        return train_indices
    try:
        larger = select(store, min(cfg.heldout_exclude_count, store.count), seed=cfg.seed, **select_kwargs(cfg))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--heldout-exclude-count") from None
    excluded = np.union1d(train_indices, np.asarray(larger.indices, dtype=np.int64))
    if len(excluded) >= store.count:
        raise click.BadParameter(f"{cfg.heldout_exclude_count} keeps all {store.count} patches of --store "
                                 f"{cfg.store} out of the held-out set; pass a count smaller than {store.count}",
                                 param_hint="--heldout-exclude-count")
    return excluded


# ---- model -----------------------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """The trained objects: the network, its EMA (evaluated), the optimizer and schedule acting on ``net``."""

    net: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def make_model(cfg: TrainConfig, device: torch.device) -> TrainState:
    """A freshly initialized network (torch's global RNG, seeded by ``seed_everything``), its EMA copy, Adam and
    the multi-step schedule."""
    net = build_net(cfg).to(device)
    ema = models.build(cfg.model).to(device)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    # Only the trainable parameters: a prior's frozen decoder and codebook must stay bit-identical.
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, betas=BETAS)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestone_steps, gamma=cfg.gamma)
    return TrainState(net, ema, optimizer, scheduler)


def build_net(cfg: TrainConfig) -> torch.nn.Module:
    """The network of ``cfg.model``: from scratch, or with ``--prior``'s weights and all but the encoder frozen."""
    if not cfg.prior:
        return models.build(cfg.model)
    try:
        net, _ = models.build_from_prior(cfg.model, cfg.prior)
    except models.PriorError as err:
        raise click.BadParameter(str(err), param_hint="--prior") from None
    return net


def run_config(cfg: TrainConfig, data: Data, state: TrainState, device: torch.device, world: int) -> dict:
    """The resolved configuration written to config.json and the checkpoint."""
    return {
        "model": cfg.model, "parameters": models.parameter_count(state.net), "store": str(cfg.store),
        "store_fingerprint": str(getattr(data.store, "fingerprint", "")), "subset": cfg.subset, "count": cfg.count,
        "sharpness": cfg.sharpness, "train_patches": int(len(data.train_indices)), "rain": cfg.train_rain.name,
        "rain_spec": cfg.train_rain.describe(), "rain_prob": cfg.rain_prob, "test_rain": data.held.describe()["rain"],
        "heldout": data.held.describe(), "test_store": cfg.test_store, "iters": cfg.iters, "batch": cfg.batch,
        "lr": cfg.lr, "betas": list(BETAS), "milestones": cfg.milestone_steps, "gamma": cfg.gamma,
        "ema": cfg.ema, "loss": "l1", "seed": cfg.seed, "device": str(device), "world_size": world,
        "bf16_autocast": device.type == "cuda", "patch_size": int(data.store.patch_size),
        "steps_per_epoch": data.stream.steps_per_epoch,
        "loader_epochs_per_epoch": data.stream.loader_epochs_per_step,
        "train_config": dataclasses.asdict(cfg),
    }


# ---- one step, evaluation --------------------------------------------------------------------------------------------

def autocast(device: torch.device):
    """bf16 autocast on CUDA; full float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def train_step(model: torch.nn.Module, state: TrainState, rainy: torch.Tensor, clean: torch.Tensor, ema_decay: float,
               poison: bool = False) -> torch.Tensor:
    """One optimizer step on ``(rainy, clean)`` (NCHW float32 0..1) and the EMA update; returns the detached loss,
    left on the device (reading it would make the host wait for the device every step).

    ``model`` is ``state.net`` or its DistributedDataParallel wrapper; ``poison`` makes the loss NaN (a test hook).
    """
    with autocast(rainy.device):
        loss = F.l1_loss(model(rainy), clean)
        aux = getattr(state.net, "aux_loss", None)  # a quantizer's commitment term (models.vqgan)
        if aux is not None:
            loss = loss + aux
    if poison:
        loss = loss * float("nan")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(state.ema.parameters()), list(state.net.parameters()), 1.0 - ema_decay)
    return loss.detach()


def evaluate(net: torch.nn.Module, held, device: torch.device, batch: int) -> tuple[dict, np.ndarray]:
    """Decoupled metrics (means over the held-out images) and the outputs, float32 NHWC on 0..255; in full float32
    (``engine.experiments.scoring.score``: whole images of several sizes are scored on their own sizes)."""
    return score(net, held, device, batch)


# ---- checkpoints and outputs -----------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: TrainState, step: int, position: Position, config: dict,
                    device: torch.device) -> None:
    """Write everything ``load_checkpoint`` needs to continue after ``step`` exactly (fsynced, atomic)."""
    ckpt = {"model": state.net.state_dict(), "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "step": step, "epoch": position.epoch, "offset": position.offset, "config": config,
            "train_config": config["train_config"], "rng": rng_states(device)}
    atomic_write(path, lambda f: torch.save(ckpt, f), fsync=True)


def rng_states(device: torch.device) -> dict:
    """The torch, numpy and (on CUDA) device RNG states, as a checkpoint keeps them."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(states: dict, device: torch.device) -> None:
    """Set the RNGs to ``states`` (from ``rng_states``)."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def load_checkpoint(path: Path, state: TrainState, config: dict, device: torch.device) -> tuple[int, Position]:
    """Restore ``state`` and the RNGs from ``path``; returns ``(step, Position)`` of the next step.

    Refuses (click error) a checkpoint of another model or whose ``RESUME_KEYS`` differ from ``config``'s.
    """
    ck = torch.load(path, map_location=device, weights_only=False)
    check_resume(ck["config"], config)
    state.net.load_state_dict(ck["model"])
    state.ema.load_state_dict(ck["ema"])
    state.optimizer.load_state_dict(ck["optimizer"])
    state.scheduler.load_state_dict(ck["scheduler"])
    restore_rng(ck["rng"], device)
    return ck["step"], Position(ck["epoch"], ck["offset"])


def check_resume(saved: dict, config: dict) -> None:
    """Raise a click error when a checkpoint's resolved configuration ``saved`` is of another model than ``config``
    or differs from it in one of ``RESUME_KEYS``."""
    if saved["model"] != config["model"]:
        raise click.UsageError(f"--resume: the checkpoint is a {saved['model']}, not {config['model']}")
    for key in RESUME_KEYS:
        if saved.get(key) != config[key]:
            raise click.UsageError(f"--resume: {key} differs from the checkpoint's ({config[key]!r} vs "
                                   f"{saved.get(key)!r}); resume with the original options")


def prepare_out(out: Path, config: dict, step: int, resume: bool) -> None:
    """Create ``out``, write config.json and start log.jsonl (on resume: cut to the checkpoint's step, so the log
    reads like one uninterrupted run)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config, indent=2, fsync=True)
    log_path = out / LOG
    if resume and log_path.exists():
        keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(log_path, "".join(ln + "\n" for ln in keep), fsync=True)
    elif not resume:
        atomic_write_text(log_path, "", fsync=True)


def append_log(out: Path, record: dict) -> None:
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def finish(cfg: TrainConfig, data: Data, state: TrainState, step: int, device: torch.device) -> None:
    """Score the EMA weights on the held-out set; write model.pt, samples.png and metrics.json; print a summary."""
    out = Path(cfg.out)
    metrics, output = evaluate(state.ema, data.held, device, cfg.batch)
    result = {**metrics, "E_R_ceiling": rain_ceiling(data.held), "step": step, "model": cfg.model,
              "train_patches": int(len(data.train_indices)), "rain": cfg.train_rain.name,
              "heldout": data.held.describe()}
    append_log(out, {"step": step, "event": "final", **metrics})
    model = {"model": cfg.model, "ema": state.ema.state_dict(), "step": step}
    atomic_write(out / "model.pt", lambda f: torch.save(model, f), fsync=True)
    save_samples(out / "samples.png", data.held, output)
    atomic_write_json(out / "metrics.json", result, indent=2, fsync=True)
    click.echo(f"{out}: step {step}  E_R {metrics['E_R']:.2f}  E_B {metrics['E_B']:.2f}  "
               f"PSNR {metrics['PSNR']:.2f} dB  (held-out {data.held.describe()['rain']}, {len(data.held.indices)} "
               f"{'patches' if data.held.rain is not None else 'paired items'})")


# ---- logging and progress ------------------------------------------------------------------------------------------

class NonFiniteLoss(click.ClickException):
    """Training stopped on a NaN or infinite loss (exit code 3)."""

    exit_code = 3


class LogWindow:
    """Losses and timings of the steps since the last log line. Losses stay on the device until the window closes:
    one device sync per window, not per step."""

    def __init__(self) -> None:
        self.start, self.wait, self.losses = time.perf_counter(), 0.0, []

    def add(self, loss: torch.Tensor, wait_s: float) -> None:
        self.losses.append(loss)
        self.wait += wait_s

    def gather_losses(self, world: int) -> np.ndarray:
        """float32 [steps in the window]: each step's loss averaged over the ranks (one device sync)."""
        losses = torch.stack(self.losses).float()
        if world > 1:
            dist.all_reduce(losses)
            losses /= world
        self.losses = []
        return losses.cpu().numpy()

    def record(self, step: int, epoch: int, losses: np.ndarray, lr: float, batch: int) -> dict:
        """The log.jsonl line of the window; starts the next window's clock."""
        now = time.perf_counter()
        elapsed = now - self.start
        record = {"step": step, "epoch": epoch, "loss": float(losses[-1]), "loss_mean": float(losses.mean()),
                  "lr": lr, "patches_per_s": len(losses) * batch / elapsed, "steps_per_s": len(losses) / elapsed,
                  "data_wait": self.wait / elapsed}
        self.start, self.wait = now, 0.0
        return record


def check_finite(losses: np.ndarray, step: int, out: Path, last_good: int | None, master: bool,
                 ckpt: Path | None = None, what: str = "") -> None:
    """Raise ``NonFiniteLoss`` (after logging the bad step to ``out``'s log on rank 0) when a loss of the window
    ending at ``step`` is NaN or infinite; the message says where the last good checkpoint is (``ckpt``, by default
    ``out / CKPT``) and starts with ``what`` (e.g. the run's name) when given."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if not len(bad):
        return
    bad_step = step - len(losses) + int(bad[0]) + 1
    if master:
        append_log(out, {"step": bad_step, "event": "non-finite loss", "loss": float(losses[bad[0]])})
    where = (f"the last good checkpoint is {ckpt or out / CKPT} (step {last_good})" if last_good is not None
             else "no checkpoint was written yet")
    raise NonFiniteLoss(f"{what}loss became {losses[bad[0]]} at step {bad_step}; training stopped, {where}")


class Progress:
    """The live progress line on stderr: step/iters, loss, patches/s, data wait and ETA.

    On a terminal the line is redrawn in place (at most every ``redraw_s`` seconds). Otherwise (a pipe read by
    ``demo`` or ``sweep``, a CI log) a plain line is printed after each log step, at most every ``pipe_min_s``
    seconds, and at least every ``pipe_max_s`` seconds while steps go on; the last step always gets a line.
    Rates cover the steps since the previous line; the ETA uses the mean step time since the first step shown.
    """

    def __init__(self, iters: int, batch: int, step: int, enabled: bool = True, stream: TextIO | None = None,
                 clock=time.perf_counter, redraw_s: float = 0.5, pipe_min_s: float = 5.0,
                 pipe_max_s: float = 30.0) -> None:
        self.iters, self.batch, self.enabled, self.clock = iters, batch, enabled, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.redraw_s, self.pipe_min_s, self.pipe_max_s = redraw_s, pipe_min_s, pipe_max_s
        self.loss: float | None = None
        self.first: tuple[int, float] | None = None  # (step, time) of the first update: the ETA's origin
        self.last_step, self.last_time, self.wait, self.width = step, clock(), 0.0, 0

    def update(self, step: int, wait_s: float, loss: float | None = None) -> None:
        """After ``step``: ``wait_s`` seconds spent waiting for its batch; ``loss`` when a log window closed."""
        if not self.enabled:
            return
        now = self.clock()
        self.wait += wait_s
        if loss is not None:
            self.loss = loss
        if self.first is None:
            self.first = (step, now)
        since = now - self.last_time
        if self.tty:
            due = since >= self.redraw_s or loss is not None
        else:
            due = (loss is not None and since >= self.pipe_min_s) or since >= self.pipe_max_s
        if due or step == self.iters:
            self.show(self.line(step, now))

    def line(self, step: int, now: float) -> str:
        since = max(now - self.last_time, 1e-9)
        rate = (step - self.last_step) * self.batch / since
        first_step, first_time = self.first
        eta = "?" if step == first_step else format_seconds(
            (self.iters - step) * (now - first_time) / (step - first_step))
        loss = "-" if self.loss is None else f"{self.loss:.4g}"
        text = (f"step {step}/{self.iters}  loss {loss}  {rate:.1f} patches/s  "
                f"data wait {100 * min(self.wait / since, 1):.0f} %  ETA {eta}")
        self.last_step, self.last_time, self.wait = step, now, 0.0
        return text

    def show(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line on a terminal."""
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def start_line(cfg: TrainConfig, data: Data, config: dict, step: int) -> str:
    """One line saying what is trained, on what, and what it is scored on."""
    n, total = len(data.train_indices), data.store.count
    if cfg.subset:
        what = f"{n} of {total} patches of {cfg.store} (--subset {cfg.subset})"
    elif cfg.count:
        what = f"{n} of {total} patches of {cfg.store}"
    else:
        what = f"all {total} patches of {cfg.store} (no --count or --subset given)"
    held = data.held.describe()
    test_store = f" of {cfg.test_store}" if cfg.test_store else ""
    resuming = f"resuming at step {step} of {cfg.iters}: " if step else ""
    devices = config["device"] + (f" x {config['world_size']}" if config["world_size"] > 1 else "")
    return (f"{resuming}training {cfg.model} ({config['parameters']:,} parameters) on {what}, "
            f"{cfg.train_rain.name} rain on {100 * cfg.rain_prob:g} % of patches; held-out: {held['count']} "
            f"patches{test_store} ({held['policy']}), {held['rain']}; {cfg.iters} steps of {cfg.batch} patches on "
            f"{devices} -> {cfg.out}")


# ---- the loop --------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> None:
    """Build everything (nothing is written until it all works), train to ``cfg.iters`` steps, evaluate."""
    master, out = rank == 0, Path(cfg.out)
    seed_everything(cfg.seed, cfg.threads, device)
    data = make_data(cfg, device, rank, world)
    state = make_model(cfg, device)
    config = run_config(cfg, data, state, device, world)
    step, position = load_checkpoint(out / CKPT, state, config, device) if cfg.resume else (0, Position())
    if master:
        prepare_out(out, config, step, cfg.resume)
        click.echo(start_line(cfg, data, config, step), err=True)
    model = torch.nn.parallel.DistributedDataParallel(
        state.net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else state.net
    steps = data.stream.steps(position)
    window, progress = LogWindow(), Progress(cfg.iters, cfg.batch, step, enabled=master)
    last_good = step if cfg.resume else None
    model.train()
    try:
        while step < cfg.iters:
            t0 = time.perf_counter()
            rainy, clean, position = next(steps)
            wait = time.perf_counter() - t0
            loss = train_step(model, state, rainy, clean, cfg.ema, poison=step + 1 == cfg.fault_at)
            step += 1
            window.add(loss, wait)
            at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.iters
            record = None
            if step % cfg.log_every == 0 or at_ckpt:
                losses = window.gather_losses(world)
                check_finite(losses, step, out, last_good, master)
                record = window.record(step, position.epoch, losses, state.optimizer.param_groups[0]["lr"], cfg.batch)
                if master:
                    append_log(out, record)
            progress.update(step, wait, None if record is None else record["loss_mean"])
            if at_ckpt:
                if master:
                    save_checkpoint(out / CKPT, state, step, position, config, device)
                if world > 1:
                    dist.barrier()
                last_good = step
                if step == cfg.stop_after:
                    return
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.iters and master:
                metrics, _ = evaluate(state.ema, data.held, device, cfg.batch)
                append_log(out, {"step": step, "event": "eval", **metrics})
    finally:
        progress.close()
    if master:
        finish(cfg, data, state, step, device)
    if world > 1:
        dist.barrier()


# ---- the command -----------------------------------------------------------------------------------------------------

@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--store", required=True, type=click.Path(exists=True), help="Patch store (rainsweep precompute).")
@click.option("--subset", type=click.Path(exists=True, dir_okay=False), help="Subset file (rainsweep select).")
@click.option("--count", type=int, help="Select this many training backgrounds (instead of --subset).")
@click.option("--sharpness", default=None, help="Sharpness band for --count (passed to engine.data.select).")
@click.option("--rain", default="medium", help="Training rain: preset or spec (RainSpec.parse).")
@click.option("--rain-prob", default=0.9, type=click.FloatRange(0, 1), help="Fraction of patches that get rain.")
@click.option("--test-rain", default="heldout-layered", help="Held-out rain preset or spec.")
@click.option("--test-store", type=click.Path(exists=True),
              help="Separate store for held-out backgrounds, or a paired store (rainsweep precompute-pairs): then "
                   "every stored rainy image is scored as it is (--test-rain and --test-count do not apply).")
@click.option("--test-count", default=64, type=click.IntRange(1), help="Held-out patches.")
@click.option("--test-seed", default=1000, type=int, help="Fixes the held-out set (same for every run).")
@click.option("--heldout-exclude-count", default=0, type=click.IntRange(0),
              help="With --count: keep held-out patches out of the N-patch selection too (selection is nested, so a "
                   "sweep passing its largest count evaluates every run on the same held-out set).")
@click.option("--model", default="resnet", help=f"One of: {', '.join(models.NAMES)}.")
@click.option("--iters", default=100_000, type=click.IntRange(1), help="Training steps.")
@click.option("--batch", default=16, type=click.IntRange(1), help="Global batch size (patches per step).")
@click.option("--lr", default=2e-4, type=float, help="Initial Adam learning rate.")
@click.option("--milestones", default="0.5,0.75", help="LR halving points, as fractions of --iters.")
@click.option("--gamma", default=0.5, type=float, help="LR factor at each milestone.")
@click.option("--ema", default=0.999, type=click.FloatRange(0, 1), help="EMA decay (0: no EMA).")
@click.option("--seed", default=0, type=int, help="Seed of initialization, subset selection and training rain.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--loader-mode", default="auto", help="engine.loader mode.")
@click.option("--eval-every", default=0, type=click.IntRange(0), help="Held-out evaluation every K steps (0: end only).")
@click.option("--ckpt-every", default=1000, type=click.IntRange(1), help="Checkpoint every K steps.")
@click.option("--log-every", default=50, type=click.IntRange(1), help="Log (and check the loss) every K steps.")
@click.option("--threads", default=0, type=click.IntRange(0),
              help="CPU threads for torch and numba (0: their defaults).")
@click.option("--resume", is_flag=True, help="Continue from OUT/ckpt.pt.")
@click.option("--prior", type=click.Path(exists=True, dir_okay=False),
              help=f"Prior checkpoint for {', '.join(models.PRIOR_MODELS)}: a prior.pt of rainsweep prior or a "
                   f"taming-transformers .ckpt; all but the encoder stays frozen.")
@click.option("--fault-at", default=0, type=int, hidden=True, help="Test hook: make the loss NaN at this step.")
@click.option("--stop-after", default=0, type=int, hidden=True,
              help="Test hook: exit after the checkpoint at this step, as if the job were preempted.")
def main(**options: Any) -> None:
    """Train a deraining model and write log.jsonl, metrics.json, config.json and checkpoints under --out."""
    # torchrun sets WORLD_SIZE / RANK / LOCAL_RANK
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cfg = TrainConfig.from_options(options, world)
    device = resolve_device(cfg.device, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with torch_settings_kept():
            train(cfg, device, rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def torch_settings_kept() -> Iterator[None]:
    """Restore torch's deterministic-algorithms flag and torch's and numba's thread counts on exit: training switches
    on the first (CPU) and ``--threads`` sets the others, and an in-process call (tests, notebooks) should leave the
    process as it found it."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    numba_threads = numba.get_num_threads()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        numba.set_num_threads(numba_threads)


if __name__ == "__main__":
    main()
