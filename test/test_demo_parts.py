"""The demo's parts without the nodes: the shared palette (equal to what the node's outputs draw today), PLY
writing, metrics, the side-by-side report, the engine settings it uses, and oracle pseudo-labels on a real scan."""
import argparse
import json

import numpy as np
import pytest

from conftest import require_data
from sal_ros.core import palette
from sal_ros.demo.metrics import FrameResult, RunFrame, agnostic_pq, demo_metrics, run_metrics, student_vs_pseudo
from sal_ros.demo.ply import read_ply, write_ply
from sal_ros.demo.report import report_markdown
from sal_ros.demo.settings import ORACLE, DemoConfig


# ------------------------------------------------------------------------------------------------ palette

@pytest.mark.parametrize("num_classes", [0, 1, 19, 20, 64, 1000])
def test_palette_gives_the_node_its_class_colours(num_classes):
    """The node's outputs draw with the one palette, and its vectorised HSV gives exactly the colours the node has
    always drawn (per class with colorsys: grey for 0, hue 0.12 + k * golden ratio, value 0.95 / 0.8)."""
    import colorsys

    from sal_ros.nodes import outputs

    assert outputs.class_colors is palette.class_colors and outputs.label_colors is palette.label_colors
    reference = [palette.UNLABELED_COLOR] + [
        tuple(np.round(np.array(colorsys.hsv_to_rgb((0.12 + k * 0.618033988749895) % 1.0, 0.8,
                                                    0.95 if k % 2 == 0 else 0.8)) * 255).astype(np.uint8))
        for k in range(num_classes)]
    assert np.array_equal(palette.class_colors(num_classes), np.array(reference, np.uint8).reshape(-1, 3))
    label = np.arange(num_classes + 5)  # beyond the palette too: drawn as label 0
    drawn = palette.label_colors(label, palette.class_colors(num_classes))
    assert (drawn[num_classes + 1:] == palette.UNLABELED_COLOR).all()


def test_segment_colors_one_colour_per_segment_and_grey_for_none():
    seg = np.array([0, 7, 7, 1 << 20, 3, 3, 99, 5])
    none = np.zeros(len(seg), bool)
    none[-1] = True
    rgb = palette.segment_colors(seg, none)
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 3)
    grey = np.array(palette.UNLABELED_COLOR)
    assert (rgb[0] == grey).all() and (rgb[-1] == grey).all()
    assert (rgb[1] == rgb[2]).all() and (rgb[4] == rgb[5]).all()
    distinct = {tuple(c) for c in rgb[[1, 3, 4, 6]]}
    assert len(distinct) == 4 and tuple(grey) not in distinct
    # a frame's segments take the palette's first hues, the ones the node gives its first classes
    assert np.array_equal(palette.segment_colors(np.array([40, 10])), palette.class_colors(2)[[2, 1]])


# ---------------------------------------------------------------------------------------------------- ply

def test_ply_round_trip_keeps_every_point_and_field(tmp_path):
    rng = np.random.default_rng(0)
    n = 257
    points = rng.normal(size=(n, 3)).astype(np.float32)
    label, instance = rng.integers(0, 20, n), rng.integers(0, 70000, n)
    score = rng.random(n).astype(np.float32)
    path = write_ply(tmp_path / "c.ply", points, None, label, instance, score)
    head = path.read_bytes().split(b"end_header\n")[0].decode().splitlines()
    assert head[:3] == ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    assert head[3:] == ["property float x", "property float y", "property float z", "property float intensity",
                        "property ushort label", "property uint instance", "property float score"]
    rows = read_ply(path)
    assert len(rows) == n and np.array_equal(np.stack([rows["x"], rows["y"], rows["z"]], 1), points)
    assert np.array_equal(rows["label"], label) and np.array_equal(rows["instance"], instance)
    assert np.array_equal(rows["score"], score) and not rows["intensity"].any()  # no intensity: zeros
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ply"]  # no temporary file left
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat ascii 1.0\nend_header\n")
    with pytest.raises(ValueError, match="not a binary little-endian PLY"):
        read_ply(tmp_path / "bad.ply")


