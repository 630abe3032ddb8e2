"""Seal's temporal poses from a bag's /tf: a converted SemanticKITTI bag re-written with the sequence's motion as
/tf (odom -> base_link, moving) and /tf_static (base_link -> lidar) gives each cloud the lidar pose of poses.txt,
and the temporal pairs match the folder's; a missing pose is said once and counted per step."""
import numpy as np
import pytest
import yaml

from conftest import require_data

from sal_ros.cli import main as cli_main
from sal_ros.core.transforms import invert_transform, make_transform, matrix_to_transform_fields

T_BASE_LIDAR = make_transform([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0.3, 0.0, 1.7])


def _tf(types, parent: str, child: str, T: np.ndarray, stamp: int):
    from sal_ros.core.msgtypes import make_header

    (x, y, z), (qx, qy, qz, qw) = matrix_to_transform_fields(T)
    return types.TransformStamped(header=make_header(parent, stamp, types), child_frame_id=child,
                                  transform=types.Transform(translation=types.Vector3(x=x, y=y, z=z),
                                                            rotation=types.Quaternion(x=qx, y=qy, z=qz, w=qw)))


def _bag_with_motion(src, out, poses: dict[str, np.ndarray]):
    """``src``'s messages plus /tf (odom -> base_link at each cloud stamp: the lidar pose of ``poses``, keyed by
    cloud stamp, through base_link) and /tf_static (base_link -> lidar), written with rosbags."""
    import shutil

    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    from sal_ros.core.msgtypes import rosbags_types

    store = get_typestore(Stores.ROS2_KILTED)
    types = rosbags_types(store)
    messages = []
    with AnyReader([src]) as reader:
        for conn, t, raw in reader.messages():
            messages.append((t, conn.topic, conn.msgtype, bytes(raw)))
    tf_type = "tf2_msgs/msg/TFMessage"
    first = min(int(k) for k in poses)
    static = types.TFMessage(transforms=[_tf(types, "base_link", "lidar", T_BASE_LIDAR, first)])
    messages.append((first, "/tf_static", tf_type, store.serialize_cdr(static, tf_type)))
    for key, T_odom_lidar in poses.items():
        T_odom_base = T_odom_lidar @ invert_transform(T_BASE_LIDAR)
        msg = types.TFMessage(transforms=[_tf(types, "odom", "base_link", T_odom_base, int(key))])
        messages.append((int(key), "/tf", tf_type, store.serialize_cdr(msg, tf_type)))
    conns = {}
    with Writer(out, version=9) as writer:
        for t, topic, msgtype, raw in sorted(messages, key=lambda m: m[0]):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(conns[topic], t, raw)
    for extra in ("extrinsics.yaml", "labels.npz"):
        shutil.copy(src / extra, out / extra)
    return out


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    from sal_ros.data.convert import convert
    from sal_ros.data.datasets import semantickitti_poses

    seq = require_data("semantickitti", "sequences", "00")
    tmp = tmp_path_factory.mktemp("poses")
    convert(seq, tmp / "plain", pose_frame="", progress=False)  # no /tf of its own: the motion is added below
    from sal_ros.data.sources import FrameSource

    stamps = FrameSource(tmp / "plain").keys()
    by_scan = semantickitti_poses(seq)
    poses = {stamp: by_scan[key] for stamp, key in zip(stamps, sorted(by_scan))}
    return seq, _bag_with_motion(tmp / "plain", tmp / "moving", poses), poses


def test_tf_history_interpolates_between_messages_and_never_extrapolates():
    from sal_ros.core.msgtypes import rosbags_types
    from sal_ros.core.tf import TfHistory
    from sal_ros.core.transforms import quaternion_to_matrix

    types = rosbags_types()
    yaw90 = make_transform(quaternion_to_matrix([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)]), [2.0, 0.0, 0.0])
    history = TfHistory()
    history.add([_tf(types, "odom", "base_link", np.eye(4), 1_000_000_000),
                 _tf(types, "odom", "base_link", yaw90, 3_000_000_000)], static=False)
    history.add([_tf(types, "base_link", "lidar", T_BASE_LIDAR, 0)], static=True)
    half = history.lookup("odom", "base_link", 2_000_000_000)  # half way: 1 m along x, 45 degrees
    yaw45 = quaternion_to_matrix([0, 0, np.sin(np.pi / 8), np.cos(np.pi / 8)])
    np.testing.assert_allclose(half, make_transform(yaw45, [1.0, 0.0, 0.0]), atol=1e-12)
    np.testing.assert_allclose(history.lookup("odom", "lidar", 3_000_000_000), yaw90 @ T_BASE_LIDAR, atol=1e-12)
    assert history.lookup("odom", "lidar", 3_000_000_001) is None  # past the last message
    assert history.lookup("odom", "lidar", 999_999_999) is None
    assert history.lookup("map", "lidar", 2_000_000_000) is None


