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


# numba's OpenMP threads spin while idle between parallel regions, and the loader runs them back to back with DALI's
# threads beside them: on the shared 2-core machine a spinning thread takes the core its partner needs (perf of the
# resident loader: ~13 % of its CPU time spinning in libgomp; rain synthesis of 64-patch batches ~95-115 CPU-us per
# patch with passive waiting vs ~120-140 without). The setting takes effect only for OpenMP runtimes started after
# it (numba's at its first parallel launch or ``numba.set_num_threads``, torch's at ``import torch``), which is why it
# is made when the kernels package is imported; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if not os.environ.get("NUMBA_CACHE_DIR"):
    from numba.core import config as _numba_config

    _cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rainsweep" / "numba"
    _numba_config.CACHE_DIR = str(_cache_root / _source_digest())
