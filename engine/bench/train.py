"""Training throughput: K runs of one model trained fused, as K processes at once, and one run alone.

``run_train_bench`` is what ``rainsweep bench --train`` calls. Every case runs the real trainers as subprocesses
(``python -P -m train`` for a run alone and for each of K processes, ``python -P -m train_fused`` for K runs fused)
on a temporary store of random patches with medium rain, and reads their own log.jsonl: the trainers log
``patches_per_s`` and ``data_wait`` over each ``--log-every`` window, data wait included. A case trains three
windows of ``steps`` steps and reports the middle one: the first holds start-up (first batches, allocator and
cuDNN warm-up), and the third keeps every process of a K-process case busy while the others finish their middle
window, so the K middle windows overlap.

Rates are patches/s of all K runs together. ``sequential`` is the rate of one run alone (K runs one after another
train at that rate), ``processes`` the sum of K concurrent train.py processes (each with ``cores // K`` CPU threads,
at least 1), ``fused`` K times one fused run's rate.

``pick_fuse_k`` (``rainsweep sweep --fuse auto``) times fused steps alone, on random data: the largest K, doubling
from 1, whose step takes less than ``ratio * K`` times the single model's.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

#: Models, group sizes, patch side and per-run batch of the full benchmark (issue "Fused sweeps").
MODELS = ("resnet-s", "resnet", "unet-s", "swinir-s")
KS = (1, 2, 4, 8, 16)
GPU_KS = (*KS, 32)
MODES = ("sequential", "processes", "fused")


# ---- fused step time (sweep --fuse auto) -----------------------------------------------------------------------------

def step_time(model: str, k: int, batch: int, patch: int, device: str = "cpu", steps: int = 3) -> float:
    """Median seconds of one fused training step of ``k`` streams (forward, per-stream L1, backward, StreamAdam),
    on random float32 ``[k, batch, 3, patch, patch]`` images in 0..1, bf16 autocast on CUDA, after one step off the
    clock.

    Parameters
    ----------
    model : str
        A name in ``models.NAMES``.
    k, batch, patch : int
        Streams, patches per stream and step, patch side in pixels.
    device : str
        "cpu", "cuda" or "auto".
    steps : int
        Timed steps (at least 1).

    Returns
    -------
    float
        Seconds per step (the median of ``steps``).
    """
    import torch

    from models.fused import StreamAdam, build_fused, stream_l1

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    net = build_fused(model, k).to(dev)
    opt = StreamAdam(net.parameters(), k, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(k, batch, 3, patch, patch, generator=gen).to(dev)
    y = torch.rand(k, batch, 3, patch, patch, generator=gen).to(dev)
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def one() -> float:
        t0 = time.perf_counter()
        with cast:
            loss = stream_l1(net(x), y).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    one()
    return statistics.median(one() for _ in range(max(1, steps)))


def pick_fuse_k(model: str, batch: int, patch: int, device: str = "auto", max_k: int = 64, ratio: float = 0.9,
                steps: int = 3, echo: Callable[[str], None] = print,
                timer: Callable[..., float] = step_time) -> int:
    """The largest K (1, 2, 4, ... up to ``max_k``) whose fused step time grows sub-linearly:
    ``time(K) < ratio * K * time(1)`` for it and every smaller power of two. Says what it measured and picked.

    Parameters
    ----------
    model : str
        A name in ``models.NAMES``.
    batch, patch : int
        Patches per run and step, patch side in pixels.
    device : str
        "cpu", "cuda" or "auto".
    max_k : int
        Largest K worth trying (e.g. the number of runs to group).
    ratio : float
        How much less than linear a step must grow to be worth fusing (0.9: at least 10 % faster than K single
        steps).
    steps : int
        Timed steps per K.
    echo : callable
        Gets one line per K measured and one with the choice.
    timer : callable
        ``timer(model, k, batch, patch, device, steps)`` -> seconds per step (``step_time``; tests pass another).

    Returns
    -------
    int
        The group size; 1 means fusing does not pay on this device.
    """
    t1 = timer(model, 1, batch, patch, device, steps)
    echo(f"fuse auto ({model}, batch {batch}, {patch} px, {device}): K=1 step {1000 * t1:.1f} ms")
    best, k, why = 1, 2, f"K={max_k} is the largest group the runs allow"
    while k <= max_k:
        try:
            tk = timer(model, k, batch, patch, device, steps)
        except RuntimeError as err:  # out of device memory
            why = f"K={k} failed ({str(err).splitlines()[0][:80]})"
            break
        share = tk / (k * t1)
        echo(f"fuse auto ({model}): K={k} step {1000 * tk:.1f} ms = {share:.2f} x K single steps")
        if share >= ratio:
            why = f"K={k} took {share:.2f} x the time of {k} single steps (not below {ratio})"
            break
        best, k = k, 2 * k
    else:
        if best == 1:
            why = f"only {max_k} run(s) to group"
    echo(f"fuse auto ({model}): picked K={best}: {why}")
    return best


# ---- the benchmark ---------------------------------------------------------------------------------------------------

def run_train_bench(models: Sequence[str] = MODELS, ks: Sequence[int] | None = None, patch: int = 128,
                    batch: int = 16, steps: int = 10, device: str = "auto", modes: Sequence[str] = MODES,
                    python: str = sys.executable, echo: Callable[[str], None] = print) -> list[dict]:
    """Patches/s of training, K runs together, for every model and K, in each of ``modes``.

    Parameters
    ----------
    models : sequence of str
        Model names.
    ks : sequence of int, optional
        Group sizes (default ``KS``, ``GPU_KS`` on CUDA).
    patch, batch : int
        Patch side in pixels and patches per run and step.
    steps : int
        Steps per log window; each case trains ``3 * steps`` and reports the middle window.
    device : str
        "cpu", "cuda" or "auto" (the trainers' ``--device``).
    modes : sequence of str
        Among ``MODES``.
    python : str
        The interpreter of the trainers.
    echo : callable
        Gets a line per case as it starts.

    Returns
    -------
    list of dict
        One row per (model, K): ``model``, ``K``, ``device``, ``patch``, ``batch``, the patches/s of every mode
        measured (``sequential``, ``processes``, ``fused``; all K runs together), ``fused_data_wait`` (share of the
        fused step spent waiting for data), the ratios ``fused_vs_sequential``, ``fused_vs_processes``, and
        ``load`` (the machine's 1-minute load average as the row ends).
    """
    import torch

    from engine.bench.loader import synthetic_store

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes: unknown {bad}; expected some of {', '.join(MODES)}")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    ks = tuple(ks or (GPU_KS if dev == "cuda" else KS))
    rows = []
    with synthetic_store(patches=max(64, 2 * batch + 16), patch_size=patch) as store, \
            tempfile.TemporaryDirectory(prefix="rainsweep-train-bench-") as tmp:
        case = Case(store, Path(tmp), patch, batch, steps, dev, python)
        for model in models:
            single = None
            if "sequential" in modes:
                echo(f"  timing {model}: one run alone ({dev})")
                single = case.rate(model, 1, "single")
            for k in ks:
                row = {"model": model, "K": k, "device": dev, "patch": patch, "batch": batch}
                if single is not None:
                    row["sequential"] = single[0]
                if "processes" in modes:
                    echo(f"  timing {model}: {k} processes at once")
                    row["processes"] = single[0] if k == 1 and single else case.rate(model, k, "processes")[0]
                if "fused" in modes:
                    echo(f"  timing {model}: {k} runs fused")
                    row["fused"], row["fused_data_wait"] = case.rate(model, k, "fused")
                for other in ("sequential", "processes"):
                    if "fused" in row and row.get(other):
                        row[f"fused_vs_{other}"] = row["fused"] / row[other]
                # the 1-minute load average as the row's cases end: on a shared machine concurrent processes take
                # a larger share of the cores than one fused process, so the load says how far to trust a ratio
                row["load"] = os.getloadavg()[0]
                rows.append(row)
    return rows


class Case:
    """Runs the trainers for one benchmark: where, on what, how long."""

    def __init__(self, store: str, tmp: Path, patch: int, batch: int, steps: int, device: str, python: str) -> None:
        self.store, self.tmp, self.patch, self.batch, self.steps = store, tmp, patch, batch, steps
        self.device, self.python, self.n = device, python, 0

    def run_args(self, model: str, seed: int, out: Path, threads: int) -> list[str]:
        """train.py's arguments for one benchmark run: ``3 * steps`` steps, a log line per ``steps``."""
        return ["--store", self.store, "--count", str(self.batch + 8), "--test-count", "4", "--rain", "medium",
                "--model", model, "--batch", str(self.batch), "--iters", str(3 * self.steps),
                "--log-every", str(self.steps), "--ckpt-every", str(3 * self.steps), "--seed", str(seed),
                "--device", self.device, "--threads", str(threads), "--out", str(out)]

    def rate(self, model: str, k: int, how: str) -> tuple[float, float]:
        """``(patches/s of all runs together, data wait share)`` of ``k`` runs trained ``how``: "single" (one run,
        k = 1), "processes" (k train.py processes at once) or "fused" (one train_fused process)."""
        from engine.experiments.logged_run import run_logged
        from engine.experiments.train_command import fused_argv, train_env, train_module_argv

        self.n += 1
        where = self.tmp / f"case{self.n}"
        outs = [where / f"run{j}" for j in range(k)]
        env = train_env(self.python)
        if how == "fused":
            group = where / "group.json"
            where.mkdir(parents=True)
            group.write_text(json.dumps({"runs": [self.run_args(model, j, o, 0) for j, o in enumerate(outs)]}))
            argvs = [fused_argv(group, where / "group", python=self.python)]
        else:
            threads = 0 if how == "single" else max(1, (os.cpu_count() or 1) // k)
            argvs = [[*train_module_argv(self.python), *self.run_args(model, j, o, threads)]
                     for j, o in enumerate(outs)]
        with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
            done = list(pool.map(lambda j: run_logged(argvs[j], where / f"trainer{j}.out", env=env),
                                 range(len(argvs))))
        failed = [d for d in done if d.returncode != 0]
        if failed:
            raise RuntimeError(f"{how} {model} x{k}: a trainer failed (exit {failed[0].returncode}): "
                               + " | ".join(failed[0].tail))
        windows = [self.middle_window(o) for o in outs]
        total = sum(w["patches_per_s"] for w in windows)
        return total, statistics.fmean(w["data_wait"] for w in windows)

    def middle_window(self, out: Path) -> dict:
        """The log.jsonl line of a run's second window (step ``2 * steps``)."""
        for line in (out / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "event" not in rec and rec["step"] == 2 * self.steps:
                return rec
        raise RuntimeError(f"{out / 'log.jsonl'} has no line for step {2 * self.steps}")


def format_train_rows(rows: Sequence[dict]) -> str:
    """The on-screen table of ``run_train_bench`` rows (patches/s of all K runs together)."""
    def rate(x: float | None) -> str:
        return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"

    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    header = ["model", "K", "device", "px", "sequential/s", "K processes/s", "fused/s", "fused/sequential",
              "fused/processes", "fused data wait", "load"]
    body = [[r["model"], str(r["K"]), r["device"], str(r["patch"]), rate(r.get("sequential")),
             rate(r.get("processes")), rate(r.get("fused")), ratio(r.get("fused_vs_sequential")),
             ratio(r.get("fused_vs_processes")),
             "-" if r.get("fused_data_wait") is None else f"{100 * r['fused_data_wait']:.1f} %",
             "-" if r.get("load") is None else f"{r['load']:.1f}"] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


__all__ = ["GPU_KS", "KS", "MODELS", "MODES", "format_train_rows", "pick_fuse_k", "run_train_bench", "step_time"]
