"""engine.data.precompute: content against independently cut patches, counts by reason, worker invariance, argument
checks, and resumption after real SIGKILLs at every commit-protocol window."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zarr
from PIL import Image

from engine.data.precompute import PROGRESS_DIR, PrecomputeError, precompute
from engine.data.progress import HOOK_ENV, create_incomplete_store
from engine.data.store import ATTR_KEY, open_store, verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path, rng):
    """Images with known pixels (lossless), plus one of each bad kind. Returns (folder, {name: rgb array})."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    arrays = {}
    for name, shape in (("a.png", (40, 56)), ("sub/b.bmp", (32, 32)), ("c.tif", (64, 33))):
        a = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        Image.fromarray(a).save(d / name)
        arrays[name] = a
    g = rng.integers(0, 256, (33, 47), dtype=np.uint8)
    Image.fromarray(g, "L").save(d / "gray.png")
    arrays["gray.png"] = np.stack([g, g, g], -1)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / "tiny.png")
    (d / "broken.png").write_bytes((d / "a.png").read_bytes()[:200])
    (d / "readme.txt").write_text("not an image")
    return d, arrays


def expected(arrays, order, patch, stride):
    ps, org, src = [], [], []
    for i, name in enumerate(order):
        a = arrays.get(name)
        if a is None:
            continue
        for y in range(0, a.shape[0] - patch + 1, stride):
            for x in range(0, a.shape[1] - patch + 1, stride):
                ps.append(a[y:y + patch, x:x + patch])
                org.append((y, x))
                src.append(i)
    return np.array(ps), np.array(org), np.array(src)


ORDER = ["a.png", "broken.png", "c.tif", "gray.png", "readme.txt", "sub/b.bmp", "tiny.png"]


def test_precompute_content_and_counts(folder, tmp_path):
    d, arrays = folder
    s = precompute([str(d)], tmp_path / "s.zarr", patch=16, stride=16, progress=False, chunk_patches=8)
    assert (s.images, s.images_read) == (7, 4)
    assert s.skipped == {"corrupt or truncated": 1, "non-image file": 1, "smaller than the patch": 1}
    assert s.converted == {"gray": 1}
    store = open_store(tmp_path / "s.zarr")
    want_p, want_o, want_s = expected(arrays, ORDER, 16, 16)
    assert s.patches == store.count == len(want_p)
    np.testing.assert_array_equal(store.read_all(), want_p)
    np.testing.assert_array_equal(store.origin, want_o)
    np.testing.assert_array_equal(store.source, want_s)
    assert [Path(r["path"]).relative_to(d).as_posix() for r in store.sources_meta] == ORDER
    assert store.categories == ["imgs"] and (store.category == 0).all()
    a_meta = store.sources_meta[0]
    assert a_meta["sha256"] and a_meta["size"] == (d / "a.png").stat().st_size
    assert (a_meta["height"], a_meta["width"], a_meta["patches"]) == (40, 56, 6)
    # metrics against an independent Laplacian-variance reference
    g = want_p[..., 0] * 0.299 + want_p[..., 1] * 0.587 + want_p[..., 2] * 0.114
    q = np.pad(g, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = q[:, :-2, 1:-1] + q[:, 2:, 1:-1] + q[:, 1:-1, :-2] + q[:, 1:-1, 2:] - 4 * g
    np.testing.assert_allclose(store.sharpness, lap.reshape(len(g), -1).var(axis=1), rtol=1e-9)
    assert np.isfinite(store.complexity).all()
    assert not (tmp_path / "s.zarr" / PROGRESS_DIR).exists()
    assert verify(tmp_path / "s.zarr") == []
    assert store.attrs["counts"]["skipped"] == s.skipped


def test_overlapping_stride_and_category(folder, tmp_path):
    d, arrays = folder
    precompute([str(d / "a.png")], tmp_path / "o.zarr", patch=16, stride=8, category="city", progress=False)
    store = open_store(tmp_path / "o.zarr")
    want_p, want_o, _ = expected({"a.png": arrays["a.png"]}, ["a.png"], 16, 8)
    np.testing.assert_array_equal(store.read_all(), want_p)
    np.testing.assert_array_equal(store.origin, want_o)
    assert store.categories == ["city"]


def _attrs_without_run(path):
    info = dict(zarr.open_group(str(path), mode="r").attrs)[ATTR_KEY]
    return {k: v for k, v in info.items() if k not in ("run",)}


def assert_same_store(a: Path, b: Path) -> None:
    """Every array equal, every chunk file byte-identical, attributes equal except timing."""
    sa, sb = open_store(a), open_store(b)
    np.testing.assert_array_equal(sa.read_all(), sb.read_all())
    for name in ("sharpness", "complexity", "source", "origin", "category"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name))
    assert _attrs_without_run(a) == _attrs_without_run(b)
    fa = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        if rel != "zarr.json":  # the group's attributes hold the timing fields
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.mark.slow
def test_workers_give_identical_store(folder, tmp_path):
    d, _ = folder
    precompute([str(d)], tmp_path / "w1.zarr", patch=16, stride=8, progress=False, chunk_patches=8, workers=1)
    precompute([str(d)], tmp_path / "w2.zarr", patch=16, stride=8, progress=False, chunk_patches=8, workers=2,
               commit_seconds=0)
    assert_same_store(tmp_path / "w1.zarr", tmp_path / "w2.zarr")


