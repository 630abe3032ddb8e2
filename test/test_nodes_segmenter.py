"""The segmenter node end to end with real rclpy and DDS: a real SemanticKITTI scan + image + camera_info in,
labeled points (same points, same order), markers, overlay, info out; prompts changed through the
SetParameters service; bad input never kills it; the latest-only slot drops and counts. The tests share one
node and pass in any order: stamps grow in run order, counts are read relative, prompts are put back."""
import contextlib
import itertools
import json

import numpy as np
import pytest

from conftest import Sensors, Spinner, call_service, require_rclpy, wait_for, wait_until

rclpy = require_rclpy()
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data  # noqa: E402

from sal_ros.core.msgtypes import make_header, stamp_to_ns  # noqa: E402
from sal_ros.core.pointcloud2 import encode_cloud, read_fields  # noqa: E402
from sal_ros.nodes.qos import latched  # noqa: E402


T0 = 1_700_000_000_000_000_000
NODE = "/sal_segmenter"
PROMPTS = ["car", "road", "tree"]
_STARTS = itertools.count(1)


def fresh_t0() -> int:
    """A base stamp later than any an earlier test used: the node drops a cloud older than the last it took."""
    return T0 + next(_STARTS) * 10_000_000_000
# A text encoder small enough for CPU tests; must be a name sal_ros.model.text_encoder.TextEncoder accepts.
TINY_TEXT_ENCODER = "sal-tiny-text"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The segmenter and a test node (publishers, subscribers, parameter client) on one executor."""
    from rcl_interfaces.srv import SetParameters
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_msgs.msg import String
    from visualization_msgs.msg import MarkerArray

    from sal_ros.nodes import params as P
    from sal_ros.nodes.segmenter import SegmenterNode

    sensors = Sensors(tmp_path_factory.mktemp("segmenter"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    values = {
        "cloud_topic": "/kitti/points", "cameras": ["cam0"],
        "camera.cam0.image_topic": "/kitti/image", "camera.cam0.info_topic": "/kitti/camera_info",
        "sync.timeout": 0.3, "calibration.source": "static", "calibration.file": str(sensors.calib_file),
        "model.device": "cpu", "text_encoder.model": TINY_TEXT_ENCODER, "prompts": PROMPTS,
        "score_threshold": 0.0, "stats_period": 0.2, "qos.outputs.depth": 5,
    }
    node = SegmenterNode(context=ctx, parameter_overrides=P.overrides(P.SEGMENTER_NODE, values))
    test = rclpy.create_node("segmenter_test", context=ctx)
    got = {"cloud": [], "markers": [], "info": [], "overlay": [], "vocabulary": [], "stats": []}
    qos = QoSProfile(depth=10)
    rig = type("Rig", (), {})()
    rig.node, rig.test, rig.sensors, rig.got = node, test, sensors, got
    rig.pub_cloud = test.create_publisher(PointCloud2, "/kitti/points", qos_profile_sensor_data)
    rig.pub_image = test.create_publisher(Image, "/kitti/image", qos_profile_sensor_data)
    rig.pub_info = test.create_publisher(CameraInfo, "/kitti/camera_info", qos_profile_sensor_data)
    rig.outputs = []

    def subscribe():  # the outputs, once; the idle test takes them away and the next test back
        if not rig.outputs:
            rig.outputs = [
                test.create_subscription(PointCloud2, f"{NODE}/labeled_points", got["cloud"].append, qos),
                test.create_subscription(MarkerArray, f"{NODE}/markers", got["markers"].append, qos),
                test.create_subscription(String, f"{NODE}/info", lambda m: got["info"].append(json.loads(m.data)),
                                         qos),
                test.create_subscription(Image, f"{NODE}/overlay/cam0", got["overlay"].append, qos),
            ]
        wait_for(lambda: node.outputs.cloud.get_subscription_count() > 0, what="output subscription")

    def unsubscribe():
        for sub in rig.outputs:
            test.destroy_subscription(sub)
        rig.outputs = []
        wait_for(lambda: node.outputs.cloud.get_subscription_count() == 0, what="no output subscription")

    rig.subscribe, rig.unsubscribe = subscribe, unsubscribe
    test.create_subscription(String, f"{NODE}/debug/vocabulary", lambda m: got["vocabulary"].append(json.loads(m.data)),
                             latched())
    test.create_subscription(String, f"{NODE}/stats", lambda m: got["stats"].append(json.loads(m.data)), qos)
    rig.set_params = test.create_client(SetParameters, f"{NODE}/set_parameters")
    executor = MultiThreadedExecutor(num_threads=4, context=ctx)
    executor.add_node(node)
    executor.add_node(test)
    spinner = Spinner(executor)
    wait_for(lambda: rig.pub_cloud.get_subscription_count() > 0, what="segmenter subscription")
    yield rig
    spinner.stop(node, test)
    rclpy.shutdown(context=ctx)


def publish_frame(rig, stamp_ns, cloud=None, camera=True):
    if camera:
        rig.pub_info.publish(rig.sensors.info(stamp_ns))
        rig.pub_image.publish(rig.sensors.image_msg(stamp_ns))
    rig.pub_cloud.publish(rig.sensors.cloud(stamp_ns) if cloud is None else cloud)


def cloud_at(rig, stamp_ns):
    return wait_for(lambda: next((c for c in rig.got["cloud"] if stamp_to_ns(c.header.stamp) == stamp_ns), None),
                    what=f"labeled cloud at {stamp_ns}")


def count(rig, name):
    return rig.node.stats.get(name)


def set_prompts(rig, value, type_=Parameter.Type.STRING_ARRAY):
    from rcl_interfaces.srv import SetParameters

    request = SetParameters.Request(parameters=[Parameter("prompts", type_, value).to_parameter_msg()])
    return set_parameters(rig, request)


def set_parameters(rig, request):
    """The first result of a SetParameters call, resent if its response is lost (conftest.call_service)."""
    return call_service(rig.set_params, request, lambda predicate, what: wait_for(predicate, what=what)).results[0]


def restore_prompts(rig):
    """Put the module's prompts back, so the next test (in any order) finds them."""
    if rig.node.get_parameter("prompts").value != PROMPTS or list(rig.node.active.class_names) != PROMPTS:
        before = rig.node.active.version
        assert set_prompts(rig, PROMPTS).successful
        wait_for(lambda: rig.node.active.version > before, what="the module's prompts back")


