"""engine.data.sources: discovery order, decoding and conversions against hand-computed values, skips, patch grid,
built-in sources."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import sources as src
from engine.data.builtin import PROC_LEVELS, SKIMAGE_NAMES, procedural_image
from engine.data.sources import SourceError, cut_patches, decode_file, decode_item, discover, patch_count


def png16_rgb(path: Path, a: np.ndarray) -> None:
    """Write a 16-bit RGB PNG by hand (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    h, w, _ = a.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def rgb(rng):
    return rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)


def test_rgb_formats_lossless(tmp_path, rgb):
    for ext in ("png", "tif", "bmp"):
        p = tmp_path / f"a.{ext}"
        Image.fromarray(rgb).save(p)
        d = decode_file(str(p))
        assert d.skip is None and d.conversions == []
        np.testing.assert_array_equal(d.rgb, rgb)
        assert d.size == p.stat().st_size and len(d.sha256) == 64
    p = tmp_path / "a.webp"
    Image.fromarray(rgb).save(p, lossless=True)
    np.testing.assert_array_equal(decode_file(str(p)).rgb, rgb)


def test_jpeg_decodes_close(tmp_path, rgb):
    smooth = np.repeat(np.repeat(rgb[::8, ::8], 8, 0), 8, 1)[:40, :48]
    p = tmp_path / "a.jpg"
    Image.fromarray(smooth).save(p, quality=98)
    d = decode_file(str(p))
    assert d.rgb.shape == (40, 48, 3) and d.rgb.dtype == np.uint8
    assert np.abs(d.rgb.astype(int) - smooth).mean() < 8


