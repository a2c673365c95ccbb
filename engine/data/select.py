"""Subsets of a patch store chosen by sharpness band, complexity range and category, saved as JSON.

Selection is deterministic and nested: every store index ``i`` gets the 64-bit priority
``bits(patch_state(seed, i), counter(SELECT_STREAM, 0))`` (kernels.rng, the same on every machine and numpy
version), and a query keeps the ``count`` matching patches of lowest priority. So for one seed and query the
64-patch subset is contained in the 128-patch subset, and so on: background-count sweeps (8, 16, ..., 1024) grow
by adding patches, never by reshuffling. ``Subset.indices`` are store indices, int64, unique, sorted ascending
(store order; the loader shuffles per epoch).

Sharpness bands on the 0..255-scale Laplacian variance, as in Hu et al., "Revisiting the Generalization Problem of
Low-level Vision Models Through the Lens of Image Deraining" (journal extension of Gu et al., "Networks are Slacking
Off: Understanding Generalization Problem in Image Deraining", NeurIPS 2023): low < 50, medium 500..1000
(inclusive), high > 5000. A range ``LO:HI`` means LO <= value < HI; either side may be empty (``:50``, ``5000:``).

Complexity by a band of scales: with ``complexity_levels = (start, steps)`` the complexity range applies to the sum
of the stored per-level terms ``start <= k < start + steps`` (the store's ``complexity_profile``,
``engine.metrics.complexity_from_profile``) instead of the full-range complexity.

Subset file (JSON): ``{"format": "rainsweep-subset", "version": 1, "store_path", "store_fingerprint",
"store_count", "seed", "query", "matched", "count", "indices"}``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.atomic import atomic_write_json
from kernels.rng import bits_np, counter_np, patch_state_np

SUBSET_FORMAT = "rainsweep-subset"
SUBSET_VERSION = 1
#: kernels.rng stream of the selection priority; far above the rain streams (0..15) so draws never coincide
SELECT_STREAM = 0x5E1EC7
#: sharpness bands (0..255-scale Laplacian variance, see the module docstring): name -> (lo, hi, lo inclusive,
#: hi inclusive)
BANDS: dict[str, tuple[float, float, bool, bool]] = {
    "low": (-math.inf, 50.0, True, False),
    "medium": (500.0, 1000.0, True, True),
    "high": (5000.0, math.inf, False, False),
}


class SubsetError(ValueError):
    """A query cannot be satisfied, or a subset does not belong to the store it is used with."""


@dataclass
class Subset:
    """A selection of store patches, as ``select`` returns it and ``Subset.save`` writes it.

    Attributes
    ----------
    indices : numpy.ndarray
        int64 [n] store indices, unique, sorted ascending.
    query : dict
        The normalized query that produced them: ``sharpness`` / ``complexity`` ({``spec``, ``lo``, ``hi``,
        ``lo_inclusive``, ``hi_inclusive``}, open bounds as None; ``complexity`` also ``levels`` [start, steps]
        when queried by a band of scales), ``category`` (list of names), ``count``.
    seed : int
        The selection seed.
    store_path, store_fingerprint : str
        The store the indices refer to; the fingerprint detects a different or rebuilt store.
    matched : int
        How many patches matched the query (-1: unknown).
    store_count : int
        Patches in the store at selection time (-1: unknown).
    extra : dict
        Free-form fields saved with the subset.
    """

    indices: np.ndarray
    query: dict
    seed: int
    store_path: str
    store_fingerprint: str
    matched: int = -1
    store_count: int = -1
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def to_dict(self) -> dict:
        """The subset file's JSON object (format: the module docstring)."""
        return {"format": SUBSET_FORMAT, "version": SUBSET_VERSION, "store_path": self.store_path,
                "store_fingerprint": self.store_fingerprint, "store_count": self.store_count, "seed": self.seed,
                "query": self.query, "matched": self.matched, "count": int(len(self.indices)),
                "indices": [int(i) for i in self.indices], **({"extra": self.extra} if self.extra else {})}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the subset as JSON (``to_dict``, indent 1), atomically (``engine.atomic``); return its path."""
        return atomic_write_json(path, self.to_dict(), indent=1)


def load_subset(path: str | os.PathLike) -> Subset:
    """Read a subset file written by ``Subset.save``.

    Parameters
    ----------
    path : str or os.PathLike
        The JSON file.

    Returns
    -------
    Subset

    Raises
    ------
    SubsetError
        Missing file, not JSON, not a subset file, another format version, or malformed fields.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SubsetError(f"subset {str(path)!r}: no such file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SubsetError(f"subset {str(path)!r}: not a JSON file ({e})") from e
    if not isinstance(d, dict) or d.get("format") != SUBSET_FORMAT:
        raise SubsetError(f"subset {str(path)!r}: not a rainsweep subset file (expected \"format\": "
                          f"\"{SUBSET_FORMAT}\"; write one with `rainsweep select`)")
    if d.get("version") != SUBSET_VERSION:
        raise SubsetError(f"subset {str(path)!r}: version {d.get('version')}, this rainsweep reads version "
                          f"{SUBSET_VERSION}")
    try:
        idx = np.asarray(d["indices"], dtype=np.int64)
        sub = Subset(indices=idx, query=dict(d["query"]), seed=int(d["seed"]), store_path=str(d["store_path"]),
                     store_fingerprint=str(d["store_fingerprint"]), matched=int(d.get("matched", -1)),
                     store_count=int(d.get("store_count", -1)), extra=dict(d.get("extra", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise SubsetError(f"subset {str(path)!r}: malformed ({type(e).__name__}: {e})") from e
    if idx.ndim != 1 or int(d.get("count", len(idx))) != len(idx):
        raise SubsetError(f"subset {str(path)!r}: malformed (count {d.get('count')} != {len(idx)} indices)")
    return sub


def check_subset(store: Any, subset: Subset) -> None:
    """Check that ``subset`` was selected from ``store``: same fingerprint, indices unique and within range.

    Parameters
    ----------
    store : PatchStore or str or os.PathLike
        The store, open or by path.
    subset : Subset

    Raises
    ------
    SubsetError
        The subset belongs to another store (or an older build of it), or its indices are out of range or
        repeated.
    """
    from engine.data.store import open_store

    store = open_store(store)
    if subset.store_fingerprint != store.fingerprint:
        raise SubsetError(f"subset was selected from store {subset.store_path!r} (fingerprint "
                          f"{subset.store_fingerprint}), not from {str(store.path)!r} (fingerprint "
                          f"{store.fingerprint}); select again from this store")
    idx = np.asarray(subset.indices)
    if idx.size and (idx.min() < 0 or idx.max() >= store.count):
        raise SubsetError(f"subset indices span {int(idx.min())}..{int(idx.max())}, outside the store's "
                          f"0..{store.count - 1}")
    if len(np.unique(idx)) != len(idx):
        raise SubsetError("subset indices contain duplicates")


def parse_range(spec: Any, name: str, *, bands: bool = False) -> tuple[float, float, bool, bool] | None:
    """Parse a range query.

    Parameters
    ----------
    spec : str, pair of float or None
        ``"low"`` / ``"medium"`` / ``"high"`` (when ``bands``), ``"LO:HI"`` (either side may be empty) or a
        (lo, hi) pair; None for no constraint.
    name : str
        The query's name, for error messages.
    bands : bool
        Accept the sharpness band names of ``BANDS``.

    Returns
    -------
    tuple or None
        ``(lo, hi, lo_inclusive, hi_inclusive)``; ``LO:HI`` and pairs mean LO <= v < HI. None when ``spec`` is
        None.

    Raises
    ------
    SubsetError
        Not a band name, range or pair, or LO >= HI.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        s = spec.strip().lower()
        if bands and s in BANDS:
            return BANDS[s]
        if ":" not in s:
            allowed = "low, medium, high or LO:HI" if bands else "LO:HI"
            raise SubsetError(f"{name}: expected {allowed} (e.g. 500:1000), got {spec!r}")
        lo_s, hi_s = s.split(":", 1)
        try:
            lo = float(lo_s) if lo_s.strip() else -math.inf
            hi = float(hi_s) if hi_s.strip() else math.inf
        except ValueError as e:
            raise SubsetError(f"{name}: expected numbers in LO:HI, got {spec!r}") from e
    else:
        try:
            lo, hi = (float(v) for v in spec)
        except (TypeError, ValueError) as e:
            raise SubsetError(f"{name}: expected a band name, 'LO:HI' or a (lo, hi) pair, got {spec!r}") from e
    if math.isnan(lo) or math.isnan(hi) or lo >= hi:
        raise SubsetError(f"{name}: expected LO < HI, got {spec!r}")
    return (lo, hi, True, False)


def parse_levels(spec: Any, name: str = "complexity_levels") -> tuple[int, int] | None:
    """Parse a band of complexity levels: ``"K0:K1"`` or a (start, steps) pair of ints, None for no band.

    Only the form is checked here (``start >= 0``, ``steps >= 1``); whether the levels exist depends on the store's
    patch size and is checked against its profile.

    Raises
    ------
    SubsetError
        Not ``K0:K1`` / a pair of non-negative ints with ``steps >= 1``.
    """
    if spec is None:
        return None
    parts = spec.split(":") if isinstance(spec, str) else spec
    try:
        k0, k1 = parts
        if isinstance(spec, str):
            k0, k1 = int(k0), int(k1)
    except (TypeError, ValueError) as e:
        raise SubsetError(f"{name}: expected K0:K1 (start level, number of levels, e.g. 0:4) or a (start, steps) "
                          f"pair, got {spec!r}") from e
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (k0, k1)) or k0 < 0 or k1 < 1:
        raise SubsetError(f"{name}: expected integers start >= 0 and steps >= 1, got {spec!r}")
    return int(k0), int(k1)


def _in_range(v: np.ndarray, r: tuple[float, float, bool, bool]) -> np.ndarray:
    lo, hi, lo_incl, hi_incl = r
    return ((v >= lo) if lo_incl else (v > lo)) & ((v <= hi) if hi_incl else (v < hi))


def priorities(seed: int, indices: np.ndarray) -> np.ndarray:
    """Selection priority of each store index for ``seed``: uint64 [n] (lower is picked first), from
    ``kernels.rng`` stream ``SELECT_STREAM``, the same on every machine."""
    state = patch_state_np(int(seed), np.asarray(indices, dtype=np.int64))
    return bits_np(state, counter_np(SELECT_STREAM, 0))


def _band_complexity(store: Any, levels: tuple[int, int]) -> np.ndarray:
    """float64 [N]: the store's per-level complexity terms ``levels[0] <= k < levels[0] + levels[1]`` summed."""
    from engine.metrics import complexity_from_profile

    profile = store.complexity_profile
    try:
        return complexity_from_profile(profile, levels)
    except ValueError as e:
        raise SubsetError(f"complexity_levels: {e} (store patch size {store.patch_size})") from e


def select(store: Any, count: int | None, *, sharpness: Any = None, complexity: Any = None,
           complexity_levels: Any = None, category: str | Sequence[str] | None = None, seed: int = 0) -> Subset:
    """Choose ``count`` patches of ``store`` that match every given criterion, deterministically and nested.

    Among the matching patches, the ``count`` of lowest ``priorities(seed, index)`` are kept, so for one seed and
    query a smaller subset is contained in a larger one.

    Parameters
    ----------
    store : PatchStore or str or os.PathLike
        The store, open or by path.
    count : int or None
        Patches to choose (>= 1); None for every match.
    sharpness : str or pair of float, optional
        ``"low"`` | ``"medium"`` | ``"high"`` | ``"LO:HI"`` | (lo, hi), on the 0..255-scale Laplacian variance.
    complexity : str or pair of float, optional
        ``"LO:HI"`` | (lo, hi), on the 0..1-scale structural complexity.
    complexity_levels : str or pair of int, optional
        ``"K0:K1"`` | (start, steps): apply ``complexity`` to the sum of the per-level terms ``start <= k < start +
        steps`` of the store's ``complexity_profile`` (as ``engine.metrics.complexity(x, levels=(start, steps))``).
        Needs ``complexity``, and a store with the profile.
    category : str or sequence of str, optional
        A category name or several (a patch in any of them matches).
    seed : int
        Selection seed (64-bit signed).

    Returns
    -------
    Subset
        ``indices``: int64 store indices, unique, sorted ascending.

    Raises
    ------
    SubsetError
        A malformed query, an unknown category, levels the store's patch size lacks, or fewer matching patches
        than ``count`` (the message says how many match).
    StoreError
        ``complexity_levels`` on a store written without the profile.
    """
    from engine.data.store import open_store

    store = open_store(store)
    if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1):
        raise SubsetError(f"count: expected a positive number of patches (or None for all), got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**63:
        raise SubsetError(f"seed: expected a 64-bit integer, got {seed!r}")
    s_range = parse_range(sharpness, "sharpness", bands=True)
    c_range = parse_range(complexity, "complexity")
    levels = parse_levels(complexity_levels)
    if levels is not None and c_range is None:
        raise SubsetError("complexity_levels: needs a complexity range (LO:HI) to apply to")
    keep = np.ones(store.count, dtype=bool)
    query: dict[str, Any] = {}
    if s_range is not None:
        keep &= _in_range(store.sharpness, s_range)
        query["sharpness"] = {"spec": sharpness if isinstance(sharpness, str) else list(sharpness),
                              "lo": s_range[0], "hi": s_range[1], "lo_inclusive": s_range[2],
                              "hi_inclusive": s_range[3]}
    if c_range is not None:
        keep &= _in_range(store.complexity if levels is None else _band_complexity(store, levels), c_range)
        query["complexity"] = {"spec": complexity if isinstance(complexity, str) else list(complexity),
                               "lo": c_range[0], "hi": c_range[1], "lo_inclusive": c_range[2],
                               "hi_inclusive": c_range[3]}
        if levels is not None:
            query["complexity"]["levels"] = list(levels)
    if category is not None:
        names = [category] if isinstance(category, str) else list(category)
        unknown = [c for c in names if c not in store.categories]
        if unknown:
            raise SubsetError(f"category: {unknown} not in this store's categories {store.categories}")
        codes = [store.categories.index(c) for c in names]
        keep &= np.isin(store.category, codes)
        query["category"] = names
    # JSON cannot hold infinities portably: write open bounds as null
    for q in query.values():
        if isinstance(q, dict):
            q["lo"] = None if math.isinf(q["lo"]) else q["lo"]
            q["hi"] = None if math.isinf(q["hi"]) else q["hi"]
    matches = np.flatnonzero(keep).astype(np.int64)
    if count is not None and len(matches) < count:
        desc = ", ".join(f"{k}={v['spec'] if isinstance(v, dict) else v}" for k, v in query.items()) or "no filter"
        raise SubsetError(f"asked for {count} patches but only {len(matches)} of the store's {store.count} "
                          f"match ({desc})")
    if count is None or count == len(matches):
        chosen = matches
    else:
        # lowest priority first; ties (astronomically rare) broken by store index to stay deterministic
        pri = priorities(seed, matches)
        order = np.lexsort((matches, pri))
        chosen = np.sort(matches[order[:count]])
    query["count"] = None if count is None else int(count)
    return Subset(indices=chosen, query=query, seed=int(seed), store_path=str(store.path),
                  store_fingerprint=store.fingerprint, matched=int(len(matches)), store_count=store.count)
