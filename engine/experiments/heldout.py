"""The held-out evaluation set: background patches the model never trained on, with rain of a held-out family,
fixed by a seed so every run of a sweep is scored on the same images when it can be; or the stored pairs of a paired
test set.

Backgrounds come from ``test_store`` when given (all of it is unseen), else from the training store, preferring
patches cut from source images that no training patch came from; when the training subset touches every source
image, the set falls back to patches that are merely not in the training subset (``HeldOut.policy`` says which).

``build_paired_heldout`` takes every item of a paired store (``engine.data.paired_store``) as it is: its rainy
images, its clean backgrounds and the mask ``rain > threshold`` of its rain layer estimate; nothing is synthesized.
Whole images of several sizes keep their sizes (``HeldOut.sizes`` / ``input_sizes``; scored by
``engine.experiments.scoring`` on each image's own region).
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.rain import RainSpec

#: Default number of held-out patches.
DEFAULT_COUNT = 64

#: Mixed into the seed of the held-out choice, so it never shares a random stream with another use of the same seed.
_CHOICE_STREAM = 0x4E1D


class HeldOutError(ValueError):
    """The held-out set cannot be built from the given stores and training subset."""


@dataclass(frozen=True)
class HeldOut:
    """A fixed evaluation set; every array is a host numpy array.

    Attributes
    ----------
    indices : np.ndarray
        int64 [n], sorted patch indices in the store the backgrounds came from.
    background : np.ndarray
        uint8 NHWC [n, P, P, 3], clean backgrounds on the 0..255 scale.
    rainy : np.ndarray
        uint8 NHWC [n, P, P, 3], the backgrounds with held-out rain on the 0..255 scale (``engine.synth.synthesize``).
    mask : np.ndarray
        bool NHW [n, P, P], the pixels where the rain layer exceeds the spec's threshold (before beta).
    rain : RainSpec or None
        The held-out rain spec used, with ``rain_prob`` 1 (every patch gets rain); None for a paired store's stored
        rain.
    seed : int
        Seed of both the patch choice and the rain (0 for a paired store).
    policy : str
        ``"test-store"``, ``"disjoint-sources"`` or ``"disjoint-patches"``: how the backgrounds were chosen;
        ``"paired"``: every item of a paired store.
    sizes : np.ndarray or None
        int32 [n, 2], (h, w) of each item's scored region at the top left of its arrays, when items differ in size;
        None when every item fills its arrays.
    input_sizes : np.ndarray or None
        int32 [n, 2], (h, w) of the region a network sees (the scored region padded to a multiple of the stride);
        set with ``sizes``.
    paired : dict or None
        ``PairedStore.describe()`` of the paired store the set came from.
    """

    indices: np.ndarray
    background: np.ndarray
    rainy: np.ndarray
    mask: np.ndarray
    rain: RainSpec | None
    seed: int
    policy: str
    sizes: np.ndarray | None = None
    input_sizes: np.ndarray | None = None
    paired: dict | None = None

    def describe(self) -> dict:
        """JSON-ready summary for metrics.json / config.json.

        Returns
        -------
        dict
            ``count``, ``rain`` (name), ``rain_spec`` (``RainSpec.describe``), ``seed``, ``policy`` and
            ``indices_sha256`` (first 16 hex digits of the sha256 of the int64 indices), which identifies the set.
            A paired set has ``rain`` ``"paired:<store folder name>"``, ``rain_spec`` None and ``paired`` (the
            store's description: path, fingerprint, layout, threshold).
        """
        digest = hashlib.sha256(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes()).hexdigest()[:16]
        if self.rain is None:
            name = "paired:" + Path(str((self.paired or {}).get("store", ""))).name
            return {"count": int(len(self.indices)), "rain": name, "rain_spec": None, "seed": int(self.seed),
                    "policy": self.policy, "indices_sha256": digest, "paired": self.paired}
        return {"count": int(len(self.indices)), "rain": self.rain.name, "rain_spec": self.rain.describe(),
                "seed": int(self.seed), "policy": self.policy, "indices_sha256": digest}


def choice_order(n: int, seed: int) -> np.ndarray:
    """The order in which held-out patches are taken from a store of ``n`` patches.

    Parameters
    ----------
    n : int
        Number of patches in the store.
    seed : int
        The held-out seed.

    Returns
    -------
    np.ndarray
        int64 [n], a permutation of ``0 .. n - 1`` fixed by ``seed`` alone.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, _CHOICE_STREAM])).permutation(n)


