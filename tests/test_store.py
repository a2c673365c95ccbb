"""engine.data.store: format, reads against the in-memory arrays and plain zarr, errors, verify."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.data.store import (ATTR_KEY, SCHEMA_VERSION, PatchStore, StoreError, open_store, summarize, verify,
                          write_store)


def _patches(rng, n=150, p=16):
    return rng.integers(0, 256, (n, p, p, 3), dtype=np.uint8)


@pytest.fixture
def small(tmp_path, rng):
    x = _patches(rng)
    s = write_store(tmp_path / "s.zarr", x, chunk_patches=32,
                    category=np.array(["a", "b", "c"])[np.arange(len(x)) % 3])
    return s, x


def test_roundtrip_random_repeated_unsorted(small, rng):
    s, x = small
    assert isinstance(s, PatchStore)
    assert (s.count, s.patch_size) == (150, 16)
    for idx in (rng.integers(0, 150, 400), np.array([149, 0, 31, 32, 33, 31, 31]), np.arange(150)[::-1],
                np.array([5])):
        got = s.read(idx)
        assert got.dtype == np.uint8 and got.shape == (len(idx), 16, 16, 3)
        np.testing.assert_array_equal(got, x[idx])
    np.testing.assert_array_equal(s.read_all(), x)
    np.testing.assert_array_equal(s.read_range(30, 70), x[30:70])
    assert s.read(np.zeros(0, np.int64)).shape == (0, 16, 16, 3)


def test_read_into_out_buffer(small):
    s, x = small
    out = np.full((3, 16, 16, 3), 7, np.uint8)
    r = s.read([10, 140, 2], out=out)
    assert r is out
    np.testing.assert_array_equal(out, x[[10, 140, 2]])
    with pytest.raises(ValueError, match="out"):
        s.read([1, 2], out=np.empty((3, 16, 16, 3), np.uint8))


def test_plain_zarr_user_sees_the_same_data(small):
    s, x = small
    g = zarr.open_group(str(s.path), mode="r")
    np.testing.assert_array_equal(g["patches"][:], x)
    assert g["patches"].dtype == np.uint8
    info = dict(g.attrs)[ATTR_KEY]
    assert info["schema"] == SCHEMA_VERSION and info["complete"] is True and info["count"] == 150
    assert info["categories"] == ["a", "b", "c"]
    np.testing.assert_array_equal(g["category"][:], np.arange(150) % 3)
    assert g["source"][:].tolist() == [-1] * 150
    assert g["origin"].shape == (150, 2)


def test_metrics_computed_when_missing_match_opencv(small):
    cv2 = pytest.importorskip("cv2")
    s, x = small
    gray = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    want = np.array([cv2.Laplacian(g, cv2.CV_64F).var() for g in gray])
    np.testing.assert_allclose(s.sharpness, want, rtol=1e-9)
    assert s.complexity.shape == (150,) and np.isfinite(s.complexity).all() and (s.complexity > 0).all()


def test_given_metadata_is_stored(tmp_path, rng):
    x = _patches(rng, 10)
    sh, cx = rng.random(10) * 1000, rng.random(10)
    src, org = np.arange(10) // 4, rng.integers(0, 100, (10, 2))
    s = write_store(tmp_path / "m.zarr", x, sharpness=sh, complexity=cx, source=src, origin=org,
                    category=np.zeros(10, int), categories=["only"], sources_meta=[{"path": "a"}] * 3,
                    params={"why": "test"})
    np.testing.assert_array_equal(s.sharpness, sh)
    np.testing.assert_array_equal(s.complexity, cx)
    np.testing.assert_array_equal(s.source, src)
    np.testing.assert_array_equal(s.origin, org)
    assert s.source.dtype == np.int32 and s.origin.dtype == np.int32 and s.category.dtype == np.int16
    assert s.attrs["params"] == {"why": "test"} and len(s.sources_meta) == 3
    assert verify(s.path) == []


def test_fingerprint_tracks_content(tmp_path, rng):
    x = _patches(rng, 20)
    a = write_store(tmp_path / "a.zarr", x)
    b = write_store(tmp_path / "b.zarr", x)
    y = x.copy()
    y[3, 0, 0, 0] ^= 1
    c = write_store(tmp_path / "c.zarr", y)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert isinstance(a.fingerprint, str) and 8 <= len(a.fingerprint) <= 64


def test_pickle_reopens(small, rng):
    s, x = small
    s.read([1, 2])  # populate descriptor cache first: it must not travel
    t = pickle.loads(pickle.dumps(s))
    idx = rng.integers(0, 150, 50)
    np.testing.assert_array_equal(t.read(idx), x[idx])


def test_fallback_for_compressed_layout(tmp_path, rng):
    """A store whose patches were rewritten with compression (still valid zarr) is read through zarr."""
    x = _patches(rng, 40)
    s = write_store(tmp_path / "z.zarr", x)
    assert s.raw_layout
    g = zarr.open_group(str(s.path), mode="r+")
    del g["patches"]
    g.create_array("patches", data=x, chunks=(8, 16, 16, 3))  # default zstd compression
    t = open_store(s.path)
    assert not t.raw_layout
    idx = np.array([39, 0, 8, 8, 17])
    np.testing.assert_array_equal(t.read(idx), x[idx])


def test_bad_indices(small):
    s, _ = small
    with pytest.raises(IndexError, match="150"):
        s.read([0, 150])
    with pytest.raises(IndexError, match="-1"):
        s.read([-1])
    with pytest.raises(ValueError, match="integer"):
        s.read(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-d"):
        s.read(np.zeros((2, 2), np.int64))


def test_open_errors(tmp_path, small):
    with pytest.raises(StoreError, match="no such"):
        open_store(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a rainsweep store"):
        open_store(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a rainsweep store"):
        open_store(tmp_path / "file.txt")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a rainsweep store"):
        open_store(tmp_path / "plain.zarr")
    assert issubclass(StoreError, ValueError)

    s, _ = small
    g = zarr.open_group(str(s.path), mode="r+")
    info = dict(g.attrs)[ATTR_KEY]
    g.attrs[ATTR_KEY] = {**info, "schema": 99}
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(s.path)
    g.attrs[ATTR_KEY] = {**info, "complete": False}
    with pytest.raises(StoreError, match="incomplete"):
        open_store(s.path)
    assert open_store(s.path, allow_incomplete=True).count == 150


def test_write_store_refuses_existing_and_leaves_nothing_on_failure(tmp_path, rng):
    x = _patches(rng, 5)
    write_store(tmp_path / "s.zarr", x)
    with pytest.raises(FileExistsError):
        write_store(tmp_path / "s.zarr", x)
    with pytest.raises(ValueError, match="sharpness"):
        write_store(tmp_path / "bad.zarr", x, sharpness=np.zeros(4))
    with pytest.raises(ValueError, match="uint8"):
        write_store(tmp_path / "bad.zarr", x.astype(np.float32))
    with pytest.raises(ValueError, match="square"):
        write_store(tmp_path / "bad.zarr", np.zeros((2, 8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="categories"):
        write_store(tmp_path / "bad.zarr", x, category=np.zeros(5, int))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    y = _patches(rng, 5)
    s = write_store(tmp_path / "s.zarr", y, overwrite=True)
    np.testing.assert_array_equal(s.read_all(), y)


def test_empty_store(tmp_path):
    s = write_store(tmp_path / "e.zarr", np.zeros((0, 8, 8, 3), np.uint8))
    assert s.count == 0 and s.read_all().shape == (0, 8, 8, 3)
    assert verify(s.path) == []


def test_all_black_chunk_is_stored_not_missing(tmp_path):
    x = np.zeros((70, 8, 8, 3), np.uint8)
    s = write_store(tmp_path / "k.zarr", x)
    assert (Path(s.path) / "patches" / "c" / "1" / "0" / "0" / "0").is_file()
    assert verify(s.path) == []


def test_verify_detects_damage(small, tmp_path):
    s, x = small
    assert verify(s.path) == []
    chunk = Path(s.path) / "patches" / "c" / "2" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert any("patches_digest" in p for p in verify(s.path))
    chunk.write_bytes(bytes(raw[:1000]))  # truncated
    assert any("chunk 2" in p for p in verify(s.path))
    os.remove(chunk)
    assert any("chunk 2" in p and "missing" in p for p in verify(s.path))
    with pytest.raises(StoreError, match="missing"):
        open_store(s.path).read([70])
    assert verify(tmp_path / "nothing-here") != []


def test_verify_detects_metadata_change(small):
    s, _ = small
    g = zarr.open_group(str(s.path), mode="r+")
    sh = g["sharpness"][:]
    sh[5] += 1
    g["sharpness"][:] = sh
    assert any("meta_sha256" in p for p in verify(s.path))


def test_summary(small):
    s, x = small
    d = summarize(s)
    assert d["count"] == 150 and d["complete"] and d["categories"] == {"a": 50, "b": 50, "c": 50}
    assert d["sharpness"]["q0"] == pytest.approx(s.sharpness.min())
    assert d["sharpness"]["q100"] == pytest.approx(s.sharpness.max())
    assert sum(d["sharpness_bands"].values()) <= 150


def test_views_are_the_patches_without_a_copy(small, rng, monkeypatch):
    s, x = small
    idx = np.concatenate([rng.integers(0, 150, 200), [149, 0, 31, 32]])
    views = s.views(idx)
    assert len(views) == len(idx)
    for v, i in zip(views, idx):
        assert v.shape == (16, 16, 3) and v.dtype == np.uint8 and not v.flags.writeable
        np.testing.assert_array_equal(v, x[i])
    # more chunks than the map cache holds: evicted maps stay valid while a view uses them
    import engine.data.store as S

    monkeypatch.setattr(S, "MAP_CACHE_SIZE", 2)
    t = open_store(s.path)
    few = t.views(idx)
    again = t.views(np.arange(150))
    np.testing.assert_array_equal(np.stack(again), x)
    np.testing.assert_array_equal(np.stack(few), x[idx])
    np.testing.assert_array_equal(np.stack(views), x[idx])
    with pytest.raises(IndexError):
        s.views([150])


def test_no_views_for_compressed_or_incomplete_stores(tmp_path, rng, small):
    x = _patches(rng, 40)
    s = write_store(tmp_path / "z.zarr", x)
    g = zarr.open_group(str(s.path), mode="r+")
    del g["patches"]
    g.create_array("patches", data=x, chunks=(8, 16, 16, 3))  # compressed: no raw chunk files
    assert open_store(s.path).views([0, 1]) is None
    t, _ = small
    t.attrs = {**t.attrs, "complete": False}  # files of an unfinished store may still change
    assert t.views([0]) is None


def test_views_report_a_truncated_chunk(small):
    s, _ = small
    f = Path(s.path) / "patches" / "c" / "4" / "0" / "0" / "0"  # the last chunk: patches 128..149
    os.truncate(f, 16 * 16 * 3 * 5)
    t = open_store(s.path)
    assert len(t.views([130])) == 1
    with pytest.raises(StoreError, match="chunk 4 is truncated"):
        t.views([140])


# ---- complexity profile ------------------------------------------------------------------------------------------

def test_complexity_profile_computed_and_given(small, tmp_path, rng):
    from engine import metrics
    from engine.data.store import profile_levels
    from kernels.complexity import num_levels

    s, x = small
    assert s.complexity_profile.shape == (150, 4) and s.complexity_profile.dtype == np.float64
    np.testing.assert_array_equal(s.complexity_profile, metrics.complexity_profile(x, backend="cpu"))
    np.testing.assert_array_equal(metrics.complexity_from_profile(s.complexity_profile), s.complexity)
    assert [profile_levels(p) for p in range(1, 300)] == [num_levels(p, p) for p in range(1, 300)]
    prof = rng.random((10, 4))
    g = write_store(tmp_path / "g.zarr", x[:10], complexity_profile=prof)
    np.testing.assert_array_equal(g.complexity_profile, prof)
    assert verify(g.path) == []
    with pytest.raises(ValueError, match="complexity_profile: expected shape"):
        write_store(tmp_path / "bad.zarr", x[:10], complexity_profile=rng.random((10, 3)))


def test_store_without_profile_still_opens(small):
    from engine.data.store import META_ARRAYS, meta_digest

    s, x = small
    group = zarr.open_group(str(s.path), mode="a")
    del group["complexity_profile"]
    info = dict(group.attrs[ATTR_KEY])
    info["meta_sha256"] = meta_digest({k: np.asarray(group[k][:]) for k in META_ARRAYS})
    group.attrs[ATTR_KEY] = info
    old = open_store(s.path)
    np.testing.assert_array_equal(old.read_all(), x)
    assert old.complexity.shape == (150,)
    assert verify(old.path) == []
    with pytest.raises(StoreError, match=r"s\.zarr.*complexity_profile.*rebuild it with precompute"):
        old.complexity_profile


def test_verify_detects_profile_change(small):
    s, _ = small
    group = zarr.open_group(str(s.path), mode="a")
    group["complexity_profile"][3, 1] = 0.5
    assert any("meta_sha256" in p for p in verify(s.path))
