"""DDS delivery across two processes: 100 lidar-sized best-effort clouds at 10 Hz with the shipped profile."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, require_rclpy

pytestmark = [pytest.mark.ros]


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    require_rclpy()
    # no --domain-id: the bench claims free domains besides this run's own
    cmd = [sys.executable, "-m", "sal_ros.cli", "bench", "dds", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(45)  # ~13 s: 10 s of publishing plus process start and discovery
def test_shipped_profile_delivers_every_cloud():
    done = run_bench("--count", "100", "--rate", "10", "--points", "120000")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert "XMLPARSER" not in done.stderr, done.stderr[-3000:]  # the profile parsed cleanly
    profile = result["profile"]
    assert profile["config"] == str(REPO / "config" / "fastdds.xml")
    assert result["bytes_per_cloud"] > 2_000_000
    assert (profile["sent"], profile["received"], profile["corrupt"]) == (100, 100, 0)
    lat = profile["latency_ms"]
    assert 0 < lat["median"] <= lat["p90"] <= lat["max"]
    assert "stock" not in result


def test_missing_profile_is_a_clear_error():
    done = run_bench("--profile", "/nonexistent/fastdds.xml", timeout=30)
    assert done.returncode == 2 and "profile not found: /nonexistent/fastdds.xml" in done.stderr


@pytest.mark.slow
def test_shipped_profile_delivers_a_two_million_point_cloud():
    """2M points (48 MB): as one 16 MiB shared-memory message (the old profile) nothing arrived."""
    done = run_bench("--count", "3", "--rate", "1", "--points", "2000000", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["bytes_per_cloud"] == 48_000_000
    profile = result["profile"]
    # The first cloud after discovery may be lost (best effort, while the reader's pools grow): not the others.
    assert profile["sent"] == 3 and profile["received"] >= 2 and profile["corrupt"] == 0, profile
