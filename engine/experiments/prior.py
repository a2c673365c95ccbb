"""Stage 1 of the content prior (Hu et al., Sec. VI-B): train a VQGAN autoencoder (``models.vqgan``) on clean
background patches of a store, so that its codebook and decoder hold the store's content. Stage 2 (train.py
``--model vqgan-ft --prior PRIOR/prior.pt``) then fine-tunes only the encoder on degraded -> clean pairs.

Objective per step (taming-transformers' ``VQModel`` autoencoder loss without its adversarial and perceptual
terms): ``|x - x_rec|_1`` on the -1..1 scale plus the quantizer's loss (codebook term ``||sg(z) - e||^2`` weighted
``beta`` and commitment term ``||z - sg(e)||^2``, taming's legacy weighting, ``beta = 0.25``), codes updated through
the straight-through estimator by Adam (betas 0.5, 0.9, as taming); or, with ``codebook="ema"``, codes moved by
exponential moving averages of their latents (``prior_codebook.EMACodebook``) and the loss L1 + ``beta`` x
commitment. Left out: the patch discriminator (GAN training
is unstable over a few thousand CPU steps) and the LPIPS perceptual loss (it needs VGG weights that are not
shipped). Added: codes unused over ``dead_every`` steps are restarted at random latents of the current batch (a
common cure for codebook collapse in short trainings; ``dead_every=0`` turns it off).

Outputs under ``out`` (every file written atomically; log.jsonl appended):
  config.json   the options and the autoencoder's configuration
  log.jsonl     per ``log_every`` steps: loss, rec_l1, q_loss, psnr (of the reconstructions, 0..1 scale, dB),
                perplexity and dead codes (code usage over the window), restarted codes, steps_per_s
  ckpt.pt       the last checkpoint (model, optimizer, step, loader position, RNG); a rerun continues from it
  prior.pt      the final weights under taming's key names (``"state_dict"``, as a Lightning checkpoint), the
                configuration and the final metrics; its existence marks the prior finished
  metrics.json  reconstruction PSNR and code usage of the final weights on up to 256 training patches, evenly
                spaced in store order
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.atomic import atomic_write, atomic_write_json
from engine.experiments.prior_codebook import EMACodebook, restart_dead
from engine.loader.steps import Position, TrainingStream
from engine.runtime import limit_cpu_threads

PRIOR = "prior.pt"
CKPT = "ckpt.pt"
LOG = "log.jsonl"
BETAS = (0.5, 0.9)
#: Options a continued run must share with its checkpoint.
RESUME_KEYS = ("store", "count", "config", "batch", "lr", "seed", "dead_every", "codebook", "ema_decay")
#: How the codes learn: through the quantizer's codebook loss, or by moving averages (``EMACodebook``).
CODEBOOK_UPDATES = ("gradient", "ema")
#: The training loss of each codebook update, as config.json states it.
LOSSES = {"gradient": "l1 on -1..1 + commitment + 0.25 x codebook (taming's legacy quantizer loss)",
          "ema": "l1 on -1..1 + 0.25 x commitment; codes by moving averages"}


class PriorTrainingError(ValueError):
    """Bad options for stage 1 (each message names the option)."""


@dataclass(frozen=True)
class PriorConfig:
    """Options of one stage-1 training.

    Attributes
    ----------
    store : str
        Patch store (``rainsweep precompute``); clean patches, uint8 NHWC.
    out : str
        Output folder.
    count : int or None
        Train on this many patches (``engine.data.select.select`` with ``seed``); None: the whole store.
    config : str
        A name in ``models.vqgan.CONFIGS`` (``small``, ``f16-1024``, ``tiny``).
    iters, batch : int
        Steps and patches per step.
    lr : float
        Adam learning rate.
    seed : int
        Seeds initialization, patch order and selection.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    threads : int
        CPU threads for torch and numba (0: their defaults).
    log_every, ckpt_every : int
        Steps between log lines and between checkpoints.
    dead_every : int
        Restart codes unused over this many steps (0: never).
    codebook : str
        ``gradient`` (taming: the codebook loss term moves the codes) or ``ema`` (moving averages of the assigned
        latents, decay ``ema_decay``; the loss is then L1 + ``beta`` x commitment).
    ema_decay : float
        Decay of the ``ema`` codebook update.
    """

    store: str
    out: str
    count: int | None = None
    config: str = "small"
    iters: int = 2000
    batch: int = 16
    lr: float = 5e-4
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    dead_every: int = 100
    codebook: str = "gradient"
    ema_decay: float = 0.99

    def check(self) -> None:
        """Raise ``PriorTrainingError`` naming the first option that cannot work."""
        from models.vqgan import CONFIGS

        if self.config not in CONFIGS:
            raise PriorTrainingError(f"--config {self.config!r}: expected one of {', '.join(CONFIGS)}")
        for name in ("iters", "batch", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise PriorTrainingError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected >= 1")
        if self.count is not None and self.count < 1:
            raise PriorTrainingError(f"--count {self.count}: expected a positive number of patches")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PriorTrainingError(f"--lr {self.lr}: expected a positive learning rate")
        if self.codebook not in CODEBOOK_UPDATES:
            raise PriorTrainingError(f"--codebook {self.codebook!r}: expected one of {', '.join(CODEBOOK_UPDATES)}")
        if not 0 < self.ema_decay < 1:
            raise PriorTrainingError(f"--ema-decay {self.ema_decay}: expected a value in (0, 1)")
        if self.dead_every < 0:
            raise PriorTrainingError(f"--dead-every {self.dead_every}: expected >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise PriorTrainingError(f"--device {self.device!r}: expected auto, cpu or cuda")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PriorTrainingError("--device cuda: CUDA is not available on this machine")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def training_indices(cfg: PriorConfig, store) -> np.ndarray:
    """int64 store indices of the patches the prior trains on."""
    if cfg.count is None:
        return np.arange(store.count, dtype=np.int64)
    if cfg.count > store.count:
        raise PriorTrainingError(f"--count {cfg.count}: the store {cfg.store} holds only {store.count} patches")
    from engine.data.select import select

    return np.asarray(select(store, cfg.count, seed=cfg.seed).indices, dtype=np.int64)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) between two NCHW batches on the 0..1 scale (``a`` clamped to 0..1)."""
    mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1).double().clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


