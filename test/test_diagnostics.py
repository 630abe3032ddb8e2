"""Health levels of /diagnostics (nodes/diagnostics.py) from recorded frame events, with a fake monotonic clock,
and the typed message builders of nodes/outputs.py."""
import numpy as np
import pytest

from conftest import require_rclpy, wait_until
from sal_ros.core.types import InstanceSummary, OrientedBox
from sal_ros.nodes import diagnostics as D


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def monitor(cameras=("cam0",)):
    clock = FakeClock()
    return D.HealthMonitor(cameras, window_s=10.0, clock=clock), clock


def feed(mon, clock, n, period=0.1, missing=(), dropped_every=0, latency_ms=50.0):
    for k in range(n):
        clock.t += period
        mon.frame_in(missing)
        if dropped_every and k % dropped_every == 0:
            mon.dropped()
        else:
            mon.processed(latency_ms)


def test_input_silent_then_arriving_then_silent_again():
    mon, clock = monitor()
    assert D.input_status("n", mon.window(), "/points", 2.0).level == D.OK  # just started: waiting
    clock.t += 3.0
    status = D.input_status("n", mon.window(), "/points", 2.0)
    assert status.level == D.ERROR and "no frame since start" in status.message
    feed(mon, clock, 20)
    status = D.input_status("n", mon.window(), "/points", 2.0)
    assert status.level == D.OK and dict(status.values)["input rate (Hz)"] == "10"
    clock.t += 2.5
    assert "silent for 2.5 s" in D.input_status("n", mon.window(), "/points", 2.0).message


def test_camera_missing_from_most_frames_warns():
    mon, clock = monitor(("cam0", "cam1"))
    feed(mon, clock, 10, missing=("cam1",))
    status = D.input_status("n", mon.window(), "/points", 2.0)
    assert status.level == D.WARN and "cam1" in status.message and "cam0" not in status.message
    assert dict(status.values)["camera cam1 missing (share)"] == "1"


def test_processing_levels():
    timings = {"total": {"median_ms": 80.0}}
    mon, clock = monitor()
    feed(mon, clock, 20)
    ok = D.processing_status("n", mon.window(), timings)
    assert ok.level == D.OK and dict(ok.values)["total median (ms)"] == "80"
    mon, clock = monitor()
    feed(mon, clock, 20, dropped_every=2)  # half dropped
    assert D.processing_status("n", mon.window(), timings).level == D.WARN
    mon, clock = monitor()
    feed(mon, clock, 20, latency_ms=250.0)  # 250 ms latency at a 100 ms input period
    status = D.processing_status("n", mon.window(), timings)
    assert status.level == D.WARN and "exceeds the input period" in status.message
    mon.error("model")
    status = D.processing_status("n", mon.window(), timings)
    assert status.level == D.ERROR and "model x1" in status.message
    clock.t += 11.0  # the error leaves the window
    assert D.processing_status("n", mon.window(), timings, subscribed=False).level == D.OK


def test_every_key_appears_once_with_the_node_timings_of_stats():
    """~/stats times a stage named latency too: its median must not repeat the window's key ('-' and '275' both
    under "latency median (ms)" before)."""
    mon, clock = monitor()
    feed(mon, clock, 5, latency_ms=275.0)
    timings = {"latency": {"median_ms": 300.0}, "total": {"median_ms": 90.0}, "write": {"median_ms": 4.0}}
    for status in (D.processing_status("n", mon.window(), timings),
                   D.recording_status("n", mon.window(), "frames", 3, "", timings)):
        keys = [key for key, _ in status.values]
        assert len(keys) == len(set(keys)), keys
        assert "total median (ms)" in keys and "write median (ms)" in keys
    values = dict(D.processing_status("n", mon.window(), timings).values)
    assert values["latency median (ms)"] == "275"  # the window's figure, the one the level is judged on


def test_model_cpu_fallback_warns_and_recorder_levels():
    assert D.model_status("n", "cuda", "cpu", 3, 5, 1, 2).level == D.WARN
    assert D.model_status("n", "cpu", "cpu", 3, 5, 1, 2).level == D.OK
    mon, clock = monitor()
    feed(mon, clock, 5)
    assert D.recording_status("r", mon.window(), "frames", 5, "", {}).level == D.OK
    assert D.recording_status("r", mon.window(), "frames", 5, "limit", {}).level == D.WARN
    assert D.recording_status("r", mon.window(), "frames", 5, "store locked by pid 7", {}).level == D.ERROR


def test_diagnostic_array_message():
    require_rclpy()
    from builtin_interfaces.msg import Time

    msg = D.diagnostic_array([D.Status("n: input", D.WARN, "cam1 missing", [("k", "v")])], Time(sec=3), "/n")
    assert D.level_of(msg.status[0]) == D.WARN and msg.status[0].hardware_id == "/n"
    assert [(kv.key, kv.value) for kv in msg.status[0].values] == [("k", "v")] and msg.header.stamp.sec == 3


