"""Output message builders: labeled cloud layout and order, markers, overlay drawing, JSON records."""
import json

import numpy as np
import pytest

from conftest import require_data, require_rclpy
from sal_ros.core.pointcloud2 import read_fields, unpack_rgb
from sal_ros.core.types import InstanceSummary, OrientedBox, Segmentation
from sal_ros.nodes import outputs

require_rclpy()
from sal_ros.nodes.messages import rclpy_types  # noqa: E402


def _scan():
    path = require_data("semantickitti", "sequences", "00", "velodyne", "000000.bin")
    scan = np.fromfile(path, np.float32).reshape(-1, 4)
    return scan[:, :3], scan[:, 3]


def _segmentation(n, rng):
    label = rng.integers(0, 4, n).astype(np.uint16)
    instance = np.where(label == 1, rng.integers(1, 9, n), 0).astype(np.uint32)
    return Segmentation(label=label, instance=instance, score=rng.random(n, dtype=np.float32),
                        class_names=("car", "road", "tree"), vocabulary_version=3)


def test_class_colors_distinct_and_stable_when_classes_are_appended():
    five, ten = outputs.class_colors(5), outputs.class_colors(10)
    assert five.shape == (6, 3) and five.dtype == np.uint8
    assert tuple(five[0]) == outputs.UNLABELED_COLOR
    assert np.array_equal(ten[:6], five)
    assert len({tuple(c) for c in ten}) == 11
    # A label beyond the palette (stale vocabulary) is drawn as unlabeled instead of failing.
    assert np.array_equal(outputs.label_colors(np.array([2, 99]), five), five[[2, 0]])


def test_labeled_cloud_same_points_same_order_with_all_fields():
    xyz, intensity = _scan()
    seg = _segmentation(len(xyz), np.random.default_rng(0))
    msg = outputs.labeled_cloud(xyz, intensity, seg, "velodyne", 1_234_567_890_123, rclpy_types())
    assert [f.name for f in msg.fields] == [name for name, _ in outputs.LABELED_FIELDS]
    assert msg.header.frame_id == "velodyne"
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1234, 567_890_123)
    fields = read_fields(msg)
    assert np.array_equal(np.stack([fields["x"], fields["y"], fields["z"]], 1), xyz)
    assert np.array_equal(fields["intensity"], intensity)
    for name, dtype in outputs.LABELED_FIELDS:
        assert fields[name].dtype == dtype, name
    assert np.array_equal(fields["label"], seg.label)
    assert np.array_equal(fields["instance"], seg.instance)
    assert np.array_equal(fields["score"], seg.score)
    assert msg.point_step == 32  # the version sits in the padding before instance
    assert np.array_equal(fields["vocabulary_version"], np.full(len(xyz), 3, np.uint16))
    palette = outputs.class_colors(3)
    assert np.array_equal(unpack_rgb(fields["rgb"]), palette[seg.label])


def test_labeled_cloud_without_intensity_and_length_mismatch():
    xyz = np.zeros((4, 3), np.float32)
    msg = outputs.labeled_cloud(xyz, None, Segmentation.empty(4), "lidar", 0, rclpy_types())
    assert np.array_equal(read_fields(msg, ["intensity"])["intensity"], np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="3 points, cloud has 4"):
        outputs.labeled_cloud(xyz, None, Segmentation.empty(3), "lidar", 0, rclpy_types())


def test_markers_deleteall_vocabulary_then_box_and_text_per_instance():
    from visualization_msgs.msg import Marker

    box = OrientedBox(center=np.array([10.0, 2.0, -0.5]), size=np.array([4.0, 2.0, 1.5]), yaw=np.pi / 2)
    instances = [InstanceSummary(7, 1, "car", 0.9, 300, box),
                 InstanceSummary(8, 2, "person", 0.6, 2, box)]  # too small for a marker
    msg = outputs.instance_markers(instances, "velodyne", 5, outputs.class_colors(2), rclpy_types(), min_points=5,
                                   vocabulary_version=12)
    kinds = [(m.action, m.type, m.ns, m.id) for m in msg.markers]
    assert kinds == [(Marker.DELETEALL, 0, "", 0), (Marker.ADD, Marker.TEXT_VIEW_FACING, "vocabulary", 12),
                     (Marker.ADD, Marker.LINE_LIST, "boxes", 7), (Marker.ADD, Marker.TEXT_VIEW_FACING, "labels", 7)]
    assert msg.markers[1].text == "vocabulary v12"
    lines = np.array([[p.x, p.y, p.z] for p in msg.markers[2].points])
    assert lines.shape == (24, 3)
    # yaw 90 deg: the 4 m length runs along y.
    assert np.allclose(lines.min(0), [9.0, 0.0, -1.25]) and np.allclose(lines.max(0), [11.0, 4.0, 0.25])
    assert msg.markers[3].text == "car 0.90"
    assert all(m.header.frame_id == "velodyne" for m in msg.markers)


