"""Profile the CPU streak synthesis against its peers, one thread, side by side in one process.

Run: ``python bench/profile_streak.py [--patches 256] [--rounds 7] [--presets small,medium,large,random]
[--phases] [--baseline DIR]``. Not a pytest module (``bench/`` suites are ``test_*.py``); the pytest-benchmark suite
has the official cases, this is the tool for working on the kernels.

What it measures (128 x 128 x 3 uint8 built-in patches, ``numba``/OpenCV/torch limited to one thread):

- ``ours[p]``: ``engine.synth.synthesize(patches, p, backend="cpu")`` (rain layer + rainy + mask), per preset.
- ``authors[p]``: the authors' OpenCV generator (``kernels.authors_generator.authors_rain``) per patch, per preset.
- ``alb-default``: albumentations ``RandomRain(p=1)`` with its default settings (rainy image only; left out, and its
  ratios nan, when albumentations is not installed).
- with ``--phases``: the parts of ours separately: ``render[p]`` (``kernels.streak.cpu.render_cpu``), ``composite``
  (``composite_cpu``) and ``draws`` (``common_draws``, the host-side per-patch hashes).
- with ``--baseline DIR``: ``now[p]`` and ``before[p]``, the fused CPU pass (common draws, output allocation,
  ``render_composite_cpu``) of this tree and of another version of the kernels: ``DIR`` holds a copy of its
  ``kernels`` package (e.g. ``git archive REV kernels | tar -x -C DIR``), imported under a private package name.
  Their outputs are checked byte for byte against each other before timing.

The cases run interleaved (one call of each per round, in a rotating order) so that load from other processes on a
shared machine hits all of them alike; the report gives the median rate over rounds in patches/s by wall clock
(``perf_counter``) and by CPU time of this process (``process_time``, which discounts time the process spent
descheduled), and the ratios of ours to the peers computed per round then taken as the median (ratios are steadier
than rates on a noisy machine).

glibc's allocator settings of ``engine.bench.machine.MALLOC_ENV`` stabilize the OpenCV peers; the script re-executes
itself with them when they are missing.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.bench.machine import MALLOC_ENV  # noqa: E402
from engine.bench.timing import apply_threads  # noqa: E402


def _load_baseline(directory: str):
    """``render_composite_cpu`` of the kernels package copied to ``DIR/kernels``, imported as ``_baseline_kernels``
    (its absolute ``kernels`` imports rewritten to that name, in a temporary copy)."""
    import importlib
    import re
    import shutil
    import tempfile

    src = Path(directory) / "kernels"
    if not (src / "__init__.py").exists():
        raise SystemExit(f"--baseline: no kernels package in {directory}")
    tmp = Path(tempfile.mkdtemp(prefix="rainsweep-baseline-"))
    dst = tmp / "_baseline_kernels"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for path in dst.rglob("*.py"):
        text = re.sub(r"\b(from|import) kernels\b", r"\1 _baseline_kernels", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(tmp))
    for name in ("streak.cpu", "rain_streak"):   # the fused CPU renderer, in either package layout
        try:
            mod = importlib.import_module(f"_baseline_kernels.{name}")
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "render_composite_cpu"):
            return mod.render_composite_cpu
    raise SystemExit(f"--baseline: no render_composite_cpu in {src}")


def _cases(patches: np.ndarray, presets: list[str], phases: bool,
           baseline: str | None = None) -> dict[str, tuple[int, object]]:
    """name -> (patches per call, zero-argument runner)."""
    from engine.bench.core import albumentations_peer, authors_opencv
    from engine.rain import RainSpec
    from engine.synth import common_draws, synthesize
    from kernels import composite
    from kernels.streak import cpu as streak_cpu

    n = len(patches)
    keys = np.arange(n, dtype=np.int64)
    # the OpenCV peer is ~5-10x slower: a quarter of the batch keeps the rounds short without changing its rate
    few = patches[: max(8, n // 4)]
    cases: dict[str, tuple[int, object]] = {}
    base = _load_baseline(baseline) if baseline else None
    for p in presets:
        spec = RainSpec.preset(p)
        cases[f"ours[{p}]"] = (n, lambda spec=spec: synthesize(patches, spec, seed=0, keys=keys, backend="cpu"))
        if base is not None:
            def fused(render, spec=spec, params=spec.to_vector()):
                states, active, beta_q = common_draws(spec, 0, keys)
                rain = np.empty(patches.shape[:3], dtype=np.uint8)
                rainy = np.empty(patches.shape, dtype=np.uint8)
                mask = np.empty(patches.shape[:3], dtype=np.bool_)
                render(params, states, active, patches, beta_q, spec.threshold, rain, rainy, mask)
                return rainy, rain, mask

            if not all(np.array_equal(a, b) for a, b in zip(fused(streak_cpu.render_composite_cpu), fused(base))):
                raise SystemExit(f"baseline and ours differ on {p}")
            cases[f"now[{p}]"] = (n, lambda fused=fused: fused(streak_cpu.render_composite_cpu))
            cases[f"before[{p}]"] = (n, lambda fused=fused: fused(base))
        cases[f"authors[{p}]"] = (len(few), authors_opencv(p)(few))
        if phases:
            params = spec.to_vector()
            states, active, beta_q = common_draws(spec, 0, keys)
            rain = np.empty(patches.shape[:3], dtype=np.uint8)
            cases[f"render[{p}]"] = (n, lambda params=params, states=states, active=active, rain=rain:
                                     streak_cpu.render_cpu(params, states, active, rain))
            if p == presets[0]:
                streak_cpu.render_cpu(params, states, active, rain)
                rainy = np.empty_like(patches)
                mask = np.empty(patches.shape[:3], dtype=np.bool_)
                cases["composite"] = (n, lambda: composite.composite_cpu(patches, rain, beta_q, spec.threshold,
                                                                         rainy, mask))
                cases["draws"] = (n, lambda spec=spec: common_draws(spec, 0, keys))
    try:
        cases["alb-default"] = (len(few), albumentations_peer("default")(few))
    except ImportError:
        pass  # albumentations not installed: no such peer
    return cases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--presets", default="small,medium,large,random")
    ap.add_argument("--phases", action="store_true", help="also time render_cpu, composite_cpu and common_draws")
    ap.add_argument("--baseline", metavar="DIR", help="also time the kernels package copied to DIR/kernels")
    args = ap.parse_args(argv)

    from engine.data.builtin_images import builtin_patches

    apply_threads(1)
    patches = builtin_patches(args.patches, 128)
    presets = [p for p in args.presets.split(",") if p]
    cases = _cases(patches, presets, args.phases, args.baseline)
    for _, run in cases.values():      # warm-up: compilation, caches, first-touch of buffers
        run()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            n, run = cases[k]
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[k].append(n / max(t1 - t0, 1e-9))
            cpu[k].append(n / max(c1 - c0, 1e-9))

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print(f"{'case':<20}{'wall p/s':>12}{'cpu p/s':>12}")
    for k in names:
        print(f"{k:<20}{med(wall[k]):>12,.0f}{med(cpu[k]):>12,.0f}")
    print()
    print(f"{'preset':<16}{'vs authors (wall)':>13}{'(cpu)':>8}{'vs alb-default (wall)':>23}{'(cpu)':>8}")
    rows = [(p, f"ours[{p}]") for p in presets]
    for p, o in rows:
        q = p.split()[0]
        ra = [a / b for a, b in zip(wall[o], wall[f"authors[{q}]"])]
        rac = [a / b for a, b in zip(cpu[o], cpu[f"authors[{q}]"])]
        rb = [a / b for a, b in zip(wall[o], wall.get("alb-default", [math.nan]))]
        rbc = [a / b for a, b in zip(cpu[o], cpu.get("alb-default", [math.nan]))]
        print(f"{p:<16}{med(ra):>13.2f}{med(rac):>8.2f}{med(rb):>23.2f}{med(rbc):>8.2f}")
    if args.baseline:
        print()
        print(f"{'preset':<16}{'now / before rate (wall)':>25}{'(cpu)':>8}")
        for p in presets:
            rw = [a / b for a, b in zip(wall[f"now[{p}]"], wall[f"before[{p}]"])]
            rc = [a / b for a, b in zip(cpu[f"now[{p}]"], cpu[f"before[{p}]"])]
            print(f"{p:<16}{med(rw):>26.3f}{med(rc):>8.3f}")


if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    main()
