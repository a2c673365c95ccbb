"""engine.data.select: queries against a brute-force filter, determinism, nesting, errors, save/load, mismatch checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.data.select import Subset, SubsetError, check_subset, load_subset, select
from engine.data.store import write_store


@pytest.fixture
def store(tmp_path, rng):
    n = 400
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    # sharpness spread over the bands, with exact band edges present
    sh = np.concatenate([rng.uniform(0, 8000, n - 6), [50.0, 500.0, 1000.0, 5000.0, 49.999, 5000.001]])
    cx = rng.uniform(0, 0.3, n)
    cats = np.array(["city", "forest", "sky"])[rng.integers(0, 3, n)]
    return write_store(tmp_path / "s.zarr", x, sharpness=sh, complexity=cx, category=cats,
                       categories=["city", "forest", "sky"])


def brute(store, lo, hi, incl, cx=None, cats=None):
    s = store.sharpness
    keep = (s >= lo) & ((s <= hi) if incl else (s < hi))
    if cx is not None:
        keep &= (store.complexity >= cx[0]) & (store.complexity < cx[1])
    if cats is not None:
        names = np.array(store.categories)[store.category]
        keep &= np.isin(names, cats)
    return set(np.flatnonzero(keep).tolist())


@pytest.mark.parametrize("band,lo,hi,incl", [("low", -np.inf, 50, False), ("medium", 500, 1000, True),
                                             ("high", np.nextafter(5000, np.inf), np.inf, False), ("100:2000", 100, 2000, False),
                                             (":700", -np.inf, 700, False), ("6000:", 6000, np.inf, False)])
def test_bands_match_brute_force(store, band, lo, hi, incl):
    want = brute(store, lo, hi, incl)
    sub = select(store, None, sharpness=band)
    assert set(sub.indices.tolist()) == want
    assert sub.matched == len(want)
    k = min(5, len(want))
    sub = select(store, k, sharpness=band, seed=3)
    assert len(sub) == k and set(sub.indices.tolist()) <= want


def test_band_edges(store):
    low = set(select(store, None, sharpness="low").indices.tolist())
    med = set(select(store, None, sharpness="medium").indices.tolist())
    high = set(select(store, None, sharpness="high").indices.tolist())
    n = store.count
    # appended values: n-6: 50.0, n-5: 500.0, n-4: 1000.0, n-3: 5000.0, n-2: 49.999, n-1: 5000.001
    assert (n - 2) in low and (n - 6) not in low  # 49.999 is low, 50.0 is not
    assert {n - 5, n - 4} <= med     # 500 and 1000 are medium (inclusive)
    assert (n - 3) not in high and (n - 1) in high  # 5000 is not high, 5000.001 is


def test_combined_query(store):
    want = brute(store, 500, 1000, True, cx=(0.05, 0.2), cats=["city", "sky"])
    sub = select(store, None, sharpness="medium", complexity="0.05:0.2", category=["city", "sky"])
    assert set(sub.indices.tolist()) == want
    assert sub.query["category"] == ["city", "sky"]


def test_deterministic_sorted_unique_and_nested(store):
    a = select(store, 50, seed=7)
    b = select(store, 50, seed=7)
    c = select(store, 50, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert a.indices.dtype == np.int64
    assert (np.diff(a.indices) > 0).all()
    small = set(select(store, 8, seed=7).indices.tolist())
    big = set(select(store, 64, seed=7).indices.tolist())
    assert small <= big <= set(range(store.count))


def test_selection_is_roughly_uniform(store):
    """Over many seeds every store index is picked about count/N of the time (no bias toward low indices)."""
    hits = np.zeros(store.count)
    for seed in range(200):
        hits[select(store, 40, seed=seed).indices] += 1
    expected = 200 * 40 / store.count  # 20
    assert abs(hits[: store.count // 2].mean() - expected) < 2
    assert abs(hits[store.count // 2:].mean() - expected) < 2


def test_too_few_matches_says_how_many(store):
    n_med = len(brute(store, 500, 1000, True))
    with pytest.raises(SubsetError, match=f"only {n_med} "):
        select(store, n_med + 1, sharpness="medium")


def test_bad_queries(store):
    for bad in ("mid", "5:1", "a:b", "10"):
        with pytest.raises(SubsetError, match="sharpness"):
            select(store, 1, sharpness=bad)
    with pytest.raises(SubsetError, match="complexity"):
        select(store, 1, complexity="low")
    with pytest.raises(SubsetError, match="categories"):
        select(store, 1, category="ocean")
    with pytest.raises(SubsetError, match="count"):
        select(store, 0)


def test_save_load_roundtrip_and_atomic(store, tmp_path):
    sub = select(store, 30, sharpness="high", seed=1)
    p = sub.save(tmp_path / "sub" / "s.json")
    assert [f.name for f in p.parent.iterdir()] == ["s.json"]
    back = load_subset(p)
    np.testing.assert_array_equal(back.indices, sub.indices)
    assert (back.seed, back.store_fingerprint, back.query) == (1, store.fingerprint, sub.query)
    d = json.loads(p.read_text())
    assert d["count"] == 30 and d["query"]["sharpness"]["spec"] == "high"
    check_subset(store, back)


def test_load_errors(tmp_path):
    with pytest.raises(SubsetError, match="no such"):
        load_subset(tmp_path / "x.json")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(SubsetError, match="JSON"):
        load_subset(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"indices": [1, 2]}')
    with pytest.raises(SubsetError, match="not a rainsweep subset"):
        load_subset(tmp_path / "b.json")


def test_check_subset_mismatch(store, tmp_path, rng):
    sub = select(store, 10, seed=0)
    other = write_store(tmp_path / "o.zarr", rng.integers(0, 256, (400, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(SubsetError, match="fingerprint"):
        check_subset(other, sub)
    bad = Subset(indices=np.array([1, 400]), query={}, seed=0, store_path=str(store.path),
                 store_fingerprint=store.fingerprint)
    with pytest.raises(SubsetError, match="outside"):
        check_subset(store, bad)


def test_cli_select(store, tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    out = tmp_path / "sub.json"
    r = CliRunner().invoke(main, ["select", str(store.path), "--count", "12", "--sharpness", "high",
                                  "--category", "city", "--category", "sky", "--seed", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    sub = load_subset(out)
    want = select(store, 12, sharpness="high", category=["city", "sky"], seed=5)
    np.testing.assert_array_equal(sub.indices, want.indices)
    r = CliRunner().invoke(main, ["select", str(store.path), "--count", "all", "--complexity", "0.1:0.2",
                                  "--out", str(out)])
    assert r.exit_code == 0 and len(load_subset(out)) == sum(
        1 for c in store.complexity if 0.1 <= c < 0.2)
    r = CliRunner().invoke(main, ["select", str(store.path), "--count", "100000", "--out", str(out)])
    assert r.exit_code == 1 and "only 400" in r.output
    r = CliRunner().invoke(main, ["select", str(store.path), "--count", "ten", "--out", str(out)])
    assert r.exit_code == 2 and "--count" in r.output


# ---- complexity by a band of scales (the stored per-level profile) ------------------------------------------------

@pytest.mark.parametrize("levels, spec", [((0, 1), "0.09:0.1"), ((1, 2), "0.02:0.03"), ((0, 3), ":0.125"),
                                          ("2:1", "0.005:")])
def test_complexity_levels_match_a_numpy_filter_of_the_profile(store, levels, spec):
    prof = store.complexity_profile
    assert prof.shape == (store.count, 3)  # 8 x 8 patches: levels 8, 4, 2 -> 3 terms
    k0, k1 = (int(v) for v in levels.split(":")) if isinstance(levels, str) else levels
    lo_s, hi_s = spec.split(":")
    band = prof[:, k0:k0 + k1].sum(axis=1)
    keep = (band >= (float(lo_s) if lo_s else -np.inf)) & (band < (float(hi_s) if hi_s else np.inf))
    want = set(np.flatnonzero(keep).tolist())
    assert 0 < len(want) < store.count  # the query is a real filter
    sub = select(store, None, complexity=spec, complexity_levels=levels)
    assert set(sub.indices.tolist()) == want
    assert sub.query["complexity"]["levels"] == [k0, k1] and sub.query["complexity"]["spec"] == spec


def test_complexity_levels_full_range_is_the_stored_complexity(tmp_path, rng):
    # metrics computed by write_store: the full band of the profile is the complexity, bit for bit
    x = rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8)
    s = write_store(tmp_path / "c.zarr", x)
    full = select(s, None, complexity="0.12:0.128", complexity_levels=(0, 4))
    plain = select(s, None, complexity="0.12:0.128")
    assert 0 < plain.matched < 60
    np.testing.assert_array_equal(full.indices, plain.indices)
    assert "levels" not in plain.query["complexity"]


def test_complexity_levels_errors(store):
    with pytest.raises(SubsetError, match="needs a complexity range"):
        select(store, None, complexity_levels=(0, 1))
    for bad in ["1", "a:b", (0, 0), (-1, 2), (0.5, 1), "0:1:2"]:
        with pytest.raises(SubsetError, match="complexity_levels"):
            select(store, None, complexity="0:1", complexity_levels=bad)
    with pytest.raises(SubsetError, match="only 3 levels"):
        select(store, None, complexity="0:1", complexity_levels=(2, 2))


def test_cli_select_complexity_levels(store, tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    out = tmp_path / "band.json"
    r = CliRunner().invoke(main, ["select", str(store.path), "--count", "all", "--complexity", "0.09:0.1",
                                  "--complexity-levels", "0:1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    sub = load_subset(out)
    band = store.complexity_profile[:, 0]
    np.testing.assert_array_equal(sub.indices, np.flatnonzero((band >= 0.09) & (band < 0.1)))
    assert 0 < len(sub) < store.count
    assert sub.query["complexity"]["levels"] == [0, 1]
    r = CliRunner().invoke(main, ["select", str(store.path), "--count", "all", "--complexity", "0:1",
                                  "--complexity-levels", "0:9", "--out", str(out)])
    assert r.exit_code == 1 and "only 3 levels" in r.output