class Window:
    """Statistics of the steps since the last log line."""

    def __init__(self, n_embed: int, device: torch.device) -> None:
        self.n_embed = n_embed
        self.used = torch.zeros(n_embed, dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        self.start, self.rows = time.perf_counter(), []

    def add(self, **values: float) -> None:
        self.rows.append(values)

    def record(self, step: int, lr: float, restarted: int) -> dict:
        p = self.used.double() / max(int(self.used.sum()), 1)
        nz = p[p > 0]
        perplexity = float(torch.exp(-(nz * nz.log()).sum())) if len(nz) else 0.0
        elapsed = time.perf_counter() - self.start
        rec = {"step": step, **{k: float(np.mean([r[k] for r in self.rows])) for k in self.rows[0]},
               "perplexity": perplexity, "dead_codes": int((self.used == 0).sum()), "restarted": restarted,
               "lr": lr, "steps_per_s": len(self.rows) / max(elapsed, 1e-9)}
        self.used.zero_()
        self.reset()
        return rec


def append_log(out: Path, record: dict) -> None:
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(out: Path, net, opt, ema: EMACodebook | None, step: int, position: Position,
                    cfg: PriorConfig) -> None:
    ck = {"model": net.state_dict(), "optimizer": opt.state_dict(), "codebook_ema": ema and ema.state_dict(),
          "step": step, "epoch": position.epoch,
          "offset": position.offset, "options": asdict(cfg), "rng": torch.get_rng_state()}
    atomic_write(out / CKPT, lambda f: torch.save(ck, f), fsync=True)


@torch.no_grad()
def final_metrics(net, store, indices: np.ndarray, device: torch.device, batch: int) -> dict:
    """Reconstruction PSNR (dB, 0..1 scale) and code usage of ``net`` (eval mode) on 256 training patches evenly
    spaced in store order (the first 256 would all come from the first source picture)."""
    from models.vqgan_quantize import usage

    ordered = np.sort(indices)
    rows = np.unique(ordered[np.linspace(0, len(ordered) - 1, min(256, len(ordered))).round().astype(np.int64)])
    net.eval()
    values, codes = [], []
    for i in range(0, len(rows), batch):
        x = torch.from_numpy(np.ascontiguousarray(store.read(rows[i:i + batch]))).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        y, q = net.reconstruct(x * 2 - 1)
        values.append(((((y + 1) / 2).clamp(0, 1) - x) ** 2).flatten(1).mean(1).double().cpu())
        codes.append(q.indices.flatten().cpu())
    net.train()
    mse = torch.cat(values).clamp_min(1e-12)
    perplexity, dead = usage(torch.cat(codes), net.config.n_embed)
    return {"psnr": float((10 * torch.log10(1 / mse)).mean()), "patches": int(len(rows)),
            "perplexity": perplexity, "dead_codes": dead, "n_embed": net.config.n_embed}


def train_prior(cfg: PriorConfig, echo: Callable[[str], None] = print, progress_s: float = 10.0) -> dict:
    """Train (or finish, or reuse) the prior of ``cfg``; returns the contents of metrics.json.

    A folder whose ``prior.pt`` exists is reused as it is (when its options match); one holding ``ckpt.pt``
    continues from it. Raises ``PriorTrainingError`` for bad options or a folder made with other options.
    """
    import models.vqgan as vq
    from engine.data.store import open_store

    cfg.check()
    out = Path(cfg.out)
    options = asdict(cfg)
    saved = out / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())["options"]
        diff = [k for k in RESUME_KEYS if old.get(k) != options[k]]
        if diff:
            raise PriorTrainingError(f"{out} holds a prior made with other {', '.join(diff)} "
                                     f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); choose another --out")
        if (out / PRIOR).exists() and (out / "metrics.json").exists():
            echo(f"prior: reusing {out / PRIOR}")
            return json.loads((out / "metrics.json").read_text())
    try:
        store = open_store(cfg.store)
    except ValueError as err:
        raise PriorTrainingError(f"--store {cfg.store}: {err}") from None
    device = resolve_device(cfg.device)
    limit_cpu_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    indices = training_indices(cfg, store)
    stream = TrainingStream(str(Path(cfg.store).resolve()), indices, cfg.batch, rain=None, seed=cfg.seed,
                            device=device, mode="auto")
    net = vq.VQGAN(cfg.config).to(device)
    ema = EMACodebook(net.quantize.embedding.weight.data, cfg.ema_decay) if cfg.codebook == "ema" else None
    if ema is not None:
        net.quantize.embedding.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, betas=BETAS)
    step, position = 0, Position()
    if (out / CKPT).exists():
        ck = torch.load(out / CKPT, map_location=device, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["codebook_ema"])
        torch.set_rng_state(ck["rng"])
        step, position = ck["step"], Position(ck["epoch"], ck["offset"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, {"options": options, "vqgan": net.config.to_dict(), "train_patches": int(len(indices)),
                              "loss": LOSSES[cfg.codebook], "betas": list(BETAS),
                              "left_out": ["patch discriminator", "LPIPS perceptual loss"]}, indent=2)
    n_params = sum(p.numel() for p in net.parameters())
    echo(f"prior: {'continuing at step ' + str(step) + ' of' if step else 'training'} a VQGAN '{cfg.config}' "
         f"({n_params:,} parameters, {net.config.n_embed} codes) on {len(indices)} clean patches of {cfg.store}; "
         f"{cfg.iters} steps of {cfg.batch} on {device} -> {out}")
    gen = torch.Generator().manual_seed(cfg.seed + step)
    window = Window(net.config.n_embed, device)
    dead_used = torch.zeros(net.config.n_embed, dtype=torch.int64, device=device)
    restarted = 0
    last_shown, t_start, start_step = time.perf_counter(), time.perf_counter(), step
    steps = stream.steps(position)
    net.train()
    while step < cfg.iters:
        _, clean, position = next(steps)
        x = clean * 2 - 1
        h = net.quant_conv(net.encoder(x))
        q = net.quantize(h)
        y = net.decode(q.z_q)
        rec = F.l1_loss(y, x)
        loss = rec + (q.loss if ema is None else net.quantize.beta * q.commitment)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        latents = h.detach().permute(0, 2, 3, 1).reshape(-1, net.config.embed_dim)
        if ema is not None:
            ema.update(latents, q.indices.flatten())
        step += 1
        if not torch.isfinite(loss):
            raise PriorTrainingError(f"the loss became {float(loss)} at step {step}; lower --lr")
        counts = torch.bincount(q.indices.flatten(), minlength=net.config.n_embed)
        window.used += counts
        dead_used += counts
        window.add(loss=loss.item(), rec_l1=rec.item(), q_loss=q.loss.item(), commitment=q.commitment.item(),
                   psnr=psnr((y.detach() + 1) / 2, clean))
        if cfg.dead_every and step % cfg.dead_every == 0 and step < cfg.iters:
            dead = restart_dead(net.quantize.embedding.weight.data, dead_used, latents, gen)
            if ema is not None:
                ema.reset(dead)
            restarted += len(dead)
            dead_used.zero_()
        at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.iters
        if step % cfg.log_every == 0 or at_ckpt:
            record = window.record(step, cfg.lr, restarted)
            restarted = 0
            append_log(out, record)
            now = time.perf_counter()
            if now - last_shown >= progress_s or step == cfg.iters:
                eta = (cfg.iters - step) * (now - t_start) / max(step - start_step, 1)
                echo(f"prior: step {step}/{cfg.iters}  loss {record['loss']:.4f}  psnr {record['psnr']:.2f} dB  "
                     f"perplexity {record['perplexity']:.1f}  dead codes {record['dead_codes']}/"
                     f"{net.config.n_embed}  {record['steps_per_s']:.1f} steps/s  ETA {eta:.0f} s")
                last_shown = now
        if at_ckpt:
            save_checkpoint(out, net, opt, ema, step, position, cfg)
    metrics = {**final_metrics(net, store, indices, device, cfg.batch), "step": step, "config": cfg.config,
               "train_patches": int(len(indices)), "train_seconds": time.perf_counter() - t_start}
    payload = vq.prior_payload(net, cfg.config, {"step": step, "metrics": metrics})
    atomic_write(out / PRIOR, lambda f: torch.save(payload, f), fsync=True)
    atomic_write_json(out / "metrics.json", metrics, indent=2)
    echo(f"prior: {out / PRIOR}: reconstruction PSNR {metrics['psnr']:.2f} dB on {metrics['patches']} training "
         f"patches, perplexity {metrics['perplexity']:.1f}, {metrics['dead_codes']} of {metrics['n_embed']} codes "
         f"unused")
    return metrics


def main_echo(text: str) -> None:
    """Progress printer of the command line (stderr, flushed: a pipe shows lines as they come)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


__all__ = ["PriorConfig", "PriorTrainingError", "train_prior", "PRIOR"]
