"""Bad inputs found by fuzzing the nodes (issue 14 items 5, 7, 8): each is left out or dropped with a named,
counted reason while the rest goes on; the node's side runs through real DDS."""
import threading

import numpy as np
import pytest

from conftest import Sensors, require_data, require_rclpy, wait_until

from sal_ros.core.errors import SensorDataError
from sal_ros.nodes.messages import rclpy_types

T0 = 1_700_000_000_000_000_000


# ------------------------------------------------------------------------------------------ without ROS


def test_an_intensity_field_with_count_two_is_ignored_not_the_cloud():
    from sal_ros.core.pointcloud2 import encode_cloud, intensity_problem, read_xyz_intensity

    xyz = np.arange(30, dtype=np.float32).reshape(10, 3)
    msg = encode_cloud({"xyz": xyz, "intensity": np.ones((10, 2), np.float32)}, "lidar", T0, rclpy_types())
    got, intensity = read_xyz_intensity(msg)
    assert np.array_equal(got, xyz) and intensity is None
    assert "count 2" in intensity_problem(msg)


def test_wrong_typed_parameter_names_the_parameter():
    from sal_ros.nodes.params import SEGMENTER_NODE, overrides

    with pytest.raises(ValueError, match=r"parameter prompts: expected string array, got 5 \(int\)"):
        overrides(SEGMENTER_NODE, {"prompts": 5})
    with pytest.raises(ValueError, match=r"parameter stats_period: expected double, got 'abc'"):
        overrides(SEGMENTER_NODE, {"stats_period": "abc"})


