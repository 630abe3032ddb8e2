"""`sal-ros run` keeps the DDS environment it is given; `--localhost` asks for this machine only. The node is not
started here: rclpy.init is replaced by a stop, because a node with the discovery range unset would go beyond
loopback (the launched and `ros2 run` nodes are checked for real in test_ros_launch.py)."""
import argparse
import os

import pytest

from conftest import REPO, require_rclpy

DDS_VARS = ("RMW_IMPLEMENTATION", "ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE")


class Stop(Exception):
    pass


def run_main_until_init(monkeypatch, tmp_path, *flags):
    rclpy = require_rclpy()
    from sal_ros.tools import run

    seen = {}

    def init(*args, **kwargs):
        seen.update({name: os.environ.get(name) for name in DDS_VARS})
        raise Stop

    monkeypatch.setattr(rclpy, "init", init)
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    with pytest.raises(Stop):
        run.main(parser.parse_args(["--no-segmenter", "--record", str(tmp_path / "frames"), *flags]))
    return seen


def test_sal_ros_run_leaves_dds_settings_alone_unless_asked(monkeypatch, tmp_path):
    for name in DDS_VARS:
        monkeypatch.delenv(name, raising=False)
    assert run_main_until_init(monkeypatch, tmp_path) == dict.fromkeys(DDS_VARS)
    local = run_main_until_init(monkeypatch, tmp_path, "--localhost")
    assert local == {"RMW_IMPLEMENTATION": "rmw_fastrtps_cpp", "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
                     "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds.xml")}


def test_localhost_keeps_what_the_user_set(monkeypatch, tmp_path):
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET")
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", str(tmp_path / "mine.xml"))
    seen = run_main_until_init(monkeypatch, tmp_path, "--localhost")
    assert seen["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SUBNET"
    assert seen["FASTDDS_DEFAULT_PROFILES_FILE"] == str(tmp_path / "mine.xml")
