"""engine.data.lru: eviction order, recency on get and put, the eviction callback on evict / clear / collection."""
from __future__ import annotations

import gc

import pytest

from engine.data.lru import LRUCache


def test_least_recently_used_goes_first():
    dropped = []
    c = LRUCache(3, on_evict=dropped.append)
    for k in "abc":
        c.put(k, k.upper())
    assert c.get("a") == "A"  # a is now the most recent: b is the oldest
    c.put("d", "D")
    assert dropped == ["B"] and "b" not in c and len(c) == 3
    c.put("c", "C2")  # re-putting refreshes too: a is the oldest now
    c.put("e", "E")
    assert dropped == ["B", "A"]
    assert [c.get(k) for k in "cde"] == ["C2", "D", "E"] and c.get("zz") is None
    c.clear()
    assert dropped == ["B", "A", "C2", "D", "E"] and len(c) == 0


def test_falsy_values_are_cached():
    c = LRUCache(2)
    c.put(1, 0)  # descriptor 0 is a real descriptor
    assert c.get(1) == 0 and 1 in c


def test_collected_cache_releases_its_values():
    dropped = []
    c = LRUCache(4, on_evict=dropped.append)
    c.put("x", 1)
    c.put("y", 2)
    del c
    gc.collect()
    assert sorted(dropped) == [1, 2]


def test_bad_size():
    with pytest.raises(ValueError, match="maxsize"):
        LRUCache(0)
