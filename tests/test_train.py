"""train.py end to end on tiny stores: outputs, metrics against an independent numpy computation, exact resume,
NaN handling, bad input, and the held-out set's disjointness."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import models
import train
from engine.experiments.heldout import choose_indices
from engine.data.store import write_store

P = 32  # patch side: small so steps are fast, large enough that held-out rain always leaves a mask


def make_store(path: Path, n: int = 24, sources: int = 6, seed: int = 0) -> Path:
    """A store of smooth random patches (low-frequency noise, upsampled) with ``sources`` source images."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.float64)
    patches = np.repeat(np.repeat(small, P // 4, axis=1), P // 4, axis=2).astype(np.uint8)
    write_store(path, patches, source=np.arange(n) % sources)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s.zarr")


def run_train(*args: str, expect: int = 0):
    torch.set_num_threads(1)  # the CI machine is small and shared; one thread keeps runs steady
    res = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == expect, res.output
    return res


BASE = ("--model", "resnet-s", "--batch", "4", "--count", "8", "--test-count", "4", "--log-every", "2",
        "--device", "cpu")


def test_outputs_and_metrics_match_an_independent_evaluation(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train("--store", store, *BASE, "--iters", "6", "--ckpt-every", "3", "--eval-every", "4", "--out", out)
    for name in ("config.json", "log.jsonl", "metrics.json", "ckpt.pt", "model.pt", "samples.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "resnet-s" and cfg["betas"] == [0.9, 0.99] and cfg["rain_prob"] == 0.9
    assert cfg["milestones"] == [3, 4]  # 0.5 and 0.75 of 6 steps
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "event" not in x]
    evals = [x for x in lines if x.get("event") == "eval"]
    assert [x["step"] for x in evals] == [4] and np.isfinite(evals[0]["E_B"])
    assert lines[-1]["event"] == "final" and lines[-1]["step"] == 6
    assert [x["step"] for x in steps] == [2, 3, 4, 6]  # every --log-every steps and at checkpoints
    for x in steps:
        assert {"loss", "lr", "patches_per_s", "data_wait"} <= set(x)
        assert 0 <= x["data_wait"] <= 1 and x["patches_per_s"] > 0
    assert [x["lr"] for x in steps] == pytest.approx([2e-4, 1e-4, 5e-5, 5e-5])  # halved after steps 3 and 4

    # Rebuild the held-out set independently and score the saved EMA weights with the formulas of docs/science.md section 4.
    from engine.rain import RainSpec
    from engine.data.store import open_store
    from engine.synth import synthesize

    metrics = json.loads((out / "metrics.json").read_text())
    s = open_store(store)
    idx = np.asarray(choose_indices(np.asarray(s.source), _train_indices(store, 8), 4, cfg["heldout"]["seed"])[0])
    B = s.read(idx)
    syn = synthesize(B, RainSpec.preset("heldout-layered"), seed=cfg["heldout"]["seed"], keys=idx)
    net = models.build("resnet-s")
    net.load_state_dict(torch.load(out / "model.pt", weights_only=False)["ema"])
    with torch.no_grad():
        O = net(torch.from_numpy(np.asarray(syn.rainy)).permute(0, 3, 1, 2).float() / 255).permute(0, 2, 3, 1)
    O = O.double().numpy() * 255
    I, Bf, M = np.asarray(syn.rainy, np.float64), B.astype(np.float64), np.asarray(syn.mask)[..., None]
    M3 = np.broadcast_to(M, O.shape)
    er = [np.sqrt(((O[i] - I[i]) ** 2)[M3[i]].mean()) for i in range(len(O))]
    eb = [np.sqrt(((O[i] - Bf[i]) ** 2)[~M3[i]].mean()) for i in range(len(O))]
    psnr = [10 * np.log10(255 ** 2 / ((O[i] - Bf[i]) ** 2).mean()) for i in range(len(O))]
    assert metrics["E_R"] == pytest.approx(np.mean(er), rel=1e-4)
    assert metrics["E_B"] == pytest.approx(np.mean(eb), rel=1e-4)
    assert metrics["PSNR"] == pytest.approx(np.mean(psnr), rel=1e-4)
    ceiling = np.mean([np.sqrt(((Bf[i] - I[i]) ** 2)[M3[i]].mean()) for i in range(len(O))])
    assert metrics["E_R_ceiling"] == pytest.approx(ceiling, rel=1e-6)


def _train_indices(store: Path, count: int, seed: int = 0) -> np.ndarray:
    from engine.data.select import select

    return np.asarray(select(str(store), count, seed=seed).indices)


def test_resume_equals_an_uninterrupted_run(store: Path, tmp_path: Path) -> None:
    args = ("--store", store, *BASE, "--iters", "8", "--ckpt-every", "3")
    run_train(*args, "--out", tmp_path / "a")
    run_train(*args, "--out", tmp_path / "b", "--stop-after", "3")
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    run_train(*args, "--out", tmp_path / "b", "--resume")
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["ema"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=False)["ema"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert ma == mb
    la, lb = ([(x["step"], x.get("loss")) for x in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())]
              for d in "ab")
    assert la == lb


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    res = run_train("--store", store, *BASE, "--iters", "10", "--ckpt-every", "4", "--fault-at", "7",
                    "--out", out, expect=3)
    assert "step 7" in res.output and "step 4" in res.output
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (out / "metrics.json").exists()


def test_subset_smaller_than_the_batch_trains(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    run_train("--store", store, "--model", "unet-s", "--batch", "8", "--count", "3", "--test-count", "2",
              "--iters", "3", "--out", out, "--device", "cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["loader_epochs_per_epoch"] == 3 and cfg["steps_per_epoch"] == 1
    assert np.isfinite(json.loads((out / "metrics.json").read_text())["E_B"])


@pytest.mark.parametrize("opt,value,names", [
    ("--model", "resnet-xl", models.NAMES),
    ("--rain", "drizzle", ("small", "medium", "large")),
    ("--test-rain", "nope", ("heldout-layered", "heldout-sparse")),
])
def test_unknown_names_list_the_valid_ones(store: Path, tmp_path: Path, opt: str, value: str, names) -> None:
    res = CliRunner().invoke(train.main, ["--store", str(store), "--out", str(tmp_path / "x"), opt, value])
    assert res.exit_code == 2
    for n in names:
        assert n in res.output
    assert not (tmp_path / "x").exists()


def test_subset_from_another_store_is_rejected(store: Path, tmp_path: Path) -> None:
    from engine.data.select import select

    other = make_store(tmp_path / "other.zarr", seed=1)
    sub_path = tmp_path / "sub.json"
    select(str(other), 8, seed=0).save(sub_path)
    res = CliRunner().invoke(train.main, ["--store", str(store), "--subset", str(sub_path), "--out",
                                          str(tmp_path / "x"), "--iters", "1"])
    assert res.exit_code == 2
    assert "does not belong to --store" in res.output


def test_existing_checkpoint_needs_resume(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    run_train("--store", store, *BASE, "--iters", "2", "--out", out)
    res = CliRunner().invoke(train.main, ["--store", str(store), *BASE, "--iters", "2", "--out", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output


# ---- held-out choice -------------------------------------------------------------------------------------------

def test_heldout_prefers_unseen_source_images() -> None:
    sources = np.repeat(np.arange(10), 5)           # 10 source images, 5 patches each
    train_idx = np.arange(0, 25)                     # sources 0..4
    idx, policy = choose_indices(sources, train_idx, 12, seed=3)
    assert policy == "disjoint-sources" and len(idx) == 12 and len(set(idx)) == 12
    assert set(sources[idx]).isdisjoint(set(sources[train_idx]))
    again, _ = choose_indices(sources, train_idx, 12, seed=3)
    assert np.array_equal(idx, again)


def test_heldout_falls_back_to_unseen_patches() -> None:
    sources = np.repeat(np.arange(4), 5)
    train_idx = np.array([0, 5, 10, 15])             # one patch of every source
    idx, policy = choose_indices(sources, train_idx, 8, seed=0)
    assert policy == "disjoint-patches" and len(idx) == 8
    assert not np.isin(idx, train_idx).any()


def test_heldout_errors_when_nothing_is_left() -> None:
    with pytest.raises(ValueError, match="--test-store"):
        choose_indices(np.zeros(5, int), np.arange(5), 3, seed=0)