def test_rerun_and_argument_checks(folder, tmp_path):
    d, _ = folder
    out = tmp_path / "s.zarr"
    first = precompute([str(d)], out, patch=16, stride=16, progress=False)
    again = precompute([str(d)], out, patch=16, stride=16, progress=False)
    assert again.already_complete and again.patches == first.patches
    with pytest.raises(PrecomputeError, match="stride"):
        precompute([str(d)], out, patch=16, stride=8, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(PrecomputeError, match="not a rainsweep store"):
        precompute([str(d)], tmp_path / "junk", patch=16, progress=False)
    with pytest.raises(PrecomputeError, match="patch"):
        precompute([str(d)], tmp_path / "p.zarr", patch=0, progress=False)
    with pytest.raises(PrecomputeError, match="workers"):
        precompute([str(d)], tmp_path / "p.zarr", workers=0, progress=False)
    assert not (tmp_path / "p.zarr").exists()
    # an empty existing folder is fine
    (tmp_path / "e.zarr").mkdir()
    precompute([str(d / "a.png")], tmp_path / "e.zarr", patch=16, stride=16, progress=False)
    assert open_store(tmp_path / "e.zarr").count == 6


def test_nothing_left_when_all_images_skipped(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "in" / "t.png")
    s = precompute([str(tmp_path / "in")], tmp_path / "s.zarr", patch=16, progress=False)
    assert s.patches == 0 and s.skipped == {"smaller than the patch": 1}
    store = open_store(tmp_path / "s.zarr")
    assert store.count == 0 and verify(store.path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "s.zarr"]


# ------------------------------------------------------------------------------------------------------------------
# SIGKILL resumption

SOURCES = ["builtin:procedural?images=10&size=64"]
KW = dict(patch=16, stride=16, chunk_patches=16, commit_seconds=0.0)  # 16 patches per image, 160 in all


def _script(out: Path, workers: int = 1) -> list[str]:
    code = (f"from engine.data.precompute import precompute; "
            f"precompute({SOURCES!r}, {str(out)!r}, workers={workers}, progress=False, **{KW!r})")
    return [sys.executable, "-c", code]


def _run_until(out: Path, hook: str, workers: int = 1, timeout: float = 120.0) -> str:
    """Start a precompute subprocess, wait until it reaches ``hook`` ("HOOK x" line) or prints a commit line
    matching ``hook`` ("committed N"), SIGKILL it, and return what it printed."""
    with _paused_at(out, hook, workers, timeout) as seen:
        pass
    return "".join(seen)


@contextlib.contextmanager
def _paused_at(out: Path, hook: str, workers: int = 1, timeout: float = 120.0) -> Iterator[list[str]]:
    """Start a precompute subprocess and yield (the lines it printed) once it reaches ``hook`` (see
    ``_run_until``); SIGKILL it on exit."""
    env = {**os.environ, HOOK_ENV: hook}
    proc = subprocess.Popen(_script(out, workers), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(f"HOOK {hook.split('@')[0]}") or line.strip() == hook:
                break
            if time.monotonic() > deadline:
                break
        else:
            pytest.fail(f"precompute ended before reaching {hook!r}: {''.join(seen)[-2000:]}")
        yield seen
    finally:
        # the whole process group: a SIGKILLed parent must not need its pool workers' cooperation
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    precompute(SOURCES, out, progress=False, **KW)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("hook,resumed", [("after_data@1", [0]), ("after_segment@3", [32]), ("after_commit@2", [32]),
                                         ("committed 96", range(96, 161, 16)), ("before_finalize", [160]),
                                         ("before_attrs", [160]), ("after_attrs", [None])])
def test_sigkill_then_resume_matches_uninterrupted(reference, tmp_path, hook, resumed):
    out = tmp_path / "s.zarr"
    _run_until(out, hook)
    assert out.exists()  # created atomically before the first image
    with pytest.raises(Exception, match="incomplete") if hook != "after_attrs" else _nullctx():
        open_store(out)
    s = precompute(SOURCES, out, progress=False, **KW)
    assert s.patches == 160
    # the kill landed where intended: the re-run picked up exactly the committed work (or only cleaned up)
    assert (s.already_complete if resumed == [None] else s.resumed_from in resumed)
    assert_same_store(reference, out)
    assert not (out / PROGRESS_DIR).exists()
    assert verify(out) == []


@pytest.mark.slow
def test_sigkill_twice_with_workers(reference, tmp_path):
    out = tmp_path / "s.zarr"
    _run_until(out, "after_commit@1", workers=2)
    _run_until(out, "after_segment@2", workers=2)
    s = precompute(SOURCES, out, progress=False, workers=2, **KW)
    assert s.resumed_from > 0
    assert_same_store(reference, out)


@pytest.mark.slow
def test_resume_refuses_changed_arguments_and_sources(tmp_path):
    out = tmp_path / "s.zarr"
    _run_until(out, "after_commit@1")
    with pytest.raises(PrecomputeError, match="other arguments.*stride"):
        precompute(SOURCES, out, progress=False, **{**KW, "stride": 8})
    with pytest.raises(PrecomputeError, match="other arguments.*sources"):
        precompute(["builtin:procedural?images=11&size=64"], out, progress=False, **KW)
    state = json.loads((out / PROGRESS_DIR / "state.json").read_text())
    assert state["committed"] >= 16 and state["committed"] % 16 == 0


def test_second_first_time_run_gets_the_busy_message(tmp_path):
    """Two first-time runs into one new --out: the store another run created while this one built its own
    temporary copy makes this run's rename fail; it stops with the message a busy store gives, and leaves the
    other run's store and nothing of its own."""
    out = tmp_path / "s.zarr"
    params = {"sources": ["x"], "patch": 16, "stride": 16, "category": None, "chunk_patches": 16}
    create_incomplete_store(out, params, [], ["x"])  # the winner
    with pytest.raises(PrecomputeError, match="another precompute is writing it right now"):
        create_incomplete_store(out, params, [], ["x"])
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]
    assert open_store(out, allow_incomplete=True).attrs["params"] == params
    assert json.loads((out / PROGRESS_DIR / "state.json").read_text())["committed"] == 0


@pytest.mark.slow
def test_a_live_runs_temporary_store_is_left_alone(reference, tmp_path):
    """A run that starts while another builds the same new store does not remove the other's temporary folder;
    once that run is dead, the next run does."""
    out = tmp_path / "s.zarr"
    with _paused_at(out, "before_rename"):
        temps = list(tmp_path.glob(".s.zarr.tmp-*"))
        assert len(temps) == 1 and temps[0].is_dir()
        s = precompute(SOURCES, out, progress=False, **KW)
        assert s.patches == 160 and temps[0].is_dir()
    assert precompute(SOURCES, out, progress=False, **KW).already_complete
    assert not temps[0].exists()
    assert_same_store(reference, out)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------------------------------
# command line: precompute and info

def test_cli_precompute_and_info(folder, tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    d, arrays = folder
    out = tmp_path / "c.zarr"
    r = CliRunner().invoke(main, ["precompute", str(d), "--out", str(out), "--patch", "16", "--stride", "16",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    n = len(expected(arrays, ORDER, 16, 16)[0])
    assert f"patches: {n} in the store" in r.output
    assert "skipped: corrupt or truncated 1, non-image file 1, smaller than the patch 1" in r.output
    assert "converted: gray 1" in r.output
    r = CliRunner().invoke(main, ["info", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert f"patches: {n} of 16 x 16" in r.output and "verify: OK" in r.output and "complete: yes" in r.output
    r = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert json.loads(r.output)["count"] == n
    # damage one chunk: --verify fails with a non-zero exit status
    chunk = out / "patches" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 1
    chunk.write_bytes(bytes(raw))
    r = CliRunner().invoke(main, ["info", str(out), "--verify"])
    assert r.exit_code == 1 and "verify: FAILED" in r.output
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0  # without --verify nothing is read that could fail


def test_cli_errors(tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    r = CliRunner().invoke(main, ["precompute", str(tmp_path / "missing"), "--out", str(tmp_path / "o.zarr")])
    assert r.exit_code != 0 and "no such file or folder" in r.output
    r = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert r.exit_code != 0 and "not a rainsweep store" in r.output


@pytest.mark.slow
def test_cli_info_on_interrupted_store(tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    out = tmp_path / "s.zarr"
    _run_until(out, "after_commit@1")
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0 and "complete: NO" in r.output
    r = CliRunner().invoke(main, ["info", str(out), "--verify"])
    assert r.exit_code == 1 and "incomplete" in r.output


def test_precompute_stores_the_complexity_profile(folder, tmp_path):
    from engine import metrics

    d, _ = folder
    precompute([str(d)], tmp_path / "p.zarr", patch=16, stride=16, progress=False, chunk_patches=8)
    store = open_store(tmp_path / "p.zarr")
    x = store.read_all()
    assert store.complexity_profile.shape == (store.count, 4)
    np.testing.assert_array_equal(store.complexity_profile, metrics.complexity_profile(x, backend="cpu"))
    # the stored complexity is the profile's sum, bit for bit what metrics.complexity gives
    np.testing.assert_array_equal(store.complexity, metrics.complexity(x, backend="cpu"))
    assert verify(tmp_path / "p.zarr") == []