def test_no_model_work_without_subscribers(rig):
    rig.unsubscribe()
    idle, processed = count(rig, "idle"), count(rig, "processed")
    publish_frame(rig, fresh_t0())
    wait_for(lambda: count(rig, "idle") > idle, what="idle frame")
    assert count(rig, "processed") == processed


def test_labeled_points_same_points_same_order_with_markers_overlay_info(rig):
    rig.subscribe()
    version = rig.node.active.version
    stamp = fresh_t0()
    publish_frame(rig, stamp)
    cloud = cloud_at(rig, stamp)
    assert cloud.header.frame_id == "velodyne"
    fields = read_fields(cloud)
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "intensity", "label", "vocabulary_version", "instance",
                                              "score", "rgb"]
    assert np.array_equal(np.stack([fields["x"], fields["y"], fields["z"]], 1), rig.sensors.xyz)
    assert np.array_equal(fields["intensity"], rig.sensors.intensity)
    assert fields["label"].dtype == np.uint16 and fields["instance"].dtype == np.uint32
    assert (fields["vocabulary_version"] == version).all()
    assert fields["label"].max() <= 3 and np.all((fields["score"] >= 0) & (fields["score"] <= 1))
    info = wait_for(lambda: next((i for i in rig.got["info"] if i["stamp_ns"] == stamp), None), what="info")
    assert info["classes"] == PROMPTS and info["vocabulary_version"] == version
    assert info["missing_cameras"] == [] and info["num_points"] == len(rig.sensors.xyz)
    markers = wait_for(lambda: next((m for m in rig.got["markers"] if m.markers
                                     and stamp_to_ns(m.markers[0].header.stamp) == stamp), None), what="markers")
    from visualization_msgs.msg import Marker

    assert markers.markers[0].action == Marker.DELETEALL
    assert (markers.markers[1].ns, markers.markers[1].id) == ("vocabulary", version)
    assert len(markers.markers) == 2 + 2 * sum(i["num_points"] >= 5 for i in info["instances"])
    overlay = wait_for(lambda: next((o for o in rig.got["overlay"] if stamp_to_ns(o.header.stamp) == stamp), None),
                       what="overlay")
    assert (overlay.width, overlay.height, overlay.encoding) == (1241, 376, "rgb8")
    assert overlay.header.frame_id == "cam0"
    pixels = np.frombuffer(overlay.data, np.uint8).reshape(376, 1241, 3)
    assert (pixels[:, :, 0] != pixels[:, :, 1]).any()  # coloured points drawn on the grey image


