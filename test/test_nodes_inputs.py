"""Sensor inputs through real DDS: a SemanticKITTI cloud, image and camera_info are synced and decoded into a
Frame with the camera's model and static extrinsics; a silent camera gives a partial frame after the timeout;
a camera frame without calibration is left out and counted."""
import itertools
import threading
import time

import numpy as np
import pytest

from conftest import Sensors, require_rclpy, wait_for

rclpy = require_rclpy()
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402

from sal_ros.core.msgtypes import NS_PER_S  # noqa: E402

T0 = 1_700_000_000_000_000_000

_STARTS = itertools.count(1)


def fresh_t0() -> int:
    """A base stamp later than any a test of this module used before: the shared synchronizer drops a cloud
    older than the last it emitted, so stamps must grow in the order tests run, not in file order."""
    return T0 + next(_STARTS) * 10 * NS_PER_S


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from sal_ros.nodes import params as P
    from sal_ros.nodes.inputs import SensorInputs, declare_inputs
    from sal_ros.nodes.stats import NodeStats, Throttle

    sensors = Sensors(tmp_path_factory.mktemp("inputs"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    values = {"cloud_topic": "/in/points", "cameras": ["image_0"], "camera.image_0.image_topic": "/in/image",
              "camera.image_0.info_topic": "/in/info", "sync.timeout": 0.2, "calibration.source": "static",
              "calibration.file": str(sensors.calib_file)}
    node = rclpy.create_node(P.RECORDER_NODE, context=ctx, parameter_overrides=P.overrides(P.RECORDER_NODE, values))
    declared, cameras = declare_inputs(node)
    got = []
    stats = NodeStats()
    inputs = SensorInputs(node, declared, cameras, got.append, stats, Throttle())
    test = rclpy.create_node("inputs_test", context=ctx)
    pubs = (test.create_publisher(PointCloud2, "/in/points", qos_profile_sensor_data),
            test.create_publisher(Image, "/in/image", qos_profile_sensor_data),
            test.create_publisher(CameraInfo, "/in/info", qos_profile_sensor_data))
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)
    executor.add_node(node)
    executor.add_node(test)
    threading.Thread(target=executor.spin, daemon=True).start()
    wait_for(lambda: all(p.get_subscription_count() for p in pubs), what="subscriptions")
    yield sensors, inputs, pubs, got, stats
    executor.shutdown()
    node.destroy_node()
    test.destroy_node()
    rclpy.shutdown(context=ctx)


def test_synced_frame_decodes_with_camera_model_and_extrinsics(rig):
    # Stamps, counters and the list of sets are relative to this test's start: the module's tests share the rig
    # and pass in any order.
    sensors, inputs, (pub_cloud, pub_image, pub_info), got, stats = rig
    t0, n, matched = fresh_t0(), len(got), stats.get("matched")
    pub_info.publish(sensors.info(t0))
    # camera_info is not synced: it only has to be there before the frame is decoded
    wait_for(lambda: inputs._infos.get("image_0") is not None, what="camera info")
    pub_image.publish(sensors.image_msg(t0 + 5_000_000))  # within the 30 ms match threshold
    pub_cloud.publish(sensors.cloud(t0))
    synced = wait_for(lambda: got[n] if len(got) > n else None, what="synced set")
    assert synced.missing == () and synced.images["image_0"][0] == t0 + 5_000_000
    decoded = inputs.decode(synced)
    frame = decoded.frame
    assert frame.stamp_ns == t0 and frame.frame_id == "velodyne" and frame.missing_cameras == ()
    assert np.array_equal(frame.points, sensors.xyz) and np.array_equal(frame.intensity, sensors.intensity)
    view = frame.cameras["image_0"]
    assert np.array_equal(view.image, sensors.image)
    assert np.allclose(view.T_cam_lidar, sensors.calib["image_0"].T_cam_lidar)
    assert np.allclose(view.camera.K, sensors.calib["image_0"].camera.K)
    assert (view.stamp_ns, view.frame_id) == (t0 + 5_000_000, "cam0")
    assert stats.get("matched") == matched + 1


def test_silent_camera_gives_partial_frame_and_unknown_frame_is_left_out(rig):
    sensors, inputs, (pub_cloud, pub_image, _), got, stats = rig
    n, partial, missing_tf = len(got), stats.get("partial"), stats.get("error.missing_transform")
    t0 = fresh_t0()
    pub_cloud.publish(sensors.cloud(t0 + 100_000_000))  # no image: partial after the timeout
    synced = wait_for(lambda: got[n] if len(got) > n else None, what="partial set")
    assert synced.missing == ("image_0",) and stats.get("partial") == partial + 1
    assert inputs.decode(synced).frame.missing_cameras == ("image_0",)

    image = sensors.image_msg(t0 + 200_000_000)
    image.header.frame_id = "uncalibrated_cam"
    pub_image.publish(image)
    pub_cloud.publish(sensors.cloud(t0 + 200_000_000))
    synced = wait_for(lambda: got[n + 1] if len(got) > n + 1 else None, what="set with image")
    decoded = inputs.decode(synced)
    assert decoded.problems == {"image_0": "missing_transform"}
    assert decoded.frame.missing_cameras == ("image_0",) and not decoded.frame.cameras
    assert stats.get("error.missing_transform") == missing_tf + 1


def test_sync_timeout_runs_on_sim_time_in_a_slowed_replay(tmp_path):
    """At replay rate 0.1 a camera firing 150 ms after the cloud arrives 1.5 s later in wall time: the sync must
    wait in bag time (sim clock), as it would live, and not give up after 0.38 s of wall time (window end
    0.18 s + timeout 0.2 s). The timeout still ends the wait once the sim clock passes it; the latency clock
    stays the wall clock."""
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image, PointCloud2

    from sal_ros.core.msgtypes import make_stamp
    from sal_ros.nodes import params as P
    from sal_ros.nodes.inputs import SensorInputs, declare_inputs
    from sal_ros.nodes.stats import NodeStats, Throttle

    sensors = Sensors(tmp_path)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    values = {"use_sim_time": True, "cloud_topic": "/sim/points", "cameras": ["image_0"],
              "camera.image_0.image_topic": "/sim/image", "camera.image_0.info_topic": "/sim/info",
              "camera.image_0.time_offset": 0.15, "sync.match_threshold": 0.03, "sync.timeout": 0.2,
              "calibration.source": "static", "calibration.file": str(sensors.calib_file)}
    node = rclpy.create_node(P.RECORDER_NODE, context=ctx, parameter_overrides=P.overrides(P.RECORDER_NODE, values))
    declared, cameras = declare_inputs(node)
    got, stats = [], NodeStats()
    SensorInputs(node, declared, cameras, got.append, stats, Throttle())
    test = rclpy.create_node("sim_clock_test", context=ctx)
    reliable = rclpy.qos.QoSProfile(depth=10)
    pub_cloud = test.create_publisher(PointCloud2, "/sim/points", qos_profile_sensor_data)
    pub_image = test.create_publisher(Image, "/sim/image", qos_profile_sensor_data)
    pub_clock = test.create_publisher(Clock, "/clock", reliable)
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)
    executor.add_node(node)
    executor.add_node(test)
    threading.Thread(target=executor.spin, daemon=True).start()
    sim = {"now": T0, "step": 5_000_000}  # 5 ms of bag time per 50 ms of wall time: rate 0.1
    running = threading.Event()
    running.set()

    def tick():
        while running.is_set():
            pub_clock.publish(Clock(clock=make_stamp(sim["now"], sensors.types)))
            sim["now"] += sim["step"]
            time.sleep(0.05)

    clock_thread = threading.Thread(target=tick, daemon=True)
    try:
        wait_for(lambda: pub_cloud.get_subscription_count() and pub_image.get_subscription_count()
                 and pub_clock.get_subscription_count(), what="subscriptions")
        clock_thread.start()
        wait_for(lambda: node.get_clock().now().nanoseconds >= T0, what="sim time")
        sent = time.monotonic_ns()
        pub_cloud.publish(sensors.cloud(sim["now"]))
        cloud_stamp = sim["now"]
        # The replay publishes the image when the bag clock reaches its stamp (~1.5 s wall from now).
        wait_for(lambda: node.get_clock().now().nanoseconds >= cloud_stamp + 150_000_000, what="bag time +150 ms")
        assert not got, "the set was decided before the camera's image could arrive"
        assert time.monotonic_ns() - sent > 1.0 * NS_PER_S  # well past the wall-time timeout
        pub_image.publish(sensors.image_msg(cloud_stamp + 150_000_000))
        synced = wait_for(lambda: got[0] if got else None, what="matched set")
        assert synced.stamp_ns == cloud_stamp and synced.missing == ()
        assert 0 < synced.received_ns - sent < 5 * NS_PER_S  # wall-clock arrival, for the latency figure

        sim["step"] = 50_000_000  # speed the bag clock up: a cloud without image times out in bag time
        pub_cloud.publish(sensors.cloud(sim["now"]))
        synced = wait_for(lambda: got[1] if len(got) > 1 else None, what="partial set")
        assert synced.missing == ("image_0",) and stats.get("partial") == 1
    finally:
        running.clear()
        executor.shutdown()
        node.destroy_node()
        test.destroy_node()
        rclpy.shutdown(context=ctx)


