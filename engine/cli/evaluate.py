"""``rainsweep evaluate``: score finished runs (a model.pt, a run folder or a whole sweep) on test stores."""
from __future__ import annotations

import click


@click.command(context_settings={"show_default": True})
@click.argument("targets", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--store", "stores", multiple=True, required=True, type=click.Path(exists=True),
              help="Test store: a paired store (rainsweep precompute-pairs) or a patch store scored with --test-rain "
                   "synthesized on the fly. Repeat for several.")
@click.option("--name", default=None, help="Name of the test set (columns <name>.E_R, ...; default: the store's "
                                           "folder name, plus -<rain> for a patch store). Only with one --store.")
@click.option("--test-rain", default="heldout-layered", help="Held-out rain for patch stores.")
@click.option("--test-count", default=64, type=click.IntRange(1), help="Held-out patches of a patch store.")
@click.option("--test-seed", default=1000, type=int, help="Seed of a patch store's held-out patches and rain.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--batch", default=16, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--threads", default=0, type=click.IntRange(0), help="CPU threads for torch (0: its default).")
@click.option("--overwrite", is_flag=True, help="Replace results of the same name made on another test set.")
def evaluate(targets: tuple[str, ...], stores: tuple[str, ...], name: str | None, test_rain: str, test_count: int,
             test_seed: int, device: str, batch: int, threads: int, overwrite: bool) -> None:
    """Score TARGETS (model.pt files, run folders or sweep folders) on each --store.

    Writes <run>/eval/<name>.json (E_R, E_B, rain residual, PSNR, E_R ceiling) and <run>/eval/<name>.png (samples);
    a sweep folder's results.csv and results.json gain the columns <name>.E_R, <name>.E_B, ... Results of an
    unchanged model on an unchanged test set are reused."""
    import torch

    from engine.experiments.evaluate import EvaluateError, evaluate as run

    if threads:
        torch.set_num_threads(threads)
    try:
        run(list(targets), list(stores), name=name, rain=test_rain, count=test_count, seed=test_seed, device=device,
            batch=batch, overwrite=overwrite, echo=click.echo)
    except EvaluateError as e:
        raise click.ClickException(str(e)) from e