def test_prompts_set_through_service_valid_and_rejected(rig):
    rig.subscribe()
    wait_for(lambda: rig.got["vocabulary"], what="latched vocabulary")
    try:
        check_prompt_changes(rig)
    finally:
        restore_prompts(rig)


def check_prompt_changes(rig):
    first = rig.got["vocabulary"][-1]
    start = first["version"]
    assert first["classes"] == PROMPTS and start == rig.node.active.version
    for bad, why in ((["car", "car"], "duplicate"), ([], "empty"), (["car", ""], "empty")):
        result = set_prompts(rig, bad)
        assert not result.successful and result.reason, bad
    result = set_prompts(rig, [1, 2], Parameter.Type.INTEGER_ARRAY)  # not strings
    assert not result.successful and "type" in result.reason.lower()
    assert rig.node.get_parameter("prompts").value == PROMPTS
    result = set_prompts(rig, ["car", "person", "building", "vegetation"])
    assert result.successful, result.reason
    vocab = wait_for(lambda: next((v for v in rig.got["vocabulary"] if v["version"] == start + 1), None),
                     what="the new vocabulary")
    assert vocab["classes"] == ["car", "person", "building", "vegetation"]
    stamp = fresh_t0()
    publish_frame(rig, stamp)
    info = wait_for(lambda: next((i for i in rig.got["info"] if i["stamp_ns"] == stamp), None), what="info v2")
    assert info["vocabulary_version"] == start + 1 and info["classes"] == vocab["classes"]
    fields = read_fields(cloud_at(rig, stamp), ["label", "vocabulary_version"])
    assert fields["label"].max() <= 4 and (fields["vocabulary_version"] == start + 1).all()  # the cloud alone says
    markers = wait_for(lambda: next((m for m in rig.got["markers"] if m.markers
                                     and stamp_to_ns(m.markers[0].header.stamp) == stamp), None), what="markers v2")
    assert [m.id for m in markers.markers if m.ns == "vocabulary"] == [start + 1]


