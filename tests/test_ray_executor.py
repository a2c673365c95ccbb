"""``rainsweep sweep --executor ray`` against a real Ray cluster that this module starts on 127.0.0.1.

Ray probes a public address on start to learn its own IP and binds to the machine's interface, so the cluster runs in
a network namespace made here with only loopback up (``unshare -n``, then ``ip link set lo up``), started with
``--node-ip-address 127.0.0.1``; every sweep driver joins that namespace (``nsenter --net``). One cluster (two CPUs)
serves the whole module and is stopped at its end, success or failure: every process in the namespace is ended by
its pid. Skipped, with the reason, where Ray is not installed or namespaces cannot be made (not root).

The references are independent of Ray: the same sweep command with the local executor, and on the CPU a resumed run
ends with exactly the weights of an uninterrupted one, so the metrics must agree exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli.train import sweep as sweep_cli
from engine.data.store import write_store
from engine.experiments import sweep as sw
from engine.experiments.executors.base import Unit, path_problem, visible_token_path
from engine.experiments.executors.ray_executor import HEADER, LogFollower

ROOT = Path(__file__).resolve().parents[1]
PORT = 6379
ITERS = 24
COUNTS = ("4", "8")
# Tiny runs, one thread each, a checkpoint every 4 steps (the kill test resumes from one). Held-out rain of the
# streak family: on 16-pixel patches it leaves rain pixels in every held-out set, so E_R is a number to compare.
TRAIN = ("--batch", "4", "--device", "cpu", "--train-arg=--test-count=4", "--train-arg=--log-every=4",
         "--train-arg=--threads=1", "--train-arg=--ckpt-every=4", "--view-every", "1")


def sweep_args(store: Path, out: Path, counts: tuple[str, ...] = COUNTS) -> list[str]:
    return ["--store", str(store), "--counts", ",".join(counts), "--rain", "medium", "--test-rain", "medium",
            "--model", "resnet-s", "--iters", str(ITERS), "--out", str(out), *TRAIN]


def namespaces_work() -> str | None:
    """None when this process can make a network namespace with loopback up, else why not."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    res = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    return None if res.returncode == 0 else f"cannot make a network namespace: {res.stderr.strip()}"


