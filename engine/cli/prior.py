"""``rainsweep prior``: stage 1 of the content prior (engine.experiments.prior)."""
from __future__ import annotations

import os

import click


@click.command(context_settings={"show_default": True})
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False),
              help="Patch store whose clean patches the autoencoder learns.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="Train on this many patches (nested selection by --seed); default: the whole store.")
@click.option("--config", "config", default="small",
              help="VQGAN configuration: small (CPU), f16-1024 (taming's ImageNet model) or tiny (tests).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: prior.pt, config.json, log.jsonl, metrics.json, ckpt.pt.")
@click.option("--iters", default=2000, type=click.IntRange(1), help="Training steps.")
@click.option("--batch", default=16, type=click.IntRange(1), help="Patches per step.")
@click.option("--lr", default=5e-4, type=float, help="Adam learning rate (betas 0.5, 0.9).")
@click.option("--seed", default=0, type=int, help="Seed of initialization, selection and patch order.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--threads", default=0, type=click.IntRange(0), help="CPU threads for torch and numba (0: defaults).")
@click.option("--log-every", default=50, type=click.IntRange(1), help="Steps per log.jsonl line.")
@click.option("--ckpt-every", default=500, type=click.IntRange(1), help="Steps per checkpoint.")
@click.option("--dead-every", default=100, type=click.IntRange(0),
              help="Restart codes unused over this many steps at random latents (0: never).")
@click.option("--codebook", default="gradient",
              help="How codes learn: gradient (taming's codebook loss) or ema (moving averages of their latents).")
@click.option("--ema-decay", default=0.99, type=float, help="Decay of --codebook ema.")
def prior(**options) -> None:
    """Train a VQGAN autoencoder on a store's clean patches: the content prior that `python -m train --model
    vqgan-ft-s --prior OUT/prior.pt` fine-tunes. A rerun continues an interrupted training or reuses a finished
    one."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from engine.experiments.prior import PriorConfig, PriorTrainingError, main_echo, train_prior

    try:
        train_prior(PriorConfig(**options), echo=main_echo)
    except PriorTrainingError as err:
        raise click.ClickException(str(err)) from None
