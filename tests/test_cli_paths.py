"""``rainsweep sweep`` and ``rainsweep demo`` typed in a folder other than the checkout, with relative paths: every
file lands under the user's folder and the runs finish with metrics."""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli.train import demo, sweep
from engine.data.store import write_store
from engine.experiments.sweep import METRICS
from engine.experiments.train_command import (ROOT, TrainRun, absolute_path_options, train_argv, train_env,
                                              train_module_argv)


def tiny_store(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(24, 4, 4, 3)).astype(np.float64)
    patches = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2).astype(np.uint8)
    write_store(path, patches, source=np.arange(24) % 6)
    return path


def test_path_options_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--batch", "4", "--test-store", "t.zarr", "--subset=sub/a.json", "--lr", "1e-4", "--out", "../o"]
    assert absolute_path_options(args) == ["--batch", "4", "--test-store", str(tmp_path / "t.zarr"),
                                           f"--subset={tmp_path / 'sub' / 'a.json'}", "--lr", "1e-4",
                                           "--out", str(tmp_path.parent / "o")]


def test_train_argv_spells_every_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = TrainRun(store="s.zarr", out="runs/a", model="resnet-s", rain="small", iters=7, count=8, subset="sub.json",
                   seed=3, test_rain="large", test_store="t.zarr", extra=("--batch", "4", "--test-store=u.zarr"),
                   resume=True)
    assert train_argv(run, python="py") == [
        "py", "-P", "-m", "train", "--store", str(tmp_path / "s.zarr"), "--subset", str(tmp_path / "sub.json"),
        "--count", "8", "--rain", "small", "--test-rain", "large", "--test-store", str(tmp_path / "t.zarr"),
        "--model", "resnet-s", "--iters", "7", "--seed", "3", "--out", str(tmp_path / "runs" / "a"),
        "--batch", "4", f"--test-store={tmp_path / 'u.zarr'}", "--resume"]
    bare = TrainRun(store=tmp_path / "s.zarr", out=tmp_path / "o", model="unet", rain="medium", iters=1)
    assert train_argv(bare, python="py") == ["py", "-P", "-m", "train", "--store", str(tmp_path / "s.zarr"),
                                             "--rain", "medium", "--model", "unet", "--iters", "1", "--seed", "0",
                                             "--out", str(tmp_path / "o")]


def test_train_env_finds_this_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a train.py of the user's own in the working folder must not be what `-m train` runs
    (tmp_path / "train.py").write_text("raise SystemExit('the wrong train.py')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    env = train_env()
    code = "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('train').origin).resolve())"
    argv = train_module_argv()[:2] + ["-c", code]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    assert Path(res.stdout.strip()) == ROOT / "train.py"
    # where the child finds it already, the environment is left as it is
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    assert train_env()["PYTHONPATH"] == str(ROOT)


@pytest.mark.slow
def test_sweep_with_relative_paths_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    tiny_store(data / "s.zarr", 7)
    tiny_store(data / "t.zarr", 8)
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    args = ["--store", "../data/s.zarr", "--test-store", "../data/t.zarr", "--out", "sweeps/s1", "--counts", "4",
            "--rain", "medium", "--model", "resnet-s", "--iters", "2", "--batch", "4", "--device", "cpu",
            "--train-arg=--test-count=4", "--train-arg=--threads=1", "--train-arg=--log-every=1"]
    res = CliRunner().invoke(sweep, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = user / "sweeps" / "s1"
    run = out / "runs" / "resnet-s_medium_n4_s0"
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["store"] == str(data / "s.zarr") and config["test_store"] == str(data / "t.zarr")
    assert metrics["step"] == 2
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "trained"
    for k in METRICS:
        assert np.isfinite(float(row[k])), (k, row)
    assert float(row["E_B"]) == pytest.approx(metrics["E_B"])
    assert (out / "figures" / "er_eb_resnet-s.png").is_file()
    assert not (ROOT / "sweeps").exists()

    again = CliRunner().invoke(sweep, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "skipped (finished)" in again.output


@pytest.mark.slow
def test_demo_with_a_relative_out_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    args = ["--out", "d", "--iters", "2", "--counts", "4,8", "--patch", "32"]
    res = CliRunner().invoke(demo, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for count in (4, 8):
        run = tmp_path / "d" / "runs" / f"resnet-s_p32_i2_n{count}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["step"] == 2 and np.isfinite(metrics["E_R"]) and np.isfinite(metrics["E_B"])
        assert json.loads((run / "config.json").read_text())["store"] == str(tmp_path / "d" / "store-32")
        assert str(run / "samples.png") in res.output
    assert str(tmp_path / "d" / "comparison.png") in res.output
    assert not (ROOT / "d").exists()


def test_python_m_engine_cli_works_from_any_folder(tmp_path: Path) -> None:
    res = subprocess.run([*train_module_argv()[:2], "-m", "engine.cli", "demo", "--help"], cwd=tmp_path,
                         env=train_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: rainsweep demo")
