"""Where a sweep stands: the live view and ``rainsweep sweep --status OUT``, on hand-made sweep folders (every state,
the ETA worked out by hand) and on a real sweep whose driver is killed half-way, then rerun to the end. A fake
interpreter stands in for train.py (fast, no torch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli.train import sweep as sweep_cli
from engine.data.store import write_store
from engine.experiments import sweep_status as ss

ROOT = Path(__file__).resolve().parents[1]

# Stands in for `python -P -m train ...`. Logs two steps (log.jsonl as train.py writes it) and writes metrics.json;
# the run with --count 8 started without --resume instead writes a checkpoint and kills the sweep's driver (its
# parent) half-way, as a lost machine would. Records each call's arguments in calls.txt beside the sweep folder.
FAKE_PYTHON = """#!{python}
import json, os, signal, sys, time
args = sys.argv[1:]
if "-c" in args:  # train_env's probe for train.py: say nothing
    sys.exit(0)
opt = dict(zip(args, args[1:]))
out = opt["--out"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "..", "..", "..", "calls.txt"), "a") as f:
    f.write(" ".join(args) + "\\n")
def log(step):
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps({{"step": step, "patches_per_s": 64.0, "steps_per_s": 16.0}}) + "\\n")
log(2)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
if opt["--count"] == "8" and "--resume" not in args:
    open(os.path.join(out, "ckpt.pt"), "w").close()
    os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(9)
log(4)
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({{"E_R": 1.5, "E_B": 2.5, "rain_residual": 0.5, "PSNR": 30.0, "E_R_ceiling": 9.0, "step": 4}}, f)
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """FAKE_PYTHON as an executable ``bin/python``."""
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    os.chmod(path, 0o755)
    return str(path)