def test_bad_clouds_keep_the_node_alive(rig):
    from sensor_msgs.msg import PointCloud2

    rig.subscribe()
    base = fresh_t0()
    types = rig.sensors.types
    malformed = rig.sensors.cloud(base + 300_000_000)
    malformed.width += 10  # claims more points than the data holds
    before = count(rig, "error.malformed_cloud")
    publish_frame(rig, 0, cloud=malformed, camera=False)
    wait_for(lambda: count(rig, "error.malformed_cloud") > before, what="malformed counted")

    empty = encode_cloud({"xyz": np.zeros((0, 3), np.float32)}, "velodyne", base + 400_000_000, types)
    publish_frame(rig, 0, cloud=empty, camera=False)
    cloud_empty = cloud_at(rig, base + 400_000_000)
    assert cloud_empty.width == 0

    xyz = rig.sensors.xyz[:2000].copy()
    xyz[::7] = np.nan
    stamp = base + 500_000_000
    publish_frame(rig, 0, cloud=rig.sensors.cloud(stamp, xyz, rig.sensors.intensity[:2000]), camera=False)
    fields = read_fields(cloud_at(rig, stamp))
    assert fields["x"].shape == (2000,)
    assert np.all(fields["label"][::7] == 0) and np.all(fields["score"][::7] == 0)
    assert np.isnan(fields["x"][::7]).all()

    no_xyz = PointCloud2(header=make_header("velodyne", base + 550_000_000, types), height=1, width=0)
    publish_frame(rig, 0, cloud=no_xyz, camera=False)
    good = base + 600_000_000
    publish_frame(rig, good)
    assert cloud_at(rig, good).width == len(rig.sensors.xyz)  # still alive and processing


def test_latest_only_slot_drops_and_counts_while_busy(rig):
    rig.subscribe()
    processed, dropped = count(rig, "processed"), count(rig, "dropped")
    base = fresh_t0()
    stamps = [base + (700 + i) * 1_000_000 for i in range(5)]
    small = rig.sensors.xyz[:500]
    wait_for(lambda: not rig.node.worker.busy.is_set() and not rig.node.worker.slot._full, what="worker idle")
    with rig.node._model_lock:  # the worker blocks inside the first frame
        rig.pub_cloud.publish(rig.sensors.cloud(stamps[0], small, rig.sensors.intensity[:500]))
        wait_for(rig.node.worker.busy.is_set, what="worker busy")
        for stamp in stamps[1:]:  # paced like a lidar: a same-process burst can lose best-effort samples
            clouds = rig.node.inputs.sync_stats()["clouds"]
            rig.pub_cloud.publish(rig.sensors.cloud(stamp, small, rig.sensors.intensity[:500]))
            wait_for(lambda: rig.node.inputs.sync_stats()["clouds"] > clouds, what=f"cloud {stamp} received")
        wait_for(lambda: count(rig, "dropped") >= dropped + 3, what="replacements")
    cloud_at(rig, stamps[-1])
    wait_for(lambda: count(rig, "processed") >= processed + 2, what="processed")
    assert count(rig, "dropped") == dropped + 3  # frames 2..4 were replaced by their successors
    received = {stamp_to_ns(c.header.stamp) for c in rig.got["cloud"]}
    assert stamps[0] in received and stamps[-1] in received
    assert not received & set(stamps[1:4])
    stats = wait_for(lambda: next((s for s in reversed(rig.got["stats"])
                                   if s["counts"].get("dropped", 0) >= dropped + 3), None), what="stats")
    assert "total" in stats["timings"]


def test_intensity_scale_maps_another_lidars_intensity_to_the_trained_scale(rig):
    from rcl_interfaces.srv import SetParameters

    from sal_ros.core.types import Frame

    def set_scale(value):
        request = SetParameters.Request(
            parameters=[Parameter("model.intensity_scale", Parameter.Type.DOUBLE, value).to_parameter_msg()])
        assert set_parameters(rig, request).successful

    xyz, intensity = rig.sensors.xyz[:20000], rig.sensors.intensity[:20000]  # KITTI: 0..1, as trained

    def segment(values):
        return rig.node.segment_frame(Frame(T0, "velodyne", xyz, values))

    reference = segment(intensity)
    eight_bit = intensity * np.float32(255)  # the same returns from a driver that reports 0..255
    unscaled = segment(eight_bit)
    set_scale(255.0)
    try:
        scaled = segment(eight_bit)
    finally:
        set_scale(0.0)
    assert not np.allclose(unscaled.score, reference.score, atol=1e-3)  # the model does see the scale
    np.testing.assert_allclose(scaled.score, reference.score, atol=1e-4)
    assert np.mean(scaled.label == reference.label) > 0.999