def test_gray_palette_alpha_16bit(tmp_path, rng):
    g = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    d = decode_file(str(tmp_path / "g.png"))
    assert d.conversions == ["gray"]
    np.testing.assert_array_equal(d.rgb, np.stack([g, g, g], -1))

    pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(pal.ravel().tolist())
    im.save(tmp_path / "p.png")
    d = decode_file(str(tmp_path / "p.png"))
    assert d.conversions == ["palette"]
    np.testing.assert_array_equal(d.rgb, pal[idx])

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 128)   # round(200*128/255) = 100, 50.2 -> 50, 25.1 -> 25
    rgba[0, 1] = (255, 255, 255, 255)
    rgba[1, 0] = (90, 90, 90, 0)
    rgba[1, 1] = (10, 20, 30, 254)     # 9.96 -> 10, 19.92 -> 20, 29.88 -> 30
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    d = decode_file(str(tmp_path / "a.png"))
    assert d.conversions == ["alpha"]
    assert d.rgb.tolist() == [[[100, 50, 25], [255, 255, 255]], [[0, 0, 0], [10, 20, 30]]]

    v16 = np.array([[0, 1, 128, 129], [257, 32768, 65279, 65535]], np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    d = decode_file(str(tmp_path / "g16.png"))
    assert sorted(d.conversions) == ["16-bit", "gray"]
    want = np.floor(v16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # [[0,0,0,1],[1,128,254,255]]
    np.testing.assert_array_equal(d.rgb[..., 0], want)
    assert want.tolist() == [[0, 0, 0, 1], [1, 128, 254, 255]]

    c16 = rng.integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    png16_rgb(tmp_path / "c16.png", c16)
    d = decode_file(str(tmp_path / "c16.png"))
    assert d.conversions == ["16-bit"]
    np.testing.assert_array_equal(d.rgb, (c16 >> 8).astype(np.uint8))  # Pillow keeps the high byte


def test_exif_orientation_applied(tmp_path, rgb):
    ex = Image.Exif()
    ex[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=ex.tobytes())
    d = decode_file(str(tmp_path / "o.png"))
    np.testing.assert_array_equal(d.rgb, np.rot90(rgb, -1))


def test_skips(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    assert decode_file(str(tmp_path / "trunc.png")).skip == src.SKIP_CORRUPT
    Image.fromarray(np.tile(rgb, (4, 4, 1))).save(tmp_path / "big.jpg", quality=90)
    jd = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jd[: len(jd) // 2])
    assert decode_file(str(tmp_path / "trunc.jpg")).skip == src.SKIP_CORRUPT
    (tmp_path / "fake.png").write_bytes(b"this is not an image at all" * 10)
    assert decode_file(str(tmp_path / "fake.png")).skip == src.SKIP_NOT_IMAGE
    Image.fromarray(rgb).save(tmp_path / "x.gif")
    assert decode_file(str(tmp_path / "x.gif")).skip == src.SKIP_FORMAT


def test_discover_folder_glob_order_and_categories(tmp_path, rgb):
    root = tmp_path / "forest"
    (root / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("z.png", "a.png", "b/m.png", ".hidden/h.png", ".dot.png"):
        Image.fromarray(rgb).save(root / name)
    (root / "notes.txt").write_text("labels")
    items = discover([str(root)])
    assert [Path(i.path).relative_to(root).as_posix() for i in items] == ["a.png", "b/m.png", "notes.txt", "z.png"]
    assert [i.skip for i in items] == [None, None, src.SKIP_NOT_IMAGE, None]
    assert {i.category for i in items} == {"forest"}
    # a file reached twice is kept once; globs sort; explicit category wins
    items = discover([str(root / "z.png"), str(root / "*.png")], category="trees")
    assert [Path(i.path).name for i in items] == ["z.png", "a.png"]
    assert {i.category for i in items} == {"trees"}
    assert discover([str(root / "a.png")])[0].category == "forest"


def test_discover_errors(tmp_path):
    with pytest.raises(SourceError, match="no such"):
        discover([str(tmp_path / "missing.png")])
    with pytest.raises(SourceError, match="glob matches no files"):
        discover([str(tmp_path / "*.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no files"):
        discover([str(tmp_path / "empty")])
    with pytest.raises(SourceError, match="unknown builtin"):
        discover(["builtin:nothing"])
    with pytest.raises(SourceError, match="no picture"):
        discover(["builtin:skimage/not_a_picture"])
    with pytest.raises(SourceError, match="images"):
        discover(["builtin:procedural?images=0"])
    with pytest.raises(SourceError, match="unknown options"):
        discover(["builtin:procedural?colour=red"])
    with pytest.raises(SourceError, match="at least one"):
        discover([])


def test_builtin_skimage_matches_skimage():
    import skimage.data

    items = discover(["builtin:skimage"])
    assert [i.arg[0] for i in items] == sorted(SKIMAGE_NAMES)
    assert all(i.category == "skimage" for i in items)
    d = decode_item(discover(["builtin:skimage/astronaut"])[0])
    np.testing.assert_array_equal(d.rgb, skimage.data.astronaut())
    d = decode_item(discover(["builtin:skimage/camera"])[0])
    assert d.conversions == ["gray"]
    np.testing.assert_array_equal(d.rgb[..., 1], skimage.data.camera())


def test_cut_patches_grid(rng):
    img = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    for patch, stride in ((16, 16), (16, 7), (37, 1), (10, 40)):
        p, o = cut_patches(img, patch, stride)
        want = [(y, x) for y in range(0, 37 - patch + 1, stride) for x in range(0, 50 - patch + 1, stride)]
        assert o.tolist() == [list(t) for t in want]
        assert len(p) == patch_count(37, 50, patch, stride) == len(want)
        for k, (y, x) in enumerate(want):
            np.testing.assert_array_equal(p[k], img[y:y + patch, x:x + patch])
        p2, o2 = cut_patches(img, patch, stride, start=1)
        np.testing.assert_array_equal(p2, p[1:])
    assert patch_count(10, 50, 16, 16) == 0


def test_procedural_deterministic_and_varied():
    a = procedural_image(3, 64, 40.0, 0.5)
    b = procedural_image(3, 64, 40.0, 0.5)
    c = procedural_image(4, 64, 40.0, 0.5)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 10  # not a flat picture
    items = discover(["builtin:procedural?images=10&size=32"])
    assert len(items) == 10 and items[9].arg == (9, 32) + PROC_LEVELS[9 % len(PROC_LEVELS)]
