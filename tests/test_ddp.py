"""torchrun with 2 CPU processes (gloo): trains, rank 0 writes the usual layout, and the result equals a
single-process run with the same global batch (the loader's shards together hold the same consecutive patches,
and DDP averages the gradients of the two halves)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.store import write_store

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, size=(16, 4, 4, 3)).astype(np.float64)
    patches = np.repeat(np.repeat(small, 8, axis=1), 8, axis=2).astype(np.uint8)
    store = tmp_path / "s.zarr"
    write_store(store, patches, source=np.arange(16) % 4)
    args = ["--store", str(store), "--model", "resnet-s", "--batch", "4", "--count", "8", "--test-count", "4",
            "--iters", "4", "--log-every", "2", "--device", "cpu"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train.py"), *args, "--out", str(tmp_path / "ddp")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    # the single-process reference runs in this process (saves a torch start-up on the small CI machine)
    import train
    from click.testing import CliRunner

    single = CliRunner().invoke(train.main, [*args, "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert single.exit_code == 0, single.output

    out = tmp_path / "ddp"
    for name in ("config.json", "log.jsonl", "metrics.json", "ckpt.pt", "model.pt", "samples.png"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2
    # one log line per logging step: only rank 0 wrote
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 4]  # two training lines and the final evaluation line
    a = torch.load(out / "model.pt", weights_only=False)["ema"]
    b = torch.load(tmp_path / "one" / "model.pt", weights_only=False)["ema"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one"))
    assert ma["E_B"] == pytest.approx(mb["E_B"], rel=1e-3)