def test_eval_model_feeds_the_model_what_the_node_does_for_a_0_255_lidar(rig, tmp_path):
    """`sal-ros eval model`'s Segmenter (build_segmenter on the node's weights saved as a checkpoint) with
    --intensity-scale 255 and the node with model.intensity_scale 255 label an 8-bit cloud alike."""
    from sal_ros.core.cloud_input import SegmenterConfig
    from sal_ros.core.types import Frame
    from sal_ros.eval.model import build_segmenter
    from sal_ros.model.checkpoint import save_checkpoint

    xyz, eight_bit = rig.sensors.xyz[:20000], rig.sensors.intensity[:20000] * np.float32(255)
    path = save_checkpoint(tmp_path / "node.pt", rig.node._segmenter.model,
                           text_encoder_identity=rig.node._text_encoder)
    offline = build_segmenter(path, PROMPTS, "cpu", SegmenterConfig(score_threshold=0.0, intensity_scale=255.0))
    set_param(rig, "model.intensity_scale", Parameter.Type.DOUBLE, 255.0)
    try:
        node = rig.node.segment_frame(Frame(T0, "velodyne", xyz, eight_bit))
    finally:
        set_param(rig, "model.intensity_scale", Parameter.Type.DOUBLE, 0.0)
    evaluated = offline.segment(xyz, eight_bit)
    assert node.label.any()
    np.testing.assert_array_equal(evaluated.label, node.label)
    np.testing.assert_array_equal(evaluated.instance, node.instance)


def test_vocabulary_file_set_at_run_time(rig, tmp_path):
    from rcl_interfaces.srv import SetParameters

    from conftest import REPO

    def set_file(path):
        request = SetParameters.Request(
            parameters=[Parameter("vocabulary_file", Parameter.Type.STRING, str(path)).to_parameter_msg()])
        return set_parameters(rig, request)

    import os

    before = rig.node.active.version
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [{name: car, thing: maybe}]\n")
    fifo = tmp_path / "vocabulary.fifo"  # opening it would block the parameter callback until a writer came
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("classes: [{name: car}]\n" + "#" * (256 * 1024))
    for path, why in ((tmp_path / "missing.yaml", "not found"), (bad, "thing"), (fifo, "FIFO"), (tmp_path, "folder"),
                      (big, "limit")):
        result = set_file(path)
        assert not result.successful and why in result.reason, (path, result.reason)
    assert rig.node.get_parameter("vocabulary_file").value == ""
    try:
        result = set_file(REPO / "config" / "vocabulary_semantickitti.yaml")
        assert result.successful, result.reason
        vocab = wait_for(lambda: next((v for v in rig.got["vocabulary"] if v["version"] == before + 1), None),
                         what="vocabulary from the file")
        assert len(vocab["classes"]) == 19 and vocab["classes"][0] == "car"
        assert rig.node.active.version == before + 1
        # the change was visible while it embedded: "re-embedding k/N" on ~/debug/vocabulary before v+1
        states = [(v["version"], v["status"]["state"]) for v in rig.got["vocabulary"] if v["version"] >= before]
        assert states.index((before, "re-embedding")) < states.index((before + 1, "active")), states
    finally:
        restore_prompts(rig)


def set_param(rig, name, type_, value):
    from rcl_interfaces.srv import SetParameters

    request = SetParameters.Request(parameters=[Parameter(name, type_, value).to_parameter_msg()])
    result = set_parameters(rig, request)
    assert result.successful, result.reason


