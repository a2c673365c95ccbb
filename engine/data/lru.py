"""A small least-recently-used cache with a size limit and an eviction callback (for open descriptors and maps)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Map of at most ``maxsize`` entries; adding one more drops the least recently used.

    Not thread-safe: give each thread its own cache (``PatchStore`` keeps one per thread for descriptors).

    Parameters
    ----------
    maxsize : int
        Largest number of entries kept (>= 1).
    on_evict : callable, optional
        Called with each value the cache drops: on eviction, on ``clear`` and when the cache itself is garbage
        collected (so a cache of file descriptors closes them however it goes away).
    """

    def __init__(self, maxsize: int, on_evict: Callable[[V], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize: expected at least 1 entry, got {maxsize}")
        self.maxsize = int(maxsize)
        self.on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value cached under ``key`` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Cache ``value`` under ``key`` as the most recently used; drop the oldest entry beyond ``maxsize``."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            _, old = self._items.popitem(last=False)
            self._evicted(old)

    def clear(self) -> None:
        """Drop every entry, oldest first."""
        while self._items:
            _, old = self._items.popitem(last=False)
            self._evicted(old)

    def _evicted(self, value: V) -> None:
        if self.on_evict is not None:
            self.on_evict(value)

    def __del__(self) -> None:
        try:
            self.clear()
        except Exception:  # interpreter shutdown: nothing useful to do with an error here
            pass
