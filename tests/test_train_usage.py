"""train.py as a new user meets it: clear errors (and no --out left behind) when the held-out set has no room or an
option is wrong, the start line, the live progress line, the saved TrainConfig, and resume refusing other options."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train
from engine.data.select import select
from engine.data.store import write_store

N = 24  # patches in the fixture store
BASE = ("--model", "resnet-s", "--batch", "4", "--test-count", "4", "--iters", "2", "--device", "cpu")


def make_store(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` patches of 32 x 32 random 8 x 8 blocks, cut from ``n // 3`` source images."""
    blocks = np.random.default_rng(seed).integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    write_store(path, blocks.repeat(8, axis=1).repeat(8, axis=2), source=np.arange(n) % max(1, n // 3))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.zarr", n=N)


def invoke(*args) -> "click.testing.Result":
    torch.set_num_threads(1)
    return CliRunner().invoke(train.main, [str(a) for a in args])


@pytest.mark.parametrize("count", [N, N + 6])
def test_count_leaving_no_heldout_patch_is_a_usage_error(store: Path, tmp_path: Path, count: int) -> None:
    out = tmp_path / "run"
    res = invoke("--store", store, "--count", count, *BASE, "--out", out)
    assert res.exit_code == 2, res.output
    assert "--count" in res.output and f"has {N} patches" in res.output and "--test-store" in res.output
    assert f"smaller than {N}" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_no_count_or_subset_says_the_whole_store_leaves_no_heldout_set(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = invoke("--store", store, *BASE, "--out", out)
    assert res.exit_code == 2, res.output
    assert "neither --count nor --subset" in res.output and f"all {N} patches" in res.output
    assert "--count" in res.output and "--test-store" in res.output
    assert not out.exists()


def test_subset_of_the_whole_store_is_a_usage_error(store: Path, tmp_path: Path) -> None:
    sub = tmp_path / "all.json"
    select(str(store), N, seed=0).save(sub)
    out = tmp_path / "run"
    res = invoke("--store", store, "--subset", sub, *BASE, "--out", out)
    assert res.exit_code == 2, res.output
    assert "--subset" in res.output and f"all {N} patches" in res.output and "--test-store" in res.output
    assert not out.exists()


@pytest.mark.parametrize("args,option", [
    (("--count", "0"), "--count"),
    (("--count", "8", "--milestones", "0.5,x"), "--milestones"),
    (("--count", "8", "--milestones", "0.5,1.5"), "--milestones"),
    (("--count", "8", "--lr", "-1"), "--lr"),
    (("--count", "8", "--gamma", "0"), "--gamma"),
    (("--count", "8", "--device", "tpu"), "--device"),
    (("--count", "8", "--loader-mode", "fast"), "--loader-mode"),
    (("--count", "8", "--heldout-exclude-count", str(N)), "--heldout-exclude-count"),
    (("--count", "8", "--resume"), "--resume"),
])
def test_bad_options_name_the_option_and_leave_no_out(store: Path, tmp_path: Path, args, option: str) -> None:
    out = tmp_path / "run"
    res = invoke("--store", store, *BASE, *args, "--out", out)
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.slow
def test_whole_store_with_a_test_store_trains_and_says_so(store: Path, tmp_path: Path) -> None:
    test_store = make_store(tmp_path / "t.zarr", n=8, seed=3)
    out = tmp_path / "run"
    res = invoke("--store", store, "--test-store", test_store, *BASE, "--out", out)
    assert res.exit_code == 0, res.output
    start = [ln for ln in res.output.splitlines() if ln.startswith("training resnet-s")]
    assert len(start) == 1
    assert f"all {N} patches of {store} (no --count or --subset given)" in start[0]
    assert f"held-out: 4 patches of {test_store} (test-store), heldout-layered" in start[0]
    assert json.loads((out / "config.json").read_text())["train_patches"] == N


@pytest.mark.slow
def test_start_line_progress_and_saved_config(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = invoke("--store", store, "--count", "8", *BASE[:-4], "--iters", "4", "--log-every", "2", "--device", "cpu",
                 "--out", out)
    assert res.exit_code == 0, res.output
    assert f"training resnet-s ({train.models.parameter_count(train.models.build('resnet-s')):,} parameters) on 8 " \
           f"of {N} patches of {store}, medium rain on 90 % of patches; held-out: 4 patches" in res.output
    last = [ln for ln in res.output.splitlines() if ln.startswith("step 4/4")]
    assert len(last) == 1 and "patches/s" in last[0] and "data wait" in last[0] and "ETA 0:00:00" in last[0]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert f"loss {log[1]['loss_mean']:.4g}" in last[0]  # the loss shown is the last window's mean

    saved = json.loads((out / "config.json").read_text())["train_config"]
    cfg = train.TrainConfig.from_dict(saved)
    assert (cfg.count, cfg.iters, cfg.model, cfg.milestones, cfg.out) == (8, 4, "resnet-s", (0.5, 0.75), str(out))
    assert train.TrainConfig.from_dict(torch.load(out / "ckpt.pt", weights_only=False)["train_config"]) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.iters = 5


@pytest.mark.slow
@pytest.mark.parametrize("option,value", [("--seed", "1"), ("--batch", "8")])
def test_resume_refuses_other_options(store: Path, tmp_path: Path, option: str, value: str) -> None:
    out = tmp_path / "run"
    options = {"--store": store, "--count": "8", "--model": "resnet-s", "--batch": "4", "--test-count": "4",
               "--iters": "4", "--ckpt-every": "2", "--device": "cpu", "--out": out}
    assert invoke(*sum(options.items(), ()), "--stop-after", "2").exit_code == 0
    res = invoke(*sum({**options, option: value}.items(), ()), "--resume")
    assert res.exit_code == 2, res.output
    assert f"--resume: {option[2:]} differs from the checkpoint's" in res.output
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


# ---- the progress line -----------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_pipe_prints_a_line_per_log_step_at_most_every_few_seconds() -> None:
    clock, stream = Clock(), io.StringIO()
    p = train.Progress(100, 8, 0, stream=stream, clock=clock, pipe_min_s=5, pipe_max_s=30)
    clock.now = 1.0
    p.update(1, 0.25)                                     # first step: not a log step, not due
    clock.now = 2.0
    p.update(2, 0.25, loss=0.5)                           # log step, but 2 s after the start: not yet
    clock.now = 11.0
    p.update(10, 0.5, loss=0.25)                          # log step, 11 s: a line
    assert stream.getvalue().splitlines() == ["step 10/100  loss 0.25  7.3 patches/s  data wait 9 %  ETA 0:01:40"]
    clock.now = 40.0
    p.update(11, 0.0)                                     # no log step for 29 s: nothing
    clock.now = 42.0
    p.update(12, 0.0)                                     # 31 s since the last line: a heartbeat
    assert stream.getvalue().splitlines()[-1] == "step 12/100  loss 0.25  0.5 patches/s  data wait 0 %  ETA 0:05:28"
    clock.now = 43.0
    p.update(100, 0.0)                                    # the last step always shows
    assert stream.getvalue().splitlines()[-1].startswith("step 100/100  loss 0.25")
    p.close()
    assert len(stream.getvalue().splitlines()) == 3


def test_progress_on_a_terminal_redraws_one_line() -> None:
    clock, stream = Clock(), Tty()
    p = train.Progress(4, 2, 0, stream=stream, clock=clock, redraw_s=0.5)
    for step in range(1, 5):
        clock.now = step * 1.0
        p.update(step, 0.0, loss=0.125 if step == 2 else None)
    p.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert text.split("\r")[2].startswith("step 2/4  loss 0.125  2.0 patches/s")


def test_disabled_progress_writes_nothing() -> None:
    stream = io.StringIO()
    p = train.Progress(2, 2, 0, enabled=False, stream=stream)
    p.update(1, 0.0, loss=1.0)
    p.update(2, 0.0, loss=1.0)
    p.close()
    assert stream.getvalue() == ""


def test_evaluation_context_turns_tf32_off_and_restores_it() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with train.full_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
