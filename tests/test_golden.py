"""Byte-identity against recorded digests: rain, composites, masks, metrics, stores, loader batches and a short
training run on fixed seeds must stay exactly what they were when ``tests/data/golden.json`` was recorded.

A refactor that changes any output byte fails here; a deliberate change of behaviour re-records the file with
``RAINSWEEP_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py`` and says why in its commit.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "data" / "golden.json"
RECORD = os.environ.get("RAINSWEEP_RECORD_GOLDEN") == "1"

SYNTH_PRESETS = ("small", "medium", "large", "random", "table1-small", "table1-medium", "table1-large",
                 "heldout-layered", "heldout-sparse", "medium,pad=60")


def digest(x) -> str:
    """sha256 of an array's dtype, shape and bytes (a torch tensor is taken to the host first)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.view(__import__("torch").int16)
        x = x.numpy()
    a = np.ascontiguousarray(np.asarray(x))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def compare(name: str, got: dict) -> None:
    """Check ``got`` against the recorded entry ``name`` (or record it)."""
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if RECORD:
        recorded[name] = got
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert name in recorded, f"{name} was never recorded in {GOLDEN}"
    want = recorded[name]
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not diff, f"{name}: outputs changed for {diff[:8]}"


@pytest.fixture(scope="module")
def backgrounds() -> np.ndarray:
    from engine.data.builtin_images import builtin_patches

    return builtin_patches(12, 64, seed=3)


def test_synthesis_is_byte_identical(backgrounds: np.ndarray) -> None:
    from engine.synth import synthesize

    keys = np.arange(100, 100 + len(backgrounds), dtype=np.int64) * 7
    got = {}
    for preset in SYNTH_PRESETS:
        r = synthesize(backgrounds, preset, seed=11, keys=keys, backend="cpu")
        for field in ("rainy", "rain", "mask", "beta"):
            got[f"{preset}/{field}"] = digest(getattr(r, field))
    compare("synthesis", got)


def test_metrics_are_byte_identical(backgrounds: np.ndarray) -> None:
    from engine import metrics
    from engine.synth import synthesize

    r = synthesize(backgrounds, "medium", seed=5, backend="cpu")
    out = np.clip(backgrounds.astype(np.float32) * 0.9 + 7.5, 0, 255)
    got = {"sharpness": digest(metrics.sharpness(backgrounds)),
           "complexity": digest(metrics.complexity(backgrounds))}
    for k, v in metrics.decoupled(out, r.rainy, backgrounds, r.mask).items():
        got[f"decoupled/{k}"] = digest(v)
    compare("metrics", got)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, backgrounds: np.ndarray) -> Path:
    from engine.data.store import write_store

    path = tmp_path_factory.mktemp("golden") / "s.zarr"
    write_store(path, backgrounds, source=np.arange(len(backgrounds)) % 4)
    return path


def test_store_is_byte_identical(small_store: Path, tmp_path: Path) -> None:
    from engine.data.precompute import precompute
    from engine.data.store import open_store

    s = open_store(small_store)
    got = {"write/patches": digest(s.read_all()), "write/sharpness": digest(s.sharpness),
           "write/complexity": digest(s.complexity), "write/complexity_profile": digest(s.complexity_profile),
           "write/fingerprint": s.fingerprint}
    precompute(["builtin:procedural"], tmp_path / "p.zarr", patch=64, stride=64, progress=False)
    p = open_store(tmp_path / "p.zarr")
    got.update({"precompute/patches": digest(p.read_all()), "precompute/sharpness": digest(p.sharpness),
                "precompute/complexity": digest(p.complexity),
                "precompute/complexity_profile": digest(p.complexity_profile), "precompute/source": digest(p.source),
                "precompute/origin": digest(p.origin), "precompute/category": digest(p.category),
                "precompute/fingerprint": p.fingerprint})
    compare("store", got)


@pytest.mark.parametrize("mode", ["resident", "dali"])
def test_loader_batches_are_byte_identical(small_store: Path, mode: str) -> None:
    from engine.loader import batches

    got = {}
    for dtype in ("float32", "bfloat16", "uint8"):
        for epoch in (0, 3):
            for i, b in enumerate(batches(str(small_store), subset=np.arange(1, 11), batch_size=4, rain="medium",
                                          seed=2, epoch=epoch, device="cpu", mode=mode, dtype=dtype)):
                for field in ("index", "background", "rainy", "rain", "mask"):
                    got[f"{dtype}/{epoch}/{i}/{field}"] = digest(getattr(b, field))
    compare(f"loader/{mode}", got)


def test_training_is_byte_identical(small_store: Path, tmp_path: Path) -> None:
    import torch
    from click.testing import CliRunner

    import train

    torch.set_num_threads(1)
    out = tmp_path / "run"
    res = CliRunner().invoke(train.main, ["--store", str(small_store), "--model", "resnet-s", "--batch", "4",
                                          "--count", "6", "--test-count", "4", "--iters", "5", "--ckpt-every", "2",
                                          "--device", "cpu", "--seed", "4", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ema = torch.load(out / "model.pt", weights_only=False)["ema"]
    got = {f"ema/{k}": digest(v) for k, v in ema.items()}
    m = json.loads((out / "metrics.json").read_text())
    got.update({f"metrics/{k}": repr(m[k]) for k in ("E_R", "E_B", "PSNR", "rain_residual", "E_R_ceiling")})
    compare("train", got)
