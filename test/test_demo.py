"""`sal-ros demo` end to end on a reduced setting (few training steps, fast replay), and its clear error without data.

The reduced run is the real pipeline: convert -> recorder node over DDS -> pseudo-label -> train -> segmenter node
over DDS -> report; only the step count and point budget are small.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import require_data, require_rclpy



def run_demo(*args, env_extra=None, timeout=900):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sal_ros.cli", "demo", "--no-progress", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def read_ply(path):
    raw = path.read_bytes()
    head, _, body = raw.partition(b"end_header\n")
    lines = head.decode().splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    count = int(next(line for line in lines if line.startswith("element vertex")).split()[-1])
    kinds = {"float": "<f4", "ushort": "<u2", "uint": "<u4"}
    dtype = np.dtype([(line.split()[2], kinds[line.split()[1]]) for line in lines if line.startswith("property")])
    return np.frombuffer(body, dtype, count=count)


@pytest.mark.slow
def test_demo_reduced_run_writes_every_output_with_numbers(tmp_path):
    seq = require_data("semantickitti", "sequences", "00")
    require_rclpy()
    out = tmp_path / "demo_out"
    proc = run_demo("--data", str(seq), "--out", str(out), "--steps", "4", "--max-points", "3000", "--rate", "0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANDOM weights" in proc.stdout  # says which weights it ran with, up front and in the report

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 2
    rows = list(metrics["class_agnostic_pq_vs_ground_truth"].values()) + [metrics["student_vs_pseudo_labels"]]
    for row in rows:
        assert all(math.isfinite(row[k]) and 0 <= row[k] <= 100 for k in ("pq", "sq", "rq"))
        assert row["tp"] + row["fn"] > 0  # ground truth segments were counted
    pseudo = metrics["class_agnostic_pq_vs_ground_truth"]["pseudo-labels (camera frustum)"]
    assert pseudo["tp"] + pseudo["fp"] >= 1  # the lifted SLIC masks made segments that were scored
    online = metrics["online"]
    assert online["clouds_sent"] == 2 and online["clouds_answered"] + online["dropped"] == 2
    assert online["clouds_answered"] >= 1 and online["end_to_end_ms"]["median"] > 0
    assert online["node_timings_ms"]["total"]["median"] > 0

    report = (out / "report.md").read_text()
    assert "RANDOM weights" in report and "| pseudo-labels (camera frustum) |" in report
    assert f"| {pseudo['pq']} |" in report
    for name in ("bag/metadata.yaml", "params.yaml", "frames/index.jsonl", "train/model_last.pt",
                 "train/curves.png", "logs/segmenter.log", "logs/recorder.log"):
        assert (out / name).is_file(), name
    stamps = sorted(p.stem for p in (out / "clouds").glob("*.ply"))
    assert len(stamps) == online["clouds_answered"]
    for stamp in stamps:
        for png in (f"{stamp}_bev.png", f"{stamp}_camera.png"):
            assert (out / "png" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cloud = read_ply(out / "clouds" / f"{stamps[0]}.ply")
    scan = np.fromfile(next((seq / "velodyne").glob("*.bin")), np.float32).reshape(-1, 4)
    assert len(cloud) == len(scan)  # every input point, labeled
    assert cloud["label"].max() <= 20 and np.all((cloud["score"] >= 0) & (cloud["score"] <= 1))

    again = run_demo("--data", str(seq), "--out", str(out), "--steps", "4", "--max-points", "3000", "--rate", "0.5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "exists, kept" in again.stdout and "holds all 2 frames, kept" in again.stdout  # resumes, no redo


def test_demo_without_data_says_what_it_needs(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    proc = run_demo("--data", str(empty), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert "no SemanticKITTI data found" in proc.stderr and str(empty) in proc.stderr
    assert "--data" in proc.stderr and "SAL_DATA" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_demo_uses_sal_data_when_no_flag(tmp_path):
    proc = run_demo("--out", str(tmp_path / "out"), env_extra={"SAL_DATA": str(tmp_path / "missing")}, timeout=120)
    assert proc.returncode == 2 and str(tmp_path / "missing") in proc.stderr


def test_demo_starts_over_when_its_settings_change(tmp_path, capsys):
    """Steps resume from the folder, so results made with other masks, weights, data or steps must not be taken
    as done: the demo's own outputs go, anything else in the folder stays; same settings keep everything."""
    from sal_ros.demo import DemoConfig, start_over_if_settings_changed

    seq = tmp_path / "seq"
    seq.mkdir()
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "model_last.pt").write_bytes(b"old student")
    (out / "report.md").write_text("old")
    (out / "notes.txt").write_text("the user's")
    start_over_if_settings_changed(out, seq, DemoConfig(out=out))
    assert "older sal_ros" in capsys.readouterr().out and (out / "report.md").exists()
    start_over_if_settings_changed(out, seq, DemoConfig(out=out, rate=1.0, progress=False))  # display only
    assert (out / "train" / "model_last.pt").exists()
    start_over_if_settings_changed(out, seq, DemoConfig(out=out, masks="sam2", sam2_checkpoint="sam2.pt"))
    said = capsys.readouterr().out
    assert "masks: slic -> sam2" in said and "starting over" in said
    assert not (out / "train").exists() and not (out / "report.md").exists()
    assert (out / "notes.txt").read_text() == "the user's"
    assert json.loads((out / "settings.json").read_text())["masks"] == "sam2"
