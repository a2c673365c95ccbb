"""The content prior end to end: stage 1 (``rainsweep prior``) lowers its loss and writes its files; stage 2
(train.py ``--model vqgan-ft-s --prior``) changes only the encoder; fig18 / fig19 plans and tiny runs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train
from engine.cli.prior import prior as prior_cmd
from engine.data.store import write_store
from engine.experiments import recipes as R
from engine.experiments.prior import PriorConfig, PriorTrainingError, train_prior
from models.vqgan import VQGAN, load_prior


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """24 patches of 32 x 32 smooth random 8 x 8 blocks, cut from 8 source images."""
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    blocks = np.random.default_rng(0).integers(0, 256, size=(24, 4, 4, 3), dtype=np.uint8)
    write_store(path, blocks.repeat(8, axis=1).repeat(8, axis=2), source=np.arange(24) % 8)
    return path


@pytest.fixture(scope="module")
def small_prior(store: Path, tmp_path_factory) -> Path:
    """A prior of the ``small`` configuration after 2 steps (what vqgan-ft-s fine-tunes)."""
    out = tmp_path_factory.mktemp("prior") / "p"
    torch.set_num_threads(1)
    train_prior(PriorConfig(store=str(store), out=str(out), config="small", iters=2, batch=4, device="cpu"),
                echo=lambda s: None)
    return out / "prior.pt"


def log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_prior_training_lowers_the_loss_writes_its_files_and_is_reused(store: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "p"
    res = CliRunner().invoke(prior_cmd, ["--store", str(store), "--config", "tiny", "--out", str(out), "--iters",
                                         "60", "--batch", "4", "--lr", "2e-3", "--log-every", "10",
                                         "--ckpt-every", "30", "--dead-every", "20", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = log(out)
    assert [x["step"] for x in lines] == [10, 20, 30, 40, 50, 60]
    assert lines[-1]["rec_l1"] < lines[0]["rec_l1"] and lines[-1]["psnr"] > lines[0]["psnr"]
    assert all(1 <= x["perplexity"] <= 16 and 0 <= x["dead_codes"] <= 16 for x in lines)
    for name in ("prior.pt", "config.json", "metrics.json", "ckpt.pt"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 60 and metrics["n_embed"] == 16 and metrics["psnr"] > 0
    report = load_prior(VQGAN("tiny"), out / "prior.pt")  # the prior loads by taming's key names
    assert report.ok
    again = CliRunner().invoke(prior_cmd, ["--store", str(store), "--config", "tiny", "--out", str(out), "--iters",
                                           "60", "--batch", "4", "--lr", "2e-3", "--device", "cpu",
                                           "--log-every", "10", "--ckpt-every", "30", "--dead-every", "20"])
    assert again.exit_code == 0 and "reusing" in again.output
    other = CliRunner().invoke(prior_cmd, ["--store", str(store), "--config", "small", "--out", str(out)])
    assert other.exit_code != 0 and "config" in other.output


def test_prior_options_are_checked(store: Path, tmp_path: Path) -> None:
    with pytest.raises(PriorTrainingError, match="--config 'huge'"):
        train_prior(PriorConfig(store=str(store), out=str(tmp_path / "x"), config="huge"))
    with pytest.raises(PriorTrainingError, match="--count 99"):
        train_prior(PriorConfig(store=str(store), out=str(tmp_path / "y"), count=99, config="tiny", device="cpu"))


def run_train(*args) -> "object":
    torch.set_num_threads(1)
    return CliRunner().invoke(train.main, [str(a) for a in args])


BASE = ("--count", "16", "--batch", "4", "--test-count", "4", "--device", "cpu", "--lr", "1e-2", "--ema", "0.5")


@pytest.mark.slow
def test_finetuning_changes_only_the_encoder(store: Path, small_prior: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    res = run_train("--store", store, "--model", "vqgan-ft-s", "--prior", small_prior, "--iters", "3", "--out", out,
                    *BASE)
    assert res.exit_code == 0, res.output
    prior = torch.load(small_prior, weights_only=False)["state_dict"]
    for weights in (torch.load(out / "model.pt", weights_only=False)["ema"],
                    torch.load(out / "ckpt.pt", weights_only=False)["model"]):
        assert set(weights) == set(prior)
        encoder = [k for k in prior if k.startswith(("encoder.", "quant_conv."))]
        frozen = [k for k in prior if k not in encoder]
        assert frozen and all(torch.equal(weights[k], prior[k]) for k in frozen)  # bit-identical
        assert any(not torch.equal(weights[k], prior[k]) for k in encoder)  # the encoder did train
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["prior"] == str(small_prior)
    assert config["parameters"] == sum(v.numel() for k, v in prior.items() if k.startswith(("encoder.", "quant_c")))


def test_prior_option_errors(store: Path, tmp_path: Path) -> None:
    res = run_train("--store", store, "--model", "vqgan-ft-s", "--iters", "1", "--out", tmp_path / "a", *BASE)
    assert res.exit_code == 2 and "--prior" in res.output and not (tmp_path / "a").exists()
    dummy = tmp_path / "p.pt"
    torch.save({"state_dict": VQGAN("tiny").state_dict()}, dummy)
    res = run_train("--store", store, "--model", "resnet-s", "--prior", dummy, "--iters", "1", "--out",
                    tmp_path / "b", *BASE)
    assert res.exit_code == 2 and "takes no prior" in res.output
    res = run_train("--store", store, "--model", "vqgan-ft-s", "--prior", dummy, "--iters", "1", "--out",
                    tmp_path / "c", *BASE)  # a tiny prior does not fit the small model: keys named
    assert res.exit_code == 2 and "missing from the checkpoint" in res.output and not (tmp_path / "c").exists()


def test_plans_of_fig18_and_fig19(tmp_path: Path) -> None:
    sc, ps = R.SCALES["cpu"], R.PRIOR_SCALES["cpu"]
    specs = R.prior_sweeps("fig19", sc, ps, ("resnet-s", "unet-s", "swinir-s"), 1000, "/t", "/p/prior.pt",
                           noise=True)
    assert [s.key for s in specs] == ["prior-scratch-rain", "prior-ft-rain", "prior-scratch-noise", "prior-ft-noise"]
    for s in specs:
        has_prior = "--prior" in s.extra
        assert has_prior == (s.models == ("vqgan-ft-s",))
        a = dict(zip(s.extra[::2], s.extra[1::2]))
        assert a["--test-rain"] == s.test_rain and s.counts == (999,)
    assert specs[2].rains == (R.NOISE_TRAIN,) and specs[2].test_rain == R.NOISE_TEST
    assert specs[0].rains == ("medium",) and specs[0].test_rain == R.TEST_RAIN
    fig18 = R.prior_sweeps("fig18", sc, ps, ("vqgan-noquant-s",), 1000, "/t", "/p/prior.pt", noise=True)
    assert [s.key for s in fig18] == ["prior-scratch-rain", "prior-ft-rain"]  # shares fig19's folders


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fig19_then_fig18_tiny_end_to_end(tmp_path: Path) -> None:
    from engine.cli.reproduce import reproduce as reproduce_cmd

    runner = CliRunner()
    # one scratch family keeps the test short (each run is a train.py process); the default is all three
    res = runner.invoke(reproduce_cmd, ["fig19", "--scale", "tiny", "--model", "resnet", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "prior" / "prior.pt").exists()
    rows = read_csv(tmp_path / "fig19" / "results.csv")
    halves = {"rain", "noise"} if R.noise_available() else {"rain"}
    assert {r["half"] for r in rows} == halves
    assert {r["model"] for r in rows} == {"resnet-s", "vqgan-ft-s"}
    assert len(rows) == 2 * len(halves) and all(r["status"] == "trained" for r in rows)
    assert all(r["E_R"] and r["E_R_seen"] for r in rows)
    report = (tmp_path / "fig19" / "report.md").read_text()
    assert "Does the prior help on unseen degradation?" in report and "against resnet-s" in report
    assert (tmp_path / "fig19" / "figures" / "fig19.png").exists()
    res = runner.invoke(reproduce_cmd, ["fig18", "--scale", "tiny", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "prior: reusing" in res.output
    rows = read_csv(tmp_path / "fig18" / "results.csv")
    assert [(r["model"], r["status"]) for r in rows] == [("vqgan-ft-s", "skipped (finished)"),
                                                         ("vqgan-noquant-s", "trained")]
    report = (tmp_path / "fig18" / "report.md").read_text()
    assert "% of the E_R ceiling on its training rain" in report


def test_ema_codebook_update_by_hand() -> None:
    from engine.experiments.prior_codebook import EMACodebook, restart_dead

    weight = torch.tensor([[0.0], [10.0], [20.0]])
    ema = EMACodebook(weight, decay=0.5, eps=0.0)
    ema.update(torch.tensor([[1.0], [3.0], [12.0]]), torch.tensor([0, 0, 1]))
    # sizes 0.5 * 1 + 0.5 * (2, 1, 0) = (1.5, 1, 0.5); sums 0.5 * (0, 10, 20) + 0.5 * (4, 12, 0) = (2, 11, 10)
    torch.testing.assert_close(weight, torch.tensor([[2 / 1.5], [11.0], [20.0]]))
    dead = restart_dead(weight, torch.tensor([3, 0, 1]), torch.tensor([[7.0]]), torch.Generator().manual_seed(0))
    assert dead.tolist() == [1] and weight[1, 0].item() == 7.0


def test_prior_with_ema_codebook_trains(store: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "e"
    metrics = train_prior(PriorConfig(store=str(store), out=str(out), config="tiny", iters=20, batch=4, lr=2e-3,
                                      log_every=10, codebook="ema", dead_every=0, device="cpu"), echo=lambda s: None)
    assert metrics["step"] == 20 and (out / "prior.pt").exists()
    lines = log(out)
    assert lines[-1]["rec_l1"] < lines[0]["rec_l1"]


def test_fig19_plan_defaults_to_all_three_families(tmp_path: Path, store: Path) -> None:
    from engine.experiments.reproduce import reproduce

    test_store = tmp_path / "t.zarr"
    blocks = np.random.default_rng(1).integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
    write_store(test_store, blocks.repeat(8, axis=1).repeat(8, axis=2), source=np.arange(8))
    lines = reproduce("fig19", "cpu", tmp_path / "o", store=store, test_store=test_store, plan_only=True,
                      echo=lambda s: None)
    assert lines[0].startswith("rainsweep prior ") and "--config small" in lines[0]
    runs = [line.split() for line in lines[1:]]
    models_ = [r[r.index("--model") + 1] for r in runs]
    assert sorted(set(models_)) == ["resnet-s", "swinir-s", "unet-s", "vqgan-ft-s"]
    for r in runs:
        assert ("--prior" in r) == (r[r.index("--model") + 1] == "vqgan-ft-s")
        assert r[r.index("--iters") + 1] == str(R.PRIOR_SCALES["cpu"].iters)