def test_markers_of_several_instances_each_their_own_box_text_and_colour():
    rng = np.random.default_rng(0)
    boxes = [OrientedBox(center=rng.normal(scale=10, size=3), size=rng.random(3) + 0.5, yaw=float(rng.uniform(-3, 3)))
             for _ in range(3)]
    instances = [InstanceSummary(k + 1, k + 1, f"c{k}", 0.5, 10, box) for k, box in enumerate(boxes)]
    msg = outputs.instance_markers(instances, "lidar", 5, outputs.class_colors(3), rclpy_types())
    for k, box in enumerate(boxes):  # all boxes in one numpy pass: each still gets its own corners
        edge, text = msg.markers[1 + 2 * k], msg.markers[2 + 2 * k]
        c, s = np.cos(box.yaw), np.sin(box.yaw)
        lo = np.array([[c, -s], [s, c]]) @ (-box.size[:2] / 2)  # corner 2: rear right, in the box frame rotated
        first = np.array([[p.x, p.y, p.z] for p in edge.points])[3]  # edge 1-2 ends at corner 2
        assert np.allclose(first, box.center + np.array([lo[0], lo[1], -box.size[2] / 2]))
        assert np.isclose(text.pose.position.z, box.center[2] + box.size[2] / 2 + 0.4)
        assert np.allclose([text.pose.position.x, text.pose.position.y], box.center[:2])
        assert edge.id == text.id == k + 1 and text.text == f"c{k} 0.50"
    positions = {id(m.pose.position) for m in msg.markers[2::2]}
    assert len(positions) == 3 and len({id(m.color) for m in msg.markers[1::2]}) == 3  # nothing per-instance shared


def test_pooled_markers_equal_new_ones_as_the_instance_count_changes():
    rng = np.random.default_rng(1)
    instances = [InstanceSummary(k, k % 3, f"c{k}", float(rng.random()), 10,
                                 OrientedBox(rng.normal(size=3), rng.random(3) + 0.1, float(rng.uniform(-3, 3))))
                 for k in range(12)]
    pool, palette = outputs.MarkerPool(), outputs.class_colors(2)
    for count, tracked in ((5, False), (12, True), (2, False), (0, False), (7, True)):
        args = (instances[:count], "lidar", count, palette, rclpy_types(), 1, count, tracked)
        pooled = outputs.instance_markers(*args, pool=pool)
        assert pooled == outputs.instance_markers(*args)
    assert len(pool.pairs) == 12  # markers made only when more instances than ever before are shown


def test_draw_points_near_over_far_and_clipped_to_image():
    image = np.zeros((10, 10, 3), np.uint8)
    uv = np.array([[5.0, 5.0], [5.2, 4.9], [-3.0, 2.0], [9.4, 9.4]])
    depth = np.array([20.0, 5.0, 3.0, 8.0])
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
    out = outputs.draw_points(image, uv, depth, colors, radius=1)
    assert tuple(out[5, 5]) == (0, 255, 0)  # the nearer point wins
    assert tuple(out[9, 9]) == (9, 9, 9)
    assert not (out == [0, 0, 255]).all(axis=2).any()  # off-image point drew nothing
    assert image.sum() == 0  # input untouched


def test_json_records_carry_vocabulary_version_and_classes():
    seg = _segmentation(5, np.random.default_rng(1))
    seg.instances = [InstanceSummary(1, 1, "car", 0.8, 5, OrientedBox(np.zeros(3), np.ones(3), 0.0))]
    record = json.loads(outputs.frame_record(42, "velodyne", seg, 5, ("front",)))
    assert record["stamp_ns"] == 42 and record["vocabulary_version"] == 3
    assert record["classes"] == ["car", "road", "tree"] and record["missing_cameras"] == ["front"]
    assert record["instances"][0]["class"] == "car"


def test_vocabulary_record_from_a_real_vocabulary():
    from dataclasses import replace

    from sal_ros.model.vocabulary import Vocabulary

    vocab = replace(Vocabulary.from_prompts(["car", "road"]), version=2)
    assert json.loads(outputs.vocabulary_record(vocab)) == {
        "version": 2, "classes": ["car", "road"], "descriptions": [["car"], ["road"]], "things": [True, True],
        "source": "prompts"}


def test_bench_node_reports_every_stage_on_the_real_scan(semantickitti_dir):
    """`sal-ros bench node` runs the node's own decode/publish paths on the real scan and reports medians."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "bench", "node", "--repeats", "3",
                           "--data", str(semantickitti_dir / "sequences" / "00")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["scan"].endswith("000000.bin") and result["instances"] == 14  # scan 000000's thing instances
    stages = result["median_ms"]
    assert set(stages) == {"sync", "decode", "publish"} and all(v > 0 for v in stages.values())
    assert result["overhead_ms"] == pytest.approx(sum(stages.values()), abs=0.01)
    assert all(v > 0 for v in result["publish_parts_median_ms"].values())


def test_bench_node_times_the_whole_frame_callback_with_a_model(semantickitti_dir):
    """`sal-ros bench node --model realtime`: a real node loads the seeded preset from a checkpoint and its frame
    callback processes every timed frame of the real scan (warm-up frames first), each stage reported."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sal_ros.cli", "bench", "node", "--model", "realtime", "--repeats",
                           "2", "--threads", "1", "--data", str(semantickitti_dir / "sequences" / "00")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert (result["bench"], result["preset"], result["points"], result["frames"]) == ("node_whole_path", "realtime",
                                                                                       124_668, 2)
    assert result["processed"] == 2 + 3  # the warm-up frames went through the same callback
    stages = result["node_stage_medians_ms"]
    assert {"decode", "segment", "track", "publish", "model.backbone"} <= set(stages)
    assert 0 < stages["model.backbone"] < stages["segment"] < stages["total"]
    assert result["median_cpu_ms"] > 0 and result["meets_goal_cpu"] == (result["median_cpu_ms"] <= 50.0)

