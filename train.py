"""Train one deraining model on a background subset with synthetic rain; score it on held-out rain.

    python train.py --store S --count 64 --rain medium --model resnet --iters 100000 --out runs/r64
    torchrun --nproc_per_node 2 train.py --store S --count 64 ... --out runs/r64-ddp

Reads top to bottom: options -> distributed set-up -> data (store, subset, held-out set) -> model, EMA, optimizer
-> resume -> training loop -> final evaluation. The authors' recipe: L1 loss, Adam (betas 0.9, 0.99), multi-step
learning-rate decay (halve the rate at 50 % and 75 % of the steps by default; ``--milestones``), an EMA (0.999) of
the weights used for evaluation, rain on 90 % of training patches, bf16 autocast on GPU.

Images are NCHW float32 on the 0..1 scale inside the network; metrics are computed on the 0..255 scale by
``engine.metrics.decoupled`` on the unquantized output. ``--batch`` is the global batch: with N processes each
takes ``batch / N`` patches of its shard.

Outputs under ``--out`` (rank 0 writes; every file is written to a temporary name and renamed):
  config.json   the resolved configuration
  log.jsonl     one line per ``--log-every`` steps: step, loss, lr, patches_per_s, data_wait (fraction of time
                spent waiting for the loader); eval lines carry the held-out metrics
  ckpt.pt       the last good checkpoint (model, EMA, optimizer, scheduler, loader position, RNG states)
  model.pt      final EMA weights;  metrics.json  final held-out metrics;  samples.png  rainy | output | clean
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
from engine.rain import RainSpec

CKPT = "ckpt.pt"


# ---- small helpers (kept here so the script reads on its own) -----------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to ``path.tmp`` and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def torch_save_atomic(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def parse_rain(text: str, option: str) -> RainSpec:
    try:
        return RainSpec.parse(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=option) from None


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise click.BadParameter(f"{name!r}: expected auto, cpu or cuda", param_hint="--device")
    return torch.device("cpu")


def per_image_mean(metrics: dict) -> dict:
    """Mean over images of each per-image metric (NaN-safe: images without rain have no E_R; all NaN -> NaN)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, dtype=np.float64)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() or np.isinf(v).any() else float("nan")
    return out


