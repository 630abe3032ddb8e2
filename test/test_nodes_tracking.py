"""The segmenter's tracker with ego motion from TF (tracking.fixed_frame): a tf2 broadcaster in a test node
moves the sensor 3 m per frame through odom; objects standing still in odom keep their track ids in the node,
while the same boxes tracked in the sensor frame (tracking.fixed_frame empty) jump past the gate."""

import numpy as np
import pytest

from conftest import Spinner, require_rclpy, wait_until

rclpy = require_rclpy()
from rclpy.executors import MultiThreadedExecutor  # noqa: E402

from sal_ros.core.types import Frame, InstanceSummary, OrientedBox, Segmentation  # noqa: E402

T0 = 1_700_000_000_000_000_000
STEP_NS = 100_000_000
WORLD = [(20.0, 5.0), (30.0, -5.0)]  # objects standing still in odom


def segmentation(k):
    """Frame ``k``: two instances at their odom places seen from a sensor 3k m further along x, ids in the
    frame's own order."""
    n = 4
    seg = Segmentation(label=np.array([1, 1, 1, 1], np.uint16), instance=np.array([2, 2, 1, 1], np.uint32),
                       score=np.ones(n, np.float32), class_names=("car",), vocabulary_version=1)
    seg.instances = [InstanceSummary(j + 1, 1, "car", 0.9, 2, OrientedBox(np.array([x - 3.0 * k, y, 0.0]),
                                                                          np.array([4.0, 1.8, 1.5]), 0.0))
                     for j, (x, y) in enumerate(WORLD[::-1] if k % 2 else WORLD)]
    return seg


@pytest.fixture(scope="module")
def nodes():
    import tf2_ros
    from geometry_msgs.msg import TransformStamped

    from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER
    from sal_ros.nodes import params as P
    from sal_ros.nodes.segmenter import SegmenterNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    base = {"model.device": "cpu", "text_encoder.model": TINY_TEXT_ENCODER, "prompts": ["car"]}
    fixed = SegmenterNode(context=ctx, parameter_overrides=P.overrides(P.SEGMENTER_NODE, {
        **base, "tracking.fixed_frame": "odom"}))
    test = rclpy.create_node("tracking_tf_test", context=ctx)
    broadcaster = tf2_ros.TransformBroadcaster(test)
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)
    executor.add_node(fixed)
    executor.add_node(test)
    spinner = Spinner(executor)

    def send(k):
        t = TransformStamped()
        t.header.stamp.sec, t.header.stamp.nanosec = divmod(T0 + k * STEP_NS, 1_000_000_000)
        t.header.frame_id, t.child_frame_id = "odom", "lidar"
        t.transform.translation.x = 3.0 * k
        t.transform.rotation.w = 1.0
        broadcaster.sendTransform(t)

    yield type("Nodes", (), {"fixed": fixed, "send": staticmethod(send)})()
    spinner.stop(fixed, test)
    rclpy.shutdown(context=ctx)


def test_fixed_frame_from_tf_keeps_ids_of_still_objects_under_ego_motion(nodes):
    from sal_ros.core.tracking import Tracker, TrackerConfig

    frames = [Frame(stamp_ns=T0 + k * STEP_NS, frame_id="lidar", points=np.zeros((4, 3))) for k in range(5)]
    for k in range(5):
        nodes.send(k)
    wait_until(lambda: nodes.fixed.tracking.poses.lookup("odom", "lidar", frames[-1].stamp_ns) is not None,
               "the transforms in the node's tf2 buffer (the listener has them all)", stall_s=30)
    # the control: the sensor frame with the 2 m gate alone (a new track's widened gate would catch this
    # constant 30 m/s ego motion after its first step)
    tracked_ids, sensor_ids, sensor_tracker = [], set(), Tracker(TrackerConfig(max_speed=0.0))
    for k, frame in enumerate(frames):
        pose = nodes.fixed.tracking.pose(frame)
        assert pose[0, 3] == pytest.approx(3.0 * k)  # sensor -> odom at the cloud stamp
        seg = segmentation(k)
        sensor_ids |= {t.track_id for t in sensor_tracker.update(segmentation(k).instances, frame.stamp_ns)
                       .by_instance.values()}
        nodes.fixed.tracking.track(frame, seg)
        tracked_ids.append({tuple(np.round(i.box.center[:2] + [3.0 * k, 0])): i.instance_id for i in seg.instances})
        assert set(seg.instance.tolist()) == {i.instance_id for i in seg.instances}  # points carry the track ids
    assert all(ids == tracked_ids[0] for ids in tracked_ids), tracked_ids  # each still object keeps its id
    assert len(sensor_ids) > 2  # the sensor frame alone loses them



def test_bench_node_times_typed_outputs_beside_the_json_era_ones(capsys):
    import json
    import os

    from sal_ros.cli import main

    assert main(["bench", "node", "--points", "20000", "--repeats", "3",
                 "--domain-id", os.environ["ROS_DOMAIN_ID"]]) == 0
    out = capsys.readouterr().out
    typed = json.loads(out[out.index("{"):])["typed_outputs"]
    assert typed["publish_off_ms"] > 0 and typed["track_and_publish_on_ms"] > 0
    assert set(typed["parts_median_ms"]) == {"tracker", "detections", "frame_summary"}
    assert typed["added_ms"] == pytest.approx(typed["track_and_publish_on_ms"] - typed["publish_off_ms"], abs=2e-3)


def test_a_tracker_fault_is_counted_and_the_frame_goes_out_untracked(nodes):
    node = nodes.fixed
    frame = Frame(stamp_ns=T0 + 100 * STEP_NS, frame_id="lidar", points=np.zeros((4, 3)))
    seg = segmentation(0)
    broken = seg.instances[0]
    broken.box = OrientedBox(np.array([np.nan, 0.0]), np.array([4.0, 1.8, 1.5]), 0.0)  # a 2-vector centre
    before = node.stats.get("error.tracking")
    assert node.tracking.track(frame, seg) is None
    assert node.stats.get("error.tracking") == before + 1
    assert node.health.window()["errors"].get("tracking") == 1
    assert [i.instance_id for i in seg.instances] == [1, 2]  # per-frame ids stay


def test_tracking_parameters_change_at_run_time(nodes):
    from rclpy.parameter import Parameter

    node = nodes.fixed
    result = node.set_parameters([Parameter("tracking.max_misses", Parameter.Type.INTEGER, 7),
                                  Parameter("tracking.max_distance", Parameter.Type.DOUBLE, 3.5)])
    assert all(r.successful for r in result)
    assert (node.tracking.tracker.config.max_misses, node.tracking.tracker.config.max_distance) == (7, 3.5)
    refused = node.set_parameters([Parameter("tracking.max_distance", Parameter.Type.DOUBLE, -1.0)])[0]
    assert not refused.successful and node.tracking.tracker.config.max_distance == 3.5
