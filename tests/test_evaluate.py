"""Scoring on paired stores: whole images of several sizes against an independent per-image computation, and the
issue's must-show: a paired store made from known synthetic pairs scores a trained run exactly as the same pairs
synthesized on the fly (through rainsweep sweep --test-store, train.py and rainsweep evaluate)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import models
from engine.cli import main as cli
from engine.data.builtin_images import builtin_patches
from engine.data.paired_store import precompute_pairs, round_up
from engine.data.store import open_store, write_store
from engine.experiments.evaluate import EvaluateError, evaluate, find_runs
from engine.experiments.heldout import build_heldout, build_paired_heldout
from engine.experiments.scoring import rain_ceiling, score
from engine.rain import RainSpec
from engine.synth import synthesize

SIZES = [(40, 56), (56, 40), (44, 44), (40, 56)]


def write_pairs(folder: Path, clean: list[np.ndarray], rainy: list[np.ndarray], names: list[str]) -> Path:
    """Rain100L's layout: rain-<name>.png and norain-<name>.png in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for b, i, n in zip(clean, rainy, names):
        Image.fromarray(i).save(folder / f"rain-{n}.png")
        Image.fromarray(b).save(folder / f"norain-{n}.png")
    return folder


def save_model(run: Path, name: str = "resnet-s", seed: int = 0) -> torch.nn.Module:
    """A seeded, untrained network saved as train.py saves a finished run's model.pt."""
    torch.manual_seed(seed)
    net = models.build(name).eval()
    run.mkdir(parents=True, exist_ok=True)
    torch.save({"model": name, "ema": net.state_dict(), "step": 0}, run / "model.pt")
    return net


def independent_scores(net: torch.nn.Module, clean, rainy, masks, multiple: int) -> dict[str, float]:
    """Each image alone: reflect-padded to ``multiple``, run, cropped back; the formulas of docs/science.md on it."""
    per: dict[str, list[float]] = {k: [] for k in ("E_R", "E_B", "rain_residual", "PSNR", "ceiling")}
    for b, i, m in zip(clean, rainy, masks):
        h, w = b.shape[:2]
        x = np.pad(i, ((0, round_up(h, multiple) - h), (0, round_up(w, multiple) - w), (0, 0)), mode="reflect")
        with torch.no_grad():
            o = net(torch.from_numpy(x[None]).permute(0, 3, 1, 2).float() / 255)
        o = o.permute(0, 2, 3, 1)[0, :h, :w].double().numpy() * 255
        I, B, M = i.astype(np.float64), b.astype(np.float64), np.broadcast_to(m[..., None], o.shape)
        per["E_R"].append(np.sqrt(((o - I) ** 2)[M].mean()))
        per["E_B"].append(np.sqrt(((o - B) ** 2)[~M].mean()))
        per["rain_residual"].append(((o - B) ** 2)[M].mean())
        per["PSNR"].append(10 * np.log10(255 ** 2 / ((o - B) ** 2).mean()))
        per["ceiling"].append(np.sqrt(((B - I) ** 2)[M].mean()))
    return {k: float(np.mean(v)) for k, v in per.items()}


def test_whole_images_of_several_sizes_are_scored_on_their_own_sizes(tmp_path: Path) -> None:
    big = builtin_patches(len(SIZES), 64, seed=3, source="procedural")
    clean = [np.ascontiguousarray(big[k, :h, :w]) for k, (h, w) in enumerate(SIZES)]
    rainy = [np.asarray(synthesize(b[None], "heldout-sparse", seed=5, keys=np.array([k]), backend="reference").rainy)[0]
             for k, b in enumerate(clean)]
    folder = write_pairs(tmp_path / "Rain100L", clean, rainy, [f"{k:03d}" for k in range(1, 5)])
    precompute_pairs(folder, folder, tmp_path / "whole.zarr", multiple=16, progress=False)
    held = build_paired_heldout(tmp_path / "whole.zarr")
    assert held.sizes is not None and held.rainy.shape == (4, 64, 64, 3)
    masks = [held.mask[k, :h, :w] for k, (h, w) in enumerate(SIZES)]
    assert all(m.any() and not m.all() for m in masks)

    net = save_model(tmp_path / "run")
    torch.set_num_threads(1)
    want = independent_scores(net, clean, rainy, masks, multiple=16)
    metrics, output = score(net, held, torch.device("cpu"), batch=3)
    for k in ("E_R", "E_B", "rain_residual", "PSNR"):
        assert metrics[k] == pytest.approx(want[k], rel=1e-5), k
    assert rain_ceiling(held) == pytest.approx(want["ceiling"], rel=1e-12)
    assert output.shape == held.rainy.shape and not output[1, :, 48:].any()  # nothing beyond the padded region

    # rainsweep evaluate on the run folder: the same numbers, written to run/eval/whole.json with a sample sheet
    lines: list[str] = []
    result = evaluate([tmp_path / "run"], [tmp_path / "whole.zarr"], device="cpu", echo=lines.append)
    saved = json.loads((tmp_path / "run" / "eval" / "whole.json").read_text())
    assert saved == result[str((tmp_path / "run").resolve())]["whole"]
    assert saved["E_R"] == metrics["E_R"] and saved["E_R_ceiling"] == rain_ceiling(held)
    assert saved["test"]["kind"] == "paired" and saved["heldout"]["rain"] == "paired:whole.zarr"
    assert (tmp_path / "run" / "eval" / "whole.png").is_file()
    assert lines[0].startswith("run on whole: E_R ") and lines[0].endswith("4 images)")


