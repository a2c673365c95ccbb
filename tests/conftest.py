"""Test set-up. GPU kernels run through numba's CUDA simulator unless RAINSWEEP_REAL_GPU=1: the simulator must be
switched on before numba is first imported, which is why this happens at the top of conftest."""
import os

if os.environ.get("RAINSWEEP_REAL_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# torch's OpenMP threads spin while idle; on a 2-core CI machine running numba and subprocesses beside them that
# makes training steps 10x slower. Passive waiting costs nothing measurable here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# True when a real CUDA device is usable by CuPy (never under the simulator): the same test as bench/conftest.py's.
from engine.bench.machine import gpu_available  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a real CUDA device: without one they are skipped, with the reason shown."""
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU (run with RAINSWEEP_REAL_GPU=1 on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def warning_registries() -> None:
    """Give every project module its ``__warningregistry__`` before a test runs.

    numba's CUDA simulator runs a block's threads concurrently, and each device-function call iterates the globals of
    the function's module. The first warning raised from a module (the simulator's numpy integer scalars warn on the
    wrap-around the hash relies on) adds ``__warningregistry__`` to those globals, which can make a concurrent
    iteration fail with "dictionary changed size during iteration". With the registry present, no key is added.
    """
    for name, module in list(sys.modules.items()):
        if module is not None and name.split(".")[0] in ("kernels", "engine"):
            module.__dict__.setdefault("__warningregistry__", {})

