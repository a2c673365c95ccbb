"""Score a finished run (its ``model.pt`` EMA weights) on another degradation of its own held-out backgrounds.

fig18 / fig19 need each model's E_R on the degradation it trained on (seen) beside the unseen one train.py scored:
the ablation of the paper's Fig. 18 fits the training rain and fails on unseen rain. Re-scoring the saved weights
costs one forward pass over the held-out set instead of a second training. The backgrounds are the run's own: the
same ``--test-store`` patches, count and ``--test-seed``; only the degradation differs. Metrics are
``engine.metrics.decoupled`` on the 0..255 scale, means over images, in full float32 on the CPU.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from engine.atomic import atomic_write_json

#: Metric names of a score.
METRICS = ("E_R", "E_B", "rain_residual", "PSNR")


class RescoreError(ValueError):
    """A run that cannot be re-scored (unfinished, or trained without a separate test store)."""


def score_file(run_dir: Path, rain: str) -> Path:
    """Where the score of ``run_dir`` on ``rain`` is kept."""
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in rain)
    return run_dir / "scores" / f"{safe}.json"


def score_run(run_dir: str | Path, rain: str, batch: int = 64) -> dict:
    """Metrics of the run in ``run_dir`` on its held-out backgrounds with ``rain`` (a preset or spec); cached in
    ``run_dir/scores/<rain>.json`` (reused when present).

    Returns
    -------
    dict
        ``METRICS`` (float means over images, 0..255 scale; PSNR in dB), ``E_R_ceiling``, ``rain`` and ``count``.

    Raises
    ------
    RescoreError
        For a run without ``model.pt`` or one whose held-out set came from its training store.
    """
    import torch

    import models
    from engine.data.store import open_store
    from engine.experiments.heldout import build_heldout
    from engine.metrics import decoupled
    from engine.rain import RainSpec

    run_dir = Path(run_dir)
    cached = score_file(run_dir, rain)
    if cached.exists():
        return json.loads(cached.read_text())
    if not (run_dir / "model.pt").exists():
        raise RescoreError(f"{run_dir}: no model.pt (the run has not finished)")
    config = json.loads((run_dir / "config.json").read_text())
    tc = config["train_config"]
    if not tc.get("test_store"):
        raise RescoreError(f"{run_dir}: trained without --test-store; its held-out set depends on its training "
                           f"subset and is not re-scored here")
    store, test_store = open_store(tc["store"]), open_store(tc["test_store"])
    held = build_heldout(store, np.zeros(0, dtype=np.int64), RainSpec.parse(rain), count=config["heldout"]["count"],
                         seed=tc["test_seed"], test_store=test_store)
    net = models.build(config["model"])
    net.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)["ema"])
    net.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(held.rainy), batch):
            x = torch.from_numpy(np.ascontiguousarray(held.rainy[i:i + batch])).permute(0, 3, 1, 2).float() / 255.0
            outs.append((net(x) * 255.0).permute(0, 2, 3, 1).numpy())
    m = decoupled(np.concatenate(outs), held.rainy, held.background, held.mask)
    diff = held.rainy.astype(np.float64) - held.background
    ceiling = np.sqrt((held.mask[..., None] * diff ** 2).sum(axis=(1, 2, 3))
                      / np.maximum(held.mask.sum(axis=(1, 2)) * 3, 1))
    with warnings.catch_warnings():  # an image without degraded pixels has no E_R (NaN); all NaN gives NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        result = {k: float(np.nanmean(np.asarray(m[k], dtype=np.float64))) for k in METRICS}
    result.update({"E_R_ceiling": float(np.nanmean(ceiling)), "rain": rain, "count": int(len(held.indices))})
    atomic_write_json(cached, result, indent=2)
    return result
