"""Core benchmarks as pytest-benchmark tests: the cases of ``rainsweep bench`` (``engine.bench.core``), so the numbers
mean the same in both places. Groups are ``task-device-threads``: ours and the peers of one task sit in one group,
so pytest-benchmark's table compares them directly; ``extra_info['patches_per_s']`` holds the rate.

A benchmark that silently did less work would report a flattering rate, so each test checks what the timed runner
returned against an independent reference on the same patches: synthesis against the plain-numpy reference backend
(and a direct call on the whole batch), sharpness against OpenCV, complexity against its closed form for
power-of-two squares, the authors' generator against a fresh call with the same seed, the rainy-only peers for one
changed image per patch.

Run: ``pytest bench/test_bench_core.py`` (sizes: see bench/conftest.py).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from engine.bench import core as B
from engine.bench.timing import all_threads, thread_limit

SETTINGS = B.suite_settings()
PRESETS, ROUNDS = SETTINGS.presets, SETTINGS.rounds
CPU_CASES = B.our_cpu_cases(PRESETS) + B.peer_cpu_cases(PRESETS)
GPU_CASES = B.gpu_cases(PRESETS)
THREADS = {"1t": lambda: 1, "allt": all_threads}

#: Patches checked against the slow references (the first ones, plus the last one of the batch).
CHECKED = 4


def _skip_missing(case: B.Case) -> None:
    missing = case.missing()
    if missing:
        pytest.skip(f"{case.name}: not installed: {', '.join(missing)}")


def _host(a: Any) -> np.ndarray:
    """A numpy copy of a numpy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _checked(n: int) -> np.ndarray:
    """Indices of the patches compared with the slow references."""
    return np.unique(np.r_[np.arange(min(n, CHECKED)), n - 1])


# ---- references ----------------------------------------------------------------------------------------------------

def _check_synthesis(case: B.Case, out: Any, patches: np.ndarray) -> None:
    from engine.rain import RainSpec
    from engine.synth import synthesize

    spec, n = RainSpec.preset(case.preset), len(patches)
    got = {f: _host(getattr(out, f)) for f in ("rain", "rainy", "mask", "beta")}
    assert got["rainy"].shape == patches.shape and got["rain"].shape == patches.shape[:3]
    idx = _checked(n)
    ref = synthesize(patches[idx], spec, seed=0, keys=idx.astype(np.int64), backend="reference")
    for f, value in got.items():
        np.testing.assert_array_equal(value[idx], getattr(ref, f), err_msg=f"{case.name} {f} vs reference")
    np.testing.assert_array_equal(got["mask"], got["rain"] > spec.threshold)
    if case.device == "cpu":  # the whole batch: the thread limit must not change a single pixel
        direct = synthesize(patches, spec, seed=0, keys=np.arange(n, dtype=np.int64), backend="cpu")
        for f, value in got.items():
            np.testing.assert_array_equal(value, getattr(direct, f), err_msg=f"{case.name} {f} vs direct call")


def _opencv_sharpness(patches: np.ndarray) -> np.ndarray:
    """Var(Laplacian(BT.601 gray)) in float64 per patch, by OpenCV."""
    cv2 = pytest.importorskip("cv2")
    bt601 = np.array([0.299, 0.587, 0.114])
    return np.array([cv2.Laplacian(p.astype(np.float64) @ bt601, cv2.CV_64F).var() for p in patches])


def _check_sharpness(case: B.Case, out: Any, patches: np.ndarray) -> None:
    got = np.asarray(out, dtype=np.float64)
    assert got.shape == (len(patches),)
    idx = np.arange(len(patches)) if case.device == "cpu" else _checked(len(patches))
    # float32 OpenCV rounds its gray and Laplacian: agreement to ~1e-6 relative, checked at 1e-4
    rtol = 1e-4 if case.name.endswith("f32") else 1e-9
    np.testing.assert_allclose(got[idx], _opencv_sharpness(patches[idx]), rtol=rtol, err_msg=case.name)