@torch.no_grad()
def predict(net: torch.nn.Module, rainy_nhwc_255: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    """Run ``net`` on NHWC images on the 0..255 scale; returns float32 NHWC on 0..255, unquantized and unclipped
    (the decoupled metrics score exactly what the network produced)."""
    outs = []
    for i in range(0, len(rainy_nhwc_255), batch):
        x = torch.from_numpy(np.ascontiguousarray(rainy_nhwc_255[i:i + batch])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        outs.append(net(x).float().mul_(255.0).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(outs)


def evaluate(net: torch.nn.Module, held, device: torch.device, batch: int) -> tuple[dict, np.ndarray]:
    """Decoupled metrics (means over the held-out images) and the outputs, float32 NHWC on 0..255."""
    from engine.metrics import decoupled

    was_training = net.training
    net.eval()
    out = predict(net, held.rainy, device, batch)
    net.train(was_training)
    return per_image_mean(decoupled(out, held.rainy, held.background, held.mask)), out


def save_samples(path: Path, held, output: np.ndarray, n: int = 4) -> None:
    """PNG with one row per image: rainy input | output | ground truth (uint8, output clipped for display)."""
    from PIL import Image

    n = min(n, len(output))
    rows = [np.concatenate([np.asarray(held.rainy[i], dtype=np.float32), output[i],
                            held.background[i].astype(np.float32)], axis=1) for i in range(n)]
    img = np.clip(np.concatenate(rows, axis=0), 0, 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


class NonFiniteLoss(click.ClickException):
    """Training stopped on a NaN or infinite loss (exit code 3)."""

    exit_code = 3


# ---- the command ---------------------------------------------------------------------------------------------------

@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--store", required=True, type=click.Path(exists=True), help="Patch store (rainsweep precompute).")
@click.option("--subset", type=click.Path(exists=True, dir_okay=False), help="Subset file (rainsweep select).")
@click.option("--count", type=int, help="Select this many training backgrounds (instead of --subset).")
@click.option("--sharpness", default=None, help="Sharpness band for --count (passed to engine.data.select).")
@click.option("--rain", "rain_text", default="medium", help="Training rain: preset or spec (RainSpec.parse).")
@click.option("--rain-prob", default=0.9, type=click.FloatRange(0, 1), help="Fraction of patches that get rain.")
@click.option("--test-rain", "test_rain_text", default="heldout-layered", help="Held-out rain preset or spec.")
@click.option("--test-store", type=click.Path(exists=True), help="Separate store for held-out backgrounds.")
@click.option("--test-count", default=64, type=click.IntRange(1), help="Held-out patches.")
@click.option("--test-seed", default=1000, type=int, help="Fixes the held-out set (same for every run).")
@click.option("--heldout-exclude-count", default=0, type=click.IntRange(0),
              help="With --count: keep held-out patches out of the N-patch selection too (selection is nested, so a "
                   "sweep passing its largest count evaluates every run on the same held-out set).")
@click.option("--model", "model_name", default="resnet", help=f"One of: {', '.join(models.NAMES)}.")
@click.option("--iters", default=100_000, type=click.IntRange(1), help="Training steps.")
@click.option("--batch", default=16, type=click.IntRange(1), help="Global batch size (patches per step).")
@click.option("--lr", default=2e-4, type=float, help="Initial Adam learning rate.")
@click.option("--milestones", default="0.5,0.75", help="LR halving points, as fractions of --iters.")
@click.option("--gamma", default=0.5, type=float, help="LR factor at each milestone.")
@click.option("--ema", "ema_decay", default=0.999, type=click.FloatRange(0, 1), help="EMA decay (0: no EMA).")
@click.option("--seed", default=0, type=int, help="Seed of initialization, subset selection and training rain.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--device", "device_name", default="auto", help="auto, cpu or cuda.")
@click.option("--loader-mode", default="auto", help="engine.loader mode.")
@click.option("--eval-every", default=0, type=click.IntRange(0), help="Held-out evaluation every K steps (0: end only).")
@click.option("--ckpt-every", default=1000, type=click.IntRange(1), help="Checkpoint every K steps.")
@click.option("--log-every", default=50, type=click.IntRange(1), help="Log (and check the loss) every K steps.")
@click.option("--threads", default=0, type=click.IntRange(0), help="CPU threads for torch (0: torch's default).")
@click.option("--resume", is_flag=True, help="Continue from OUT/ckpt.pt.")
@click.option("--fault-at", default=0, type=int, hidden=True, help="Test hook: make the loss NaN at this step.")
@click.option("--stop-after", default=0, type=int, hidden=True,
              help="Test hook: exit after the checkpoint at this step, as if the job were preempted.")
def main(**opt) -> None:
    """Train a deraining model and write log.jsonl, metrics.json, config.json and checkpoints under --out."""
    # ---- distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK) -------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(opt["device_name"], local_rank)
    ddp = world > 1
    if ddp and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    # run() switches on deterministic algorithms (CPU) and may set the thread count: restore both afterwards, so
    # an in-process call (tests, notebooks) leaves torch as it found it.
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        run(opt, device, rank, world, master)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def run(opt: dict, device: torch.device, rank: int, world: int, master: bool) -> None:
    out = Path(opt["out"])
    ddp = world > 1

    # ---- validate names early: a typo should fail before any data is touched -----------------------------------
    if opt["model_name"] not in models.NAMES:
        raise click.BadParameter(f"unknown model {opt['model_name']!r}; valid models: {', '.join(models.NAMES)}",
                                 param_hint="--model")
    train_spec = dataclasses.replace(parse_rain(opt["rain_text"], "--rain"), rain_prob=opt["rain_prob"])
    test_spec = parse_rain(opt["test_rain_text"], "--test-rain")
    if opt["subset"] and opt["count"]:
        raise click.UsageError("give either --subset or --count, not both")
    if opt["batch"] % world:
        raise click.BadParameter(f"{opt['batch']} is not divisible by the {world} processes", param_hint="--batch")
    try:
        milestone_fracs = sorted(float(m) for m in opt["milestones"].split(",") if m.strip())
    except ValueError:
        raise click.BadParameter(f"{opt['milestones']!r}: expected comma-separated fractions in (0, 1)",
                                 param_hint="--milestones") from None
    if any(not 0 < m < 1 for m in milestone_fracs):
        raise click.BadParameter(f"{opt['milestones']!r}: fractions must lie in (0, 1)", param_hint="--milestones")
    milestones = sorted({max(1, round(m * opt["iters"])) for m in milestone_fracs})
    if (out / CKPT).exists() and not opt["resume"]:
        raise click.UsageError(f"{out} already holds a checkpoint: pass --resume to continue it, or pick a new --out")
    if opt["resume"] and not (out / CKPT).exists():
        raise click.UsageError(f"--resume: no checkpoint at {out / CKPT}")
    if master:
        out.mkdir(parents=True, exist_ok=True)

    # ---- reproducibility: CPU runs are bit-exact so --resume can be tested against an uninterrupted run ---------
    if opt["threads"]:
        torch.set_num_threads(opt["threads"])
    torch.manual_seed(opt["seed"])
    np.random.seed(opt["seed"] % 2**32)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)

    # ---- data: store, training subset, held-out set -------------------------------------------------------------
    from engine import loader as engine_loader
    from engine.experiments.heldout import build_heldout
    from engine.data.store import open_store

    store = open_store(opt["store"])
    # The loader gets the path: it caches loaders by store path, which stays valid across in-process runs.
    store_path = str(Path(opt["store"]).resolve())
    if opt["subset"]:
        from engine.data.select import check_subset, load_subset

        subset = load_subset(opt["subset"])
        try:
            check_subset(store, subset)
        except ValueError as err:
            raise click.UsageError(f"--subset {opt['subset']} does not belong to --store {opt['store']}: {err}")
        train_indices = np.asarray(subset.indices, dtype=np.int64)
    elif opt["count"]:
        from engine.data.select import select

        kwargs = {} if opt["sharpness"] is None else {"sharpness": opt["sharpness"]}
        try:
            subset = select(store, opt["count"], seed=opt["seed"], **kwargs)
        except ValueError as err:
            raise click.UsageError(f"--count {opt['count']}: {err}") from None
        train_indices = np.asarray(subset.indices, dtype=np.int64)
    else:
        subset = None
        train_indices = np.arange(store.count, dtype=np.int64)
    if len(train_indices) == 0:
        raise click.UsageError("the training subset is empty")
    test_store = open_store(opt["test_store"]) if opt["test_store"] else None
    excluded = train_indices
    if opt["heldout_exclude_count"] and opt["count"] and test_store is None:
        # Same query and seed as the training selection: the largest subset of a sweep contains every smaller one.
        larger = select(store, min(opt["heldout_exclude_count"], store.count), seed=opt["seed"], **kwargs)
        excluded = np.union1d(train_indices, np.asarray(larger.indices, dtype=np.int64))
    held = build_heldout(store, excluded, test_spec, count=opt["test_count"], seed=opt["test_seed"],
                         test_store=test_store)
    if test_store is None and np.isin(held.indices, train_indices).any():
        raise RuntimeError("held-out patches overlap the training subset")  # guarded by build_heldout; be sure

    # Steps of one (trainer) epoch, the same on every rank since DDP all-reduces each step. The loader's epoch
    # visits each subset patch once; a subset smaller than the global batch (the paper's 8 backgrounds at batch 16)
    # glues k = ceil(batch / n) loader epochs into one step, so repeated patches still get fresh rain (the rain key
    # holds the loader epoch).
    per_rank = opt["batch"] // world
    n_train = len(train_indices)
    glue = 1 if n_train >= opt["batch"] else math.ceil(opt["batch"] / n_train)
    steps_per_epoch = (n_train // per_rank) // world if glue == 1 else 1

    def epoch_batches(epoch: int):
        """(rainy, clean) NCHW float32 0..1 tensors on ``device`` for each step of ``epoch``, this rank's share."""
        common = dict(rain=train_spec, seed=opt["seed"], device=str(device), mode=opt["loader_mode"])
        if glue == 1:
            for b in engine_loader.batches(store_path, subset=train_indices, batch_size=per_rank, epoch=epoch,
                                           drop_last=True, shard_id=rank, num_shards=world, **common):
                yield b.rainy, b.background
            return
        parts = [next(iter(engine_loader.batches(store_path, subset=train_indices, batch_size=n_train,
                                                 epoch=epoch * glue + j, **common))) for j in range(glue)]
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        yield (torch.cat([p.rainy for p in parts])[rows], torch.cat([p.background for p in parts])[rows])

    # ---- model, EMA, optimizer, schedule ----------------------------------------------------------------------------
    net = models.build(opt["model_name"]).to(device)
    ema = models.build(opt["model_name"]).to(device)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt_ = torch.optim.Adam(net.parameters(), lr=opt["lr"], betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt_, milestones=milestones, gamma=opt["gamma"])
    step, epoch, offset = 0, 0, 0

    config_now = {"store_fingerprint": str(getattr(store, "fingerprint", "")), "train_patches": n_train,
                  "rain_spec": train_spec.describe(), "seed": opt["seed"], "batch": opt["batch"], "world_size": world}
    if opt["resume"]:
        ck = torch.load(out / CKPT, map_location=device, weights_only=False)
        if ck["config"]["model"] != opt["model_name"]:
            raise click.UsageError(f"--resume: the checkpoint is a {ck['config']['model']}, not {opt['model_name']}")
        for key in ("store_fingerprint", "train_patches", "rain_spec", "seed", "batch", "world_size"):
            if ck["config"].get(key) != config_now[key]:
                raise click.UsageError(f"--resume: {key} differs from the checkpoint's ({config_now[key]!r} vs "
                                       f"{ck['config'].get(key)!r}); resume with the original options")
        net.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt_.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, epoch, offset = ck["step"], ck["epoch"], ck["offset"]
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                      else None) if ddp else net
    config = {
        "model": opt["model_name"], "parameters": models.parameter_count(net), "store": str(opt["store"]),
        "store_fingerprint": str(getattr(store, "fingerprint", "")), "subset": opt["subset"], "count": opt["count"],
        "sharpness": opt["sharpness"], "train_patches": int(len(train_indices)), "rain": train_spec.name,
        "rain_spec": train_spec.describe(), "rain_prob": opt["rain_prob"], "test_rain": test_spec.name,
        "heldout": held.describe(), "test_store": opt["test_store"], "iters": opt["iters"], "batch": opt["batch"],
        "lr": opt["lr"], "betas": [0.9, 0.99], "milestones": milestones, "gamma": opt["gamma"],
        "ema": opt["ema_decay"], "loss": "l1", "seed": opt["seed"], "device": str(device), "world_size": world,
        "bf16_autocast": device.type == "cuda", "patch_size": int(store.patch_size),
        "steps_per_epoch": steps_per_epoch, "loader_epochs_per_epoch": glue,
    }
    if master:
        atomic_write_json(out / "config.json", config)
        # On resume drop log lines past the checkpoint, so the log reads like one uninterrupted run.
        log_path = out / "log.jsonl"
        if opt["resume"] and log_path.exists():
            keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            atomic_write_bytes(log_path, "".join(ln + "\n" for ln in keep).encode())
        elif not opt["resume"]:
            atomic_write_bytes(log_path, b"")

    def log(rec: dict) -> None:
        if master:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint() -> None:
        if master:
            torch_save_atomic(out / CKPT, {
                "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt_.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "epoch": epoch, "offset": offset,
                "config": config,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            })
        if ddp:
            dist.barrier()

    # ---- training loop ---------------------------------------------------------------------------------------------
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    pending: list[torch.Tensor] = []  # losses since the last check, left on the device to avoid a sync per step
    t_window, wait_window, n_window = time.perf_counter(), 0.0, 0
    last_good = step if opt["resume"] else None
    model.train()
    while step < opt["iters"]:
        it = epoch_batches(epoch)
        for _ in range(offset):  # resume mid-epoch: batches are pure functions of (seed, epoch), so skip ahead
            next(it)
        while step < opt["iters"]:
            t0 = time.perf_counter()
            rainy, clean = next(it)
            wait_window += time.perf_counter() - t0

            with autocast:
                loss = F.l1_loss(model(rainy), clean)
            if step + 1 == opt["fault_at"]:
                loss = loss * float("nan")
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, net_params, 1.0 - opt["ema_decay"])
            pending.append(loss.detach())
            step += 1
            offset += 1
            n_window += 1
            epoch_done = offset == steps_per_epoch
            if epoch_done:  # the position is always "next batch to take": (epoch, offset)
                epoch, offset = epoch + 1, 0

            at_ckpt = step % opt["ckpt_every"] == 0 or step == opt["iters"]
            if step % opt["log_every"] == 0 or at_ckpt:
                # One device sync per window: the losses of every step, averaged over ranks.
                losses = torch.stack(pending).float()
                if ddp:
                    dist.all_reduce(losses)
                    losses /= world
                losses = losses.cpu().numpy()
                pending.clear()
                bad = np.flatnonzero(~np.isfinite(losses))
                if len(bad):
                    bad_step = step - len(losses) + int(bad[0]) + 1
                    log({"step": bad_step, "event": "non-finite loss", "loss": float(losses[bad[0]])})
                    where = (f"the last good checkpoint is {out / CKPT} (step {last_good})" if last_good is not None
                             else "no checkpoint was written yet")
                    raise NonFiniteLoss(f"loss became {losses[bad[0]]} at step {bad_step}; training stopped, "
                                        f"{where}")
                now = time.perf_counter()
                elapsed = now - t_window
                log({"step": step, "epoch": epoch, "loss": float(losses[-1]),
                     "loss_mean": float(losses.mean()), "lr": opt_.param_groups[0]["lr"],
                     "patches_per_s": n_window * opt["batch"] / elapsed, "steps_per_s": n_window / elapsed,
                     "data_wait": wait_window / elapsed})
                t_window, wait_window, n_window = now, 0.0, 0
                if at_ckpt:
                    checkpoint()
                    last_good = step
                    if step == opt["stop_after"]:
                        return
            if opt["eval_every"] and step % opt["eval_every"] == 0 and step < opt["iters"] and master:
                metrics, _ = evaluate(ema, held, device, opt["batch"])
                log({"step": step, "event": "eval", **metrics})
            if epoch_done:
                break  # start the next epoch's (differently shuffled and rained) batches

    # ---- final evaluation (EMA weights) ---------------------------------------------------------------------------
    if master:
        metrics, output = evaluate(ema, held, device, opt["batch"])
        ceiling = per_image_mean({"E_R": np.sqrt(
            (held.mask[..., None] * (held.rainy.astype(np.float64) - held.background) ** 2).sum(axis=(1, 2, 3))
            / np.maximum(held.mask.sum(axis=(1, 2)) * 3, 1))})["E_R"]
        result = {**metrics, "E_R_ceiling": ceiling, "step": step, "model": opt["model_name"],
                  "train_patches": int(len(train_indices)), "rain": train_spec.name, "heldout": held.describe()}
        log({"step": step, "event": "final", **metrics})
        torch_save_atomic(out / "model.pt", {"model": opt["model_name"], "ema": ema.state_dict(), "step": step})
        save_samples(out / "samples.png", held, output)
        atomic_write_json(out / "metrics.json", result)
        click.echo(f"{out}: step {step}  E_R {metrics['E_R']:.2f}  E_B {metrics['E_B']:.2f}  "
                   f"PSNR {metrics['PSNR']:.2f} dB  (held-out {test_spec.name}, {len(held.indices)} patches)")
    if ddp:
        dist.barrier()


if __name__ == "__main__":
    main()
