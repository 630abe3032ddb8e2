"""The nodes as processes, started the ways users start them: `sal-ros run` with the shipped params files
(the node must come up and stop cleanly on Ctrl-C), and `ros2 run`'s entry points with a configuration that
cannot work (exit 1 with the reason, no traceback)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, require_rclpy



def _start(*args):
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               RCUTILS_COLORIZED_OUTPUT="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _wait_for(proc, text, timeout=60.0):
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"no {text!r} within {timeout} s:\n" + "".join(lines))


def _ctrl_c_after(proc, text) -> str:
    """Send SIGINT once ``text`` was printed; what the process printed after it."""
    try:
        _wait_for(proc, text)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rest


@pytest.mark.parametrize("args, ready", [
    (["--params", "config/segment.yaml", "--set", "model.device=cpu"], "[sal_segmenter]: listening on /points"),
    (["--params", "config/record.yaml", "--no-segmenter", "--record", "{tmp}/frames"], "[sal_recorder]: recording"),
], ids=["segment.yaml", "record.yaml"])
def test_shipped_params_files_start_the_nodes(tmp_path, args, ready):
    require_rclpy()
    proc = _start("-m", "sal_ros.cli", "run", *[a.format(tmp=tmp_path) for a in args])
    rest = _ctrl_c_after(proc, ready)
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest


def test_ctrl_c_while_the_model_loads_ends_quietly():
    require_rclpy()
    proc = _start("-m", "sal_ros.cli", "run", "--params", "config/segment.yaml", "--set", "model.device=cpu")
    rest = _ctrl_c_after(proc, "text_encoder.pretrained is empty")  # logged just before the encoder is built
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest and "cannot start" not in rest, rest


@pytest.mark.parametrize("module, ros_args, reason", [
    ("sal_ros.nodes.segmenter", ["-p", "model.checkpoint:=/nonexistent/model.pt", "-p", "model.device:=cpu"],
     "cannot start: checkpoint not found: /nonexistent/model.pt"),
    ("sal_ros.nodes.recorder", ["-p", "output_dir:={tmp}/a_file/frames"], "cannot start: "),
], ids=["segmenter", "recorder"])
def test_node_that_cannot_start_exits_1_with_the_reason(tmp_path, module, ros_args, reason):
    require_rclpy()
    (tmp_path / "a_file").write_text("not a folder")
    proc = _start("-m", module, "--ros-args", *[a.format(tmp=tmp_path) for a in ros_args])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert reason in out and "Traceback" not in out, out  # a partly built node is destroyed quietly