def test_detections_message_box_id_and_ranked_classes():
    require_rclpy()
    from sal_ros.nodes.messages import rclpy_types
    from sal_ros.nodes import outputs

    inst = InstanceSummary(7, 2, "truck", 0.8, 40, OrientedBox(np.array([1.0, 2.0, 0.5]), np.array([4.0, 2.0, 1.5]),
                                                                np.pi / 2))
    msg = outputs.detections_message([inst], "lidar", 5_000_000_001, ("car", "truck"), rclpy_types(),
                                     {7: [(2, 0.75), (1, 0.25)]})
    assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == ("lidar", 5, 1)
    det = msg.detections[0]
    assert det.id == "7" and (det.bbox.size.x, det.bbox.size.y, det.bbox.size.z) == (4.0, 2.0, 1.5)
    assert (det.bbox.center.position.x, det.bbox.center.position.y) == (1.0, 2.0)
    assert (det.bbox.center.orientation.z, det.bbox.center.orientation.w) == pytest.approx((2 ** -0.5, 2 ** -0.5))
    assert [r.hypothesis.class_id for r in det.results] == ["truck", "car"]
    assert [r.hypothesis.score for r in det.results] == pytest.approx([0.6, 0.2])  # instance score x class share
    plain = outputs.detections_message([inst], "lidar", 0, ("car", "truck"), rclpy_types())
    assert [(r.hypothesis.class_id, r.hypothesis.score) for r in plain.detections[0].results] == [("truck", 0.8)]


def test_track_colours_stay_and_differ():
    from sal_ros.nodes import outputs

    colours = [outputs.track_color(i) for i in range(1, 30)]
    assert outputs.track_color(5) == colours[4]
    assert all(colours[i] != colours[i + 1] for i in range(len(colours) - 1))


def test_tracked_markers_take_the_track_colour_and_id():
    require_rclpy()
    from sal_ros.nodes.messages import rclpy_types
    from sal_ros.nodes import outputs

    box = OrientedBox(np.zeros(3), np.array([4.0, 2.0, 1.5]), 0.0)
    instances = [InstanceSummary(12, 1, "car", 0.5, 40, box), InstanceSummary(13, 1, "car", 0.5, 40, box)]
    msg = outputs.instance_markers(instances, "lidar", 0, outputs.class_colors(1), rclpy_types(), tracked=True)
    boxes = [m for m in msg.markers if m.ns == "boxes"]
    assert [m.id for m in boxes] == [12, 13]
    got = [tuple(round(c * 255) for c in (m.color.r, m.color.g, m.color.b)) for m in boxes]
    assert got == [outputs.track_color(12), outputs.track_color(13)] and got[0] != got[1]  # same class, own colours
    assert [m.text for m in msg.markers if m.ns == "labels"] == ["car 0.50 #12", "car 0.50 #13"]


def test_diagnostics_keep_coming_while_sim_time_stands_still(tmp_path):
    """use_sim_time with no /clock (a paused replay): the ROS clock stands at 0, /diagnostics still ticks."""
    import threading

    rclpy = require_rclpy()
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from sal_ros.nodes import params as P
    from sal_ros.nodes.recorder import RecorderNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    values = {"output_dir": str(tmp_path / "frames"), "diagnostics_period": 0.2, "input_timeout": 0.5}
    node = RecorderNode(context=ctx, parameter_overrides=P.overrides(P.RECORDER_NODE, values)
                        + [Parameter("use_sim_time", Parameter.Type.BOOL, True)])
    probe = rclpy.create_node("diagnostics_probe", context=ctx)
    got = []
    probe.create_subscription(DiagnosticArray, "/diagnostics", got.append, 10)
    executor = MultiThreadedExecutor(num_threads=2, context=ctx)
    executor.add_node(node)
    executor.add_node(probe)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        error = D.ERROR.to_bytes(1, "little")
        wait_until(lambda: len(got) >= 5 and any(s.level == error for m in got for s in m.status),
                   "5 DiagnosticArrays, one with the input ERROR", progress=lambda: len(got), stall_s=60)
        assert node.get_clock().now().nanoseconds == 0  # the ROS clock never moved
        names = {s.name for s in got[-1].status}
        assert names == {"sal_recorder: input", "sal_recorder: recording", "sal_recorder: clouds"}
    finally:
        executor.shutdown()
        node.destroy_node()
        probe.destroy_node()
        rclpy.try_shutdown(context=ctx)


def test_cameras_left_out_at_decoding_count_as_missing():
    mon, clock = monitor(("cam0", "cam1"))
    for _ in range(4):
        clock.t += 0.1
        mon.frame_in(())
        mon.left_out(["cam1"])  # e.g. no transform for it yet
    status = D.input_status("n", mon.window(), "/points", 2.0)
    assert status.level == D.WARN and dict(status.values)["camera cam1 missing (share)"] == "1"
