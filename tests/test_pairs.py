"""Paired stores: pairing by the test sets' naming schemes, the errors, the rain layer estimate against known
synthetic rain, the whole-image and patch layouts, re-runs, and the command line.

Test folders are made here from the built-in procedural pictures with held-out rain synthesized by engine.synth (the
numpy reference backend: no kernel compilation), in the sets' own naming schemes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli import main as cli
from engine.data.builtin_images import builtin_patches
from engine.data.paired_store import (PairedStoreError, open_paired_store, precompute_pairs, rain_estimate,
                                      round_up)
from engine.data.pairs import SCHEME_NAMES, PairingError, pair_folders
from engine.data.sources import cut_patches
from engine.data.store import StoreError, open_store
from engine.experiments.heldout import build_paired_heldout
from engine.synth import synthesize

#: (height, width) of the test pictures: both orientations and one square, none a multiple of 16.
SIZES = [(40, 56), (56, 40), (44, 44), (40, 56)]


def pictures(sizes=SIZES, seed: int = 0) -> list[np.ndarray]:
    """Clean pictures of the given sizes, cut from built-in procedural textures (uint8 HWC)."""
    big = builtin_patches(len(sizes), 64, seed=seed, source="procedural")
    return [np.ascontiguousarray(big[i, :h, :w]) for i, (h, w) in enumerate(sizes)]


def rained(clean: list[np.ndarray], spec: str = "heldout-layered", seed: int = 7):
    """Held-out rain on each picture: (rainy uint8 HWC, rain uint8 HW before beta, beta_q int) per picture."""
    out = []
    for i, b in enumerate(clean):
        r = synthesize(b[None], spec, seed=seed, keys=np.array([i]), backend="reference")
        out.append((np.asarray(r.rainy)[0], np.asarray(r.rain)[0], int(round(float(r.beta[0]) * 1024))))
    return out


def save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


#: layout -> (rainy file, clean file) of picture k (1-based), relative to the test folder.
LAYOUTS = {
    "rain100": lambda k: (f"Rain100L/rain-{k:03d}.png", f"Rain100L/norain-{k:03d}.png"),
    "rain100-two-folders": lambda k: (f"rainy/rain-{k}.png", f"clean/norain-{k}.png"),
    "same-name": lambda k: (f"rain/{k}.png", f"norain/{k}.png"),
    "suffix": lambda k: (f"own/{k}_rain.png", f"own/{k}_clean.jpg" if k == 1 else f"own/{k}_clean.png"),
}


def make_set(root: Path, layout: str, clean: list[np.ndarray], rainy: list[np.ndarray]) -> tuple[Path, Path]:
    """Write the pictures in ``layout``; returns (rainy folder, clean folder)."""
    for k, (b, i) in enumerate(zip(clean, rainy), start=1):
        rf, cf = LAYOUTS[layout](k)
        save(root / rf, i)
        if cf.endswith(".jpg"):  # a clean file in another format: pairing ignores extensions
            Image.fromarray(b).save(root / cf, quality=100)
        else:
            save(root / cf, b)
    rf, cf = LAYOUTS[layout](1)
    return root / Path(rf).parent, root / Path(cf).parent


@pytest.fixture(scope="module")
def synthetic():
    clean = pictures()
    return clean, rained(clean)


@pytest.mark.parametrize("layout, scheme", [("rain100", "rain100"), ("rain100-two-folders", "rain100"),
                                            ("same-name", "same-name"), ("suffix", "suffix")])
def test_each_naming_scheme_pairs_every_file(tmp_path: Path, layout: str, scheme: str, synthetic) -> None:
    clean, rain = synthetic
    rainy_dir, clean_dir = make_set(tmp_path, layout, clean, [r[0] for r in rain])
    pairing = pair_folders(rainy_dir, clean_dir)
    assert pairing.scheme.name == scheme
    assert len(pairing.pairs) == len(clean)
    for k, p in enumerate(pairing.pairs, start=1):
        rf, cf = LAYOUTS[layout](k)
        assert (Path(p.rainy).name, Path(p.clean).name) == (Path(rf).name, Path(cf).name)
    assert pair_folders(rainy_dir, clean_dir, scheme=scheme).pairs == pairing.pairs


def test_keys_sort_by_number_and_variants_share_a_clean_image(tmp_path: Path) -> None:
    img = pictures([(16, 16)])[0]
    for k in (1, 2, 10):
        save(tmp_path / "same" / f"rain-{k}.png", img)
        save(tmp_path / "same" / f"norain-{k}.png", img)
    assert [Path(p.rainy).name for p in pair_folders(tmp_path / "same", tmp_path / "same").pairs] == [
        "rain-1.png", "rain-2.png", "rain-10.png"]
    for key in ("901", "902"):  # Rain1400: 901_1 ... 901_3 all show clean image 901
        save(tmp_path / "clean" / f"{key}.png", img)
        for v in (1, 2, 3):
            save(tmp_path / "rainy" / f"{key}_{v}.png", img)
    pairing = pair_folders(tmp_path / "rainy", tmp_path / "clean")
    assert pairing.scheme.name == "variants"
    assert [(Path(p.rainy).stem, Path(p.clean).stem) for p in pairing.pairs] == [
        ("901_1", "901"), ("901_2", "901"), ("901_3", "901"), ("902_1", "902"), ("902_2", "902"), ("902_3", "902")]


def test_unmatched_files_are_listed_with_their_count(tmp_path: Path) -> None:
    img = pictures([(16, 16)])[0]
    for k in range(1, 11):
        save(tmp_path / "rain" / f"{k}.png", img)
    for k in range(1, 4):
        save(tmp_path / "norain" / f"{k}.png", img)
    save(tmp_path / "norain" / "extra.png", img)
    with pytest.raises(PairingError) as err:
        pair_folders(tmp_path / "rain", tmp_path / "norain")
    msg = str(err.value)
    assert "7 rainy images without a clean partner" in msg and "4.png, 5.png, 6.png, 7.png, 8.png and 2 more" in msg
    assert "1 clean images without a rainy partner" in msg and "extra.png" in msg
    assert "3 pairs found" in msg and "rain100 (rain-KEY / norain-KEY)" in msg  # says what it accepts


def test_files_the_scheme_cannot_read_are_named(tmp_path: Path) -> None:
    img = pictures([(16, 16)])[0]
    for name in ("rain-1.png", "norain-1.png", "rain-2.png", "norain-2.png", "photo.png"):
        save(tmp_path / name, img)
    with pytest.raises(PairingError, match=r"1 files whose names the scheme does not read as rainy or clean .*"
                                           r"photo\.png"):
        pair_folders(tmp_path, tmp_path)
    with pytest.raises(PairingError, match="needs two folders"):
        pair_folders(tmp_path, tmp_path, scheme="same-name")


def test_non_image_files_and_empty_folders_are_errors(tmp_path: Path) -> None:
    img = pictures([(16, 16)])[0]
    save(tmp_path / "rain" / "1.png", img)
    save(tmp_path / "norain" / "1.png", img)
    (tmp_path / "norain" / "readme.txt").write_text("Rain100L test set")
    (tmp_path / "norain" / ".DS_Store").write_text("hidden files are ignored")
    with pytest.raises(PairingError, match=r"1 files that are not images in the clean folder .*readme\.txt"):
        pair_folders(tmp_path / "rain", tmp_path / "norain")
    (tmp_path / "parent" / "rain").mkdir(parents=True)
    with pytest.raises(PairingError, match=r"holds no image files \(sub-folders are not searched; pass one of them: "
                                           r"rain\)"):
        pair_folders(tmp_path / "parent", tmp_path / "norain")
    with pytest.raises(PairingError, match="no such folder"):
        pair_folders(tmp_path / "missing", tmp_path / "norain")


def test_pairs_of_different_sizes_are_named(tmp_path: Path) -> None:
    a, b = pictures([(16, 24), (24, 16)])
    save(tmp_path / "rain" / "1.png", a)
    save(tmp_path / "norain" / "1.png", a)
    save(tmp_path / "rain" / "2.png", a)
    save(tmp_path / "norain" / "2.png", b)
    with pytest.raises(PairingError, match=r"1 of 2 pairs have rainy and clean images of different sizes "
                                           r"\(height x width\): 2\.png 16x24 vs 2\.png 24x16"):
        precompute_pairs(tmp_path / "rain", tmp_path / "norain", tmp_path / "p.zarr", progress=False)
    assert not (tmp_path / "p.zarr").exists()


def test_rain_estimate_is_the_visible_synthetic_rain(tmp_path: Path, synthetic) -> None:
    """On synthetic pairs I_c = min(255, B_c + floor(beta_q R / 1024)), so the estimate is exactly
    min(floor(beta_q R / 1024), 255 - min_c B_c): round(beta R) within 1 wherever a channel stays unclipped."""
    clean, rain = synthetic
    rainy_dir, clean_dir = make_set(tmp_path, "same-name", clean, [r[0] for r in rain])
    precompute_pairs(rainy_dir, clean_dir, tmp_path / "p.zarr", progress=False)
    store = open_paired_store(tmp_path / "p.zarr")
    items = store.read()
    assert store.verify() == []
    for i, (b, (rainy, r, beta_q)) in enumerate(zip(clean, rain)):
        h, w = b.shape[:2]
        assert (items.clean[i, :h, :w] == b).all() and (items.rainy[i, :h, :w] == rainy).all()
        est, r = items.rain[i, :h, :w].astype(np.int64), r.astype(np.int64)
        headroom = 255 - b.min(axis=2).astype(np.int64)
        np.testing.assert_array_equal(est, np.minimum(r * beta_q // 1024, headroom))
        unclipped = r * beta_q / 1024 < headroom
        assert unclipped.mean() > 0.9 and (est > 0).any() and (~unclipped).any()
        assert np.abs(est - np.rint(r * beta_q / 1024))[unclipped].max() <= 1
        # the paired mask marks visible rain: a subset of the synthetic mask R > t (taken before beta)
        mask = est > store.threshold
        assert not (mask & ~(r > 50)).any() and mask.sum() > 0
    np.testing.assert_array_equal(rain_estimate(items.rainy, items.clean), items.rain)


def test_whole_images_are_padded_by_reflection_and_keep_their_sizes(tmp_path: Path, synthetic) -> None:
    clean, rain = synthetic
    rainy_dir, clean_dir = make_set(tmp_path, "rain100", clean, [r[0] for r in rain])
    summary = precompute_pairs(rainy_dir, clean_dir, tmp_path / "p.zarr", multiple=16, progress=False)
    assert (summary.pairs, summary.items, summary.scheme, summary.canvas) == (4, 4, "rain100", (64, 64))
    store = open_paired_store(tmp_path / "p.zarr")
    items = store.read()
    assert items.size.tolist() == [list(s) for s in SIZES]
    assert items.input_size.tolist() == [[round_up(h, 16), round_up(w, 16)] for h, w in SIZES]
    for i, b in enumerate(clean):
        h, w = b.shape[:2]
        hi, wi = items.input_size[i]
        np.testing.assert_array_equal(items.clean[i, :hi, :wi], np.pad(b, ((0, hi - h), (0, wi - w), (0, 0)),
                                                                       mode="reflect"))
        assert not items.clean[i, hi:].any() and not items.clean[i, :, wi:].any()
    held = build_paired_heldout(store)
    assert held.sizes.tolist() == items.size.tolist() and held.rain is None and held.policy == "paired"
    assert held.describe()["rain"] == "paired:p.zarr" and held.describe()["paired"]["threshold"] == 50
    assert (held.mask == (items.rain > 50)).all()
    assert build_paired_heldout(store, threshold=20).mask.sum() > held.mask.sum()

    precompute_pairs(rainy_dir, clean_dir, tmp_path / "c.zarr", fit="crop", multiple=16, progress=False)
    crop = open_paired_store(tmp_path / "c.zarr").read()
    assert crop.size.tolist() == crop.input_size.tolist() == [[32, 48], [48, 32], [32, 32], [32, 48]]
    assert crop.origin.tolist() == [[4, 4], [4, 4], [6, 6], [4, 4]]
    np.testing.assert_array_equal(crop.clean[0, :32, :48], clean[0][4:36, 4:52])
    assert build_paired_heldout(tmp_path / "c.zarr").sizes is not None  # sizes differ: scored per image


def test_patch_mode_cuts_aligned_patches(tmp_path: Path, synthetic) -> None:
    clean, rain = synthetic
    rainy_dir, clean_dir = make_set(tmp_path, "same-name", clean, [r[0] for r in rain])
    summary = precompute_pairs(rainy_dir, clean_dir, tmp_path / "p.zarr", mode="patch", patch=16, stride=12,
                               progress=False)
    items = open_paired_store(tmp_path / "p.zarr").read()
    expected_clean, expected_rainy, origins = [], [], []
    for b, (r, _, _) in zip(clean, rain):
        pc, o = cut_patches(b, 16, 12)
        expected_clean.append(pc)
        expected_rainy.append(cut_patches(r, 16, 12)[0])
        origins.append(o)
    assert summary.items == sum(len(o) for o in origins) == len(items.clean)
    np.testing.assert_array_equal(items.clean, np.concatenate(expected_clean))
    np.testing.assert_array_equal(items.rainy, np.concatenate(expected_rainy))
    np.testing.assert_array_equal(items.origin, np.concatenate(origins))
    assert build_paired_heldout(tmp_path / "p.zarr").sizes is None  # every patch fills its arrays
    with pytest.raises(PairedStoreError, match=r"4 pairs are smaller than --patch 48: 1\.png \(40x56\)"):
        precompute_pairs(rainy_dir, clean_dir, tmp_path / "q.zarr", mode="patch", patch=48, progress=False)


def test_reruns_and_other_stores(tmp_path: Path, synthetic) -> None:
    clean, rain = synthetic
    rainy_dir, clean_dir = make_set(tmp_path, "same-name", clean, [r[0] for r in rain])
    out = tmp_path / "p.zarr"
    precompute_pairs(rainy_dir, clean_dir, out, progress=False)
    fingerprint = open_paired_store(out).fingerprint
    assert precompute_pairs(rainy_dir, clean_dir, out, progress=False).already_complete
    with pytest.raises(PairedStoreError, match="made with other arguments; pass --overwrite"):
        precompute_pairs(rainy_dir, clean_dir, out, threshold=30, progress=False)
    assert open_paired_store(out).fingerprint == fingerprint
    precompute_pairs(rainy_dir, clean_dir, out, threshold=30, overwrite=True, progress=False)
    assert open_paired_store(out).threshold == 30
    assert not list(tmp_path.glob(".p.zarr.tmp-*"))
    with pytest.raises(StoreError, match="a paired test store .* not a patch store"):
        open_store(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PairedStoreError, match="not a rainsweep store"):
        open_paired_store(tmp_path / "file")
    # damage: a changed chunk is found by verify
    chunk = out / "rainy" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert open_paired_store(out).verify() == ["rainy: does not match its recorded digest (altered or damaged "
                                               "chunks)"]


def test_command_line(tmp_path: Path, synthetic) -> None:
    from engine.cli.pairs import precompute_pairs as command

    schemes = next(p for p in command.params if p.name == "scheme").type.choices
    assert tuple(schemes) == SCHEME_NAMES  # the option lists every scheme engine.data.pairs knows
    clean, rain = synthetic
    rainy_dir, clean_dir = make_set(tmp_path, "rain100", clean, [r[0] for r in rain])
    out = tmp_path / "rain100l.zarr"
    res = CliRunner().invoke(cli, ["precompute-pairs", str(rainy_dir), str(clean_dir), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "4 pairs (scheme rain100) -> 4 items of 64 x 64 pixels" in res.output
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["rainsweep"]
    assert attrs["kind"] == "paired" and attrs["schema"] == 1 and attrs["multiple"] == 16 and attrs["fit"] == "pad"
    assert [p["key"] for p in attrs["pairs"]] == ["001", "002", "003", "004"]
    res = CliRunner().invoke(cli, ["precompute-pairs", str(rainy_dir), str(tmp_path), "--out", str(tmp_path / "x"),
                                   "--patch", "16", "--whole"])
    assert res.exit_code == 2 and "either --whole or --patch" in res.output
    (rainy_dir / "rain-005.png").write_bytes((rainy_dir / "rain-001.png").read_bytes())
    res = CliRunner().invoke(cli, ["precompute-pairs", str(rainy_dir), str(clean_dir), "--out", str(tmp_path / "y"),
                                   "--quiet"])
    assert res.exit_code == 1 and "1 rainy images without a clean partner" in res.output and "rain-005.png" in res.output
