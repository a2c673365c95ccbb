"""``rainsweep precompute``, ``rainsweep info`` and ``rainsweep select``: build, inspect and subset patch stores."""
from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(), help="Store directory to create (or finish).")
@click.option("--patch", default=128, show_default=True, type=int, help="Patch side in pixels.")
@click.option("--stride", default=128, show_default=True, type=int, help="Grid step between patches, pixels.")
@click.option("--category", default=None, help="Category name for every patch (default: per source: the "
              "folder's name, 'skimage' or 'procedural').")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Decoding/metrics processes (the store is identical for any number).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def precompute(sources: tuple[str, ...], out: str, patch: int, stride: int, category: str | None, workers: int,
               quiet: bool) -> None:
    """Cut SOURCES (image files, folders, globs, builtin:skimage, builtin:procedural) into a patch store with
    sharpness and complexity per patch. Killed or interrupted, the same command resumes where it stopped."""
    from engine.data.precompute import PrecomputeError
    from engine.data.precompute import precompute as run
    from engine.data.sources import SourceError

    try:
        summary = run(list(sources), out, patch=patch, stride=stride, category=category, workers=workers,
                      progress=not quiet)
    except (PrecomputeError, SourceError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(summary.format())


def _fmt_q(d: dict) -> str:
    return "  ".join(f"{k} {v:,.4g}" for k, v in d.items())


@click.command()
@click.argument("store", type=click.Path())
@click.option("--verify", "do_verify", is_flag=True,
              help="Read every chunk and check counts and checksums (exit status 1 on any problem).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(store: str, do_verify: bool, as_json: bool) -> None:
    """Summarize a patch store: count, patch size, sources, categories, sharpness and complexity quantiles."""
    from engine.data.store import StoreError, open_store, summarize, verify

    try:
        s = open_store(store, allow_incomplete=True)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    d = summarize(s)
    problems = verify(store, progress=not as_json and sys.stderr.isatty()) if do_verify else None
    if as_json:
        if problems is not None:
            d["verify"] = {"ok": not problems, "problems": problems}
        click.echo(json.dumps(d, indent=1))
    else:
        c = d["counts"]
        lines = [f"store: {d['path']}",
                 f"complete: {'yes' if d['complete'] else 'NO (interrupted: re-run the same precompute)'}",
                 f"patches: {d['count']} of {d['patch_size']} x {d['patch_size']}"
                 + (f", stride {d['stride']}" if d.get("stride") else ""),
                 f"fingerprint: {d['fingerprint']}  schema {d['schema']}  rainsweep {d['rainsweep_version']}",
                 f"sources: {d['sources']}"
                 + (f" ({c.get('images_read', 0)} read" if "images_read" in c else "")
                 + (", skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(c.get("skipped", {}).items()))
                    if c.get("skipped") else "")
                 + (", converted: " + ", ".join(f"{k} {v}" for k, v in sorted(c.get("converted", {}).items()))
                    if c.get("converted") else "")
                 + (")" if "images_read" in c else ""),
                 "categories: " + (", ".join(f"{k} {v}" for k, v in d["categories"].items()) or "none")]
        if d["sharpness"]:
            lines.append(f"sharpness quantiles: {_fmt_q(d['sharpness'])}")
            lines.append("sharpness bands: " + ", ".join(f"{k} {v}" for k, v in d["sharpness_bands"].items()))
            lines.append(f"complexity quantiles: {_fmt_q(d['complexity'])}")
        click.echo("\n".join(lines))
        if problems is not None:
            click.echo("verify: OK" if not problems else "verify: FAILED\n" + "\n".join(f"  - {p}" for p in problems))
    if problems:
        sys.exit(1)


@click.command()
@click.argument("store", type=click.Path())
@click.option("--count", required=True, help="Patches to select (a number, or 'all').")
@click.option("--sharpness", default=None, help="low (<50) | medium (500..1000) | high (>5000) | LO:HI.")
@click.option("--complexity", default=None, help="LO:HI.")
@click.option("--complexity-levels", default=None,
              help="K0:K1: apply --complexity to the per-level terms K0 <= k < K0 + K1 only (start level, number "
                   "of levels; needs a store with the complexity profile).")
@click.option("--category", multiple=True, help="Category name (repeat for any of several).")
@click.option("--seed", default=0, show_default=True, type=int, help="Selection seed.")
@click.option("--out", "out", required=True, type=click.Path(), help="Subset JSON file to write.")
def select(store: str, count: str, sharpness: str | None, complexity: str | None, complexity_levels: str | None,
           category: tuple[str, ...], seed: int, out: str) -> None:
    """Choose a deterministic subset of STORE's patches and save it as JSON (for the loader and train.py)."""
    from engine.data.select import SubsetError
    from engine.data.select import select as choose
    from engine.data.store import StoreError

    if count.strip().lower() == "all":
        n = None
    else:
        try:
            n = int(count)
        except ValueError as e:
            raise click.BadParameter(f"expected a number of patches or 'all', got {count!r}",
                                     param_hint="--count") from e
    try:
        sub = choose(store, n, sharpness=sharpness, complexity=complexity, complexity_levels=complexity_levels,
                     category=list(category) if category else None, seed=seed)
    except (SubsetError, StoreError) as e:
        raise click.ClickException(str(e)) from e
    path = sub.save(out)
    click.echo(f"selected {len(sub)} of {sub.matched} matching patches (store has {sub.store_count}) -> {path}")
