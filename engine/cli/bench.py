"""``rainsweep bench``: patches/s of synthesis and metrics, ours against the peers, in one process."""
from __future__ import annotations

import importlib.util
import inspect
import math
import os
import time
from typing import Any, Sequence

import click

from engine.atomic import atomic_write_json
from engine.bench import core as B
from engine.bench import train as TB
from engine.bench.machine import MALLOC_ENV, gpu_available, machine_info
from engine.bench.timing import parse_threads


@click.command()
@click.option("--presets", default="small,medium,large", show_default=True,
              help="Comma-separated rain presets to synthesize (see `RainSpec.preset`).")
@click.option("--patches", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Patches (128 x 128 x 3 uint8, built-in images) per timed call on the CPU.")
@click.option("--threads", default="1,all", show_default=True,
              help="CPU thread counts to run, comma-separated; 'all' = numba's thread pool size. Applies to numba, "
                   "OpenCV and torch alike.")
@click.option("--gpu/--no-gpu", default=None,
              help="Also time the GPU cases on CuPy arrays (default: when a CUDA GPU is present).")
@click.option("--gpu-patches", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Patches per timed call on the GPU (the CPU patches repeated; a GPU needs large batches).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Time the installed peers in the same run: the authors' OpenCV generator, albumentations and "
                   "kornia RandomRain, OpenCV gray + Laplacian variance.")
@click.option("--loader", is_flag=True, help="Append the data-loader cases (engine.bench.loader).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write all numbers, ratios and the machine description to this JSON file.")
@click.option("--seconds", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="Minimum timed seconds per case (after warm-up); at least 3 repeats, the median is reported.")
@click.option("--train", is_flag=True,
              help="Instead of the synthesis cases: training patches/s (all K runs together) of one run alone, K "
                   "train.py processes at once and K runs fused (engine.bench.train), data wait included.")
@click.option("--train-models", default=",".join(TB.MODELS), show_default=True, help="--train: models.")
@click.option("--train-k", default=None, help="--train: group sizes K  [default: 1,2,4,8,16; 32 too on a GPU]")
@click.option("--train-patch", type=click.IntRange(min=16), default=128, show_default=True,
              help="--train: patch side in pixels.")
@click.option("--train-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="--train: patches per run and step.")
@click.option("--train-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="--train: steps per timed window (each case trains 3 windows and reports the middle one).")
@click.option("--train-modes", default=",".join(TB.MODES), show_default=True,
              help="--train: which of sequential (one run alone), processes, fused to time.")
@click.option("--train-devices", default="auto", show_default=True,
              help="--train: cpu, cuda or cpu,cuda; auto: the GPU when present, else the CPU (the full CPU table "
                   "takes hours: restrict it with the other --train options).")
def bench(presets: str, patches: int, threads: str, gpu: bool | None, gpu_patches: int, peers: bool, loader: bool,
          json_path: str | None, seconds: float, train: bool, train_models: str, train_k: str | None,
          train_patch: int, train_batch: int, train_steps: int, train_modes: str, train_devices: str) -> None:
    """Patches/s of rain synthesis (rain layer + rainy image + mask) per preset, of sharpness and complexity, on
    CPU with one thread and all threads and on the GPU when present; beside them the peers on the same patches in
    the same process, and the ratios ours / peer.

    Each case is warmed up outside the clock (numba compiles there), then repeated for at least --seconds; the
    median of the repeats is reported.

    \b
    For stable OpenCV and kornia numbers set glibc's allocator thresholds before starting (otherwise it returns and
    re-faults the peers' large buffers on every call):
      MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432 rainsweep bench
    """
    if train:
        _bench_train(train_models, train_k, train_patch, train_batch, train_steps, train_modes, train_devices,
                     json_path)
        return
    try:
        preset_names = B.check_presets(presets.split(","))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--presets") from None
    try:
        thread_counts = parse_threads(threads)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--threads") from None
    has_gpu = gpu_available()
    if gpu is None:
        gpu = has_gpu
    elif gpu and not has_gpu:
        raise click.UsageError("--gpu: no CUDA GPU is usable through CuPy here (use --no-gpu)")
    if loader and importlib.util.find_spec("engine.bench.loader") is None:
        raise click.UsageError("--loader needs engine.bench.loader (run_loader_bench), which is not in this "
                               "checkout")
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        click.echo("note: allocator thresholds not set; for stable peer numbers run with "
                   + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()), err=True)

    from engine.data.builtin_images import builtin_patches

    data = builtin_patches(patches, 128)
    progress = (lambda msg: click.echo(f"  timing {msg}", err=True))
    started = time.time()
    results: list[B.Result] = []
    cpu_cases = B.our_cpu_cases(preset_names) + (B.peer_cpu_cases(preset_names) if peers else [])
    for n in thread_counts:
        results += B.run_cases(cpu_cases, data, n, seconds, progress=progress)
    if gpu:
        results += B.run_cases(B.gpu_cases(preset_names), B.tile_patches(data, gpu_patches), None, seconds,
                               progress=progress)
    loader_rows = _run_loader(seconds, gpu, thread_counts) if loader else []

    ratio_rows = B.ratios(results)
    click.echo(format_results(results))
    if ratio_rows:
        click.echo("")
        click.echo(format_ratios(ratio_rows))
    if loader_rows:
        click.echo("")
        click.echo(format_rows(loader_rows, "loader"))
    if json_path:
        doc = {
            "machine": machine_info(),
            "settings": {"presets": preset_names, "patches": patches, "patch_shape": [128, 128, 3],
                         "threads": thread_counts, "gpu": bool(gpu), "gpu_patches": gpu_patches if gpu else None,
                         "peers": peers, "seconds": seconds, "started_utc": _utc(started),
                         "elapsed_s": time.time() - started},
            "results": [r.as_dict() for r in results],
            "ratios": ratio_rows,
            "loader": loader_rows if loader else None,
        }
        atomic_write_json(json_path, _finite(doc), indent=2, default=_json_default, allow_nan=False)
        click.echo(f"wrote {json_path}", err=True)


def _bench_train(model_text: str, k_text: str | None, patch: int, batch: int, steps: int, mode_text: str,
                 device_text: str, json_path: str | None) -> None:
    """``rainsweep bench --train``: check the options, run ``engine.bench.train.run_train_bench`` per device,
    print the table (and write the JSON file)."""
    import models

    names = [m.strip() for m in model_text.split(",") if m.strip()]
    bad = [m for m in names if m not in models.NAMES]
    if bad or not names:
        raise click.BadParameter(f"{model_text!r}: expected models among {', '.join(models.NAMES)}",
                                 param_hint="--train-models")
    try:
        ks = None if k_text is None else [int(k) for k in k_text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if ks is not None and (not ks or min(ks) < 1):
        raise click.BadParameter(f"{k_text!r}: expected comma-separated group sizes >= 1",
                                 param_hint="--train-k")
    modes = [m.strip() for m in mode_text.split(",") if m.strip()]
    if not modes or any(m not in TB.MODES for m in modes):
        raise click.BadParameter(f"{mode_text!r}: expected some of {', '.join(TB.MODES)}", param_hint="--train-modes")
    if device_text == "auto":
        devices = ["cuda" if gpu_available() else "cpu"]
    else:
        devices = [d.strip() for d in device_text.split(",") if d.strip()]
    if not devices or any(d not in ("cpu", "cuda") for d in devices):
        raise click.BadParameter(f"{device_text!r}: expected cpu, cuda, both or auto", param_hint="--train-devices")
    started = time.time()
    rows = []
    for device in devices:
        rows += TB.run_train_bench(names, ks, patch, batch, steps, device, modes,
                                   echo=lambda msg: click.echo(msg, err=True))
    click.echo(f"training patches/s (all K runs together; {batch} patches per run and step, {patch} x {patch}, "
               f"medium rain, data wait included):")
    click.echo(TB.format_train_rows(rows))
    if json_path:
        doc = {"machine": machine_info(),
               "settings": {"models": names, "ks": ks, "patch": patch, "batch": batch, "steps": steps,
                            "modes": modes, "devices": devices, "started_utc": _utc(started),
                            "elapsed_s": time.time() - started, "load_average": list(os.getloadavg())},
               "train": rows}
        atomic_write_json(json_path, _finite(doc), indent=2, default=_json_default, allow_nan=False)
        click.echo(f"wrote {json_path}", err=True)


def _run_loader(seconds: float, gpu: bool, threads: list[int]) -> list[dict]:
    """Run ``engine.bench.loader.run_loader_bench`` with this run's seconds, GPU choice and thread counts.

    ``--patches`` is not passed on: there it means the size of the temporary store, not a batch.

    Returns
    -------
    list of dict
        The loader rows.
    """
    from engine.bench.loader import run_loader_bench

    # Pass only the arguments its signature takes, so either side can grow options independently.
    offered: dict[str, Any] = {"seconds": seconds, "gpu": gpu, "threads": threads}
    params = inspect.signature(run_loader_bench).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    return list(run_loader_bench(**kwargs))


# ---- formatting ----------------------------------------------------------------------------------------------------

def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    line = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), line] + [fmt(r) for r in rows])


