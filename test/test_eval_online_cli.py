"""`sal-ros eval online`: a 2-frame SemanticKITTI bag replayed into a real `sal-ros run` child (tiny checkpoint,
tiny text encoder, CPU) over DDS on localhost; online.json / online.md and the printed headline."""
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import require_data, require_rclpy, save_tiny_checkpoint



def run_eval(*args, timeout=240):
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    return subprocess.run([sys.executable, "-m", "sal_ros.cli", "eval", "online", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The converted 2-frame bag, a tiny random-weight checkpoint and node params naming both."""
    seq = require_data("semantickitti", "sequences", "00")
    require_rclpy()
    from sal_ros.data.convert import CLOUD_TOPIC, EXTRINSICS_FILE, convert, image_topic, info_topic
    from sal_ros.model.vocabulary import TINY_TEXT_ENCODER

    root = tmp_path_factory.mktemp("eval_online")
    bag = root / "bag"
    convert(seq, bag, progress=False)
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "/**": {"ros__parameters": {
            "cloud_topic": CLOUD_TOPIC, "cameras": ["image_0"],
            "camera": {"image_0": {"image_topic": image_topic("image_0"), "info_topic": info_topic("image_0")}},
            "calibration": {"source": "static", "file": str(bag / EXTRINSICS_FILE)},
            "sync": {"match_threshold": 0.03, "timeout": 0.5},
            "stats_period": 1.0,
        }},
        "sal_segmenter": {"ros__parameters": {
            "model": {"checkpoint": str(checkpoint), "device": "cpu"},
            "text_encoder": {"model": TINY_TEXT_ENCODER, "pretrained": ""},
            "prompts": ["car", "road", "tree"],
            "score_threshold": 0.0,
            "qos": {"outputs": {"reliability": "reliable", "depth": 5}},
        }},
    }))
    return type("Rig", (), {"root": root, "bag": bag, "params": params})


def test_eval_online_writes_summary_and_prints_headline(rig):
    out = rig.root / "out"
    proc = run_eval(rig.bag, "--params", rig.params, "--out", out, "--rate", "1", "--set", "stats_period=0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr

    summary = json.loads((out / "online.json").read_text())
    assert summary["clouds_sent"] == 2 and summary["clouds_answered"] + summary["dropped"] == 2
    assert summary["clouds_answered"] >= 1
    latency = summary["end_to_end_ms"]
    for key in ("median", "p90", "max"):
        assert isinstance(latency[key], float) and math.isfinite(latency[key]) and latency[key] > 0, latency
    assert latency["n"] == summary["clouds_answered"]
    assert summary["node_timings_ms"]["total"]["median"] > 0
    assert summary["meta"]["sets"] == ["stats_period=0.5"] and summary["meta"]["cloud_topic"] == "/lidar/points"

    headline = f"{summary['clouds_answered']}/2 clouds answered"
    assert headline in proc.stdout and f"median {latency['median']:.1f} ms" in proc.stdout
    assert f"p90 {latency['p90']:.1f} ms" in proc.stdout
    markdown = (out / "online.md").read_text()
    assert markdown.startswith("# Online evaluation") and headline in markdown and "| total |" in markdown
    assert (out / "node.log").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]  # atomic writes left no temp files


def test_eval_online_without_params_file_says_so(tmp_path):
    require_rclpy()
    proc = run_eval(tmp_path, "--params", tmp_path / "missing.yaml", "--out", tmp_path / "out", timeout=60)
    assert proc.returncode == 1 and "missing.yaml" in proc.stderr
    assert not (tmp_path / "out").exists()
