"""Test environment: DDS stays on loopback in a private domain, and real data comes from ../shared/data."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sal_ros.env import claim_free_ros_domain  # noqa: E402 - needs the path above; imports no ROS

# Must happen before anything imports rclpy. Each run holds its own free domain for the whole session (a lock per
# domain, skipping domains a running DDS participant uses): a second clone's suite, a robot stack or a `ros2` shell
# on this machine never meets this run's nodes, whatever ROS_DOMAIN_ID the caller exported. Every node and
# subprocess inherits it; a test that needs another domain claims one the same way.
SESSION_DOMAIN = claim_free_ros_domain()
os.environ["ROS_DOMAIN_ID"] = str(SESSION_DOMAIN.domain_id)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds.xml")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # ray (pseudo-label backend) never reports usage
# Tests never download weights: a pretrained tag asked for by mistake fails at once instead of fetching.
os.environ["HF_HUB_OFFLINE"] = "1"

DATA_DIR = Path(os.environ.get("SAL_DATA", REPO.parent / "shared" / "data"))


def require_data(*parts: str) -> Path:
    """Path inside ../shared/data; CI fails without it, elsewhere the test skips with the reason."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        msg = f"real sample data missing: {path} (set SAL_DATA or provide ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def data_dir() -> Path:
    return require_data()


@pytest.fixture
def semantickitti_dir() -> Path:
    return require_data("semantickitti")


@pytest.fixture
def nuscenes_dir() -> Path:
    return require_data("nuscenes_mini")


def require_rclpy():
    """Import rclpy, or skip where ROS is not installed: the core suite must run without it. CI installs it, so
    there a broken rclpy (a missing RMW library, say) fails the ROS tests instead of skipping them."""
    if os.environ.get("CI"):
        import rclpy

        return rclpy
    return pytest.importorskip("rclpy", reason="rclpy not importable")


def save_tiny_checkpoint(path: Path) -> Path:
    """The tiny preset with seeded random weights, saved as a checkpoint naming the tiny text encoder: what the
    command-level tests run the node and `sal-ros eval` with."""
    import torch

    from sal_ros.model.backbone import ModelConfig
    from sal_ros.model.checkpoint import save_checkpoint
    from sal_ros.model.sal import SALModel
    from sal_ros.model.vocabulary import tiny_text_encoder

    torch.manual_seed(0)
    return save_checkpoint(path, SALModel(ModelConfig.preset("tiny")).eval(), text_encoder_identity=tiny_text_encoder())


def wait_until(predicate, what: str, *, progress=None, stall_s: float = 120.0, check=None, poll_s: float = 0.01):
    """Poll `predicate` until it returns something truthy, and return that. The wait follows progress, not the
    clock: it fails only after `stall_s` seconds in which `progress()` (any comparable snapshot: a log's length, a
    count of messages, a step number) did not change, so a machine under load only makes it slower. `check()` is
    called each round to fail at once (a child process that died, say)."""
    import time

    last, since = (progress() if progress else None), time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        now = time.monotonic()
        if progress is not None:
            current = progress()
            if current != last:
                last, since = current, now
        if now - since > stall_s:
            raise AssertionError(f"no progress for {stall_s:.0f} s waiting for {what} (last progress: {last!r})")
        time.sleep(poll_s)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc: progress of a child that works but
    answers nothing yet (loading a model, in a slow frame on a loaded machine). 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
