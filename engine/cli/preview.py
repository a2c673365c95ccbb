"""``rainsweep preview``: a PNG grid of (background, rain layer, rainy image, mask) per rain preset."""
from __future__ import annotations

import click


@click.command()
@click.option("--rain", default="all", show_default=True,
              help="'all' (every preset), preset names separated by commas (e.g. 'small,medium'), or one rain spec "
                   "string (e.g. 'medium,width=9' or 'amount=0.005:0.007,length=35:45').")
@click.option("--out", "out", default="preview.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write (written to a temporary name, then renamed).")
@click.option("--size", type=click.IntRange(min=16, max=1024), default=128, show_default=True,
              help="Patch side in pixels.")
@click.option("--count", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Built-in background patches (rows) per preset.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Rain seed (and crop positions of the built-in images); same seed, same picture.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda", "reference"]), default="auto",
              show_default=True, help="Synthesis backend.")
def preview(rain: str, out: str, size: int, count: int, seed: int, backend: str) -> None:
    """Render the rain of each chosen preset on built-in images (scikit-image's bundled pictures, or procedural
    textures without scikit-image): one row per image with the background, the rain layer R (0..255, before
    beta), the rainy image I = clip(B + beta R) and the mask R > t, labelled with the spec's description."""
    from engine.experiments.preview import resolve_rain, write_preview

    try:
        specs = resolve_rain(rain)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--rain") from None
    layout = write_preview(out, rain=specs, size=size, count=count, seed=seed, backend=backend)
    click.echo(f"wrote {out} ({layout.width} x {layout.height} px, {len(layout.labels)} rain spec(s) x {count} "
               f"image(s))")