def test_score_threshold_and_max_points_are_applied_by_the_segmenter_to_what_is_published(rig):
    """Set at run time, both reach the Segmenter: below the threshold a point is label 0, instance 0, score 0,
    and the summaries (~/info, markers) count and box exactly the published points of the whole subsampled
    cloud, not the model's subset nor points that were zeroed."""
    from sal_ros.core.types import Frame
    from conftest import assert_summaries_describe_the_labels

    xyz, intensity = rig.sensors.xyz, rig.sensors.intensity
    set_param(rig, "score_threshold", Parameter.Type.DOUBLE, 0.3)
    set_param(rig, "max_points", Parameter.Type.INTEGER, 30_000)
    try:
        seg = rig.node.segment_frame(Frame(T0, "velodyne", xyz, intensity))
    finally:
        set_param(rig, "score_threshold", Parameter.Type.DOUBLE, 0.0)
        set_param(rig, "max_points", Parameter.Type.INTEGER, 300_000)
    labeled = seg.label > 0
    assert labeled.any() and (~labeled).any()
    assert (seg.score[labeled] >= 0.3).all()
    assert (seg.score[~labeled] == 0).all() and (seg.instance[~labeled] == 0).all()
    assert sum(i.num_points for i in seg.instances) == int((seg.instance > 0).sum()) > 30_000
    assert_summaries_describe_the_labels(xyz, seg)


def test_min_instance_points_set_at_run_time_drops_small_instances(rig):
    """Instances smaller than min_instance_points vanish from what is published (points back to label 0,
    instance 0) and from the summaries; the larger ones are untouched."""
    try:
        check_min_instance_points(rig)
    finally:
        restore_prompts(rig)


