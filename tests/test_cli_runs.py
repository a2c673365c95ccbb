"""Training subprocesses of sweeps and the demo: their output streams live to the caller and to train.out, and a run
that ends without metrics is reported as such. A fake interpreter stands in for train.py (fast, no torch)."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data.store import write_store
from engine.experiments import demo as dm
from engine.experiments import sweep as sw
from engine.experiments.logged_run import run_logged

# Stands in for `python -P -m train ...`: prints two progress lines on stderr, then, as FAKE_TRAIN says, writes
# metrics.json ("ok") or not ("no-metrics"). Called as the probe (`-c ...`), it finds nothing.
FAKE_PYTHON = """#!{python}
import json, os, sys
args = sys.argv[1:]
if "-m" not in args:
    sys.exit(0)
out = args[args.index("--out") + 1]
os.makedirs(out, exist_ok=True)
for step in (1, 2):
    print(f"fake step {{step}}/2 loss 0.{{step}}", file=sys.stderr, flush=True)
if os.environ["FAKE_TRAIN"] == "ok":
    metrics = {{"E_R": 1.5, "E_B": 2.5, "rain_residual": 0.5, "PSNR": 30.0, "E_R_ceiling": 9.0, "step": 2,
               "heldout": {{"count": 4}}}}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(out, "log.jsonl"), "w") as f:
        f.write(json.dumps({{"step": 2, "steps_per_s": 4.0}}) + "\\n")
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    path = tmp_path / "fake-python"
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    patches = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    write_store(tmp_path / "s.zarr", patches, source=np.arange(12) % 4)
    return tmp_path / "s.zarr"


def test_run_logged_streams_lines_while_the_command_runs(tmp_path: Path) -> None:
    # The child prints a line, then waits for a file that only the callback creates on seeing that line: it ends
    # with status 0 only if the line reached the callback before the child ended.
    go = tmp_path / "go"
    child = ("import os, sys, time\n"
             "print('ready', flush=True)\n"
             f"for _ in range(600):\n    if os.path.exists({str(go)!r}): break\n    time.sleep(0.05)\n"
             "else: sys.exit(7)\n"
             "sys.stderr.write('a\\rb\\n'); print('done')\n")
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "ready":
            go.touch()

    log = tmp_path / "logs" / "child.out"
    done = run_logged([sys.executable, "-c", child], log, on_line=on_line, tail=2)
    assert done.returncode == 0
    assert seen == ["ready", "a", "b", "done"]
    assert done.tail == ("b", "done")
    text = log.read_text()
    assert text.startswith(f"$ {sys.executable} -c ") and text.endswith("\nready\na\nb\ndone\n")


def test_run_logged_reports_the_exit_status(tmp_path: Path) -> None:
    done = run_logged([sys.executable, "-c", "print('bye'); raise SystemExit(3)"], tmp_path / "o.txt")
    assert done == type(done)(3, ("bye",))


def test_sweep_shows_each_runs_lines(store: Path, tmp_path: Path, fake_python: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRAIN", "ok")
    said: list[str] = []
    rows = sw.sweep(store, [4, 8], ["medium"], ["resnet-s"], 2, tmp_path / "sw", jobs=2, python=fake_python,
                    echo=said.append)
    assert [r["status"] for r in rows] == ["trained", "trained"]
    assert [r["E_R"] for r in rows] == [1.5, 1.5]
    for r in rows:
        for step in (1, 2):
            assert f"{r['run']} | fake step {step}/2 loss 0.{step}" in said
        assert "fake step 2/2 loss 0.2" in (tmp_path / "sw" / "runs" / r["run"] / "train.out").read_text()


def test_sweep_names_a_run_that_wrote_no_metrics(store: Path, tmp_path: Path, fake_python: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRAIN", "no-metrics")
    with pytest.raises(sw.SweepError, match="1 run"):
        sw.sweep(store, [4], ["medium"], ["resnet-s"], 2, tmp_path / "sw", python=fake_python, echo=lambda s: None)
    (row,) = json.loads((tmp_path / "sw" / "results.json").read_text())
    run = tmp_path / "sw" / "runs" / row["run"]
    assert row["status"] == "failed (exit 0 without metrics.json)"
    assert str(run / "metrics.json") in row["error"] and "fake step 2/2" in row["error"]
    assert all(row[k] is None for k in sw.METRICS)


def test_demo_shows_the_training_lines(tmp_path: Path, fake_python: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRAIN", "ok")
    said: list[str] = []
    metrics = dm.run_demo(tmp_path / "d", iters=2, counts=(2, 4), patch=16, python=fake_python, echo=said.append)
    assert [m["E_R"] for m in metrics.values()] == [1.5, 1.5]
    for count in (2, 4):
        assert f"  n{count} | fake step 1/2 loss 0.1" in said and f"  n{count} | fake step 2/2 loss 0.2" in said
        assert "fake step 2/2" in (tmp_path / "d" / "runs" / f"resnet-s_p16_i2_n{count}" / "train.out").read_text()


def test_demo_names_a_run_that_wrote_no_metrics(tmp_path: Path, fake_python: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRAIN", "no-metrics")
    with pytest.raises(dm.DemoError, match="exited 0 but wrote no .*metrics.json"):
        dm.run_demo(tmp_path / "d", iters=2, counts=(2, 4), patch=16, python=fake_python, echo=lambda s: None)
    assert os.path.exists(tmp_path / "d" / "runs" / "resnet-s_p16_i2_n2" / "train.out")