def test_non_utf8_vocabulary_and_params_files_are_named(tmp_path):
    from sal_ros.model.vocabulary import Vocabulary, VocabularyError
    from sal_ros.nodes.params import SEGMENTER_NODE, load_params_file

    bad = tmp_path / "vocab.yaml"
    bad.write_bytes(b"classes:\n  - name: caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(VocabularyError, match=r"vocabulary file .*vocab\.yaml: not UTF-8 text \(byte 22: invalid"):
        Vocabulary.from_yaml(bad)
    params = tmp_path / "params.yaml"
    params.write_bytes(b"/**:\n  ros__parameters:\n    prompts: [caf\xe9]\n")
    with pytest.raises(ValueError, match=r"params file .*params\.yaml"):
        load_params_file(params, SEGMENTER_NODE)


def _kitti_frame():
    from sal_ros.data.datasets import load_semantickitti

    return next(iter(load_semantickitti(require_data("semantickitti", "sequences", "00"))))


@pytest.mark.parametrize("size", [(10, 10), (0, 0)])
def test_pseudolabeling_leaves_out_an_image_its_calibration_does_not_describe(size):
    from dataclasses import replace

    from sal_ros.pseudolabel.engine import EngineConfig, PseudoLabeler

    frame = _kitti_frame()
    view = frame.cameras["image_0"]
    assert (view.camera.width, view.camera.height) == (1241, 376)
    frame.cameras["image_0"] = replace(view, image=np.zeros(size, np.uint8))
    labeler = PseudoLabeler(EngineConfig(masks="slic", tokens=False))
    reason = "empty_image" if size == (0, 0) else "image_size_mismatch"
    with pytest.raises(SensorDataError, match=f"image_0: {reason}"):
        labeler.label_frame(frame)  # was: 0 instances, written as a success


# --------------------------------------------------------------------------------------- node side (DDS)


@pytest.fixture
def node_rig(tmp_path):
    """SensorInputs of a recorder-named node (use_sim_time, /clock from this test) and publishers into it."""
    rclpy = require_rclpy()
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from sal_ros.nodes import params as P
    from sal_ros.nodes.inputs import SensorInputs, declare_inputs
    from sal_ros.nodes.stats import NodeStats, Throttle

    sensors = Sensors(tmp_path)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    values = {"use_sim_time": True, "cloud_topic": "/f/points", "cameras": ["image_0"],
              "camera.image_0.image_topic": "/f/image", "camera.image_0.info_topic": "/f/info",
              "sync.timeout": 0.2, "input_timeout": 0.5, "calibration.source": "static",
              "calibration.file": str(sensors.calib_file)}
    node = rclpy.create_node(P.RECORDER_NODE, context=ctx, parameter_overrides=P.overrides(P.RECORDER_NODE, values))
    declared, cameras = declare_inputs(node)
    got, stats, warnings = [], NodeStats(), []
    inputs = SensorInputs(node, declared, cameras, got.append, stats, Throttle())
    real_warn = inputs._warn
    inputs._warn = lambda key, text: (warnings.append(text), real_warn(key, text))  # what the node logs
    test = rclpy.create_node("faults_test", context=ctx)
    pubs = {"cloud": test.create_publisher(PointCloud2, "/f/points", qos_profile_sensor_data),
            "image": test.create_publisher(Image, "/f/image", qos_profile_sensor_data),
            "info": test.create_publisher(CameraInfo, "/f/info", qos_profile_sensor_data),
            "clock": test.create_publisher(Clock, "/clock", QoSProfile(depth=10))}
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)
    executor.add_node(node)
    executor.add_node(test)
    threading.Thread(target=executor.spin, daemon=True).start()
    wait_until(lambda: all(p.get_subscription_count() for p in pubs.values()), "subscriptions", stall_s=60)
    rig = type("Rig", (), dict(sensors=sensors, inputs=inputs, pubs=pubs, got=got, stats=stats,
                               warnings=warnings, node=node))()

    def set_clock(stamp_ns):
        from sal_ros.core.msgtypes import make_stamp

        pubs["clock"].publish(Clock(clock=make_stamp(stamp_ns, sensors.types)))
        wait_until(lambda: node.get_clock().now().nanoseconds == stamp_ns, f"sim time {stamp_ns}", stall_s=60)

    rig.set_clock = set_clock
    yield rig
    executor.shutdown()
    node.destroy_node()
    test.destroy_node()
    rclpy.try_shutdown(context=ctx)


def _frame(rig, stamp, image=None):
    """Publish camera info, image and cloud at ``stamp``; the synced set that comes out."""
    n = len(rig.got)
    rig.pubs["info"].publish(rig.sensors.info(stamp))
    wait_until(lambda: rig.inputs._infos.get("image_0") is not None, "camera info", stall_s=60)
    msg = rig.sensors.image_msg(stamp) if image is None else image
    rig.pubs["image"].publish(msg)
    rig.pubs["cloud"].publish(rig.sensors.cloud(stamp))
    return wait_until(lambda: rig.got[n] if len(rig.got) > n else None, f"synced set at {stamp}", stall_s=60)


def test_node_leaves_out_images_whose_size_disagrees_with_the_camera_info(node_rig):
    rig = node_rig
    rig.set_clock(T0)
    small = rig.sensors.image_msg(T0, np.zeros((10, 10), np.uint8))
    decoded = rig.inputs.decode(_frame(rig, T0, small))
    assert decoded.problems == {"image_0": "image_size_mismatch"} and not decoded.frame.cameras
    assert rig.stats.get("error.image_size_mismatch") == 1
    assert any("10x10" in w and "1241x376" in w for w in rig.warnings)
    empty = rig.sensors.image_msg(T0 + 10**8, np.zeros((0, 0), np.uint8))
    decoded = rig.inputs.decode(_frame(rig, T0 + 10**8, empty))
    assert decoded.problems == {"image_0": "empty_image"} and rig.stats.get("error.empty_image") == 1
    decoded = rig.inputs.decode(_frame(rig, T0 + 2 * 10**8))  # a good frame after them
    assert decoded.problems == {} and decoded.frame.cameras["image_0"].image.shape == (376, 1241)


def test_negative_stamp_and_odd_intensity_are_counted_and_logged(node_rig):
    from sal_ros.core.pointcloud2 import encode_cloud

    rig = node_rig
    cloud = rig.sensors.cloud(T0)
    cloud.header.stamp.sec = -5
    rig.pubs["cloud"].publish(cloud)
    wait_until(lambda: rig.stats.get("error.negative_stamp"), "the negative stamp counted", stall_s=60)
    assert any("negative stamp" in w for w in rig.warnings)
    xyz = rig.sensors.xyz[:1000]
    odd = encode_cloud({"xyz": xyz, "intensity": np.ones((1000, 2), np.float32)}, "velodyne", T0, rig.sensors.types)
    frame = rig.inputs.decode_cloud(odd)
    assert np.array_equal(frame.points, xyz) and frame.intensity is None
    assert rig.stats.get("warning.intensity_ignored") == 1


def test_replaying_a_bag_again_into_a_sim_time_node_resets_and_goes_on(node_rig):
    rig = node_rig
    for loop in range(2):  # the same two stamps twice, as `ros2 bag play --clock` of a short bag, run again
        for k in range(2):
            stamp = T0 + k * 100_000_000
            rig.set_clock(stamp)
            synced = _frame(rig, stamp)
            assert synced.stamp_ns == stamp and synced.missing == ()
    assert rig.stats.get("time_jump_back") == 1
    assert rig.inputs.sync_stats()["dropped_late_cloud"] == 0


def test_the_input_watchdog_runs_on_wall_time_under_sim_time(node_rig):
    # No /clock at all: the ROS clock stands still, the inputs are silent, the warning must still come.
    rig = node_rig
    text = wait_until(lambda: next((w for w in rig.warnings if "published nothing" in w), None),
                      "the silent-input warning", stall_s=60)
    assert "/f/points" in text or "/f/image" in text