def test_bag_tf_gives_the_lidar_pose_at_each_cloud_stamp(bag):
    from sal_ros.data.bag import bag_poses

    _, moving, poses = bag
    got, why = bag_poses(moving, "odom")
    assert why is None and got.keys() == poses.keys()
    for key in poses:
        # poses.txt rotations are orthonormal to ~1e-9 only; /tf carries them as quaternions
        np.testing.assert_allclose(got[key], poses[key], atol=1e-6)
    assert not np.allclose(poses[min(poses)][:3, 3], poses[max(poses)][:3, 3], atol=0.3)  # the car moved
    none, why = bag_poses(moving, "map")
    assert none == {} and "2 of 2 clouds have no pose in 'map'" in why and "odom" in why
    none, why = bag_poses(moving.parent / "plain", "odom")
    assert none == {} and "the bag has no /tf" in why


def _seal_config(tmp_path, frames, name: str, pose_frame: str = "odom"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": name, "seed": 1, "objective": "seal", "device": "cpu", "augment": False,
        "model": {"preset": "waffleiron_tiny", "waffle_depth": 2, "waffle_width": 16},
        "sources": [{"frames": str(frames)}], "teacher": {"kind": "random", "dim": 8, "patch": 16},
        "superpixels": {"kind": "slic", "n_segments": 40}, "seal": {"pose_frame": pose_frame},
        "cache_dir": f"{name}_cache", "optim": {"steps": 1, "warmup_steps": 0, "batch_size": 1}}))
    return path


def test_temporal_pairs_from_bag_tf_match_the_dataset_poses(bag, tmp_path):
    from sal_ros.pretrain.cli import prepare, resolve
    from sal_ros.pretrain.trainer import PretrainConfig

    seq, moving, _ = bag
    data = {}
    for name, frames in (("folder", seq), ("bag", moving)):
        cfg = PretrainConfig.from_yaml(_seal_config(tmp_path, frames, name))
        resolve(cfg, tmp_path, None)
        data[name], _ = prepare(cfg, progress=False)
        assert data[name].partners == {0: 1}
        assert data[name].temporal_pairs() == {"scans": 2, "paired": 1, "no_partner": 1, "no_pose": 0}
    from_tf, from_file = data["bag"].matches(0, 1), data["folder"].matches(0, 1)
    assert (from_tf >= 0).mean() > 0.5  # most points of scan t find themselves in scan t+1 once moved
    assert (from_tf == from_file).mean() > 0.999  # the same pairs as poses.txt gives
    from scipy.spatial import cKDTree

    still, _ = cKDTree(data["bag"]._load(1)[0]).query(data["bag"]._load(0)[0], distance_upper_bound=0.3)
    assert (from_tf >= 0).mean() > np.isfinite(still).mean() + 0.1  # without the motion far fewer points pair


def test_a_missing_pose_is_said_once_and_counted_per_step(bag, tmp_path, capsys, caplog):
    from sal_ros.train.loop import read_metrics

    _, moving, _ = bag
    cfg = _seal_config(tmp_path, moving, "nopose", pose_frame="map")
    with caplog.at_level("WARNING"):
        assert cli_main(["pretrain", "--config", str(cfg), "--no-progress"]) == 0
    said = [r.getMessage() for r in caplog.records if "Seal temporal term" in r.getMessage()]
    assert len(said) == 1 and "no pose in 'map'" in said[0]
    assert "0 of 2 scans pair with scan t+1 (1 have no such scan, 1 no pose)" in capsys.readouterr().out
    (rec,) = read_metrics(tmp_path / "nopose" / "metrics.jsonl")
    assert rec["temporal_unpaired"] == 1 and rec["loss_temporal"] == 0


def test_a_framestore_recorded_without_poses_says_why(bag, tmp_path):
    from sal_ros.data.datasets import load_semantickitti
    from sal_ros.data.framestore import FrameStore
    from sal_ros.data.sources import FrameSource
    from sal_ros.pretrain.cache import frame_poses

    seq, _, _ = bag
    store = FrameStore(tmp_path / "store")
    for frame in load_semantickitti(seq, [0, 1]):
        store.append(frame)
    store.close()
    poses, why = frame_poses(FrameSource(tmp_path / "store"), "odom")
    assert poses == {} and why.startswith("2 of 2 frames have no pose in 'odom': the recorder had none")
