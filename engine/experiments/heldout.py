"""The held-out evaluation set: background patches the model never trained on, with rain of a held-out family,
fixed by a seed so every run of a sweep is scored on the same images when it can be.

Backgrounds come from ``test_store`` when given (all of it is unseen), else from the training store, preferring
patches cut from source images that no training patch came from; when the training subset touches every source
image, the set falls back to patches that are merely not in the training subset (``policy`` says which).
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

from engine.rain import RainSpec

#: Default number of held-out patches.
DEFAULT_COUNT = 64


@dataclass(frozen=True)
class HeldOut:
    """A fixed evaluation set (all host numpy arrays).

    Attributes:
        indices: int64 [n] patch indices in the store the backgrounds came from.
        background: uint8 NHWC [n, P, P, 3], 0..255.
        rainy: NHWC [n, P, P, 3] on 0..255 (dtype as ``engine.synth.synthesize`` returns it).
        mask: bool NHW [n, P, P], rain-layer > threshold (computed before beta).
        rain: the held-out rain spec used.
        seed: rain and choice seed.
        policy: ``"test-store"``, ``"disjoint-sources"`` or ``"disjoint-patches"``.
    """

    indices: np.ndarray
    background: np.ndarray
    rainy: np.ndarray
    mask: np.ndarray
    rain: RainSpec
    seed: int
    policy: str

    def describe(self) -> dict:
        """JSON-ready summary for metrics.json / config.json."""
        digest = hashlib.sha256(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes()).hexdigest()[:16]
        return {"count": int(len(self.indices)), "rain": self.rain.name, "rain_spec": self.rain.describe(),
                "seed": int(self.seed), "policy": self.policy, "indices_sha256": digest}


def choose_indices(sources: np.ndarray, train_indices: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, str]:
    """Pick ``count`` held-out patch indices from a store whose patch ``i`` came from source image ``sources[i]``.

    Prefers patches from source images with no training patch ("disjoint-sources"); falls back to patches not in
    ``train_indices`` ("disjoint-patches"). The order is a permutation fixed by ``seed`` (independent of the
    training subset), so nested training subsets get (nearly) the same held-out set.

    Raises:
        ValueError: when no patch outside the training subset is left.
    """
    if count < 1:
        raise ValueError(f"held-out count: expected >= 1, got {count}")
    sources = np.asarray(sources)
    n = len(sources)
    train = np.zeros(n, dtype=bool)
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if len(train_indices) and (train_indices.min() < 0 or train_indices.max() >= n):
        raise ValueError(f"training indices must lie in 0..{n - 1} (the store has {n} patches)")
    train[train_indices] = True
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x4E1D])).permutation(n)
    unseen_source = ~np.isin(sources, np.unique(sources[train_indices]))
    by_source = order[unseen_source[order]]
    if len(by_source) >= count:
        return np.sort(by_source[:count]), "disjoint-sources"
    by_patch = order[~train[order]]
    if len(by_patch) == 0:
        raise ValueError(f"no patch is left for the held-out set: the training subset uses all {n} patches of the "
                         f"store; pass a separate --test-store or train on fewer patches")
    if len(by_patch) < count:
        warnings.warn(f"held-out set: only {len(by_patch)} patches are outside the training subset "
                      f"(wanted {count})", stacklevel=2)
    # Take the unseen-source patches first, then fill from patches that are merely not in the training subset.
    rest = by_patch[~np.isin(by_patch, by_source)]
    return np.sort(np.concatenate([by_source, rest])[:count]), "disjoint-patches"


def build_heldout(store, train_indices: np.ndarray, rain: RainSpec, count: int = DEFAULT_COUNT, seed: int = 0,
                  test_store=None) -> HeldOut:
    """Build the held-out set.

    Args:
        store: the training ``PatchStore`` (``engine.data.store.open_store``).
        train_indices: indices of the training patches in ``store``.
        rain: held-out rain spec (e.g. ``RainSpec.preset("heldout-layered")``); it is applied with probability 1.
        count: number of held-out patches (fewer when the store has fewer left).
        seed: fixes both the choice of patches and their rain.
        test_store: optional separate store for test backgrounds (must have the training patch size).
    """
    from engine.synth import synthesize  # deferred: synthesis pulls in the kernels

    if test_store is not None:
        if test_store.patch_size != store.patch_size:
            raise ValueError(f"--test-store patch size {test_store.patch_size} differs from the training store's "
                             f"{store.patch_size}")
        src = test_store
        order = np.random.default_rng(np.random.SeedSequence([seed, 0x4E1D])).permutation(test_store.count)
        indices, policy = np.sort(order[:count]), "test-store"
    else:
        src = store
        indices, policy = choose_indices(np.asarray(store.source), train_indices, count, seed)
    background = np.asarray(src.read(indices))
    # Every held-out patch gets rain: a rain-free test image has no mask and no E_R.
    spec = dataclasses.replace(rain, rain_prob=1.0)
    res = synthesize(background, spec, seed=seed, keys=indices.astype(np.int64))
    return HeldOut(indices=indices.astype(np.int64), background=background, rainy=np.asarray(res.rainy),
                   mask=np.asarray(res.mask).astype(bool), rain=spec, seed=seed, policy=policy)
