"""The nodes as processes, started the ways users start them: `sal-ros run` with the shipped params files
(the node must come up and stop cleanly on Ctrl-C), and `ros2 run`'s entry points with a configuration that
cannot work (exit 1 with the reason, no traceback)."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import REPO, cpu_seconds, require_rclpy, wait_until



def _start(*args):
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               RCUTILS_COLORIZED_OUTPUT="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _wait_for(proc, text, stall_s=60.0):
    """The child's output up to the line holding ``text``. The wait follows progress (lines printed, the child's CPU
    time): it fails only after ``stall_s`` s of neither, or when the child ends without printing it."""
    lines, done = [], threading.Event()

    def read():  # readline blocks: a thread reads, the wait below watches
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if text in line:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    wait_until(done.is_set, f"{text!r} from the child", progress=lambda: (len(lines), int(cpu_seconds(proc.pid))),
               stall_s=stall_s)
    if not any(text in line for line in lines):
        raise AssertionError(f"the child ended without {text!r}:\n" + "".join(lines))
    return "".join(lines)


def _ctrl_c_after(proc, text, before=None) -> str:
    """Send SIGINT once ``text`` was printed; what the process printed after it. ``before``: a text that must
    have been printed before ``text``."""
    try:
        head = _wait_for(proc, text)
        assert before is None or before in head, f"{before!r} not printed before {text!r}:\n{head}"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rest


@pytest.mark.parametrize("args, ready, before", [
    (["--params", "config/segment.yaml", "--set", "model.device=cpu"], "[sal_segmenter]: listening on /points",
     "[sal_segmenter]: warm-up: model on a synthetic scan of 120000 points"),  # paid before ready
    (["--params", "config/record.yaml", "--no-segmenter", "--record", "{tmp}/frames"], "[sal_recorder]: recording",
     None),
], ids=["segment.yaml", "record.yaml"])
def test_shipped_params_files_start_the_nodes(tmp_path, args, ready, before):
    require_rclpy()
    proc = _start("-m", "sal_ros.cli", "run", *[a.format(tmp=tmp_path) for a in args])
    rest = _ctrl_c_after(proc, ready, before)
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest


def test_ctrl_c_while_the_model_loads_ends_quietly():
    require_rclpy()
    proc = _start("-m", "sal_ros.cli", "run", "--params", "config/segment.yaml", "--set", "model.device=cpu")
    rest = _ctrl_c_after(proc, "text_encoder.pretrained is empty")  # logged just before the encoder is built
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest and "cannot start" not in rest, rest


@pytest.mark.parametrize("entry, ros_args, reason", [
    ("segmenter_main", ["-p", "model.checkpoint:=/nonexistent/model.pt", "-p", "model.device:=cpu"],
     "cannot start: checkpoint not found: /nonexistent/model.pt"),
    ("recorder_main", ["-p", "output_dir:={tmp}/a_file/frames"], "cannot start: "),
], ids=["segmenter", "recorder"])
def test_node_that_cannot_start_exits_1_with_the_reason(tmp_path, entry, ros_args, reason):
    """Started through the console-script entry that `ros2 run sal_ros segmenter|recorder` calls."""
    require_rclpy()
    (tmp_path / "a_file").write_text("not a folder")
    code = f"import sys; from sal_ros.tools.run import {entry}; sys.exit({entry}())"
    proc = _start("-c", code, "--ros-args", *[a.format(tmp=tmp_path) for a in ros_args])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert reason in out and "Traceback" not in out, out  # a partly built node is destroyed quietly
