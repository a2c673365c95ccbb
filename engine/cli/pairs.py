"""``rainsweep precompute-pairs``: a paired store from a folder of rainy images and one of clean images."""
from __future__ import annotations

import click


@click.command("precompute-pairs", context_settings={"show_default": True})
@click.argument("rainy_dir", type=click.Path())
@click.argument("clean_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Paired store directory to create.")
@click.option("--whole", "whole", is_flag=True, help="Keep each image whole (the default when --patch is not given).")
@click.option("--patch", default=None, type=int, help="Cut aligned patches of this side (pixels) instead.")
@click.option("--stride", default=None, type=int, help="Grid step between patches, pixels (default: --patch).")
@click.option("--multiple", default=16, type=int,
              help="Whole images: pad (or crop) to a multiple of this many pixels, the models' stride.")
@click.option("--fit", default="pad", type=click.Choice(["pad", "crop"]),
              help="Whole images: reflect-pad to the next multiple and score the true size, or centre-crop.")
@click.option("--threshold", default=50, type=int, help="Rain mask threshold on the rain layer estimate (0..255).")
@click.option("--scheme", default="auto",
              type=click.Choice(["auto", "rain100", "suffix", "same-name", "variants"]),
              help="File naming scheme: rain-001/norain-001 (rain100), 001_rain/001_clean (suffix), the same names "
                   "in two folders (same-name), 901_1..901_14 / 901 (variants); auto detects it.")
@click.option("--overwrite", is_flag=True, help="Replace a paired store made with other arguments or inputs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def precompute_pairs(rainy_dir: str, clean_dir: str, out: str, whole: bool, patch: int | None, stride: int | None,
                     multiple: int, fit: str, threshold: int, scheme: str, overwrite: bool, quiet: bool) -> None:
    """Pair RAINY_DIR's images with CLEAN_DIR's by file name (the same folder for sets that keep both in one) and
    write a paired store: clean backgrounds, rainy inputs and the rain layer estimate max_c clip(rainy - clean, 0,
    255), whose mask (> --threshold) the decoupled metrics use. Score runs on it with train.py --test-store,
    rainsweep sweep --test-store or rainsweep evaluate."""
    from engine.data.paired_store import PairedStoreError, precompute_pairs as run
    from engine.data.pairs import PairingError

    if whole and patch is not None:
        raise click.UsageError("give either --whole or --patch, not both")
    if patch is None and stride is not None:
        raise click.UsageError("--stride needs --patch")
    try:
        summary = run(rainy_dir, clean_dir, out, mode="whole" if patch is None else "patch", patch=patch,
                      stride=stride, multiple=multiple, fit=fit, threshold=threshold, scheme=scheme,
                      overwrite=overwrite, progress=not quiet)
    except (PairingError, PairedStoreError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary.format())
