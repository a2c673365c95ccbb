"""engine.data.atomic_dir: a folder appears whole or not at all; a concurrent creator is reported clearly; only dead
builders' temporary folders count as stale."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.data.atomic_dir import build_dir, stale_temps, temp_sibling


def _fill(text: str):
    def build(tmp):
        tmp.mkdir()
        (tmp / "f.txt").write_text(text)
    return build


def test_build_dir_creates_replaces_and_refuses(tmp_path):
    out = tmp_path / "sub" / "d"
    assert build_dir(out, _fill("one")) == out
    assert (out / "f.txt").read_text() == "one"
    with pytest.raises(FileExistsError, match="another writer"):
        build_dir(out, _fill("two"))
    assert (out / "f.txt").read_text() == "one"
    build_dir(out, _fill("three"), replace=True)
    assert (out / "f.txt").read_text() == "three"
    assert sorted(p.name for p in out.parent.iterdir()) == ["d"]  # no temporary folder left


def test_failed_build_leaves_nothing(tmp_path):
    def build(tmp):
        tmp.mkdir()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_dir(tmp_path / "d", build)
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_spare_live_builders(tmp_path):
    out = tmp_path / "s[1].zarr"  # glob metacharacters in the name
    mine = temp_sibling(out)
    assert mine.parent == tmp_path and mine.name.startswith(f".s[1].zarr.tmp-{os.getpid()}-")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    dead = tmp_path / f".s[1].zarr.tmp-{dead_pid}-0123abcd"
    old_style = tmp_path / ".s[1].zarr.tmp-89abcdef"
    other = tmp_path / ".t.zarr.tmp-1-0123abcd"
    for p in (mine, dead, old_style, other):
        p.mkdir()
    assert stale_temps(out) == sorted([dead, old_style])
    assert stale_temps(tmp_path / "missing" / "x") == []
