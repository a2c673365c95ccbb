"""``rainsweep reproduce``: click front end of engine.experiments.reproduce."""
from __future__ import annotations

import os

import click

# Only light imports at module level: the recipes module loads no torch or numba.
from engine.experiments.recipes import PUBLIC_SCALES, RECIPES, SCALES, RecipeError


def _scale(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # A plain string checked by hand: click.Choice would advertise the test-only scale in --help.
    if value not in SCALES:
        raise click.BadParameter(f"{value!r}: expected one of {', '.join(PUBLIC_SCALES)}")
    return value


@click.command(context_settings={"show_default": True})
@click.argument("name", type=click.Choice(RECIPES))
@click.option("--scale", default="cpu", callback=_scale, metavar="|".join(PUBLIC_SCALES),
              help="cpu: within 30 minutes on 2 CPU cores; gpu: the paper's setting scaled to minutes per run on one "
                   "GPU.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: store/, test-store/, sweeps/, NAME/{results.csv, results.json, figures/, "
                   "report.md}.")
@click.option("--store", type=click.Path(exists=True, file_okay=False),
              help="Training patch store (default: built from built-in pictures under OUT/store).")
@click.option("--test-store", type=click.Path(exists=True, file_okay=False),
              help="Held-out background store (default: built from scikit-image's pictures under OUT/test-store).")
@click.option("--model", "model_names", default="",
              help="Models, comma-separated: families resnet, unet, swinir (small variants at --scale cpu) or full "
                   "model names (default: resnet; fig19: resnet,unet,swinir).")
@click.option("--device", default=None, help="train.py --device (default: cpu at --scale cpu, cuda at gpu).")
@click.option("--jobs", default=None, type=click.IntRange(1), help="Runs at once (default: the scale's).")
@click.option("--prior", type=click.Path(exists=True, dir_okay=False),
              help="fig18 / fig19: a prior checkpoint to fine-tune (a taming-transformers .ckpt of the scale's VQGAN "
                   "configuration, e.g. vqgan_imagenet_f16_1024 at --scale gpu, or a prior.pt) instead of training "
                   "one under OUT/prior.")
@click.option("--plan", "plan_only", is_flag=True, help="Print the train.py command of every run; train nothing.")
def reproduce(name: str, scale: str, out: str, store: str | None, test_store: str | None, model_names: str,
              device: str | None, jobs: int | None, prior: str | None, plan_only: bool) -> None:
    """Run the paper experiment NAME (fig4, fig6, table3, toy, fig18 or fig19) and write its results, figures and
    report.md.

    Finished runs are reused, so an interrupted recipe continues where it stopped.
    """
    # torch's OpenMP threads spin while waiting for each other, which costs a lot on a shared machine; passive
    # waiting only takes effect before torch loads (the toy recipe trains in this process).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from engine.experiments.reproduce import reproduce as run

    models = [m for m in model_names.split(",") if m.strip()]
    try:
        result = run(name, scale, out, store=store, test_store=test_store, model_names=models, device=device,
                     jobs=jobs, plan_only=plan_only, echo=click.echo, prior=prior)
    except RecipeError as err:
        raise click.ClickException(str(err)) from None
    if plan_only:
        click.echo(f"{len(result)} run(s):")
        for line in result:
            click.echo(line)
