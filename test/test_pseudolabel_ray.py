"""--backend ray on a running cluster: a real Ray head (`ray start --head`, loopback only) joined with
--ray-address gives the local backend's labels; each worker reserves a CPU, and a GPU with --device cuda; a run
that no node can host is refused at once instead of waiting forever."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import RAY_LOOPBACK_ENV, REPO, cpu_seconds, kitti_sequence, ray_loopback, wait_until

from sal_ros.data.pseudolabels import load_pseudolabels
from sal_ros.pseudolabel.engine import EngineConfig, run

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter's Ray
HEAD_CPUS, HEAD_GPUS = 2, 1  # logical resources: the GPU need not exist for Ray to reserve it
SMALL = ["--masks", "slic", "--slic-segments", 30, "--no-tokens", "--no-refine", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    """Loopback only (RAY_LOOPBACK_ENV; and Ray otherwise maps 127.0.0.1 to the interface address), and a token
    of this test's own (Ray's `ray start` enables token authentication; ~/.ray stays untouched)."""
    return {**os.environ, **RAY_LOOPBACK_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32), "OMP_NUM_THREADS": "1"}


def _wait_for_head(proc, log: Path, stall_s: float = 120) -> None:
    def check():
        assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"

    wait_until(lambda: "Ray runtime started" in log.read_text(), "ray start", check=check, stall_s=stall_s,
               progress=lambda: round(cpu_seconds(proc.pid), 1), poll_s=0.5)


@pytest.fixture(scope="module")
def ray_head():
    """A head on 127.0.0.1 with its own temp folder (short: Ray's unix sockets live there), so `ray.init()` of
    other programs on this machine never finds it. Teardown kills the process group this fixture started:
    `ray stop` would stop every Ray instance of the user on the machine, not only this one."""
    port, env = _free_port(), _ray_env()
    temp = Path(tempfile.mkdtemp(prefix="sal-ray-", dir="/tmp"))
    log = temp / "head.log"
    cmd = [*RAY, "start", "--head", "--port", port, "--node-ip-address", "127.0.0.1", "--num-cpus", HEAD_CPUS,
           "--num-gpus", HEAD_GPUS, "--disable-usage-stats", "--include-dashboard=false", "--temp-dir", temp,
           "--block"]
    with open(log, "w") as out:
        proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_head(proc, log)
        yield f"127.0.0.1:{port}", env, proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the head's processes share its group (and die with it)
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _pseudolabel(cwd: Path, env: dict, *args) -> dict:
    cmd = [sys.executable, "-m", "sal_ros.cli", "pseudolabel", *map(str, args)]
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same_labels(a: Path, b: Path, keys) -> None:
    for key in keys:
        x, y = load_pseudolabels(a / f"{key}.npz"), load_pseudolabels(b / f"{key}.npz")
        assert x.num_instances > 0 and x.meta["config_hash"] == y.meta["config_hash"]
        np.testing.assert_array_equal(x.instance, y.instance)
        np.testing.assert_array_equal(x.scores, y.scores)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two real scans and the local backend's labels of them; paths relative to the returned folder, as a user
    in it would type them (the cluster's workers run elsewhere, in another working directory)."""
    root = tmp_path_factory.mktemp("ray")
    kitti_sequence(root, 2)
    summary = _pseudolabel(root, {**os.environ, "OMP_NUM_THREADS": "1"}, "sequences/00", "--out", "local", *SMALL)
    assert (summary["done"], summary["failed"]) == (2, {})
    return root


@pytest.mark.parametrize("device, placed", [("cpu", HEAD_CPUS), ("cuda", HEAD_GPUS)])
def test_joined_cluster_labels_as_the_local_backend(ray_head, scans, device, placed):
    """2 workers asked for: with one CPU each both fit the 2-CPU head; with --device cuda each also reserves a GPU
    and only one fits the 1-GPU head, the other is never waited for. The run leaves the cluster running."""
    address, env, head = ray_head
    out = f"ray_{device}"
    summary = _pseudolabel(scans, env, "sequences/00", "--out", out, *SMALL, "--backend", "ray",
                           "--ray-address", address, "--workers", 2, "--device", device)
    assert (summary["done"], summary["failed"], summary["workers"]) == (2, {}, placed)
    _same_labels(scans / out, scans / "local", ["00_000000", "00_000001"])
    assert head.poll() is None


def test_ray_address_from_the_environment(ray_head, scans):
    address, env, _ = ray_head
    summary = _pseudolabel(scans, {**env, "RAY_ADDRESS": address}, "sequences/00", "--out", "ray_env", *SMALL,
                           "--backend", "ray", "--workers", 3)
    assert (summary["done"], summary["workers"]) == (2, HEAD_CPUS)  # the head's 2 CPUs, not a private instance
    _same_labels(scans / "ray_env", scans / "local", ["00_000000", "00_000001"])


def test_a_worker_no_node_can_host_is_refused(tmp_path, monkeypatch):
    """--device cuda where Ray sees no GPU (CUDA_VISIBLE_DEVICES empty): refused naming the nodes, no frame
    written, instead of waiting for a GPU forever."""
    ray_loopback(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    seq = kitti_sequence(tmp_path, 1)
    cfg = EngineConfig(masks="slic", mask_options={"n_segments": 30}, tokens=False, refine=None, device="cuda")
    with pytest.raises(RuntimeError, match=r"can host a worker with \d+ CPU and 1 GPU .*0 GPU.*needs a GPU node"):
        run(seq, cfg, tmp_path / "pl", backend="ray", progress=False)
    assert not list((tmp_path / "pl").iterdir())


def test_ray_address_needs_the_ray_backend(tmp_path, capsys):
    from sal_ros import cli

    seq = kitti_sequence(tmp_path, 1)
    code = cli.main(["pseudolabel", str(seq), "--out", str(tmp_path / "pl"), *map(str, SMALL),
                     "--ray-address", "auto"])
    assert code == 1 and "--ray-address needs --backend ray" in capsys.readouterr().err
    assert not (tmp_path / "pl").exists()
