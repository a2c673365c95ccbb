"""``rainsweep bench --train`` (engine.bench.train): options, the table, and one tiny run of every mode on the CPU.
Speed itself is not asserted (that is the benchmark's job), only that every number is measured and consistent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.bench import train as TB
from engine.cli.bench import bench


@pytest.mark.parametrize("args,message", [
    (["--train-models", "vgg"], "--train-models"),
    (["--train-k", "0,2"], "--train-k"),
    (["--train-k", "two"], "--train-k"),
    (["--train-modes", "fused,threads"], "--train-modes"),
    (["--train-devices", "tpu"], "--train-devices"),
])
def test_bad_train_options_are_named(args: list[str], message: str) -> None:
    res = CliRunner().invoke(bench, ["--train", *args])
    assert res.exit_code == 2 and message in res.output


def test_the_table_shows_every_mode_and_the_ratios() -> None:
    rows = [{"model": "resnet-s", "K": 8, "device": "cpu", "patch": 64, "batch": 16, "sequential": 100.0,
             "processes": 90.0, "fused": 120.0, "fused_data_wait": 0.031, "fused_vs_sequential": 1.2,
             "fused_vs_processes": 120 / 90},
            {"model": "resnet-s", "K": 1, "device": "cpu", "patch": 64, "batch": 16, "fused": 99.5}]
    lines = TB.format_train_rows(rows).splitlines()
    assert len(lines) == 4 and "fused/sequential" in lines[0]
    assert lines[2].split()[4:] == ["100", "90.0", "120", "1.20x", "1.33x", "3.1", "%", "-"]
    assert lines[3].split()[4:] == ["-", "-", "99.5", "-", "-", "-", "-"]


def test_fused_step_time_is_measured() -> None:
    assert TB.step_time("resnet-s", 2, 1, 16, "cpu", steps=1) > 0


@pytest.mark.slow
def test_a_tiny_cpu_benchmark_measures_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench, ["--train", "--train-models", "resnet-s", "--train-k", "2", "--train-patch", "16",
                                     "--train-batch", "2", "--train-steps", "1", "--train-devices", "cpu",
                                     "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["devices"] == ["cpu"] and len(doc["settings"]["load_average"]) == 3
    (row,) = doc["train"]
    assert (row["model"], row["K"], row["device"], row["patch"], row["batch"]) == ("resnet-s", 2, "cpu", 16, 2)
    for mode in TB.MODES:
        assert row[mode] > 0, mode
    assert row["fused_vs_sequential"] == pytest.approx(row["fused"] / row["sequential"])
    assert row["fused_vs_processes"] == pytest.approx(row["fused"] / row["processes"])
    assert 0 <= row["fused_data_wait"] <= 1 and row["load"] >= 0
    assert "fused/processes" in res.output
