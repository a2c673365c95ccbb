"""Where benchmark numbers come from: the machine, library versions, allocator settings and the GPU.

``gpu_available`` is also what the ``bench/`` suite's ``gpu`` marker consults.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
from typing import Any

from engine.bench.timing import all_threads

#: The environment variables that keep glibc's allocator from returning and re-faulting the peers' large buffers.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "1073741824", "MALLOC_MMAP_THRESHOLD_": "33554432"}


def gpu_available() -> bool:
    """Whether a real CUDA GPU is usable through CuPy.

    Returns
    -------
    bool
        False under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), without CuPy, a driver or a device.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device, or a broken install: all mean "no GPU" here
        return False


def machine_info() -> dict:
    """Describe where the numbers come from.

    Returns
    -------
    dict
        ``platform, python, cpu_count, cpus_usable, cpu_model, numba_threads, malloc_env`` (the ``MALLOC_ENV``
        variables as set), ``versions`` (library -> version or None) and ``gpu`` (device name or None).
    """
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