def _check_complexity(case: B.Case, out: Any, patches: np.ndarray) -> None:
    got = np.asarray(out)
    assert got.shape == (len(patches),) and got.dtype == np.float64
    h, w = patches.shape[1:3]
    assert h == w and h & (h - 1) == 0, "the closed form needs power-of-two squares"
    idx = np.arange(len(patches)) if case.device == "cpu" else _checked(len(patches))
    for start in range(0, len(idx), 256):  # chunks: the float64 copy of 2048 patches would take 800 MB
        part = idx[start:start + 256]
        f = patches[part].astype(np.float64) / 255
        # for 2^k x 2^k patches the multiscale overlaps telescope to half the summed per-channel variance
        expected = f.reshape(len(part), -1, 3).var(axis=1).sum(axis=1) / 2
        np.testing.assert_allclose(got[part], expected, rtol=1e-9, err_msg=case.name)


def _check_authors(case: B.Case, out: Any, patches: np.ndarray) -> None:
    from engine.rain import RainSpec
    from kernels.authors_generator import authors_rain

    spec = RainSpec.preset(case.preset)
    assert len(out) == len(patches)
    gen = np.random.default_rng(0)  # the runner's seed: its first draws are these
    for i in range(min(len(patches), CHECKED)):
        for got, want in zip(out[i], authors_rain(patches[i], spec, gen)):
            np.testing.assert_array_equal(got, want)
    for (rain, rainy, mask), patch in zip(out, patches):
        assert rainy.shape == patch.shape and rain.shape == patch.shape[:2]
        np.testing.assert_array_equal(mask, rain > spec.threshold)


def _check_rainy_only(case: B.Case, out: Any, patches: np.ndarray) -> None:
    if case.impl == "kornia":
        images = np.concatenate([b.numpy() for b in out])  # float NCHW 0..1
        inputs = patches.transpose(0, 3, 1, 2).astype(np.float32) / 255
        assert len(out) == -(-len(patches) // B.KORNIA_BATCH)
    else:
        images, inputs = np.stack(out), patches
    assert images.shape == inputs.shape and np.isfinite(images).all()
    changed = (images != inputs).reshape(len(images), -1).any(axis=1)
    # rain on every patch; a few tolerated, as a peer's random drops may miss a small patch
    assert changed.mean() >= 0.9, f"{case.name}: only {changed.sum()} of {len(changed)} patches changed"


def _checker(case: B.Case) -> Callable[[B.Case, Any, np.ndarray], None]:
    """The reference check of ``case``'s output."""
    if case.impl == B.OURS and case.task == "synthesis":
        return _check_synthesis
    if case.impl == "authors-opencv":
        return _check_authors
    if case.task == "sharpness":
        return _check_sharpness
    if case.task == "complexity":
        return _check_complexity
    if case.impl in ("albumentations", "kornia"):
        return _check_rainy_only
    raise AssertionError(f"{case.name}: no reference check for this case")


# ---- benchmarks ----------------------------------------------------------------------------------------------------

def _run(benchmark, case: B.Case, patches: np.ndarray, threads: int | None) -> None:
    n = len(patches)
    benchmark.group = f"{case.task}-{case.device}-{'gpu' if threads is None else f'{threads}t'}"
    benchmark.extra_info.update(case=case.name, impl=case.impl, preset=case.preset, outputs=case.outputs,
                                note=case.note, patches=n, threads=threads)
    out = benchmark.pedantic(case.prepare(patches), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _checker(case)(case, out, patches)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["patches_per_s"] = n / benchmark.stats.stats.median


@pytest.mark.parametrize("threads", list(THREADS))
@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_cpu(benchmark, case: B.Case, threads: str, patches: np.ndarray) -> None:
    _skip_missing(case)
    n = THREADS[threads]()
    with thread_limit(n):
        _run(benchmark, case, patches, n)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_gpu(benchmark, case: B.Case, gpu_patches: np.ndarray) -> None:
    _skip_missing(case)
    _run(benchmark, case, gpu_patches, None)


def test_every_case_has_a_reference() -> None:
    """A case added without a reference check fails here, before any timing."""
    for case in CPU_CASES + GPU_CASES:
        assert callable(_checker(case))
    with pytest.raises(AssertionError, match="no reference check"):
        _checker(B.Case("new-peer", "new-peer", "synthesis", "cpu", build=lambda p: (lambda: None)))
