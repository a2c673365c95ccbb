"""Benchmark cases of ``rainsweep bench`` and of the pytest-benchmark suite ``bench/test_bench_core.py``.

A ``Case`` is one thing to time on a batch of background patches (uint8 NHWC ``[N, 128, 128, 3]``, 0..255):
rainsweep's synthesis per rain preset, its sharpness and complexity metrics, and the peers (the authors' OpenCV
generator, albumentations and kornia ``RandomRain``, OpenCV gray + Laplacian variance). ``Case.prepare(patches)``
does everything that must stay outside the clock (device copies, tensor conversion, building transforms) and returns
a zero-argument runner that processes the whole batch once and returns only when the work is finished (GPU cases
synchronize). ``run_cases`` times the runners with ``engine.bench.timing`` (warm-up off the clock, interleaved
repeats, median patches per second) under one thread limit for ours and the peers alike. GPU cases run on CuPy
arrays already on the device.

For stable OpenCV / kornia numbers run with ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``:
glibc's allocator otherwise returns large buffers to the system after each call and page-faults them back in on
the next, which makes the peers' rates swing by up to 2x from run to run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from engine.bench.timing import Runner, Timing, current_threads, thread_limit, time_interleaved, warm_up

#: Batch size of the kornia peer (it works on batched float NCHW tensors).
KORNIA_BATCH = 64

#: ``Case.impl`` of rainsweep's own cases.
OURS = "rainsweep"


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes
    ----------
    name : str
        Unique id, e.g. ``"synthesize[medium]"``, ``"authors-opencv[medium]"``, ``"sharpness"``.
    impl : str
        ``OURS`` or the peer's name (``"authors-opencv"``, ``"albumentations"``, ``"kornia"``, ``"opencv"``).
    task : str
        ``"synthesis"``, ``"sharpness"`` or ``"complexity"``.
    device : str
        ``"cpu"`` or ``"gpu"``.
    build : callable
        ``build(patches) -> runner``; see the module docstring.
    preset : str or None
        Rain preset for synthesis cases that follow a ``RainSpec`` (None for peers with their own rain).
    outputs : str
        What one call produces per patch, e.g. ``"rain+rainy+mask"`` or ``"rainy only"``.
    requires : tuple of str
        Importable modules the case needs; a missing one makes the case unavailable (skipped).
    note : str
        Caveat shown beside the number.
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
        """Modules in ``requires`` that cannot be imported here.

        Returns
        -------
        list of str
            Empty when the case can run.
        """
        return [m for m in self.requires if not _importable(m)]

    def prepare(self, patches: np.ndarray) -> Runner:
        """Build the runner (preparation happens here, off the clock).

        Parameters
        ----------
        patches : numpy.ndarray
            uint8 NHWC ``[N, H, W, 3]``, 0..255.

        Returns
        -------
        Runner
            Processes all N patches once per call and returns the case's outputs (see ``bench/test_bench_core.py``
            for what each case returns).
        """
        return self.build(patches)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import counts as missing
        return False


# ---- our cases -----------------------------------------------------------------------------------------------------

def _keys(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _on_gpu(patches: np.ndarray, fn: Callable[[Any], Any]) -> Runner:
    """Runner of ``fn`` on a CuPy copy of ``patches`` made here, off the clock; it waits for the device."""
    import cupy

    data = cupy.asarray(patches)
    sync = cupy.cuda.Device().synchronize

    def run() -> Any:
        out = fn(data)
        sync()
        return out
    return run


def _ours_synth(preset: str, device: str) -> Callable[[np.ndarray], Runner]:
    def build(patches: np.ndarray) -> Runner:
        from engine.rain import RainSpec
        from engine.synth import synthesize

        spec = RainSpec.preset(preset)
        keys = _keys(len(patches))
        if device == "cpu":
            return lambda: synthesize(patches, spec, seed=0, keys=keys, backend="cpu")
        return _on_gpu(patches, lambda data: synthesize(data, spec, seed=0, keys=keys, backend="cuda"))
    return build


def _ours_metric(name: str, device: str) -> Callable[[np.ndarray], Runner]:
    def build(patches: np.ndarray) -> Runner:
        from engine import metrics

        fn = getattr(metrics, name)
        if device == "cpu":
            return lambda: fn(patches, backend="cpu")
        return _on_gpu(patches, lambda data: fn(data, backend="cuda"))
    return build


# ---- peers ---------------------------------------------------------------------------------------------------------

def authors_opencv(preset: str) -> Callable[[np.ndarray], Runner]:
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


def albumentations_peer(rain_type: str) -> Callable[[np.ndarray], Runner]:
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
            # The definition of ``engine.metrics.sharpness``: float64 BT.601 gray, Laplacian in CV_64F, variance.
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
    """rainsweep's CPU cases: ``synthesize[preset]`` per preset, then ``sharpness`` and ``complexity``.

    Parameters
    ----------
    presets : sequence of str
        Rain presets (``engine.rain.PRESETS``).

    Returns
    -------
    list of Case
    """
    cases = [Case(f"synthesize[{p}]", OURS, "synthesis", "cpu", _ours_synth(p, "cpu"), preset=p, outputs=FULL,
                  requires=("engine.synth",)) for p in presets]
    cases += [Case(m, OURS, m, "cpu", _ours_metric(m, "cpu"), outputs=METRIC) for m in ("sharpness", "complexity")]
    return cases


def peer_cpu_cases(presets: Sequence[str]) -> list[Case]:
    """The peers' CPU cases: the authors' generator per preset, albumentations, kornia, OpenCV Laplacian variance.

    Parameters
    ----------
    presets : sequence of str
        Rain presets for the authors' generator (the other peers bring their own rain).

    Returns
    -------
    list of Case
        Cases whose library is not installed report it through ``Case.missing``.
    """
    cases = [Case(f"authors-opencv[{p}]", "authors-opencv", "synthesis", "cpu", authors_opencv(p), preset=p,
                  outputs=FULL, requires=("cv2", "kernels.authors_generator"),
                  note="per patch, OpenCV filter2D") for p in presets]
    for rain_type in ("default", "torrential"):
        cases.append(Case(f"albumentations-{rain_type}", "albumentations", "synthesis", "cpu",
                          albumentations_peer(rain_type), outputs="rainy only", requires=("albumentations",),
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
    """rainsweep's GPU cases on CuPy arrays: ``synthesize[preset]`` per preset, ``sharpness``, ``complexity``.

    Parameters
    ----------
    presets : sequence of str
        Rain presets.

    Returns
    -------
    list of Case
    """
    cases = [Case(f"synthesize[{p}]", OURS, "synthesis", "gpu", _ours_synth(p, "gpu"), preset=p, outputs=FULL,
                  requires=("engine.synth", "cupy")) for p in presets]
    cases += [Case(m, OURS, m, "gpu", _ours_metric(m, "gpu"), outputs=METRIC, requires=("cupy",))
              for m in ("sharpness", "complexity")]
    return cases


def check_presets(names: Sequence[str]) -> list[str]:
    """Validate rain preset names.

    Parameters
    ----------
    names : sequence of str
        Preset names; surrounding blanks are stripped and empty names dropped.

    Returns
    -------
    list of str
        The stripped names.

    Raises
    ------
    ValueError
        For no names or an unknown one; the message lists the valid presets.
    """
    from engine.rain import PRESETS

    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"presets: expected at least one preset; valid presets: {', '.join(PRESETS)}")
    bad = [n for n in names if n not in PRESETS]
    if bad:
        raise ValueError(f"unknown rain preset(s) {', '.join(map(repr, bad))}; valid presets: {', '.join(PRESETS)}")
    return names


def tile_patches(patches: np.ndarray, n: int) -> np.ndarray:
    """Repeat ``patches`` to ``n`` patches (large GPU batches built from a few distinct images).

    Parameters
    ----------
    patches : numpy.ndarray
        ``[M, ...]``, M at least 1.
    n : int
        Patches wanted.

    Returns
    -------
    numpy.ndarray
        Contiguous ``[n, ...]``: patch ``i`` is ``patches[i % M]``.
    """
    reps = -(-n // len(patches))
    return np.ascontiguousarray(np.concatenate([patches] * reps)[:n])


# ---- a whole run ---------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """One measured (or skipped) case.

    Attributes
    ----------
    case : Case
        What was timed.
    threads : int or None
        The thread limit it ran under (None: GPU cases, threads left alone).
    timing : Timing or None
        The rates; None when skipped.
    skipped : str
        Why the case did not run (empty when it did).
    """

    case: Case
    threads: int | None
    timing: Timing | None = None
    skipped: str = ""

    def as_dict(self) -> dict:
        """The JSON row of ``rainsweep bench --json`` (rates in patches/s; None where skipped)."""
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
    """Measure each case on ``patches``.

    Every case is prepared and warmed up off the clock. With ``interleave`` the cases are then timed in turns, one
    repeat each per round (``engine.bench.timing.time_interleaved``), until each has ``seconds`` of timed work and
    ``min_repeats`` repeats: load from other processes then falls on ours and the peers alike, so the ratios stay
    fair on a shared machine. Otherwise case after case, each prepared just before it is timed (GPU runs: one
    case's device buffers at a time).

    Parameters
    ----------
    cases : sequence of Case
        What to time.
    patches : numpy.ndarray
        uint8 NHWC ``[N, H, W, 3]``, 0..255; every runner processes all N per call.
    threads : int or None
        Thread limit for numba, OpenCV and torch (``engine.bench.timing.thread_limit``); None leaves the threads
        alone (GPU cases).
    seconds : float
        Minimum timed wall-clock seconds per case.
    min_repeats, max_repeats : int
        Bounds on the timed repeats per case.
    interleave : bool, optional
        Time the cases in turns; default: when ``threads`` is given (CPU runs).
    progress : callable, optional
        Called with a line naming each case before it is prepared.

    Returns
    -------
    list of Result
        One per case, in order. A case whose module is missing or that raises is reported as skipped with the
        reason; the other cases go on.
    """
    if interleave is None:
        interleave = threads is not None
    n = len(patches)
    results: list[Result | None] = [None] * len(cases)

    def prepare(i: int) -> tuple[Runner, Timing] | None:
        case = cases[i]
        missing = case.missing()
        if missing:
            results[i] = Result(case, threads, skipped=f"not installed: {', '.join(missing)}")
            return None
        if progress:
            progress(f"{case.name} ({case.device}, {threads or '-'} threads)")
        try:
            run = case.prepare(patches)
            return run, Timing(n, warmup_s=warm_up(run))
        except Exception as err:  # one broken peer must not lose the other numbers; the reason is reported
            results[i] = Result(case, threads, skipped=_failed(err))
            return None

    def time_group(prepared: dict[int, tuple[Runner, Timing]]) -> None:
        order = list(prepared)
        errors = time_interleaved([prepared[i][0] for i in order], [prepared[i][1] for i in order], seconds,
                                  min_repeats, max_repeats)
        for i, err in zip(order, errors):
            results[i] = Result(cases[i], threads, skipped=_failed(err)) if err else \
                Result(cases[i], threads, prepared[i][1])

    with thread_limit(threads) if threads is not None else contextlib.nullcontext():
        if interleave:
            time_group({i: p for i in range(len(cases)) if (p := prepare(i)) is not None})
        else:
            for i in range(len(cases)):
                prepared = prepare(i)
                if prepared is not None:
                    time_group({i: prepared})
                del prepared
    return [r for r in results if r is not None]


def _failed(err: BaseException) -> str:
    return f"failed: {type(err).__name__}: {err}"


def ratios(results: Sequence[Result]) -> list[dict]:
    """Ours against each peer of the same task, on the CPU, at the same thread count.

    Synthesis peers that follow a preset (the authors' generator) are compared with the same preset only.

    Parameters
    ----------
    results : sequence of Result
        Skipped results are ignored.

    Returns
    -------
    list of dict
        Rows ``{ours, peer, threads, ours_patches_per_s, peer_patches_per_s, ratio}``; ``ratio`` is
        ``ours / peer`` of the median patches/s.
    """
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


@dataclass(frozen=True)
class SuiteSettings:
    """Sizes of the pytest-benchmark suites in ``bench/``, read from the environment by ``suite_settings``.

    Attributes
    ----------
    patches : int
        CPU patches per timed call.
    gpu_patches : int
        GPU patches per timed call.
    rounds : int
        Timed rounds per case.
    presets : tuple of str
        Rain presets of the synthesis cases.
    """

    patches: int = 2048
    gpu_patches: int = 65536
    rounds: int = 5
    presets: tuple[str, ...] = ("small", "medium", "large")


def suite_settings(environ: dict[str, str] | None = None) -> SuiteSettings:
    """Read the suite sizes from the environment.

    Parameters
    ----------
    environ : dict, optional
        Variables to read (default ``os.environ``): ``RAINSWEEP_BENCH_PATCHES``, ``RAINSWEEP_BENCH_GPU_PATCHES``,
        ``RAINSWEEP_BENCH_ROUNDS`` (positive integers) and ``RAINSWEEP_BENCH_PRESETS`` (comma-separated presets).

    Returns
    -------
    SuiteSettings
        Unset variables keep ``SuiteSettings``' defaults.

    Raises
    ------
    ValueError
        For a value that is not a positive integer or an unknown preset, naming the variable.
    """
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
        try:
            values["presets"] = tuple(check_presets(presets.split(",")))
        except ValueError as err:
            raise ValueError(f"RAINSWEEP_BENCH_PRESETS: {err}") from None
    return SuiteSettings(**{**base.__dict__, **values})
