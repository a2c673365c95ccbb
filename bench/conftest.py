"""pytest-benchmark set-up for ``bench/`` (not collected by the default test run: ``pytest bench/``).

Unlike ``tests/``, nothing here switches on numba's CUDA simulator: tests marked ``gpu`` (the marker registered in
pyproject.toml) run on a real GPU and are skipped without one. Sizes come from the environment
(``engine.bench.core.suite_settings``) so collection-time parametrization can use them:

- ``RAINSWEEP_BENCH_PATCHES`` (default 2048): CPU patches per timed call (128 x 128 x 3 uint8, built-in images).
- ``RAINSWEEP_BENCH_GPU_PATCHES`` (default 65536): GPU patches per timed call (the CPU patches repeated).
- ``RAINSWEEP_BENCH_PRESETS`` (default ``small,medium,large``): rain presets for the synthesis cases.
- ``RAINSWEEP_BENCH_ROUNDS`` (default 5): timed rounds per case (pytest-benchmark reports their statistics).

For stable OpenCV / kornia numbers run with
``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432 pytest bench/``.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.bench.core import suite_settings, tile_patches
from engine.bench.machine import gpu_available


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu``-marked benchmarks when no real CUDA GPU is usable through CuPy, with the reason shown."""
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU usable through CuPy")
    for item in (i for i in items if i.get_closest_marker("gpu") is not None):
        item.add_marker(skip)


@pytest.fixture(scope="session")
def patches() -> np.ndarray:
    """The CPU batch: built-in background patches, uint8 NHWC [patches, 128, 128, 3], 0..255."""
    from engine.data.builtin_images import builtin_patches

    return builtin_patches(suite_settings().patches, 128)


@pytest.fixture(scope="session")
def gpu_patches(patches: np.ndarray) -> np.ndarray:
    """The GPU batch (host copy): the CPU patches repeated to the GPU batch size."""
    return tile_patches(patches, suite_settings().gpu_patches)
