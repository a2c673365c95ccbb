"""rainsweep kernels: the math on arrays (numba CPU kernels, numba.cuda GPU kernels, numpy references).

numba's on-disk cache (``cache=True``) is invalidated only when the file that defines a kernel changes. Our kernels
close over helpers built in other files (``kernels/rng.py``, shared segment code), so an edit there would leave a
stale compiled kernel behind. Keying the cache directory on a hash of every kernel source makes any edit start a
fresh cache. An explicit ``NUMBA_CACHE_DIR`` from the user wins.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


if not os.environ.get("NUMBA_CACHE_DIR"):
    from numba.core import config as _numba_config

    _cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rainsweep" / "numba"
    _numba_config.CACHE_DIR = str(_cache_root / _source_digest())