def write_log(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hand_made_sweep(out: Path, pid: int) -> None:
    """Four cells of 40 steps: a (done), b (running at step 10, 2 steps/s), c (failed), d (queued)."""
    write_log(out / "runs" / "a", [{"step": 40, "patches_per_s": 8.0, "steps_per_s": 2.0}])
    (out / "runs" / "a" / "metrics.json").write_text("{}")
    write_log(out / "runs" / "b", [{"step": 5, "patches_per_s": 4.0, "steps_per_s": 1.0},
                                   {"step": 10, "patches_per_s": 8.0, "steps_per_s": 2.0},
                                   {"step": 10, "event": "eval", "E_R": 1.0}])
    (out / "runs" / "b" / "ckpt.pt").write_bytes(b"")
    tracker = ss.SweepTracker(out, [(n, 40) for n in "abcd"], "ray", view_every=30)
    tracker.started("a", "10.0.0.1")
    tracker.finished("a", failed=False)
    tracker.started("b", "10.0.0.2")
    tracker.started("b", "10.0.0.3")
    tracker.started("c", "")
    tracker.finished("c", failed=True, error="loss became nan at step 3")
    state = json.loads((out / ss.STATE_FILE).read_text())
    state["pid"] = pid
    (out / ss.STATE_FILE).write_text(json.dumps(state))


def test_status_of_a_running_sweep(tmp_path: Path) -> None:
    hand_made_sweep(tmp_path, os.getpid())
    status = ss.load_status(tmp_path)
    assert status.live and "running on the ray executor" in status.note
    assert [(c.name, c.state, c.step) for c in status.cells] == [
        ("a", "done", 40), ("b", "running", 10), ("c", "failed", None), ("d", "queued", None)]
    b = status.cells[1]
    assert (b.patches_per_s, b.where, b.attempts) == (8.0, "10.0.0.3", 2)
    # 30 steps left in b and 40 in d, at b's 2 steps/s
    assert ss.eta_seconds(status.cells) == pytest.approx(35.0)
    lines = ss.status_lines(tmp_path, status)
    assert lines[1] == "4 cells: 1 done, 1 running, 1 failed, 1 queued; ETA 0:00:35"
    assert any(ln.split() == ["b", "running", "step", "10/40", "8.0", "patches/s", "on", "10.0.0.3", "attempt", "2"]
               for ln in lines)
    assert any("error: loss became nan at step 3" in ln for ln in lines)
    assert ss.live_lines(status.cells)[0] == "sweep: " + lines[1]
    assert len(ss.live_lines(status.cells)) == 2  # the summary and the one running cell


def test_status_of_a_sweep_whose_driver_is_gone(tmp_path: Path) -> None:
    hand_made_sweep(tmp_path, dead_pid())
    status = ss.load_status(tmp_path)
    assert not status.live and "not running" in status.note
    assert [c.state for c in status.cells] == ["done", "interrupted", "failed", "queued"]
    lines = ss.status_lines(tmp_path, status)
    assert lines[1] == "4 cells: 1 done, 0 running, 1 failed, 1 queued, 1 interrupted"
    assert "resumes from its checkpoint on rerun" in lines[3]
    assert lines[-1].startswith("rerun the same sweep command")
    # another host's driver is judged by its silence
    state = json.loads((tmp_path / ss.STATE_FILE).read_text())
    state["host"] = "elsewhere"
    assert ss.driver_alive(state, now=state["updated"] + 59)
    assert not ss.driver_alive(state, now=state["updated"] + 91)


def test_status_without_a_state_file_and_of_no_sweep(tmp_path: Path) -> None:
    write_log(tmp_path / "runs" / "x", [{"step": 3, "patches_per_s": 1.0, "steps_per_s": 1.0}])
    (tmp_path / "runs" / "x" / "config.json").write_text(json.dumps({"iters": 6}))
    (cell,) = ss.load_status(tmp_path).cells
    assert (cell.name, cell.state, cell.step, cell.iters) == ("x", "interrupted", 3, 6)
    assert ss.cell_line(cell, 1).endswith("restarts on rerun")  # no checkpoint to resume from
    res = CliRunner().invoke(sweep_cli, ["--status", str(tmp_path / "runs" / "x")])
    assert res.exit_code == 2 and "no sweep here" in res.output


def test_a_half_finished_sweep_is_reported_and_finished_by_a_rerun(tmp_path: Path, fake_python: str) -> None:
    rng = np.random.default_rng(5)
    write_store(tmp_path / "s.zarr", rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8),
                source=np.arange(16) % 4)
    out = tmp_path / "sw"
    driver = ("import sys; from engine.experiments import sweep as sw\n"
              f"sw.sweep({str(tmp_path / 's.zarr')!r}, [4, 8, 12], ['medium'], ['resnet-s'], 4, {str(out)!r}, "
              f"python={fake_python!r}, view_every=0.05)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_SLEEP": "0.5"}
    first = subprocess.run([sys.executable, "-u", "-c", driver], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == -9, first.stdout + first.stderr  # the driver was killed by the n8 run
    assert "sweep: 3 cells: 0 done, 1 running, 0 failed, 2 queued; ETA 0:00:01" in first.stdout  # the live view
    assert "resnet-s_medium_n4_s0  running      step 2/4  64.0 patches/s" in first.stdout

    res = CliRunner().invoke(sweep_cli, ["--status", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "not running (the local executor's driver" in lines[0]
    assert lines[1] == "3 cells: 1 done, 0 running, 0 failed, 1 queued, 1 interrupted"
    assert lines[2].split() == ["resnet-s_medium_n4_s0", "done", "step", "4/4"]
    assert lines[3].split()[:4] == ["resnet-s_medium_n8_s0", "interrupted", "step", "2/4"]
    assert lines[3].endswith("resumes from its checkpoint on rerun")
    assert lines[4].split() == ["resnet-s_medium_n12_s0", "queued"]

    env["FAKE_SLEEP"] = "0"
    again = subprocess.run([sys.executable, "-c", driver.replace("sw.sweep(", "rows = sw.sweep(")
                            + "print([r['status'] for r in rows])"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "['skipped (finished)', 'trained', 'trained']" in again.stdout
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [("--count 8" in c, c.endswith("--resume")) for c in calls] == [
        (False, False), (True, False), (True, True), (False, False)]  # n4, n8 killed, n8 resumed, n12
    res = CliRunner().invoke(sweep_cli, ["--status", str(out)])
    assert "3 cells: 3 done, 0 running, 0 failed, 0 queued" in res.output and "rerun" not in res.output