def choose_indices(sources: np.ndarray, train_indices: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, str]:
    """Pick ``count`` held-out patch indices of a store, avoiding its training patches.

    Prefers patches from source images with no training patch ("disjoint-sources"); falls back to patches not in
    ``train_indices`` ("disjoint-patches"). Patches are taken in ``choice_order(len(sources), seed)``, which does not
    depend on the training subset, so nested training subsets get (nearly) the same held-out set.

    Parameters
    ----------
    sources : np.ndarray
        int [N], the source image of each store patch (``PatchStore.source``; -1, unknown, counts as one source).
    train_indices : np.ndarray
        int [m], store indices of the training patches (0 .. N - 1).
    count : int
        Wanted number of held-out patches (>= 1); fewer come back, with a warning, when fewer are left.
    seed : int
        The held-out seed.

    Returns
    -------
    indices : np.ndarray
        int64 [<= count], sorted store indices of the held-out patches.
    policy : str
        ``"disjoint-sources"`` or ``"disjoint-patches"``.

    Raises
    ------
    HeldOutError
        When ``count`` < 1, a training index lies outside the store, or no patch outside the training subset is left.
    """
    if count < 1:
        raise HeldOutError(f"held-out count: expected >= 1, got {count}")
    sources = np.asarray(sources)
    n = len(sources)
    train = np.zeros(n, dtype=bool)
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if len(train_indices) and (train_indices.min() < 0 or train_indices.max() >= n):
        raise HeldOutError(f"training indices must lie in 0..{n - 1} (the store has {n} patches)")
    train[train_indices] = True
    order = choice_order(n, seed)
    unseen_source = ~np.isin(sources, np.unique(sources[train_indices]))
    by_source = order[unseen_source[order]]
    if len(by_source) >= count:
        return np.sort(by_source[:count]), "disjoint-sources"
    by_patch = order[~train[order]]
    if len(by_patch) == 0:
        raise HeldOutError(f"no patch is left for the held-out set: the training subset uses all {n} patches of the "
                           f"store; pass a separate --test-store or train on fewer patches")
    if len(by_patch) < count:
        warnings.warn(f"held-out set: only {len(by_patch)} patches are outside the training subset "
                      f"(wanted {count})", stacklevel=2)
    # Take the unseen-source patches first, then fill from patches that are merely not in the training subset.
    rest = by_patch[~np.isin(by_patch, by_source)]
    return np.sort(np.concatenate([by_source, rest])[:count]), "disjoint-patches"


def build_heldout(store: Any, train_indices: np.ndarray, rain: RainSpec, count: int = DEFAULT_COUNT, seed: int = 0,
                  test_store: Any = None) -> HeldOut:
    """Choose the held-out backgrounds, read them and put held-out rain on every one.

    Parameters
    ----------
    store : PatchStore
        The training store (``engine.data.store.open_store``; uint8 NHWC patches [N, P, P, 3]).
    train_indices : np.ndarray
        int [m], store indices of the training patches (and of any others to keep out of the set).
    rain : RainSpec
        Held-out rain (e.g. ``RainSpec.preset("heldout-layered")``); it is applied with probability 1.
    count : int
        Number of held-out patches (fewer when the store has fewer left).
    seed : int
        Fixes both the choice of patches and their rain (rain key of a patch: its store index).
    test_store : PatchStore, optional
        A separate store for the backgrounds (same patch size ``P``); all its patches count as unseen.

    Returns
    -------
    HeldOut

    Raises
    ------
    HeldOutError
        When the test store's patch size differs from the training store's, or (see ``choose_indices``) when the
        training store has no patch left outside ``train_indices``.
    """
    from engine.synth import synthesize  # deferred: synthesis pulls in the kernels

    if test_store is not None:
        if test_store.patch_size != store.patch_size:
            raise HeldOutError(f"--test-store patch size {test_store.patch_size} differs from the training store's "
                               f"{store.patch_size}")
        src = test_store
        indices, policy = np.sort(choice_order(test_store.count, seed)[:count]), "test-store"
    else:
        src = store
        indices, policy = choose_indices(np.asarray(store.source), train_indices, count, seed)
    background = np.asarray(src.read(indices))
    # Every held-out patch gets rain: a rain-free test image has no mask and no E_R.
    spec = dataclasses.replace(rain, rain_prob=1.0)
    res = synthesize(background, spec, seed=seed, keys=indices.astype(np.int64))
    return HeldOut(indices=indices.astype(np.int64), background=background, rainy=np.asarray(res.rainy),
                   mask=np.asarray(res.mask).astype(bool), rain=spec, seed=seed, policy=policy)


def build_paired_heldout(store: Any, threshold: int | None = None) -> HeldOut:
    """Every item of a paired store as a held-out set: stored rainy images, clean backgrounds, the estimated mask.

    Parameters
    ----------
    store : str, os.PathLike or PairedStore
        A paired store (``engine.data.paired_store``, ``rainsweep precompute-pairs``).
    threshold : int, optional
        Mask threshold on the 0..255 scale (default: the store's recorded one, 50 unless chosen otherwise).

    Returns
    -------
    HeldOut
        ``rain`` None, ``policy`` ``"paired"``, ``indices`` 0..N-1; ``sizes`` / ``input_sizes`` set when the items
        do not all fill the canvas (whole images of several sizes, or padded to a multiple of the stride).

    Raises
    ------
    HeldOutError
        ``store`` is not a usable paired store, or ``threshold`` lies outside 0..254.
    """
    from engine.data.paired_store import PairedStore, PairedStoreError, open_paired_store

    try:
        paired = store if isinstance(store, PairedStore) else open_paired_store(store)
    except PairedStoreError as err:
        raise HeldOutError(f"--test-store: {err}") from None
    t = paired.threshold if threshold is None else int(threshold)
    if not 0 <= t <= 254:
        raise HeldOutError(f"threshold: expected 0..254 on the 0..255 scale, got {threshold}")
    items = paired.read()
    H, W = paired.canvas
    fills = bool((items.size == (H, W)).all() and (items.input_size == (H, W)).all())
    return HeldOut(indices=np.arange(paired.count, dtype=np.int64), background=items.clean, rainy=items.rainy,
                   mask=items.rain > t, rain=None, seed=0, policy="paired",
                   sizes=None if fills else items.size, input_sizes=None if fills else items.input_size,
                   paired={**paired.describe(), "threshold": t})


__all__ = ["DEFAULT_COUNT", "HeldOut", "HeldOutError", "build_heldout", "build_paired_heldout", "choice_order",
           "choose_indices"]
