"""`sal-ros replay` as a process: it exits 0 after the bag, and on Ctrl-C / SIGTERM, without rclpy's spin thread
aborting the interpreter at exit ("terminate called without an active exception", exit code 134)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import require_data, require_rclpy



@pytest.fixture(scope="module")
def kitti_bag(tmp_path_factory):
    seq = require_data("semantickitti", "sequences", "00")
    require_rclpy()
    from sal_ros.data.convert import convert

    bag = tmp_path_factory.mktemp("replay_exit") / "bag"
    convert(seq, bag, progress=False)
    return bag


def _replay(bag, *args):
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               RCUTILS_COLORIZED_OUTPUT="0")
    return subprocess.Popen([sys.executable, "-m", "sal_ros.cli", "replay", str(bag), "--start-paused-s", "0.1",
                             "--wait-for-subscribers-s", "0.5",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_replay_exits_zero_after_the_bag(kitti_bag):
    proc = _replay(kitti_bag, "--rate", "4")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "terminate called" not in err
    # 2 clouds + 2 images + 2 camera infos, + where tf2_msgs imports (skipped elsewhere) the /tf_static message and
    # the 2 /tf messages of the sequence's motion (poses.txt)
    from sal_ros.tools.replay import message_class

    expected = 6 + 3 * (message_class("tf2_msgs/msg/TFMessage") is not None)
    assert f"published {expected} messages" in err
    assert "no subscriber on" in err and "playing anyway" in err  # nothing listened during the 0.5 s wait


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_replay_stops_cleanly_on_a_signal(kitti_bag, sig):
    proc = _replay(kitti_bag, "--rate", "1", "--loop")
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until it is publishing (the rclpy node and executor exist)
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "published" in line:
                break
        assert any("published" in line for line in lines), "".join(lines)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(lines) + err
    assert proc.returncode in (0, 130), out + err
    assert "terminate called" not in err and "Traceback" not in err, err