def test_rectified_camera_projects_with_p_and_r(tmp_path):
    """camera.<name>.rectified: the view gets CameraInfo's P as a plain pinhole and the rectification folded into
    its extrinsics, so a stereo right image_rect (R, Tx) projects as P [R X; 1]; the raw view keeps K and D."""
    import transforms3d
    from sensor_msgs.msg import CameraInfo

    from sal_ros.core.camera import project_points
    from sal_ros.core.sync import SyncedSet
    from sal_ros.nodes import params as P
    from sal_ros.nodes.inputs import SensorInputs, declare_inputs
    from sal_ros.nodes.stats import NodeStats, Throttle

    sensors = Sensors(tmp_path)
    K = sensors.calib["image_0"].camera.K
    R = transforms3d.euler.euler2mat(0.004, -0.01, 0.003)
    Pm = np.hstack([K, [[-K[0, 0] * 0.54], [0], [0]]])
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        views = {}
        for rectified in (False, True):
            values = {"cameras": ["image_0"], "camera.image_0.rectified": rectified, "calibration.source": "static",
                      "calibration.file": str(sensors.calib_file)}
            node = rclpy.create_node(P.RECORDER_NODE, context=ctx,
                                     parameter_overrides=P.overrides(P.RECORDER_NODE, values))
            declared, cameras = declare_inputs(node)
            inputs = SensorInputs(node, declared, cameras, lambda s: None, NodeStats(), Throttle())
            info = CameraInfo(**sensors.calib["image_0"].camera.to_camera_info_fields())
            info.d = [-0.2, 0.05, 0.0, 0.0, 0.0]  # the raw camera's distortion, still in image_rect's info
            info.r, info.p = R.reshape(-1).tolist(), Pm.reshape(-1).tolist()
            inputs._info_callback("image_0")(info)
            synced = SyncedSet(T0, sensors.cloud(T0), {"image_0": (T0, sensors.image_msg(T0))})
            views[rectified] = inputs.decode(synced).frame.cameras["image_0"]
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    raw, rect = views[False], views[True]
    assert raw.camera.is_distorted and not rect.camera.is_distorted
    np.testing.assert_array_equal(rect.camera.K, K)
    proj = project_points(sensors.xyz, rect.T_cam_lidar, rect.camera)
    cam = sensors.xyz @ raw.T_cam_lidar[:3, :3].T + raw.T_cam_lidar[:3, 3]  # the optical frame, from TF/YAML
    h = (Pm @ np.vstack([R @ cam.T, np.ones(len(cam))])).T
    np.testing.assert_allclose(proj.uv[proj.valid], (h[:, :2] / h[:, 2:])[proj.valid], rtol=0, atol=1e-6)
    assert proj.valid.sum() > 15_000
