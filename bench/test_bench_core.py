"""Core benchmarks as pytest-benchmark tests: the cases of ``rainsweep bench`` (engine/benchmarks.py), so the
numbers mean the same in both places. Groups are ``task-device-threads``: ours and the peers of one task sit in
one group, so pytest-benchmark's table compares them directly; ``extra_info['patches_per_s']`` holds the rate.

Run: ``pytest bench/test_bench_core.py`` (sizes: see bench/conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.bench import core as B

SETTINGS = B.suite_settings()
PRESETS, ROUNDS = SETTINGS.presets, SETTINGS.rounds
CPU_CASES = B.our_cpu_cases(PRESETS) + B.peer_cpu_cases(PRESETS)
GPU_CASES = B.gpu_cases(PRESETS)
THREADS = {"1t": lambda: 1, "allt": B.all_threads}


def _skip_missing(case: B.Case) -> None:
    missing = case.missing()
    if missing:
        pytest.skip(f"{case.name}: not installed: {', '.join(missing)}")


def _run(benchmark, case: B.Case, run: B.Runner, n: int, threads: int | None) -> None:
    benchmark.group = f"{case.task}-{case.device}-{'gpu' if threads is None else f'{threads}t'}"
    benchmark.extra_info.update(case=case.name, impl=case.impl, preset=case.preset, outputs=case.outputs,
                                note=case.note, patches=n, threads=threads)
    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    # A benchmark that silently did nothing would report a flattering rate: check one result per patch came back.
    assert out is not None
    if isinstance(out, list):
        assert len(out) in (n, -(-n // B.KORNIA_BATCH))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["patches_per_s"] = n / benchmark.stats.stats.median


@pytest.mark.parametrize("threads", list(THREADS))
@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_cpu(benchmark, case: B.Case, threads: str, patches: np.ndarray) -> None:
    _skip_missing(case)
    n = THREADS[threads]()
    with B.thread_limit(n):
        _run(benchmark, case, case.prepare(patches), len(patches), n)


@pytest.mark.skipif(not B.gpu_available(), reason="needs a real CUDA GPU usable through CuPy")
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_gpu(benchmark, case: B.Case, gpu_patches: np.ndarray) -> None:
    _skip_missing(case)
    _run(benchmark, case, case.prepare(gpu_patches), len(gpu_patches), None)
