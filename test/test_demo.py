"""`sal-ros demo` end to end on a reduced setting (few training steps, fast replay), and its clear error without data.

The reduced run is the real pipeline: convert -> recorder node over DDS -> per run (SLIC masks, oracle masks)
pseudo-label -> train -> segmenter node over DDS -> report; only the step count and point budget are small.
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


@pytest.mark.slow
def test_demo_reduced_run_writes_every_output_with_numbers(tmp_path):
    seq = require_data("semantickitti", "sequences", "00")
    require_rclpy()
    from sal_ros.demo.ply import read_ply

    out = tmp_path / "demo_out"
    args = ("--data", str(seq), "--out", str(out), "--steps", "4", "--max-points", "3000", "--rate", "0.5")
    proc = run_demo(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANDOM weights" in proc.stdout  # says which weights it ran with, up front and in the report

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 2 and list(metrics["runs"]) == ["slic", "oracle"]
    for name, run in metrics["runs"].items():
        rows = list(run["class_agnostic_pq_vs_ground_truth"].values()) + [run["student_vs_pseudo_labels"]]
        for row in rows:
            assert all(math.isfinite(row[k]) and 0 <= row[k] <= 100 for k in ("pq", "sq", "rq")), name
            assert row["tp"] + row["fn"] > 0, name  # ground truth segments were counted
        online = run["online"]
        assert online["clouds_sent"] == 2 and online["clouds_answered"] + online["dropped"] == 2
        assert online["clouds_answered"] >= 1 and online["end_to_end_ms"]["median"] > 0
        assert online["node_timings_ms"]["total"]["median"] > 0
        assert run["frames"] == online["clouds_answered"] and run["train_wall_s"] > 0
    slic = metrics["runs"]["slic"]["class_agnostic_pq_vs_ground_truth"]["pseudo-labels (camera frustum)"]
    oracle = metrics["runs"]["oracle"]["class_agnostic_pq_vs_ground_truth"]["pseudo-labels (camera frustum)"]
    assert slic["tp"] + slic["fp"] >= 1  # the lifted SLIC masks made segments that were scored
    # oracle masks are object masks: after lifting they match most ground-truth segments (~90 PQ on these scans)
    assert oracle["pq"] > 60 and oracle["tp"] > oracle["fp"] + oracle["fn"] and oracle["tp"] > slic["tp"]

    report = (out / "report.md").read_text()
    assert "RANDOM weights" in report and "| SLIC masks (weight-free) | oracle masks (stand-in for SAM) |" in report
    pseudo_row = next(line for line in report.splitlines() if line.startswith("| pseudo-labels (camera frustum)"))
    assert pseudo_row.index(f"**{slic['pq']}**") < pseudo_row.index(f"**{oracle['pq']}**")
    for name in ("bag/metadata.yaml", "frames/index.jsonl", "logs/recorder.log", "settings.json"):
        assert (out / name).is_file(), name
    scan = np.fromfile(next((seq / "velodyne").glob("*.bin")), np.float32).reshape(-1, 4)
    for run in ("slic", "oracle"):
        for name in ("params.yaml", "train/model_last.pt", "train/curves.png", "train/train.yaml"):
            assert (out / run / name).is_file(), f"{run}/{name}"
        assert len(list((out / run / "pseudolabels").glob("*.npz"))) == 2
        assert (out / "logs" / f"segmenter_{run}.log").is_file()
        stamps = sorted(p.stem for p in (out / run / "clouds").glob("*.ply"))
        assert len(stamps) == metrics["runs"][run]["online"]["clouds_answered"]
        cloud = read_ply(out / run / "clouds" / f"{stamps[0]}.ply")
        assert len(cloud) == len(scan)  # every input point, labeled
        assert cloud["label"].max() <= 20 and np.all((cloud["score"] >= 0) & (cloud["score"] <= 1))
    for stamp in stamps:
        for png in (f"{stamp}_bev.png", f"{stamp}_camera.png"):
            assert (out / "png" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_demo(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout  # resumes, no redo: every step finds its result
    assert "exists, kept" in said and "holds all 2 frames, kept" in said
    assert said.count("0 frames labelled, 2 kept") == 2 and said.count("resumed at step 4") == 2


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
    settings = json.loads((out / "settings.json").read_text())
    start_over_if_settings_changed(out, seq, DemoConfig(out=out))  # same settings: kept
    assert "starting over" not in capsys.readouterr().out and (out / "report.md").exists()
    start_over_if_settings_changed(out, seq, DemoConfig(out=out, rate=1.0, progress=False))  # display only
    assert (out / "train" / "model_last.pt").exists()
    start_over_if_settings_changed(out, seq, DemoConfig(out=out, masks="sam2", sam2_checkpoint="sam2.pt"))
    said = capsys.readouterr().out
    assert "masks: slic -> sam2" in said and "starting over" in said
    assert not (out / "train").exists() and not (out / "report.md").exists()
    assert (out / "notes.txt").read_text() == "the user's"
    assert json.loads((out / "settings.json").read_text())["masks"] == "sam2"
    # a folder of the one-run layout (train/, clouds/ at the top, no "layout" in settings.json) starts over too
    (out / "clouds").mkdir()
    (out / "settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "layout"}))
    start_over_if_settings_changed(out, seq, DemoConfig(out=out))
    assert "layout: None -> 2" in capsys.readouterr().out and not (out / "clouds").exists()
