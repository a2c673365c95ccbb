"""Benchmark cases and the timing harness shared by ``rainsweep bench`` and the pytest-benchmark suites in ``bench/``.

A ``Case`` is one thing to time on a batch of background patches (uint8 NHWC ``[N, 128, 128, 3]``, 0..255):
rainsweep's synthesis per rain preset, its sharpness and complexity metrics, and the peers (the authors' OpenCV
generator, albumentations and kornia ``RandomRain``, OpenCV gray + Laplacian variance). ``Case.prepare(patches)``
does everything that must stay outside the clock (device copies, tensor conversion, building transforms) and returns
a zero-argument callable that processes the whole batch once and returns only when the work is finished (GPU cases
synchronize). ``measure`` warms that callable up (numba compiles on the first call), repeats it and reports the
median rate in patches per second.

Thread settings (``thread_limit``) apply to numba, OpenCV and torch together, so "1 thread" means one thread for
ours and for every peer. GPU cases run on CuPy arrays already on the device.

For stable OpenCV / kornia numbers run with ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``
(glibc's allocator otherwise returns and re-faults large buffers on every call; DESIGN 4 measured ~2x swings).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

#: The environment variables that stabilize glibc's allocator for the peers (DESIGN 4).
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "1073741824", "MALLOC_MMAP_THRESHOLD_": "33554432"}

#: Batch size of the kornia peer (it works on batched tensors; DESIGN 4 measured it at 64).
KORNIA_BATCH = 64

Runner = Callable[[], Any]

OURS = "rainsweep"


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        name: unique id, e.g. ``"synthesize[medium]"``, ``"authors-opencv[medium]"``, ``"sharpness"``.
        impl: ``"rainsweep"`` or the peer's name (``"authors-opencv"``, ``"albumentations"``, ``"kornia"``,
            ``"opencv"``).
        task: ``"synthesis"``, ``"sharpness"`` or ``"complexity"``.
        device: ``"cpu"`` or ``"gpu"``.
        preset: rain preset for synthesis cases that follow a ``RainSpec`` (None for peers with their own rain).
        outputs: what one call produces per patch, e.g. ``"rain+rainy+mask"`` or ``"rainy only"``.
        requires: importable modules the case needs; a missing one makes the case unavailable (skipped).
        note: caveat shown beside the number.
        build: ``build(patches) -> runner``; see the module docstring.
    """

    name: str
    impl: str
    task: str
    device: str
    build: Callable[[np.ndarray], Runner]
    preset: str | None = None
    outputs: str = ""
    requires: tuple[str, ...] = ()
    note: str = ""

    def missing(self) -> list[str]:
        """Modules in ``requires`` that cannot be imported here (empty list: the case can run)."""
        return [m for m in self.requires if not _importable(m)]

    def prepare(self, patches: np.ndarray) -> Runner:
        """Runner that processes all of ``patches`` once per call (preparation happens here, off the clock)."""
        return self.build(patches)


@dataclass
class Timing:
    """Result of ``measure``: rates in patches per second, one per timed repeat."""

    patches: int
    rates: list[float] = field(default_factory=list)
    warmup_s: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else math.nan

    @property
    def repeats(self) -> int:
        return len(self.rates)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import counts as missing
        return False


# ---- threads -------------------------------------------------------------------------------------------------------

_current_threads: int | None = None


def all_threads() -> int:
    """The number of threads "all" means: numba's thread pool size (the CPUs this process may use)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def parse_threads(text: str) -> list[int]:
    """``"1,all"`` -> ``[1, all_threads()]`` (duplicates removed, order kept)."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            n = all_threads()
        else:
            try:
                n = int(part)
            except ValueError:
                raise ValueError(f"threads: {part!r} is not a positive integer or 'all' (e.g. '1,all')") from None
            if not 1 <= n <= all_threads():
                raise ValueError(f"threads: {n} is outside 1..{all_threads()} (numba's thread pool size)")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"threads: expected a comma-separated list like '1,all', got {text!r}")
    return out