def format_results(results: Sequence[B.Result]) -> str:
    """The on-screen table of the synthesis and metric cases.

    Parameters
    ----------
    results : sequence of engine.bench.core.Result
        Measured and skipped cases.

    Returns
    -------
    str
        One row per case and thread count; patches/s is the median of the repeats, min..max their spread.
    """
    rows = []
    for r in results:
        d = r.as_dict()
        spread = "" if r.timing is None else f"{_rate(d['patches_per_s_min'])}..{_rate(d['patches_per_s_max'])}"
        rows.append([d["case"], d["impl"], d["device"], "-" if r.threads is None else str(r.threads),
                     _rate(d["patches_per_s"]) if r.timing else "skipped", spread, d["outputs"],
                     r.skipped or d["note"]])
    return _table(["case", "impl", "device", "threads", "patches/s", "min..max", "outputs", "note"], rows,
                  right={3, 4, 5})


def format_ratios(rows: Sequence[dict]) -> str:
    """The on-screen table of ``engine.bench.core.ratios`` rows: ours / peer, same task, threads and patches.

    Parameters
    ----------
    rows : sequence of dict
        Rows of ``ratios``.

    Returns
    -------
    str
    """
    body = [[r["ours"], r["peer"], str(r["threads"]), _rate(r["ours_patches_per_s"]), _rate(r["peer_patches_per_s"]),
             f"{r['ratio']:.2f}x"] for r in rows]
    return _table(["ours", "peer", "threads", "ours/s", "peer/s", "ratio"], body, right={2, 3, 4, 5})


def format_rows(rows: Sequence[dict], title: str) -> str:
    """A table of dict rows (the loader cases), columns in first-seen key order.

    Parameters
    ----------
    rows : sequence of dict
        The rows; a missing key leaves its cell empty.
    title : str
        Printed above the table.

    Returns
    -------
    str
    """
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    body = [[_num(v) if isinstance(v, float) else str(v) for v in (r.get(k, "") for k in keys)] for r in rows]
    return f"{title}:\n" + _table(keys, body, right=set())


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _finite(x: Any) -> Any:
    """Replace NaN and infinities by None, recursively, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _json_default(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


if __name__ == "__main__":  # python -m engine.cli.bench (same options as `rainsweep bench`)
    bench()