def test_evaluate_refuses_what_it_cannot_score(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluateError, match="expected a model.pt file, a run folder"):
        find_runs(tmp_path / "empty")
    (tmp_path / "sweep" / "runs" / "a").mkdir(parents=True)
    with pytest.raises(EvaluateError, match="none of its runs has finished"):
        find_runs(tmp_path / "sweep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"not a model")
    images = list(builtin_patches(2, 16, source="procedural"))
    folder = write_pairs(tmp_path / "pairs", images, images, ["1", "2"])
    precompute_pairs(folder, folder, tmp_path / "p.zarr", progress=False)
    with pytest.raises(EvaluateError, match=r"model.pt: not a rainsweep model.pt"):
        evaluate([tmp_path / "run"], [tmp_path / "p.zarr"], device="cpu", echo=lambda s: None)
    with pytest.raises(EvaluateError, match="--store .*: store .*no such file"):
        evaluate([tmp_path / "run"], [tmp_path / "missing.zarr"], device="cpu")


@pytest.mark.slow
def test_paired_store_of_synthetic_pairs_scores_like_synthesis_on_the_fly(tmp_path: Path) -> None:
    # Dark backgrounds (every channel <= 191 < 255 - t) and beta = 1: the rain layer estimate then equals the
    # synthetic rain above the threshold, so both sets have the same mask (see engine.data.paired_store).
    patches = (builtin_patches(24, 32, seed=1, source="procedural").astype(np.uint16) * 3 // 4).astype(np.uint8)
    bg = write_store(tmp_path / "bg.zarr", patches, source=np.arange(24) % 6).path
    spec = "heldout-layered,beta=1"
    s = open_store(bg)
    synthetic = build_heldout(s, np.empty(0, np.int64), RainSpec.parse(spec), count=8, seed=1000, test_store=s)
    folder = write_pairs(tmp_path / "Rain100L", list(synthetic.background), list(synthetic.rainy),
                         [str(i) for i in synthetic.indices])
    precompute_pairs(folder, folder, tmp_path / "pairs.zarr", progress=False)
    paired = build_paired_heldout(tmp_path / "pairs.zarr")
    assert paired.sizes is None  # 32 x 32 images, a multiple of 16: scored in one pass like synthetic patches
    np.testing.assert_array_equal(paired.rainy, synthetic.rainy)
    np.testing.assert_array_equal(paired.background, synthetic.background)
    np.testing.assert_array_equal(paired.mask, synthetic.mask)

    # train through rainsweep sweep with the paired store as the test store (train.py scores on it)
    from engine.experiments.sweep import sweep

    rows = sweep(bg, [8], ["medium"], ["resnet-s"], iters=3, out=tmp_path / "sweep",
                 test_store=tmp_path / "pairs.zarr", extra=["--batch", "4", "--device", "cpu", "--threads", "1"],
                 echo=lambda line: None)
    run = tmp_path / "sweep" / "runs" / rows[0]["run"]
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["heldout"]["policy"] == "paired" and trained["heldout"]["count"] == 8

    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "sweep"), "--store", str(tmp_path / "pairs.zarr"),
                                   "--store", str(bg), "--test-rain", spec, "--test-count", "8", "--device", "cpu",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    on_pairs = json.loads((run / "eval" / "pairs.json").read_text())
    on_the_fly = json.loads((run / "eval" / "bg-custom.json").read_text())
    assert on_the_fly["heldout"]["policy"] == "test-store" and on_the_fly["heldout"]["count"] == 8
    for k in ("E_R", "E_B", "rain_residual", "PSNR", "E_R_ceiling"):
        assert on_pairs[k] == pytest.approx(on_the_fly[k], rel=1e-12, abs=1e-12), k
        assert on_pairs[k] == pytest.approx(trained[k], rel=1e-12), k
        assert rows[0][k] == pytest.approx(trained[k], rel=1e-12)
    with open(tmp_path / "sweep" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["pairs.E_R"]) == pytest.approx(on_pairs["E_R"])
    assert float(table[0]["bg-custom.E_B"]) == pytest.approx(on_the_fly["E_B"])
    assert float(table[0]["E_R"]) == pytest.approx(trained["E_R"])

    again = CliRunner().invoke(cli, ["evaluate", str(run / "model.pt"), "--store", str(tmp_path / "pairs.zarr"),
                                     "--device", "cpu"])
    assert again.exit_code == 0 and "reused" in again.output
    clash = CliRunner().invoke(cli, ["evaluate", str(run), "--store", str(bg), "--name", "pairs", "--device", "cpu"])
    assert clash.exit_code == 1 and "for another test set" in clash.output