# ------------------------------------------------------------------------------------------------ metrics

def scan(pseudo, student_instance):
    """A scan of two 60-point ground-truth segments and 30 ignored points; the whole scan is in the frustum."""
    gt_seg = np.r_[np.full(60, 1), np.full(60, 2), np.zeros(30)].astype(np.int64)
    gt_cls = np.r_[np.full(120, 1), np.zeros(30)].astype(np.int64)
    student_instance = np.asarray(student_instance, np.int64)
    f = RunFrame(np.asarray(pseudo, np.int64), np.ones(150, bool), (student_instance > 0).astype(np.int64),
                 student_instance, np.ones(150, np.float32))
    return FrameResult(1, np.zeros((150, 3), np.float32), None, gt_cls, gt_seg, None, {"slic": f})


def test_metrics_count_segments_per_run():
    gt_like = np.r_[np.full(60, 1), np.full(60, 2), np.zeros(30)]
    one_blob = np.r_[np.full(120, 1), np.zeros(30)]  # both segments as one: matches neither (IoU 0.5)
    r = scan(pseudo=gt_like, student_instance=one_blob)
    assert agnostic_pq([r], "slic", "pseudo", "frustum")["pq"] == pytest.approx(1.0)
    student = agnostic_pq([r], "slic", "student", "scan")
    assert (student["pq"], student["tp"], student["fp"], student["fn"]) == (0.0, 0, 1, 2)
    vs = student_vs_pseudo([r], "slic")  # the student against its teacher
    assert (vs["tp"], vs["fp"], vs["fn"]) == (0, 1, 2)
    same = scan(pseudo=gt_like, student_instance=gt_like)
    assert student_vs_pseudo([same], "slic")["pq"] == pytest.approx(1.0)
    # a run that did not answer a frame is scored without it
    assert agnostic_pq([r], ORACLE, "student", "scan")["tp"] == 0
    m = run_metrics([r, same], "slic", {"clouds_sent": 2}, 12.34, "ckpt.pt", DemoConfig(out="x"))
    assert m["frames"] == 2 and m["train_wall_s"] == 12.3
    assert m["class_agnostic_pq_vs_ground_truth"]["pseudo-labels (camera frustum)"] == \
        {"pq": 100.0, "sq": 100.0, "rq": 100.0, "tp": 4, "fp": 0, "fn": 0}


# ------------------------------------------------------------------------------------------------- report

def row(pq, tp, fp, fn):
    return {"pq": pq, "sq": 70.0, "rq": 50.0, "tp": tp, "fp": fp, "fn": fn}


def run_entry(pq_gt, pq_self, answered):
    names = ("pseudo-labels (camera frustum)", "student (camera frustum)", "student (full 360-degree scan)")
    return {"masks": "m", "frames": 2,
            "class_agnostic_pq_vs_ground_truth": {n: row(pq_gt + k, 3, 1, 2) for k, n in enumerate(names)},
            "student_vs_pseudo_labels": row(pq_self, 9, 8, 7),
            "online": {"clouds_sent": 2, "clouds_answered": answered, "dropped": 2 - answered,
                       "end_to_end_ms": {"median": 512.5, "max": 600.0},
                       "node_timings_ms": {"total": {"median": 300.0}, "latency": {"median": 340.0}}},
            "train_wall_s": 247.0, "checkpoint": "c.pt"}


