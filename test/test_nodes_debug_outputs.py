"""The segmenter's Autoware-style outputs (issue 26), with real rclpy and DDS and the real KITTI scan: `~/filtered`
is the input cloud, its own layout kept (an extra field, its point_step), without the points of
`filter.classes`, which is checked against the vocabulary and changes at run time; `~/debug/processing_time_ms`,
`cyclic_time_ms` and `pipeline_latency_ms` come per frame, stamped with the cloud's stamp."""
import threading

import numpy as np
import pytest

from conftest import Sensors, require_rclpy, wait_for

rclpy = require_rclpy()
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, qos_profile_sensor_data  # noqa: E402

from sal_ros.core.msgtypes import stamp_to_ns  # noqa: E402
from sal_ros.core.pointcloud2 import encode_cloud, read_fields  # noqa: E402
from sal_ros.model.open_clip_models import TINY_TEXT_ENCODER  # noqa: E402

NODE = "/sal_segmenter"
PROMPTS = ["car", "road", "tree", "building"]
DEBUG = ("processing_time_ms", "cyclic_time_ms", "pipeline_latency_ms")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    from rcl_interfaces.srv import SetParameters
    from sensor_msgs.msg import PointCloud2, Temperature

    from sal_ros.nodes import params as P
    from sal_ros.nodes.segmenter import SegmenterNode

    sensors = Sensors(tmp_path_factory.mktemp("debug_outputs"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    values = {"cloud_topic": "/lidar", "model.device": "cpu", "text_encoder.model": TINY_TEXT_ENCODER,
              "prompts": PROMPTS, "score_threshold": 0.0, "qos.outputs.depth": 5}
    node = SegmenterNode(context=ctx, parameter_overrides=P.overrides(P.SEGMENTER_NODE, values))
    test = rclpy.create_node("debug_outputs_test", context=ctx)
    got = {"labeled": {}, "filtered": {}, **{name: {} for name in DEBUG}}
    qos = QoSProfile(depth=10)

    def keep(store):
        return lambda msg: got[store].__setitem__(stamp_to_ns(msg.header.stamp), msg)

    test.create_subscription(PointCloud2, f"{NODE}/labeled_points", keep("labeled"), qos)
    test.create_subscription(PointCloud2, f"{NODE}/filtered", keep("filtered"), qos)
    for name in DEBUG:
        test.create_subscription(Temperature, f"{NODE}/debug/{name}", keep(name), qos)
    pub = test.create_publisher(PointCloud2, "/lidar", qos_profile_sensor_data)
    set_params = test.create_client(SetParameters, f"{NODE}/set_parameters")
    executor = MultiThreadedExecutor(num_threads=4, context=ctx)
    executor.add_node(node)
    executor.add_node(test)
    threading.Thread(target=executor.spin, daemon=True).start()
    wait_for(lambda: pub.get_subscription_count() > 0 and node.outputs.filtered.get_subscription_count() > 0
             and all(p.get_subscription_count() > 0 for p in node.outputs.debug.values()), what="discovery")
    yield type("Rig", (), {"node": node, "test": test, "pub": pub, "got": got, "sensors": sensors,
                           "set_params": set_params})()
    executor.shutdown()
    node.destroy_node()
    test.destroy_node()
    rclpy.shutdown(context=ctx)


def set_filter(rig, classes):
    from rcl_interfaces.srv import SetParameters

    wait_for(rig.set_params.service_is_ready, what="the set_parameters service")
    param = Parameter("filter.classes", Parameter.Type.STRING_ARRAY, classes)
    future = rig.set_params.call_async(SetParameters.Request(parameters=[param.to_parameter_msg()]))
    wait_for(future.done, what="set_parameters response")
    return future.result().results[0]


def driver_cloud(rig, stamp_ns):
    """The KITTI scan as a driver might send it: an extra per-point field (ring) besides x y z intensity."""
    s = rig.sensors
    ring = (np.arange(s.xyz.shape[0]) % 64).astype(np.uint16)
    return encode_cloud({"xyz": s.xyz, "intensity": s.intensity, "ring": ring}, "velodyne", stamp_ns, s.types)


def frame(rig):
    """One scan stamped now (ROS clock); (sent cloud, labels of its labeled cloud, its filtered cloud)."""
    stamp_ns = rig.node.get_clock().now().nanoseconds
    cloud = driver_cloud(rig, stamp_ns)
    rig.pub.publish(cloud)
    labeled = wait_for(lambda: rig.got["labeled"].get(stamp_ns), what=f"labeled cloud {stamp_ns}")
    filtered = wait_for(lambda: rig.got["filtered"].get(stamp_ns), what=f"filtered cloud {stamp_ns}")
    return cloud, read_fields(labeled, ["label"])["label"], filtered


def rows(cloud):
    return np.frombuffer(bytes(cloud.data), np.uint8).reshape(-1, cloud.point_step)


def test_filtered_cloud_keeps_the_layout_and_drops_the_chosen_classes_set_at_run_time(rig):
    cloud, label, filtered = frame(rig)
    layout = [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields]
    assert [(f.name, f.offset, f.datatype, f.count) for f in filtered.fields] == layout
    assert filtered.point_step == cloud.point_step and bytes(filtered.data) == bytes(cloud.data)  # nothing chosen
    # the most frequent class of this scan goes, through the parameter service
    counts = np.bincount(label, minlength=len(PROMPTS) + 1)
    counts[0] = 0
    top = int(counts.argmax())
    assert counts[top] > 0
    result = set_filter(rig, [PROMPTS[top - 1]])
    assert result.successful, result.reason
    cloud, label, filtered = frame(rig)
    kept = label != top
    assert (~kept).sum() > 0 and filtered.width == kept.sum() and filtered.height == 1
    assert np.array_equal(rows(filtered), rows(cloud)[kept])  # the input's own bytes, in the input's order
    assert [(f.name, f.offset, f.datatype, f.count) for f in filtered.fields] == layout
    assert set_filter(rig, [""]).successful  # what `ros2 param set ... "['']"` sends to clear it
    cloud, _, filtered = frame(rig)
    assert bytes(filtered.data) == bytes(cloud.data)


def test_filter_classes_outside_the_vocabulary_are_refused_with_the_reason(rig):
    before = list(rig.node.values["filter.classes"])
    result = set_filter(rig, ["road", "unicorn"])
    assert not result.successful and "unicorn" in result.reason and "not in the vocabulary" in result.reason
    assert rig.node.values["filter.classes"] == before


def test_debug_times_come_per_frame_stamped_with_the_cloud(rig):
    stamps = [stamp_to_ns(frame(rig)[0].header.stamp) for _ in range(2)]
    for name in DEBUG:
        msg = wait_for(lambda: rig.got[name].get(stamps[1]), what=f"{name} of the second frame")
        assert stamp_to_ns(msg.header.stamp) == stamps[1] and msg.header.frame_id == "velodyne"
        assert msg.temperature > 0, (name, msg.temperature)
    assert rig.got["processing_time_ms"][stamps[0]].temperature > 0
    # time since the sensor stamp includes the work on the frame
    assert rig.got["pipeline_latency_ms"][stamps[0]].temperature >= rig.got["processing_time_ms"][stamps[0]].temperature
