"""Fused training (train_fused.py, ``rainsweep sweep --fuse``): every run of a group against the same run trained
alone by train.py, exact resume of a group, bad groups, and fused sweeps against unfused ones."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import models
import train
import train_fused
from engine.cli.train import sweep as sweep_command
from engine.experiments import sweep as sw
from engine.data.store import write_store
from engine.experiments.train_command import TrainRun, fused_group_document, train_args

COMMON = {"model": "resnet-s", "batch": 4, "test_count": 4, "log_every": 2, "device": "cpu", "threads": 1}
#: Runs that differ in everything a group lets differ: count, seed, rain, learning rate and schedule, held-out set.
RUNS = [{"count": 8, "seed": 0},
        {"count": 4, "seed": 3, "rain": "large", "lr": 1e-3, "milestones": "0.25", "test_seed": 7}]
#: Agreement of a fused run with its unfused run (grouped convolutions round differently from single ones).
REL = 1e-4


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """24 smooth random 32 x 32 patches from 6 source images (32 px: held-out rain always leaves a mask)."""
    rng = np.random.default_rng(11)
    small = rng.integers(0, 256, size=(24, 4, 4, 3)).astype(np.float64)
    path = tmp_path_factory.mktemp("fstore") / "s.zarr"
    write_store(path, np.repeat(np.repeat(small, 8, axis=1), 8, axis=2).astype(np.uint8), source=np.arange(24) % 6)
    return path


def write_group(path: Path, store: Path, outs: list[Path], runs: list[dict] = RUNS, **common) -> Path:
    doc = {"common": {"store": str(store), **COMMON, **common},
           "runs": [{**r, "out": str(o)} for r, o in zip(runs, outs)]}
    path.write_text(json.dumps(doc))
    return path


def run_fused(*args, expect: int = 0):
    res = CliRunner().invoke(train_fused.main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res


def run_alone(store: Path, run: dict, out: Path, **common) -> None:
    argv = train_fused.option_argv({"store": str(store), **COMMON, **common, **run, "out": str(out)}, "run")
    res = CliRunner().invoke(train.main, argv, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def log_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


@pytest.mark.slow
def test_each_fused_run_matches_its_run_alone(store: Path, tmp_path: Path) -> None:
    outs = [tmp_path / f"fused{i}" for i in range(len(RUNS))]
    group = write_group(tmp_path / "g.json", store, outs, iters=6, eval_every=4)
    run_fused("--group", group, "--out", tmp_path / "group")
    assert sorted(p.name for p in (tmp_path / "group").iterdir()) == ["ckpt.pt", "config.json"]
    for run, fused in zip(RUNS, outs):
        alone = tmp_path / f"alone{run['seed']}"
        run_alone(store, run, alone, iters=6, eval_every=4)
        # the same files (the checkpoint is the group's), the same configuration but the folder and the group
        assert sorted(p.name for p in fused.iterdir()) == sorted(p.name for p in alone.iterdir() if p.name != "ckpt.pt")
        cf, ca = (json.loads((d / "config.json").read_text()) for d in (fused, alone))
        assert cf.pop("fused_group")["runs"] == len(RUNS)
        assert cf.pop("train_config") | {"out": ""} == ca.pop("train_config") | {"out": ""}
        assert cf == ca
        # every log line: same steps, epochs and learning rates; losses and held-out metrics to rounding
        lf, la = log_lines(fused), log_lines(alone)
        assert [(x["step"], x.get("event"), x.get("epoch"), x.get("lr")) for x in lf] == \
               [(x["step"], x.get("event"), x.get("epoch"), x.get("lr")) for x in la]
        for x, y in zip(lf, la):
            for key in ("loss", "loss_mean", "E_R", "E_B", "PSNR"):
                if key in y and np.isfinite(y[key]):
                    assert x[key] == pytest.approx(y[key], rel=REL), (x["step"], key)
        mf, ma = (json.loads((d / "metrics.json").read_text()) for d in (fused, alone))
        assert mf.keys() == ma.keys() and mf["heldout"] == ma["heldout"] and mf["step"] == ma["step"] == 6
        for key in ("E_R", "E_B", "PSNR", "E_R_ceiling"):
            assert mf[key] == pytest.approx(ma[key], rel=REL), key
        wf, wa = (torch.load(d / "model.pt", weights_only=False) for d in (fused, alone))
        assert wf.keys() == wa.keys() and wf["ema"].keys() == wa["ema"].keys()
        for key in wa["ema"]:
            assert rel_diff(wf["ema"][key], wa["ema"][key]) < REL, key
        # the saved weights load into the ordinary model
        net = models.build("resnet-s")
        net.load_state_dict(wf["ema"])


@pytest.mark.slow
def test_a_resumed_group_equals_an_uninterrupted_group(store: Path, tmp_path: Path) -> None:
    a = [tmp_path / "a0", tmp_path / "a1"]
    b = [tmp_path / "b0", tmp_path / "b1"]
    run_fused("--group", write_group(tmp_path / "a.json", store, a, iters=8, ckpt_every=3), "--out", tmp_path / "ga")
    gb = write_group(tmp_path / "b.json", store, b, iters=8, ckpt_every=3)
    gb_stop = write_group(tmp_path / "b-stop.json", store, b, iters=8, ckpt_every=3, stop_after=3)
    run_fused("--group", gb_stop, "--out", tmp_path / "gb")
    assert not (b[0] / "metrics.json").exists()
    assert torch.load(tmp_path / "gb" / "ckpt.pt", weights_only=False)["step"] == 3
    run_fused("--group", gb, "--out", tmp_path / "gb", expect=2)  # the group checkpoint needs --resume
    swapped = write_group(tmp_path / "swapped.json", store, b[::-1], runs=RUNS[::-1], iters=8, ckpt_every=3)
    res = run_fused("--group", swapped, "--out", tmp_path / "gb", "--resume", expect=2)
    assert "original order" in res.output
    run_fused("--group", gb, "--out", tmp_path / "gb", "--resume")
    for x, y in zip(a, b):
        wa, wb = (torch.load(d / "model.pt", weights_only=False)["ema"] for d in (x, y))
        for key in wa:
            assert torch.equal(wa[key], wb[key]), key
        assert json.loads((x / "metrics.json").read_text()) == json.loads((y / "metrics.json").read_text())
        assert [(r["step"], r.get("loss")) for r in log_lines(x)] == [(r["step"], r.get("loss")) for r in log_lines(y)]


def test_a_nan_in_one_run_stops_the_group_and_names_it(store: Path, tmp_path: Path) -> None:
    outs = [tmp_path / "r0", tmp_path / "r1"]
    runs = [RUNS[0], {**RUNS[1], "fault_at": 3}]
    group = write_group(tmp_path / "g.json", store, outs, runs=runs, iters=6, ckpt_every=2)
    res = run_fused("--group", group, "--out", tmp_path / "g", expect=3)
    assert str(outs[1]) in res.output and "step 3" in res.output and str(tmp_path / "g" / "ckpt.pt") in res.output
    assert log_lines(outs[1])[-1]["event"] == "non-finite loss"
    assert torch.load(tmp_path / "g" / "ckpt.pt", weights_only=False)["step"] == 2


@pytest.mark.parametrize("change,message", [
    ({"model": "unet-s"}, "one architecture"),
    ({"batch": 8}, "--batch"),
    ({"iters": 3}, "--iters"),
    ({"resume": True}, "belongs to the group"),
    ({"count": 0}, "run 2 of"),
])
def test_runs_that_cannot_share_a_group_are_refused(store: Path, tmp_path: Path, change: dict, message: str) -> None:
    outs = [tmp_path / "r0", tmp_path / "r1"]
    group = write_group(tmp_path / "g.json", store, outs, runs=[RUNS[0], {**RUNS[1], **change}], iters=2)
    res = run_fused("--group", group, "--out", tmp_path / "g", expect=2)
    assert message in res.output
    assert not any(o.exists() for o in outs) and not (tmp_path / "g").exists()  # nothing written


def test_bad_group_files_are_refused(store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for text, message in [("{", "--group"), ('{"runs": []}', "non-empty"), ('{"runs": [3]}', "run 1 of")]:
        bad.write_text(text)
        assert message in run_fused("--group", bad, "--out", tmp_path / "g", expect=2).output
    same = write_group(tmp_path / "same.json", store, [tmp_path / "o", tmp_path / "o"], iters=2)
    assert "both write to" in run_fused("--group", same, "--out", tmp_path / "g", expect=2).output


def test_group_documents_hold_each_runs_train_arguments(store: Path, tmp_path: Path) -> None:
    runs = [TrainRun(store=store, out=tmp_path / f"r{i}", model="resnet-s", rain="medium", iters=2, count=4, seed=i,
                     extra=("--batch", "4")) for i in range(2)]
    doc = fused_group_document(runs)
    assert doc == {"runs": [train_args(r) for r in runs]}
    cfgs = [train_fused.parse_run(r, "run") for r in doc["runs"]]
    assert [c.seed for c in cfgs] == [0, 1] and cfgs[0].store == str(store.resolve())
    with pytest.raises(ValueError, match="as a whole"):
        fused_group_document([TrainRun(store=store, out=tmp_path, model="resnet-s", rain="medium", iters=2,
                                       resume=True)])


# ---- sweeps ----------------------------------------------------------------------------------------------------------

def test_fuse_groups_are_even_per_model_and_in_plan_order() -> None:
    cfgs = sw.plan(["resnet-s", "unet-s"], ["medium"], [1, 2, 3, 4, 5], seeds=[0, 1])  # 10 runs per model
    groups = sw.fuse_groups(cfgs, 8)
    assert [len(g) for g in groups] == [5, 5, 5, 5]
    assert sorted(i for g in groups for i in g) == list(range(20))
    assert all(len({cfgs[i].model for i in g}) == 1 and g == sorted(g) for g in groups)
    assert sw.fuse_groups(cfgs, 1) == [[i] for i in range(20)]
    assert [len(g) for g in sw.fuse_groups(cfgs[:7], 3)] == [3, 2, 2]
    assert sw.group_name(cfgs[:2]) == sw.group_name(list(cfgs[:2])) != sw.group_name(cfgs[1:3])
    with pytest.raises(sw.SweepError):
        sw.fuse_groups(cfgs, 0)


def test_finished_and_checkpointed_runs_stay_out_of_fused_groups(tmp_path: Path) -> None:
    cfgs = sw.plan(["resnet-s"], ["medium"], [2, 4, 8, 16, 32])
    for cfg, name in ((cfgs[1], "metrics.json"), (cfgs[3], "ckpt.pt")):  # finished; interrupted unfused run
        (tmp_path / "runs" / cfg.name).mkdir(parents=True)
        (tmp_path / "runs" / cfg.name / name).write_text("{}")
    assert sw.fused_tasks(cfgs, tmp_path, 4, "unused", [], print) == [[0, 2, 4], [1], [3]]
    assert sw.option_value(["--batch", "8", "--device=cpu", "--batch=4"], "--batch", "16") == "4"
    assert sw.option_value(["--device=cpu"], "--batch", "16") == "16"


def test_auto_picks_the_largest_sublinear_k() -> None:
    said: list[str] = []
    times = {1: 1.0, 2: 1.2, 4: 2.0, 8: 7.5, 16: 16.0}
    k = sw_pick(lambda model, k, *a: times[k], 16, said)
    assert k == 4 and "K=8" in said[-1] and "0.94" in said[-1]
    assert sw_pick(lambda model, k, *a: float(k), 16, []) == 1  # linear growth: no fusing
    assert sw_pick(lambda model, k, *a: 1.0, 5, []) == 4  # never beyond the runs at hand


def sw_pick(timer, max_k: int, said: list[str]) -> int:
    from engine.bench.train import pick_fuse_k

    return pick_fuse_k("resnet-s", 4, 32, "cpu", max_k=max_k, echo=said.append, timer=timer)


@pytest.mark.slow
def test_fused_sweep_writes_the_rows_of_the_unfused_sweep(store: Path, tmp_path: Path) -> None:
    extra = ("--test-count", "4", "--log-every", "2", "--device", "cpu", "--batch", "4", "--threads", "1")
    said: list[str] = []
    rows = {}
    for fuse in (None, 2):
        rows[fuse] = sw.sweep(store, [4, 8], ["medium"], ["resnet-s"], 3, tmp_path / str(fuse), extra=extra,
                              fuse=fuse, echo=said.append)
    assert any("as one fused model" in s for s in said)
    tables = {}
    for fuse in rows:
        with open(tmp_path / str(fuse) / "results.csv") as f:
            tables[fuse] = list(csv.DictReader(f))
    assert list(tables[None][0]) == list(tables[2][0])
    for u, f in zip(tables[None], tables[2]):
        assert {k: u[k] for k in sw.CONFIG} == {k: f[k] for k in sw.CONFIG}
        for k in sw.METRICS:
            assert float(f[k]) == pytest.approx(float(u[k]), rel=REL), k
    assert [r["status"] for r in rows[2]] == ["trained", "trained"] and rows[2][0]["group"] == rows[2][1]["group"]
    again = sw.sweep(store, [4, 8], ["medium"], ["resnet-s"], 3, tmp_path / "2", extra=extra, fuse=2,
                     echo=lambda s: None)
    assert [r["status"] for r in again] == ["skipped (finished)"] * 2


def test_sweep_cli_checks_fuse(store: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(sweep_command, ["--store", str(store), "--out", str(tmp_path / "o"), "--fuse", "0"])
    assert res.exit_code == 2 and "--fuse" in res.output


@pytest.mark.slow
def test_four_fused_runs_score_within_half_a_percent_of_their_runs_alone_after_200_steps(store: Path,
                                                                                         tmp_path: Path) -> None:
    """The issue's figure (resnet-s, K = 4, 200 steps: held-out E_R and E_B within 0.5 %), on 32 px patches."""
    runs = [{"count": 8, "seed": 0}, {"count": 12, "seed": 1, "rain": "large"},
            {"count": 4, "seed": 2, "rain": "small", "lr": 5e-4}, {"count": 16, "seed": 3, "lr": 1e-3}]
    outs = [tmp_path / f"f{i}" for i in range(4)]
    settings = {"iters": 200, "log_every": 50, "heldout_exclude_count": 16}
    run_fused("--group", write_group(tmp_path / "g.json", store, outs, runs=runs, **settings), "--out", tmp_path / "g")
    for i, (run, fused) in enumerate(zip(runs, outs)):
        run_alone(store, run, tmp_path / f"a{i}", **settings)
        mf, ma = (json.loads((d / "metrics.json").read_text()) for d in (fused, tmp_path / f"a{i}"))
        for key in ("E_R", "E_B"):
            assert mf[key] == pytest.approx(ma[key], rel=5e-3), (i, key)
