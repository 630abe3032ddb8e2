"""What a ROS user meets with the shipped files (issue 26): `record_dir:=` wins over the shipped params files,
`ros2 param dump` of both nodes is complete and round-trips through `--params-file`, a remapped input is named as
resolved, launch prints no deprecation warning, and the ROS commands of README.md and docs/ros.md run as written.

Everything runs on the colcon install with the real `ros2` CLI, each launch in its own process group, in this
session's private domain (conftest)."""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from conftest import REPO, require_rclpy
from ros_install import GroupProcess, colcon_install, unclean_lines

require_rclpy()

from sal_ros.nodes import params as P  # noqa: E402

CLI_WAIT = ["--no-daemon", "--timeout", "60"]  # node discovery waited for (docs/ros.md: why not the daemon)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return colcon_install(tmp_path_factory.mktemp("colcon"))


def ros2(env, *args, cwd=None):
    return subprocess.run(["ros2", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def started(proc, *lines):
    for text in lines:
        proc.wait_log(text, f"{text!r} in the launch log")


def stop(proc):
    rc = proc.interrupt()
    log = proc.log()
    assert rc == 0 and not unclean_lines(log), log[-4000:]
    return log


def dump(env, node):
    out = ros2(env, "param", "dump", f"/{node}", *CLI_WAIT)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def shipped(installed, tmp_path_factory):
    """`ros2 launch sal_ros segment.launch.py record:=true record_dir:=...` with the shipped segment.yaml (the
    launch default): the tiny random model and ViT-B-16 with random weights, on the CPU."""
    root = tmp_path_factory.mktemp("shipped")
    frames = root / "my_frames"
    proc = GroupProcess(["ros2", "launch", "sal_ros", "segment.launch.py", "record:=true", f"record_dir:={frames}"],
                        installed, root / "launch.log")
    try:
        started(proc, "recording /points", "listening on /points")
        yield type("Shipped", (), {"proc": proc, "root": root, "frames": frames, "env": installed})()
    finally:
        proc.close()


def test_record_dir_wins_over_the_shipped_segment_yaml_and_launch_warns_of_nothing(shipped):
    log = shipped.proc.log()
    assert f"into {shipped.frames} (0 frames there already)" in log, log[-3000:]
    assert not (shipped.root / "sal_frames").exists()
    assert "deprecated" not in log.lower() and "LaunchConfigurationNotEquals" not in log, log[:3000]


def test_param_dump_of_both_nodes_is_complete(shipped, tmp_path):
    for node in (P.SEGMENTER_NODE, P.RECORDER_NODE):
        dumped = dump(shipped.env, node)
        assert dumped[f"/{node}"]["ros__parameters"]["cameras"] == []  # was missing: the whole dump was {}
        path = tmp_path / f"{node}.yaml"
        path.write_text(yaml.safe_dump(dumped))
        values = P.load_params_file(path, node)
        declared = {spec.name for spec in P.node_specs(node) if spec.default != []}
        assert declared <= set(values), sorted(declared - set(values))
        assert P.unknown_names(node, values) == []  # a dump is a params file `sal-ros run --params` takes
        got = ros2(shipped.env, "param", "get", f"/{node}", "cameras", *CLI_WAIT)
        assert got.returncode == 0 and "String values are: []" in got.stdout, got


def test_documented_ros2_param_commands_run_as_written(shipped):
    """Every `ros2 param ...` line of a code block in README.md and docs/ros.md, through bash as a user pastes
    it, against the launched nodes."""
    commands = [line for path in (REPO / "README.md", REPO / "docs" / "ros.md")
                for line in fenced_lines(path.read_text()) if line.startswith("ros2 param ")]
    assert any(" set /sal_segmenter prompts " in c for c in commands) and any(" dump " in c for c in commands)
    for command in commands:
        done = subprocess.run(["bash", "-c", command], env=shipped.env, cwd=shipped.root, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0 and "not found" not in done.stdout + done.stderr, (command, done)
        if " set " in command:
            assert "Set parameter successful" in done.stdout, (command, done)


def fenced_lines(text):
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if "<" not in line]


def test_param_dumps_round_trip_through_params_file(shipped, tmp_path):
    """The dumps of both nodes, as one params file for segment.launch.py, start the same nodes with the same
    parameters (the shipped launch ends here)."""
    first = {node: dump(shipped.env, node) for node in (P.SEGMENTER_NODE, P.RECORDER_NODE)}
    stop(shipped.proc)
    params = tmp_path / "dumped.yaml"
    params.write_text(yaml.safe_dump({k: v for d in first.values() for k, v in d.items()}))
    proc = GroupProcess(["ros2", "launch", "sal_ros", "segment.launch.py", f"params_file:={params}",
                         "record:=true"], shipped.env, tmp_path / "launch.log")
    try:
        started(proc, "recording /points", "listening on /points")
        again = {node: dump(shipped.env, node) for node in first}
        assert again == first
        assert f"into {shipped.frames}" in proc.log()  # record_dir empty: the file's output_dir
    finally:
        stop(proc) if proc.proc.poll() is None else proc.close()


def test_record_launch_with_the_shipped_record_yaml(installed, tmp_path):
    """record_dir:= beats record.yaml's `sal_recorder: output_dir`; without it the file's value stands."""
    for given, expected in ((tmp_path / "frames", tmp_path / "frames"), (None, "sal_frames")):
        args = [f"record_dir:={given}"] if given else []
        proc = GroupProcess(["ros2", "launch", "sal_ros", "record.launch.py", *args], installed,
                            tmp_path / f"record_{bool(given)}.log")
        try:
            started(proc, "recording /points")
        finally:
            log = stop(proc)
        assert f"into {expected} (" in log, log[-3000:]


def test_a_remapped_input_is_named_as_resolved(installed, tmp_path):
    proc = GroupProcess(["ros2", "run", "sal_ros", "recorder", "--ros-args", "-r", "/points:=/velodyne_points",
                         "-p", f"output_dir:={tmp_path / 'frames'}", "-p", "input_timeout:=0.5",
                         "-p", "diagnostics_period:=0.5"], installed, tmp_path / "run.log")
    try:
        started(proc, "input /velodyne_points has published nothing")
    finally:
        log = stop(proc)
    assert "recording /velodyne_points + cameras" in log and "/points " not in log, log[-3000:]