def apply_threads(n: int) -> None:
    """Set numba's, OpenCV's and (if loaded) torch's thread counts to ``n``."""
    global _current_threads
    import numba

    numba.set_num_threads(n)
    if _importable("cv2"):
        import cv2

        cv2.setNumThreads(n)
    if "torch" in sys.modules:  # importing torch only to set its threads would cost seconds for nothing
        sys.modules["torch"].set_num_threads(n)
    _current_threads = n


@contextlib.contextmanager
def thread_limit(n: int) -> Iterator[int]:
    """Run the block with ``n`` threads for numba, OpenCV and torch; restores "all" afterwards."""
    apply_threads(n)
    try:
        yield n
    finally:
        apply_threads(all_threads())


def current_threads() -> int:
    return _current_threads if _current_threads is not None else all_threads()


# ---- timing --------------------------------------------------------------------------------------------------------

def measure(run: Runner, patches: int, seconds: float = 1.0, min_repeats: int = 3, max_repeats: int = 30,
            warmup: int = 1) -> Timing:
    """Time ``run`` (which processes ``patches`` patches per call): ``warmup`` untimed calls (compilation, caches),
    then repeats until ``seconds`` have passed and at least ``min_repeats`` were made (at most ``max_repeats``).
    Returns every repeat's rate; report ``Timing.median``."""
    if patches <= 0:
        raise ValueError(f"patches: expected a positive patch count, got {patches}")
    timing = Timing(patches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        run()
    timing.warmup_s = time.perf_counter() - t0
    start = time.perf_counter()
    while timing.repeats < max_repeats and (timing.repeats < min_repeats or time.perf_counter() - start < seconds):
        t = time.perf_counter()
        run()
        timing.rates.append(patches / max(time.perf_counter() - t, 1e-12))
    return timing


# ---- our cases -----------------------------------------------------------------------------------------------------

def _keys(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _ours_synth(preset: str, device: str) -> Callable[[np.ndarray], Runner]:
    def build(patches: np.ndarray) -> Runner:
        from engine.rain import RainSpec
        from engine.synth import synthesize

        spec = RainSpec.preset(preset)
        keys = _keys(len(patches))
        if device == "cpu":
            return lambda: synthesize(patches, spec, seed=0, keys=keys, backend="cpu")
        import cupy

        data = cupy.asarray(patches)
        sync = cupy.cuda.Device().synchronize

        def run() -> Any:
            out = synthesize(data, spec, seed=0, keys=keys, backend="cuda")
            sync()
            return out
        return run
    return build


def _ours_metric(name: str, device: str) -> Callable[[np.ndarray], Runner]:
    def build(patches: np.ndarray) -> Runner:
        from engine import metrics

        fn = getattr(metrics, name)
        if device == "cpu":
            return lambda: fn(patches, backend="cpu")
        import cupy

        data = cupy.asarray(patches)
        sync = cupy.cuda.Device().synchronize

        def run() -> Any:
            out = fn(data, backend="cuda")
            sync()
            return out
        return run
    return build


# ---- peers ---------------------------------------------------------------------------------------------------------

def _authors_opencv(preset: str) -> Callable[[np.ndarray], Runner]:
    def build(patches: np.ndarray) -> Runner:
        from engine.rain import RainSpec
        from kernels.authors_generator import authors_rain

        spec = RainSpec.preset(preset)

        def run() -> list:
            gen = np.random.default_rng(0)
            # One parameter draw and one rendering per patch, as the authors' add_rain on a crop; the mask as
            # ours makes it (rain > t), so both sides produce rain + rainy + mask.
            return [authors_rain(patch, spec, gen) for patch in patches]
        return run
    return build


def _albumentations(rain_type: str) -> Callable[[np.ndarray], Runner]:
    def build(patches: np.ndarray) -> Runner:
        import albumentations as A

        transform = A.RandomRain(p=1.0) if rain_type == "default" else A.RandomRain(rain_type=rain_type, p=1.0)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(0)
        return lambda: [transform(image=patch)["image"] for patch in patches]
    return build


def _kornia(patches: np.ndarray) -> Runner:
    import kornia.augmentation as K
    import torch

    torch.set_num_threads(current_threads())
    # kornia works on float NCHW in 0..1: convert once, off the clock (that favours the peer).
    data = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float().div_(255)
    batches = list(torch.split(data, KORNIA_BATCH))
    aug = K.RandomRain(p=1.0)
    torch.manual_seed(0)

    def run() -> list:
        with torch.no_grad():
            return [aug(b) for b in batches]
    return run


_BT601 = np.array([[0.299, 0.587, 0.114]])


def _opencv_laplacian(precision: str) -> Callable[[np.ndarray], Runner]:
    def build(patches: np.ndarray) -> Runner:
        import cv2

        if precision == "f64":
            # Exactly DESIGN 3's definition: float64 BT.601 gray, Laplacian in CV_64F, variance.
            def one(p: np.ndarray) -> float:
                return float(cv2.Laplacian(cv2.transform(p.astype(np.float64), _BT601), cv2.CV_64F).var())
        else:
            # OpenCV's fastest float path (cvtColor on float32, Laplacian in float32): a stricter speed bar.
            def one(p: np.ndarray) -> float:
                gray = cv2.cvtColor(p.astype(np.float32), cv2.COLOR_RGB2GRAY)
                return float(cv2.Laplacian(gray, cv2.CV_32F).var())
        return lambda: [one(p) for p in patches]
    return build


# ---- case lists ----------------------------------------------------------------------------------------------------

FULL = "rain+rainy+mask"
METRIC = "float64 per patch"


def our_cpu_cases(presets: Sequence[str]) -> list[Case]:
    cases = [Case(f"synthesize[{p}]", OURS, "synthesis", "cpu", _ours_synth(p, "cpu"), preset=p, outputs=FULL,
                  requires=("engine.synth",)) for p in presets]
    cases += [Case(m, OURS, m, "cpu", _ours_metric(m, "cpu"), outputs=METRIC) for m in ("sharpness", "complexity")]
    return cases


def peer_cpu_cases(presets: Sequence[str]) -> list[Case]:
    cases = [Case(f"authors-opencv[{p}]", "authors-opencv", "synthesis", "cpu", _authors_opencv(p), preset=p,
                  outputs=FULL, requires=("cv2", "kernels.authors_generator"),
                  note="per patch, OpenCV filter2D") for p in presets]
    for rain_type in ("default", "torrential"):
        cases.append(Case(f"albumentations-{rain_type}", "albumentations", "synthesis", "cpu",
                          _albumentations(rain_type), outputs="rainy only", requires=("albumentations",),
                          note="RandomRain: no rain layer, no mask"))
    cases.append(Case(f"kornia-b{KORNIA_BATCH}", "kornia", "synthesis", "cpu", _kornia, outputs="rainy only",
                      requires=("kornia", "torch"),
                      note="RandomRain: no rain layer, no mask; float NCHW input made off the clock"))
    cases.append(Case("opencv-laplacian-f64", "opencv", "sharpness", "cpu", _opencv_laplacian("f64"),
                      outputs=METRIC, requires=("cv2",), note="float64 gray, CV_64F Laplacian (same numbers)"))
    cases.append(Case("opencv-laplacian-f32", "opencv", "sharpness", "cpu", _opencv_laplacian("f32"),
                      outputs="float32 per patch", requires=("cv2",),
                      note="float32 cvtColor + CV_32F Laplacian (fastest)"))
    return cases


def gpu_cases(presets: Sequence[str]) -> list[Case]:
    cases = [Case(f"synthesize[{p}]", OURS, "synthesis", "gpu", _ours_synth(p, "gpu"), preset=p, outputs=FULL,
                  requires=("engine.synth", "cupy")) for p in presets]
    cases += [Case(m, OURS, m, "gpu", _ours_metric(m, "gpu"), outputs=METRIC, requires=("cupy",))
              for m in ("sharpness", "complexity")]
    return cases


def gpu_available() -> bool:
    """True when a real CUDA GPU is usable through CuPy (never under numba's CUDA simulator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device, or a broken install: all mean "no GPU" here
        return False


def check_presets(names: Sequence[str]) -> list[str]:
    """Validate preset names; an unknown one raises a ValueError listing the valid presets."""
    from engine.rain import PRESETS

    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"presets: expected at least one preset; valid presets: {', '.join(PRESETS)}")
    bad = [n for n in names if n not in PRESETS]
    if bad:
        raise ValueError(f"unknown rain preset(s) {', '.join(map(repr, bad))}; valid presets: {', '.join(PRESETS)}")
    return names


def tile_patches(patches: np.ndarray, n: int) -> np.ndarray:
    """``n`` patches made by repeating ``patches`` (for large GPU batches built from a few distinct images)."""
    reps = -(-n // len(patches))
    return np.ascontiguousarray(np.concatenate([patches] * reps)[:n])


# ---- a whole run ---------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """One measured (or skipped) case."""

    case: Case
    threads: int | None
    timing: Timing | None = None
    skipped: str = ""

    def as_dict(self) -> dict:
        c, t = self.case, self.timing
        return {
            "case": c.name, "impl": c.impl, "task": c.task, "device": c.device, "preset": c.preset,
            "threads": self.threads, "outputs": c.outputs, "note": c.note,
            "patches": t.patches if t else None, "repeats": t.repeats if t else 0,
            "patches_per_s": t.median if t else None,
            "patches_per_s_min": min(t.rates) if t else None, "patches_per_s_max": max(t.rates) if t else None,
            "warmup_s": t.warmup_s if t else None, "skipped": self.skipped or None,
        }


def run_cases(cases: Sequence[Case], patches: np.ndarray, threads: int | None, seconds: float,
              min_repeats: int = 3, max_repeats: int = 30, interleave: bool | None = None,
              progress: Callable[[str], None] | None = None) -> list[Result]:
    """Measure each case on ``patches`` with ``threads`` threads (None: leave threads alone, e.g. GPU cases).

    Every case is prepared and warmed up off the clock. With ``interleave`` (default: when ``threads`` is given,
    i.e. CPU runs) the cases are then timed in turns, one repeat each per round, until each has ``seconds`` of
    timed work and ``min_repeats`` repeats: load from other processes then falls on ours and the peers alike, so
    the ratios stay fair on a shared machine. Otherwise case after case (GPU runs: one case's device buffers at a
    time). A case whose module is missing or that raises is reported as skipped with the reason."""
    if interleave is None:
        interleave = threads is not None
    n = len(patches)
    results: list[Result | None] = [None] * len(cases)

    def prepare(i: int, case: Case) -> tuple[Runner, Timing] | None:
        missing = case.missing()
        if missing:
            results[i] = Result(case, threads, skipped=f"not installed: {', '.join(missing)}")
            return None
        if progress:
            progress(f"{case.name} ({case.device}, {threads or '-'} threads)")
        try:
            run = case.prepare(patches)
            t0 = time.perf_counter()
            run()  # warm-up: numba compiles, caches fill, allocators settle
            return run, Timing(n, warmup_s=time.perf_counter() - t0)
        except Exception as err:  # one broken peer must not lose the other numbers; the reason is reported
            results[i] = Result(case, threads, skipped=f"failed: {type(err).__name__}: {err}")
            return None

    ctx = thread_limit(threads) if threads is not None else contextlib.nullcontext()
    with ctx:
        if not interleave:
            for i, case in enumerate(cases):
                prepared = prepare(i, case)
                if prepared is None:
                    continue
                run, warm = prepared
                try:
                    timing = measure(run, n, seconds=seconds, min_repeats=min_repeats, max_repeats=max_repeats,
                                     warmup=0)
                except Exception as err:
                    results[i] = Result(case, threads, skipped=f"failed: {type(err).__name__}: {err}")
                    continue
                timing.warmup_s = warm.warmup_s
                results[i] = Result(case, threads, timing)
        else:
            live: dict[int, tuple[Runner, Timing]] = {}
            for i, case in enumerate(cases):
                prepared = prepare(i, case)
                if prepared is not None:
                    live[i] = prepared
            spent = dict.fromkeys(live, 0.0)
            while live:
                for i in list(live):
                    run, timing = live[i]
                    t = time.perf_counter()
                    try:
                        run()
                    except Exception as err:
                        results[i] = Result(cases[i], threads, skipped=f"failed: {type(err).__name__}: {err}")
                        del live[i]
                        continue
                    dt = time.perf_counter() - t
                    timing.rates.append(n / max(dt, 1e-12))
                    spent[i] += dt
                    if timing.repeats >= max_repeats or (timing.repeats >= min_repeats and spent[i] >= seconds):
                        results[i] = Result(cases[i], threads, timing)
                        del live[i]
    return [r for r in results if r is not None]


def ratios(results: Sequence[Result]) -> list[dict]:
    """Ours against each peer of the same task, device CPU, same thread count: ``ours / peer`` patches/s.
    Synthesis peers that follow a preset (the authors' generator) are compared with the same preset only."""
    done = [r for r in results if r.timing is not None]
    out = []
    for ours in (r for r in done if r.case.impl == OURS and r.case.device == "cpu"):
        for peer in done:
            c = peer.case
            if c.impl == OURS or c.task != ours.case.task or c.device != "cpu" or peer.threads != ours.threads:
                continue
            if c.preset is not None and c.preset != ours.case.preset:
                continue
            out.append({"ours": ours.case.name, "peer": c.name, "threads": ours.threads,
                        "ours_patches_per_s": ours.timing.median, "peer_patches_per_s": peer.timing.median,
                        "ratio": ours.timing.median / peer.timing.median})
    return out


def machine_info() -> dict:
    """Where the numbers came from: CPU, thread pool, library versions, allocator settings, GPU."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(), "numba_threads": all_threads(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "versions": {},
    }
    for mod in ("numpy", "numba", "cv2", "albumentations", "kornia", "torch", "cupy", "scikit-image"):
        info["versions"][mod] = _version(mod)
    info["gpu"] = _gpu_name() if gpu_available() else None
    return info


def _version(mod: str) -> str | None:
    from importlib import metadata

    dist = {"cv2": "opencv-python-headless", "scikit-image": "scikit-image", "cupy": "cupy-cuda12x"}.get(mod, mod)
    if mod in sys.modules and hasattr(sys.modules[mod], "__version__"):
        return str(sys.modules[mod].__version__)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if mod == "cupy":
            for alt in ("cupy-cuda13x", "cupy-cuda11x", "cupy"):
                with contextlib.suppress(metadata.PackageNotFoundError):
                    return metadata.version(alt)
        if mod == "cv2":
            for alt in ("opencv-python", "opencv-contrib-python"):
                with contextlib.suppress(metadata.PackageNotFoundError):
                    return metadata.version(alt)
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _gpu_name() -> str | None:
    with contextlib.suppress(Exception):
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    return None


@dataclass(frozen=True)
class SuiteSettings:
    """Sizes of the pytest-benchmark suites in ``bench/``, read from the environment by ``suite_settings``."""

    patches: int = 2048
    gpu_patches: int = 65536
    rounds: int = 5
    presets: tuple[str, ...] = ("small", "medium", "large")


def suite_settings(environ: dict[str, str] | None = None) -> SuiteSettings:
    """``RAINSWEEP_BENCH_PATCHES``, ``RAINSWEEP_BENCH_GPU_PATCHES``, ``RAINSWEEP_BENCH_ROUNDS`` (positive integers)
    and ``RAINSWEEP_BENCH_PRESETS`` (comma-separated presets); unset ones keep ``SuiteSettings``' defaults."""
    env = os.environ if environ is None else environ
    base = SuiteSettings()
    values: dict[str, Any] = {}
    for field_name, var in (("patches", "RAINSWEEP_BENCH_PATCHES"), ("gpu_patches", "RAINSWEEP_BENCH_GPU_PATCHES"),
                            ("rounds", "RAINSWEEP_BENCH_ROUNDS")):
        text = env.get(var, "").strip()
        if not text:
            continue
        try:
            values[field_name] = int(text)
        except ValueError:
            raise ValueError(f"{var}: expected a positive integer, got {text!r}") from None
        if values[field_name] < 1:
            raise ValueError(f"{var}: expected a positive integer, got {text!r}")
    presets = env.get("RAINSWEEP_BENCH_PRESETS", "").strip()
    if presets:
        values["presets"] = tuple(check_presets(presets.split(",")))
    return SuiteSettings(**{**base.__dict__, **values})