def check_min_instance_points(rig):
    from sal_ros.core.types import Frame
    from conftest import assert_summaries_describe_the_labels

    before = rig.node.active.version
    assert set_prompts(rig, ["car", "person", "bicycle", "truck"]).successful  # things only: no stuff merging
    wait_for(lambda: rig.node.active.version > before, what="the things-only vocabulary")
    frame = Frame(T0, "velodyne", rig.sensors.xyz, rig.sensors.intensity)
    every = rig.node.segment_frame(frame)
    sizes = sorted(i.num_points for i in every.instances)
    assert len(sizes) >= 2 and sizes[0] < sizes[-1]
    limit = sizes[len(sizes) // 2] + 1  # drops the smaller half
    set_param(rig, "min_instance_points", Parameter.Type.INTEGER, limit)
    try:
        kept = rig.node.segment_frame(frame)
    finally:
        set_param(rig, "min_instance_points", Parameter.Type.INTEGER, 1)
    assert kept.instances and all(i.num_points >= limit for i in kept.instances)
    assert len(kept.instances) == sum(s >= limit for s in sizes)
    small = ~np.isin(every.instance, [i.instance_id for i in every.instances if i.num_points >= limit])
    assert (kept.instance[small] == 0).all() and (kept.label[small] == 0).all()
    assert_summaries_describe_the_labels(rig.sensors.xyz, kept)


def test_warm_up_is_paid_before_the_node_says_it_is_ready(rig):
    """The model pass on a synthetic scan, the tracker and the output messages come before the subscriptions
    and the ready line; the first real frame then pays none of it (its time is in ~/stats' first_frame_ms)."""
    import sys

    assert rig.node.startup_events == ["model loaded", "vocabulary", "warm-up", "ready"]
    assert "scipy.optimize" in sys.modules  # the tracker's solver, imported with the node, not on a first frame


def test_nan_logits_skip_the_frame_counted_and_the_node_goes_on(rig):
    """A model that turns NaN at run time (a NaN weight here) costs the frame, named and counted, not the node."""
    import torch

    rig.subscribe()
    params = dict(rig.node._segmenter.model.named_parameters())
    name = next(n for n in params if "decoder" in n and n.endswith("weight"))
    saved = params[name].detach().clone()
    before, processed = count(rig, "error.nonfinite_logits"), count(rig, "processed")
    with rig.node._model_lock, torch.no_grad():
        params[name].fill_(float("nan"))
    try:
        publish_frame(rig, fresh_t0())
        wait_for(lambda: count(rig, "error.nonfinite_logits") > before, what="the NaN frame counted")
    finally:
        with rig.node._model_lock, torch.no_grad():
            params[name].copy_(saved)
    assert count(rig, "processed") == processed  # skipped, not published as all-unlabeled
    good = fresh_t0()
    publish_frame(rig, good)
    assert read_fields(cloud_at(rig, good), ["label"])["label"].any()


def test_a_second_node_of_the_same_name_refuses_to_start_unless_allowed(rig):
    """Two segmenters of one name both answered every cloud and shared one set_parameters: the second one finds
    the first in the ROS graph and stops with the reason; allow_duplicate starts it anyway, with an ERROR name
    status and a count on both, and the first one's status clears when the second leaves."""
    from sal_ros.nodes import diagnostics as D
    from sal_ros.nodes.namesakes import DuplicateNodeError

    values = {"duplicate_check_s": 600.0,  # ends when the namesake is found: discovery is slow at load 12
              "duplicate_ghost_s": 0.0}
    with pytest.raises(DuplicateNodeError, match=r"1 other node\(s\) named /sal_segmenter.*allow_duplicate"):
        with segmenter_in_own_context(values):
            pass
    with segmenter_in_own_context({**values, "allow_duplicate": True}) as second:
        status = wait_until(lambda: (s := second.namesakes.status(second.stats)).level == D.ERROR and s,
                            "the second node's name status")
        assert "1 other node(s) named /sal_segmenter" in status.message and second.stats.get("duplicate_name") == 1
        wait_until(lambda: rig.node.namesakes.status(rig.node.stats).level == D.ERROR, "the first node's status")
    status = wait_until(lambda: (s := rig.node.namesakes.status(rig.node.stats)).level == D.OK and s,
                        "the first node's status after the second left")
    assert status.values == [("namesakes", "0")]


def test_a_namesake_that_leaves_is_waited_out(rig):
    """A node restarted at once meets its own ghost (a crashed participant stays until its DDS lease ends): a
    namesake found at start is given duplicate_ghost_s to leave, and the node starts when it has."""
    import threading

    from rcl_interfaces.msg import Log

    logs = []
    # transient local, as /rosout is published: a warning logged before discovery finished still arrives
    sub = rig.test.create_subscription(Log, "/rosout", lambda m: logs.append(m), QoSProfile(
        depth=1000, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    name = ["--ros-args", "-r", "__node:=ghost_test"]
    with segmenter_in_own_context({"allow_duplicate": True}, name) as ghost:
        started = {}

        def restart():
            try:
                with segmenter_in_own_context({"duplicate_check_s": 600.0, "duplicate_ghost_s": 600.0}, name) as n:
                    started["events"] = list(n.startup_events)
            except Exception as exc:  # noqa: BLE001 - reported below
                started["error"] = exc

        thread = threading.Thread(target=restart)
        thread.start()
        wait_until(lambda: any(m.name == "ghost_test" and "waiting up to 600 s" in m.msg for m in logs),
                   "the restarted node waiting for its namesake to leave", progress=lambda: len(logs))
    thread.join()
    rig.test.destroy_subscription(sub)
    assert "error" not in started, started.get("error")
    assert started["events"][-1] == "ready"


@contextlib.contextmanager
def segmenter_in_own_context(values, cli_args=None):
    from sal_ros.nodes import params as P
    from sal_ros.nodes.segmenter import SegmenterNode

    base = {"model.device": "cpu", "text_encoder.model": TINY_TEXT_ENCODER, "prompts": ["car"],
            "cloud_topic": "/duplicate_test/points"}
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = SegmenterNode(context=ctx, cli_args=cli_args,
                             parameter_overrides=P.overrides(P.SEGMENTER_NODE, {**base, **values}))
        try:
            yield node
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
