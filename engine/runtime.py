"""Process set-up for the kernels: numba's on-disk cache location and the OpenMP waiting policy.

It must run before any kernels module is imported: numba reads its cache directory when a ``cache=True`` kernel is
defined, i.e. when its module is imported, and an OpenMP runtime reads ``OMP_WAIT_POLICY`` when it starts (numba's
at its first parallel launch or ``numba.set_num_threads``, torch's at ``import torch``). ``engine/__init__.py``
calls ``configure_process``, so importing any ``engine`` module first is enough.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

_configured = False


def kernel_source_digest() -> str:
    """16 hex digits of sha256 over every ``.py`` file below the ``kernels`` package (paths and contents)."""
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        raise RuntimeError("kernels: the package is not importable (is the repository root on sys.path?)")
    root = Path(spec.origin).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def configure_process() -> None:
    """Set the process up for the kernels; values the user set in the environment win. Idempotent.

    - ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads otherwise spin while idle between parallel regions, and the
      loader runs numba's parallel regions back to back with DALI's and torch's threads beside them; on a small
      machine a spinning thread takes the core its partner needs.
    - numba's cache directory: ``$XDG_CACHE_HOME/rainsweep/numba/<kernel_source_digest()>`` (``~/.cache`` without
      ``XDG_CACHE_HOME``), unless ``NUMBA_CACHE_DIR`` is set. numba invalidates a cached kernel only when the file
      that defines it changes, while the kernels are compiled from helpers defined in other files (``kernels.rng``,
      the streak passes, the segment primitives); a directory per source digest makes any edit start a fresh cache.
    """
    global _configured
    if _configured:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not os.environ.get("NUMBA_CACHE_DIR"):
        from numba.core import config

        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rainsweep" / "numba"
        config.CACHE_DIR = str(root / kernel_source_digest())
    _configured = True


def limit_cpu_threads(threads: int) -> None:
    """Give torch and numba ``threads`` CPU threads each (numba at most its pool size); 0 leaves both as they are.

    Both are limited together because the loader's numba rain kernels run between torch's steps: a numba pool wider
    than the cores given to a run takes them from torch.
    """
    if threads < 0:
        raise ValueError(f"threads: expected >= 0, got {threads}")
    if not threads:
        return
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