def net_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def listeners(pid: int) -> list[str]:
    """Local addresses (hex ip:port, as /proc shows them) of every TCP socket listening and every UDP socket bound in
    the network namespace of ``pid``."""
    found = []
    for name, wanted in (("tcp", "0A"), ("tcp6", "0A"), ("udp", None), ("udp6", None)):
        path = Path(f"/proc/{pid}/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if wanted is None or fields[3] == wanted:
                found.append(fields[1])
    return found


#: 127.0.0.1, ::ffff:127.0.0.1 and ::1 as /proc/net writes them (32-bit words in host order)
LOOPBACK = ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")


@dataclass
class Cluster:
    """A Ray head started in its own network namespace; ``holder`` is its ``ray start --block`` process."""

    holder: subprocess.Popen
    env: dict
    address: str = f"127.0.0.1:{PORT}"
    ns: str | None = None  # the namespace's identity (``/proc/PID/ns/net`` link), once the head runs

    @property
    def netns(self) -> str:
        return f"--net=/proc/{self.holder.pid}/ns/net"

    def run(self, argv: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        """``argv`` inside the cluster's network namespace, output captured."""
        return subprocess.run(["nsenter", self.netns, *argv], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def sweep(self, args: list[str], *wrap: str) -> subprocess.CompletedProcess:
        """``rainsweep sweep ARGS --executor ray`` inside the namespace (after ``wrap``, a command prefix)."""
        cli = [sys.executable, "-m", "engine.cli", "sweep", *args, "--executor", "ray", "--address", self.address]
        return self.run([*wrap, *cli])

    def members(self) -> list[int]:
        """Pids of every process in the cluster's network namespace but the holder."""
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        return [p for p in pids if p != self.holder.pid and self.ns is not None and net_namespace(p) == self.ns]


def stop(cluster: Cluster) -> None:
    """End every process of the cluster by pid: SIGTERM, then SIGKILL what is left after 10 s."""
    members = cluster.members()
    for pid in [cluster.holder.pid, *members]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in members):
        time.sleep(0.2)
    for pid in [*members, cluster.holder.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.holder.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    pytest.importorskip("ray", reason='Ray is not installed (pip install "rainsweep[ray]")')
    why = namespaces_work()
    if why:
        pytest.skip(why)
    temp = tempfile.mkdtemp(prefix="rsray-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # no token authentication (a loopback-only cluster), so nothing depends on or is written to ~/.ray
    env["RAY_AUTH_MODE"] = "disabled"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    start = (f"ip link set lo up && exec {ray_cli} start --head --block --node-ip-address 127.0.0.1 --port {PORT} "
             f"--num-cpus 2 --num-gpus 0 --include-dashboard false --disable-usage-stats "
             f"--object-store-memory 100000000 --temp-dir {temp}")
    log = Path(temp) / "head.out"
    with open(log, "w") as f:
        holder = subprocess.Popen(["unshare", "-n", "sh", "-c", start], stdout=f, stderr=subprocess.STDOUT, env=env)
    c = Cluster(holder, env)
    try:
        deadline = time.time() + 180
        while c.ns is None and holder.poll() is None and time.time() < deadline:
            ns = net_namespace(holder.pid)  # the parent's until unshare has made the new one
            c.ns = ns if ns != net_namespace(os.getpid()) else None
            time.sleep(0.01)
        while "Ray runtime started" not in log.read_text():
            if holder.poll() is not None or time.time() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield c
    finally:
        stop(c)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(11)
    small = rng.integers(0, 256, size=(24, 4, 4, 3)).astype(np.float64)
    patches = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2).astype(np.uint8)  # 16 x 16 patches
    path = tmp_path_factory.mktemp("ray-store") / "s.zarr"
    write_store(path, patches, source=np.arange(24) % 6)
    return path


@pytest.fixture(scope="module")
def local_sweep(store: Path, tmp_path_factory) -> Path:
    """The reference: the same sweep command with the local executor."""
    out = tmp_path_factory.mktemp("local") / "sw"
    res = CliRunner().invoke(sweep_cli, [*sweep_args(store, out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    return out


def result_files(out: Path) -> dict[str, bytes]:
    files = ["results.csv", "results.json", *(f"figures/{p.name}" for p in (out / "figures").iterdir()),
             *(f"samples/{p.name}" for p in (out / "samples").iterdir())]
    return {f: (out / f).read_bytes() for f in sorted(files)}


# ---- the pieces, without a cluster -----------------------------------------------------------------------------

def test_a_unit_resumes_once_a_run_folder_holds_a_checkpoint(tmp_path: Path) -> None:
    runs = (tmp_path / "a", tmp_path / "b")
    unit = Unit("g", ("/driver/python", "-P", "-m", "train", "--out", str(runs[0])), runs, tmp_path / "g.out")
    assert unit.command() == list(unit.argv) and not unit.resumes()
    runs[1].mkdir()
    (runs[1] / "ckpt.pt").write_bytes(b"")
    assert unit.command("/node/python") == ["/node/python", *unit.argv[1:], "--resume"]
    assert Unit("g", unit.argv, runs, unit.log, resume_flag=None).command() == list(unit.argv)


def test_the_log_follower_hands_out_complete_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "train.out"
    log.write_text("from an earlier attempt\n")
    follow = LogFollower(log)
    assert follow.new_lines() == []
    with open(log, "a") as f:
        f.write("one\ntw")
    assert follow.new_lines() == ["one"]
    with open(log, "a") as f:
        f.write("o\nthr")
    assert follow.new_lines() == ["two"] and follow.new_lines(final=True) == ["thr"]
    assert LogFollower(tmp_path / "missing").new_lines(final=True) == []


def test_path_problems_name_the_option_and_the_path(tmp_path: Path) -> None:
    assert path_problem("--store", tmp_path) is None
    assert path_problem("--store", tmp_path / "s.zarr") == f"--store {tmp_path}/s.zarr: does not exist here"
    assert "cannot read .rainsweep-visible" in path_problem("--out", tmp_path, "t0")
    visible_token_path(tmp_path).write_text("t0")
    assert path_problem("--out", tmp_path, "t0") is None and list(tmp_path.iterdir()) == [visible_token_path(tmp_path)]
    assert "a different folder of that name" in path_problem("--out", tmp_path, "t1")


# ---- against a Ray cluster ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_sweep_equals_the_local_sweep(cluster: Cluster, store: Path, local_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "sw"
    res = cluster.sweep(sweep_args(store, out))
    assert res.returncode == 0, res.stdout + res.stderr
    ours, theirs = result_files(out), result_files(local_sweep)
    assert sorted(ours) == sorted(theirs) and len(ours) >= 6
    for name in theirs:
        assert ours[name] == theirs[name], name  # results.csv, results.json, figures and samples, byte for byte
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["trained", "trained"]
    assert all(np.isfinite([r[k] for k in sw.METRICS]).all() for r in rows)
    for r in rows:
        assert f"{r['run']} | {HEADER}node 127.0.0.1" in res.stdout  # each run's lines reach the driver
        assert f"{r['run']} | step {ITERS}/{ITERS}" in res.stdout
    assert "sweep: 2 cells:" in res.stdout  # the live view
    # Rerun with the other executor: nothing is trained again.
    again = CliRunner().invoke(sweep_cli, sweep_args(store, out))
    assert again.exit_code == 0, again.output
    assert [r["status"] for r in json.loads((out / "results.json").read_text())] == ["skipped (finished)"] * 2
    # Every socket the cluster listens on is on loopback (its workers have started by now).
    found = listeners(cluster.holder.pid)
    assert found and all(addr.split(":")[0] in LOOPBACK for addr in found), found
    assert not (out / ".rainsweep-visible").exists()


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_resumes(cluster: Cluster, store: Path, local_sweep: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "sw"
    cfg = sw.RunConfig("resnet-s", "medium", 4)
    run_dir = out / "runs" / cfg.name
    # The reference sweep's cells (same held-out set: its largest count is 8); n8 fails on its own (a corrupt
    # checkpoint), which must not stop n4.
    args = [*sweep_args(store, out), "--train-arg=--heldout-exclude-count=8"]
    broken = out / "runs" / "resnet-s_medium_n8_s0" / "ckpt.pt"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    extra = ["--batch", "4", "--device", "cpu", *(a.split("=", 1)[1] for a in TRAIN if a.startswith("--train-arg")),
             "--heldout-exclude-count=8"]
    # That cell in a local sweep preempted after its checkpoint at step 8: the Ray sweep takes it over.
    unit = sw.cell_unit(cfg, store, out, ITERS, extra, test_rain="medium")
    pre = subprocess.run([*unit.command(), "--stop-after", "8"], env=cluster.env, capture_output=True, text=True,
                         timeout=600)
    assert pre.returncode == 0 and (run_dir / "ckpt.pt").exists(), pre.stdout + pre.stderr
    log_path = tmp_path / "driver.out"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(["nsenter", cluster.netns, sys.executable, "-m", "engine.cli", "sweep", *args,
                                   "--executor", "ray", "--address", cluster.address, "--max-retries", "2"],
                                  env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # The first attempt's worker, once its training process runs: SIGKILL it mid-cell.
        deadline, worker, child = time.time() + 300, 0, None
        while child is None:
            assert time.time() < deadline and driver.poll() is None, log_path.read_text()
            text = (run_dir / "train.out").read_text() if (run_dir / "train.out").exists() else ""
            heads = [ln for ln in text.splitlines() if ln.startswith(HEADER)]
            if heads:
                worker = int(heads[0].split("worker pid ")[1].split(",")[0])
                child = next((int(p) for p in os.listdir("/proc") if p.isdigit() and parent(int(p)) == worker), None)
            time.sleep(0.05)
        os.kill(worker, signal.SIGKILL)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 1, log_path.read_text()
    assert "1 run(s) failed: resnet-s_medium_n8_s0" in log_path.read_text()
    deadline = time.time() + 30
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)  # the training process died with its worker: no orphan races the retry
    text = (run_dir / "train.out").read_text()
    heads = [ln for ln in text.splitlines() if ln.startswith(HEADER)]
    assert len(heads) == 2 and heads[0] != heads[1] and all(h.endswith(", resuming") for h in heads), heads
    resumed = re.findall(r"resuming at step (\d+) of 24", text)
    assert resumed and int(resumed[-1]) >= 8
    row, bad = json.loads((out / "results.json").read_text())
    assert row["status"] == "trained"
    assert bad["status"] == "failed (exit 1)" and bad["error"] and bad["E_R"] is None
    reference = local_sweep / "runs" / cfg.name
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert (run_dir / "samples.png").read_bytes() == (reference / "samples.png").read_bytes()
    # The status view of the finished sweep.
    status = CliRunner().invoke(sweep_cli, ["--status", str(out)])
    assert status.exit_code == 0 and "2 cells: 1 done, 0 running, 1 failed, 0 queued" in status.output
    assert "attempt 2" in status.output and "not running" in status.output


def parent(pid: int) -> int:
    """The parent pid of ``pid`` (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_path_workers_cannot_see_is_named(cluster: Cluster, store: Path, tmp_path: Path) -> None:
    # The driver mounts a private tmpfs (its own mount namespace) and puts the sweep folder and a copy of the store
    # there: the driver sees both, the cluster's workers see neither.
    private = tmp_path / "private"
    private.mkdir()
    setup = f"mount -t tmpfs rs-private {private} && cp -r {store} {private}/s.zarr && exec \"$@\""
    res = cluster.sweep(sweep_args(private / "s.zarr", private / "out"), "unshare", "-m", "sh", "-c", setup, "sh")
    if "mount" in res.stderr and "permission denied" in res.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"--out {private}/out: cannot read .rainsweep-visible" in res.stderr
    assert f"--store {private}/s.zarr: does not exist here" in res.stderr
    assert "Ray node 127.0.0.1" in res.stderr and "shared storage" in res.stderr
    assert not list(private.iterdir())  # nothing was written where the workers look
