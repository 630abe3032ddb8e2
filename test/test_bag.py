"""sal-ros convert -> rosbag2 -> iter_bag_frames (the node's synchronizer) reproduces the dataset frames exactly."""
import argparse
from dataclasses import replace

import numpy as np
import pytest

from conftest import require_data
from sal_ros.core.calibration import read_static_extrinsics
from sal_ros.core.errors import SensorDataError
from sal_ros.core.tf import ExtrinsicsSource, StaticTfTree
from sal_ros.core.transforms import make_transform, quaternion_to_matrix
from sal_ros.data import bag as B
from sal_ros.data import convert as C
from sal_ros.data.datasets import load_kitti_object, load_nuscenes, load_semantickitti

NS = 1_000_000_000


def assert_same_frame(got, src, shift_ns, exact_T=True):
    assert got.stamp_ns == src.stamp_ns + shift_ns and got.key == str(got.stamp_ns)
    assert got.frame_id == C.LIDAR_FRAME
    np.testing.assert_array_equal(got.points, src.points)
    np.testing.assert_array_equal(got.intensity, src.intensity)
    if src.gt_labels is None:
        assert got.gt_labels is None
    else:
        assert got.gt_labels.dtype == np.uint32
        np.testing.assert_array_equal(got.gt_labels, src.gt_labels)
    assert got.missing_cameras == () and list(got.cameras) == list(src.cameras)
    for name, view in src.cameras.items():
        back = got.cameras[name]
        assert back.stamp_ns == view.stamp_ns + shift_ns and back.frame_id == view.frame_id
        assert back.image.dtype == view.image.dtype
        np.testing.assert_array_equal(back.image, view.image)
        np.testing.assert_array_equal(back.camera.K, view.camera.K)
        assert (back.camera.width, back.camera.height) == (view.camera.width, view.camera.height)
        assert not back.camera.is_distorted
        if exact_T:
            np.testing.assert_array_equal(back.T_cam_lidar, view.T_cam_lidar)
        else:
            # through a quaternion: nuScenes' float32-rounded rotations are orthonormal to ~3e-8 only
            np.testing.assert_allclose(back.T_cam_lidar, view.T_cam_lidar, rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def semantickitti_bag(tmp_path_factory):
    seq = require_data("semantickitti", "sequences", "00")
    out = tmp_path_factory.mktemp("bags") / "semantickitti"
    summary = C.convert(seq, out, progress=False)
    assert (summary.frames, summary.labelled, list(summary.cameras)) == (2, 2, ["image_0"])
    return seq, out


@pytest.fixture(scope="module")
def nuscenes_bag(tmp_path_factory):
    root = require_data("nuscenes_mini")
    out = tmp_path_factory.mktemp("bags") / "nuscenes"
    assert C.convert(root, out, progress=False).frames == 1
    return root, out


def test_semantickitti_round_trip(semantickitti_bag):
    seq, out = semantickitti_bag
    assert sorted(p.name for p in out.iterdir()) == ["extrinsics.yaml", "labels.npz", "metadata.yaml",
                                                     "semantickitti.mcap"]
    assert not list(out.parent.glob(".*"))  # no temporary folder left beside it
    src = load_semantickitti(seq)
    got = list(B.iter_bag_frames(out))
    assert len(got) == len(src) == 2
    for g, s in zip(got, src):
        assert_same_frame(g, s, shift_ns=NS)  # KITTI times start at 0: shifted by --time-base 1 s


def test_nuscenes_six_cameras_with_their_own_stamps(nuscenes_bag):
    root, out = nuscenes_bag
    (src,) = load_nuscenes(root)
    (got,) = list(B.iter_bag_frames(out))  # offsets come from extrinsics.yaml (CAM_FRONT_LEFT fires 43 ms early)
    assert len(got.cameras) == 6
    assert_same_frame(got, src, shift_ns=0)
    offsets = {n: v.stamp_ns - src.stamp_ns for n, v in src.cameras.items()}
    assert min(offsets.values()) < -40_000_000


def test_tf_static_and_camera_info_without_the_yaml(nuscenes_bag, tmp_path):
    root, out = nuscenes_bag
    (src,) = load_nuscenes(root)
    bag = tmp_path / "bag"
    bag.mkdir()
    for name in ("metadata.yaml", "nuscenes.mcap"):  # the bag alone, no sidecars
        (bag / name).symlink_to(out / name)
    cams = [(n, C.image_topic(n), C.info_topic(n), v.stamp_ns - src.stamp_ns) for n, v in src.cameras.items()]
    (got,) = list(B.iter_bag_frames(bag, C.CLOUD_TOPIC, cams))
    assert_same_frame(got, src, shift_ns=0, exact_T=False)
    # without offsets the two cameras firing > 30 ms before the sweep do not match
    (got,) = list(B.iter_bag_frames(bag))
    assert set(got.missing_cameras) == {"CAM_FRONT", "CAM_FRONT_LEFT"} and len(got.cameras) == 4
    assert list(B.iter_bag_frames(bag, allow_partial=False)) == []


def test_node_params_file_drives_topics_offsets_and_sync(nuscenes_bag, tmp_path):
    root, out = nuscenes_bag
    (src,) = load_nuscenes(root)
    lines = ["/**:", "  ros__parameters:", f"    cloud_topic: {C.CLOUD_TOPIC}",
             "    cameras: [CAM_FRONT_LEFT, CAM_BACK]", "    camera:"]
    for n in ("CAM_FRONT_LEFT", "CAM_BACK"):
        off = (src.cameras[n].stamp_ns - src.stamp_ns) / NS
        lines += [f"      {n}:", f"        image_topic: {C.image_topic(n)}", f"        info_topic: {C.info_topic(n)}",
                  f"        time_offset: {off}"]
    lines += ["    sync: {match_threshold: 0.002, timeout: 0.05}"]
    config = tmp_path / "params.yaml"
    config.write_text("\n".join(lines) + "\n")
    (got,) = list(B.iter_bag_frames(out, config=config))
    assert list(got.cameras) == ["CAM_FRONT_LEFT", "CAM_BACK"] and got.missing_cameras == ()
    assert got.cameras["CAM_FRONT_LEFT"].stamp_ns == src.cameras["CAM_FRONT_LEFT"].stamp_ns


def test_a_camera_without_transform_is_left_out_and_the_bag_reads_on(semantickitti_bag, nuscenes_bag, tmp_path):
    # The node's rule: the camera is left out of that frame and listed; before, the reader raised and the
    # iteration ended at the first frame.
    root, out = nuscenes_bag
    (src,) = load_nuscenes(root)
    cams = [(n, C.image_topic(n), C.info_topic(n), v.stamp_ns - src.stamp_ns) for n, v in src.cameras.items()]
    calibs = read_static_extrinsics(out / B.EXTRINSICS_FILE)
    del calibs["CAM_BACK"]
    (got,) = list(B.iter_bag_frames(out, C.CLOUD_TOPIC, cams, extrinsics=calibs))
    assert got.missing_cameras == ("CAM_BACK",) and set(got.cameras) == set(src.cameras) - {"CAM_BACK"}
    _, out = semantickitti_bag
    calibs = {n: replace(c, lidar_frame_id="radar") for n, c in read_static_extrinsics(out / B.EXTRINSICS_FILE).items()}
    frames = list(B.iter_bag_frames(out, extrinsics=calibs))
    assert len(frames) == 2 and all(f.missing_cameras == ("image_0",) and not f.cameras for f in frames)


def test_node_params_file_is_read_as_the_node_reads_it(semantickitti_bag, tmp_path):
    # one reader (core.params_file) for `sal-ros run` and the bag reader: its checks apply to both
    _, out = semantickitti_bag
    cases = {"/**: [1]\n": "needs a 'ros__parameters' mapping"}
    for text, why in cases.items():
        config = tmp_path / "params.yaml"
        config.write_text(text)
        with pytest.raises(SensorDataError, match=why):
            next(B.iter_bag_frames(out, config=config))


def test_static_tree_chains_transforms():
    R = quaternion_to_matrix([0.1, -0.2, 0.3, 0.9] / np.linalg.norm([0.1, -0.2, 0.3, 0.9]))
    T_base_lidar = make_transform(np.eye(3), [0.5, 0.0, 1.8])
    T_base_cam = make_transform(R, [1.2, 0.1, 1.4])
    tree = StaticTfTree({("base_link", "lidar"): T_base_lidar, ("base_link", "cam"): T_base_cam})
    assert isinstance(tree, ExtrinsicsSource)
    np.testing.assert_allclose(tree.lookup("cam", "lidar"), np.linalg.inv(T_base_cam) @ T_base_lidar, atol=1e-12)
    np.testing.assert_allclose(tree.lookup("lidar", "cam"), np.linalg.inv(T_base_lidar) @ T_base_cam, atol=1e-12)
    assert tree.lookup("cam", "radar") is None


def test_bad_inputs_are_clear_errors(semantickitti_bag, tmp_path):
    seq, out = semantickitti_bag
    with pytest.raises(FileExistsError, match="--overwrite"):
        C.convert(seq, out, progress=False)
    with pytest.raises(SensorDataError, match="no PointCloud2 topic /points"):
        next(B.iter_bag_frames(out, "/points"))
    with pytest.raises(SensorDataError, match="no frames to convert"):
        C.convert(seq, tmp_path / "none", frames=["999999"], progress=False)
    kitti = require_data("kitti_object")
    with pytest.raises(SensorDataError, match="differs from the first frame"):
        C.convert(kitti, tmp_path / "kitti", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # failed conversions leave nothing behind
    # one KITTI object frame at a time works
    C.convert(kitti, tmp_path / "kitti", frames=["000001"], progress=False)
    (got,) = list(B.iter_bag_frames(tmp_path / "kitti"))
    assert_same_frame(got, load_kitti_object(kitti)[1], shift_ns=NS)


def test_cli_overwrite(semantickitti_bag, tmp_path, capsys):
    seq, _ = semantickitti_bag
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    out = tmp_path / "bag"
    assert C.main(parser.parse_args([str(seq), str(out), "--frames", "000001"])) == 0
    assert C.main(parser.parse_args([str(seq), str(out)])) == 1
    assert "exists" in capsys.readouterr().err
    assert C.main(parser.parse_args([str(seq), str(out), "--overwrite", "--max-frames", "2"])) == 0
    assert [f.stamp_ns for f in B.iter_bag_frames(out)] == [NS, NS + 103_735_900]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag"]