def test_report_puts_both_runs_side_by_side_and_says_what_oracle_means():
    cfg = DemoConfig(out="x")
    m = demo_metrics([], {"slic": run_entry(0.0, 31.8, 2), ORACLE: run_entry(80.0, 60.1, 1)}, 600.0, cfg)
    m["frames"] = 2
    json.dumps(m)  # metrics.json holds plain data
    text = report_markdown(m)
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("| segments |"))
    assert head.index("SLIC") < head.index("oracle masks (stand-in for SAM)")
    pseudo_row = next(line for line in lines if line.startswith("| pseudo-labels (camera frustum) vs ground truth"))
    assert pseudo_row.index("**0.0**") < pseudo_row.index("**80.0**") and "3 / 1 / 2" in pseudo_row
    self_row = next(line for line in lines if line.startswith("| student vs its own pseudo-labels"))
    assert "**31.8**" in self_row and "**60.1**" in self_row and "9 / 8 / 7" in self_row
    assert "stands in for SAM" in text and "needs no weights" in text and "RANDOM weights" in text
    online = [line for line in lines if line.startswith("| SLIC") or line.startswith("| oracle")]
    assert len(online) == 2 and "| 2 | 1 | 1 |" in online[1] and "512.5 / 600.0" in online[0]
    assert "600.0 s (10.0 min)" in text
    sam2 = report_markdown(demo_metrics([], {"sam2": run_entry(40.0, 50.0, 2), ORACLE: run_entry(80.0, 60.1, 2)},
                                        1.0, DemoConfig(out="x", masks="sam2", sam2_checkpoint="s.pt")))
    assert "SAM 2 masks" in sam2 and "needs no weights" not in sam2


# ---------------------------------------------------------------------------------------------- pipeline

def test_demo_engine_settings_are_the_pseudolabel_commands(tmp_path):
    """The demo calls the engine directly: its settings must be exactly what `sal-ros pseudolabel` builds from
    the same options on the recorded frames, so the demo's pseudo-labels stay those of the command."""
    from sal_ros.data.framestore import INDEX_FILE
    from sal_ros.demo.oracle import oracle_config
    from sal_ros.demo.steps import engine_config
    from sal_ros.pseudolabel import cli

    for cfg, argv in [
        (DemoConfig(out="x"), ["--masks", "slic", "--slic-segments", "40", "--random-weights"]),
        (DemoConfig(out="x", masks="sam2", sam2_checkpoint="s.pt", clip_pretrained="openai", clip_model="ViT-L-14"),
         ["--masks", "sam2", "--sam2-checkpoint", "s.pt", "--clip-pretrained", "openai", "--clip-model", "ViT-L-14"]),
    ]:
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        (tmp_path / INDEX_FILE).write_text("")  # the recorder's FrameStore, which the demo labels
        expected = cli.config_from_args(parser.parse_args([str(tmp_path), *argv]))
        assert engine_config(cfg).to_dict() == expected.to_dict()
        oracle = oracle_config(engine_config(cfg))
        assert oracle.config_hash() != expected.config_hash()
        assert {k: v for k, v in oracle.to_dict().items() if oracle.to_dict()[k] != expected.to_dict()[k]}.keys() \
            == {"masks", "mask_options"}


def test_oracle_pseudolabels_follow_ground_truth_segments():
    """Ground-truth segments rendered into the image, lifted with the engine's settings: the lifted instances
    match most ground-truth segments in the camera frustum (README: class-agnostic PQ ~90 on these scans)."""
    from sal_ros.data.datasets import iter_semantickitti
    from sal_ros.data.labels import get_label_set
    from sal_ros.demo.oracle import frame_masks, oracle_config
    from sal_ros.demo.steps import engine_config
    from sal_ros.pseudolabel.engine import label_from_masks

    seq = require_data("semantickitti", "sequences", "00")
    frame = next(iter(iter_semantickitti(seq, scans=["000000"])))
    label_set = get_label_set("semantickitti")
    c = oracle_config(engine_config(DemoConfig(out="x")))
    masks = frame_masks(frame, frame.gt_labels, label_set, c.lift.min_depth)
    assert list(masks) == list(frame.cameras) and len(masks["image_0"]) > 10
    pl = label_from_masks(frame, masks, None, c.lift, c.fusion_iou, c.refine, c.min_points)
    cls, seg = label_set.split(frame.gt_labels)
    from sal_ros.eval.panoptic import PanopticEvaluator

    ev = PanopticEvaluator(1, min_points=50)
    keep = pl.in_frustum
    ev.add_agnostic(np.zeros(keep.sum(), np.int64), pl.instance[keep], cls[keep], seg[keep])
    assert ev.compute().agnostic["pq"] > 0.7
