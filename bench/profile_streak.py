"""Profile the CPU streak synthesis against its peers, one thread, side by side in one process.

Run: ``python bench/profile_streak.py [--patches 256] [--rounds 7] [--presets small,medium,large,random]
[--phases]``. Not a pytest module (``bench/`` suites are ``test_*.py``); the lead's pytest-benchmark suite has the
official cases, this is the tool for working on the kernels.

What it measures (128 x 128 x 3 uint8 built-in patches, ``numba``/OpenCV/torch limited to one thread):

- ``ours[p]``: ``engine.synth.synthesize(patches, p, backend="cpu")`` (rain layer + rainy + mask), per preset.
- ``authors[p]``: the authors' OpenCV generator (``kernels.authors_generator.authors_rain``) per patch, per preset.
- ``alb-default``: albumentations ``RandomRain(p=1)`` with its default settings (rainy image only).
- with ``--phases``: the parts of ours separately: ``render[p]`` (``render_cpu``), ``composite`` (``composite_cpu``)
  and ``draws`` (``common_draws``, the host-side per-patch hashes).
- with ``--baseline DIR``: ``before[p]``, the same work done by another version of the kernels, loaded from
  ``DIR/rain_streak.py`` and ``DIR/composite.py`` (e.g. ``git show REV:kernels/rain_streak.py > DIR/...``): common
  draws, output allocation, ``render_cpu`` then ``composite_cpu``, as ``synthesize`` did before the fused path.
  Its outputs are checked byte for byte against ours before timing.

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
    """(rain_streak, composite) modules of another kernel version, under private module names."""
    import importlib.util

    mods = []
    for name in ("composite", "rain_streak"):
        spec = importlib.util.spec_from_file_location(f"_baseline_{name}", str(Path(directory) / f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        # registered before it runs: numba's on-disk cache re-imports a kernel's module by name when loading it
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[1], mods[0]


def _cases(patches: np.ndarray, presets: list[str], phases: bool,
           baseline: str | None = None) -> dict[str, tuple[int, object]]:
    """name -> (patches per call, zero-argument runner)."""
    from engine.bench.core import _albumentations, _authors_opencv
    from engine.rain import RainSpec
    from engine.synth import _vector, common_draws, synthesize
    from kernels import composite, rain_streak

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
            def before(spec=spec, params=_vector(spec)):
                states, active, beta_q = common_draws(spec, 0, keys)
                rain = np.empty(patches.shape[:3], dtype=np.uint8)
                rainy = np.empty(patches.shape, dtype=np.uint8)
                mask = np.empty(patches.shape[:3], dtype=np.bool_)
                base[0].render_cpu(params, states, active, rain)
                base[1].composite_cpu(patches, rain, beta_q, spec.threshold, rainy, mask)
                return rainy, rain, mask

            got = synthesize(patches, spec, seed=0, keys=keys, backend="cpu")
            want = before()
            if not all(np.array_equal(a, b) for a, b in zip((got.rainy, got.rain, got.mask), want)):
                raise SystemExit(f"baseline and ours differ on {p}")
            cases[f"before[{p}]"] = (n, before)
        cases[f"authors[{p}]"] = (len(few), _authors_opencv(p)(few))
        if phases:
            params = _vector(spec)
            states, active, beta_q = common_draws(spec, 0, keys)
            rain = np.empty(patches.shape[:3], dtype=np.uint8)
            cases[f"render[{p}]"] = (n, lambda params=params, states=states, active=active, rain=rain:
                                     rain_streak.render_cpu(params, states, active, rain))
            if p == presets[0]:
                rain_streak.render_cpu(params, states, active, rain)
                rainy = np.empty_like(patches)
                mask = np.empty(patches.shape[:3], dtype=np.bool_)
                cases["composite"] = (n, lambda: composite.composite_cpu(patches, rain, beta_q, spec.threshold,
                                                                         rainy, mask))
                cases["draws"] = (n, lambda spec=spec: common_draws(spec, 0, keys))
    cases["alb-default"] = (len(few), _albumentations("default")(few))
    return cases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--presets", default="small,medium,large,random")
    ap.add_argument("--phases", action="store_true", help="also time render_cpu, composite_cpu and common_draws")
    ap.add_argument("--baseline", metavar="DIR", help="also time the kernels in DIR (rain_streak.py, composite.py)")
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
    if args.baseline:
        rows += [(f"{p} before", f"before[{p}]") for p in presets]
    for p, o in rows:
        q = p.split()[0]
        ra = [a / b for a, b in zip(wall[o], wall[f"authors[{q}]"])]
        rac = [a / b for a, b in zip(cpu[o], cpu[f"authors[{q}]"])]
        rb = [a / b for a, b in zip(wall[o], wall["alb-default"])]
        rbc = [a / b for a, b in zip(cpu[o], cpu["alb-default"])]
        print(f"{p:<16}{med(ra):>13.2f}{med(rac):>8.2f}{med(rb):>23.2f}{med(rbc):>8.2f}")


if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    main()
