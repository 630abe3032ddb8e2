"""Calibration readers against the dataset files' own projection math, and the static-extrinsics YAML."""
import json

import numpy as np
import pytest
import yaml
from conftest import require_data

from sal_ros.core.calibration import (
    CameraCalibration,
    read_kitti_frustum_calib,
    read_kitti_object_calib,
    read_nuscenes_calib,
    read_semantickitti_calib,
    read_static_extrinsics,
    write_static_extrinsics,
)
from sal_ros.core.camera import CameraModel, project_points
from sal_ros.core.errors import CalibrationError


def _kitti_txt(path):
    out = {}
    for line in open(path):
        if ":" in line:
            key, values = line.split(":", 1)
            out[key] = np.array(values.split(), dtype=float)
    return out


def _direct(P, points):
    """pixel ~ P @ [x y z 1] (P is 3x4 or 4x4); returns uv and depth (the third row)."""
    h = np.column_stack([points.astype(np.float64), np.ones(len(points))]) @ np.asarray(P)[:3].T
    return h[:, :2] / h[:, 2:3], h[:, 2]


def _points(path, columns):
    return np.fromfile(path, np.float32).reshape(-1, columns)[:, :3]


def test_semantickitti_p2_with_baseline_column_folds_exactly():
    seq = require_data("semantickitti", "sequences", "00")
    raw = _kitti_txt(seq / "calib.txt")
    Tr = np.vstack([raw["Tr"].reshape(3, 4), [0, 0, 0, 1]])
    calibs = read_semantickitti_calib(seq / "calib.txt", cameras=("image_0", "image_2", "image_3"))
    pts = _points(seq / "velodyne" / "000000.bin", 4)
    for k in (0, 2, 3):
        c = calibs[f"image_{k}"]
        P = raw[f"P{k}"].reshape(3, 4)
        assert k == 0 or np.any(P[:, 3] != 0)
        np.testing.assert_array_equal(c.camera.K, P[:, :3])
        uv, depth = _direct(P @ Tr, pts)
        proj = project_points(pts, c.T_cam_lidar, c.camera)
        np.testing.assert_allclose(proj.depth, depth, rtol=0, atol=1e-9)
        ok = depth > 0
        # within 1e-9 px; points a hair in front of the camera project to ~1e7 px, so relative 1e-13 there
        np.testing.assert_allclose(proj.uv[ok], uv[ok], rtol=1e-13, atol=1e-9)
        np.testing.assert_allclose(proj.uv[proj.valid], uv[proj.valid], rtol=0, atol=1e-9)
        assert (c.frame_id, c.lidar_frame_id, c.camera.width, c.camera.height) == (f"cam{k}", "velodyne", 1241, 376)


def test_kitti_object_is_p2_r0_tr():
    root = require_data("kitti_object", "training")
    for name, size in (("000000", (1224, 370)), ("000001", (1242, 375))):
        raw = _kitti_txt(root / "calib" / f"{name}.txt")
        R0 = np.eye(4)
        R0[:3, :3] = raw["R0_rect"].reshape(3, 3)
        Tr = np.vstack([raw["Tr_velo_to_cam"].reshape(3, 4), [0, 0, 0, 1]])
        P = raw["P2"].reshape(3, 4) @ R0 @ Tr
        c = read_kitti_object_calib(root / "calib" / f"{name}.txt", size)
        pts = _points(root / "velodyne" / f"{name}.bin", 4)
        uv, depth = _direct(P, pts)
        proj = project_points(pts, c.T_cam_lidar, c.camera)
        ok = depth > 0
        np.testing.assert_allclose(proj.uv[ok], uv[ok], rtol=1e-13, atol=1e-9)
        inside = ok & (uv[:, 0] >= 0) & (uv[:, 0] < size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < size[1])
        np.testing.assert_array_equal(proj.valid, inside)
        assert 10_000 < inside.sum() < len(pts) // 2


def test_kitti_frustum_matches_lidar2img():
    root = require_data("kitti_frustum_000008")
    data = json.load(open(root / "calib.json"))
    c = read_kitti_frustum_calib(root / "calib.json")
    pts = _points(root / "000008.bin", 4)
    P = np.array(data["P2"]) @ np.array(data["R0_rect"]) @ np.array(data["Tr_velo_to_cam"])
    uv, depth = _direct(P, pts)
    proj = project_points(pts, c.T_cam_lidar, c.camera)
    np.testing.assert_allclose(proj.uv, uv, rtol=0, atol=1e-9)
    stored, _ = _direct(np.array(data["lidar2img"]), pts)  # the stored product, rounded to float32
    np.testing.assert_allclose(proj.uv, stored, rtol=0, atol=1e-4)
    inside = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < 1242) & (uv[:, 1] >= 0) & (uv[:, 1] < 375)
    assert proj.valid.sum() == inside.sum() > 0.9 * len(pts)  # the sample is cropped to this camera's view


def test_kitti_frustum_inconsistent_lidar2img_is_rejected(tmp_path):
    data = json.load(open(require_data("kitti_frustum_000008", "calib.json")))
    data["lidar2img"][0][3] += 5.0
    (tmp_path / "calib.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="lidar2img disagrees"):
        read_kitti_frustum_calib(tmp_path / "calib.json")


def test_nuscenes_cameras_stamps_and_offsets():
    root = require_data("nuscenes_mini")
    data = json.load(open(root / "calib.json"))
    calibs = read_nuscenes_calib(root / "calib.json")
    assert len(calibs) == 6
    lidar_us = int(data["lidar_path"].rsplit("__", 1)[1].split(".")[0])
    for name, c in calibs.items():
        cam = data["cams"][name]
        image_us = int(cam["img_path"].rsplit("__", 1)[1].split(".")[0])
        assert c.stamp_ns == image_us * 1000  # the JSON float seconds, rounded back to whole microseconds
        assert c.time_offset_ns == (image_us - lidar_us) * 1000
        assert -50_000_000 < c.time_offset_ns <= 0  # cameras fire within the 20 Hz sweep, before its end stamp
        np.testing.assert_array_equal(c.camera.K, cam["cam2img"])
        np.testing.assert_array_equal(c.T_cam_lidar, cam["lidar2cam"])
        assert (c.camera.width, c.camera.height, c.frame_id, c.lidar_frame_id) == (1600, 900, name, "LIDAR_TOP")


@pytest.mark.parametrize("text,match", [
    ("P0: 1 2 3\nTr: x y\n", "KEY: numbers"),
    ("P0: 1 0 0 0 0 1 0 0 0 0 1 0\n", "no Tr"),
    ("P0: 1 0 0 0 0 1 0 0\nTr: 1 0 0 0 0 1 0 0 0 0 1 0\n", "P0 has 8 values"),
    ("P0: 0 0 0 0 0 0 0 0 0 0 0 0\nTr: 1 0 0 0 0 1 0 0 0 0 1 0\n", "not of the form"),
    ("P0: 1 0 0 0 0 1 0 0 0 0 1 0\nTr: 2 0 0 0 0 1 0 0 0 0 1 0\n", "not a rigid"),
])
def test_kitti_txt_errors(tmp_path, text, match):
    (tmp_path / "calib.txt").write_text(text)
    with pytest.raises(CalibrationError, match=match):
        read_semantickitti_calib(tmp_path / "calib.txt")


def test_unknown_kitti_camera_and_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="image_5"):
        read_semantickitti_calib(require_data("semantickitti", "sequences", "00", "calib.txt"), cameras=("image_5",))
    with pytest.raises(CalibrationError, match="cannot read"):
        read_semantickitti_calib(tmp_path / "nope.txt")


# --------------------------------------------------------------------------------------- static extrinsics


def _rot(yaw):
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _calibs():
    T1 = np.eye(4)
    T1[:3, :3] = np.array([[0.0, -1, 0], [0, 0, -1], [1, 0, 0]]) @ _rot(0.3)
    T1[:3, 3] = [0.05, -0.31, -0.12345678901234]
    T2 = np.eye(4)
    T2[:3, :3] = _rot(-1.1)
    fisheye = CameraModel(K=[[300.1, 0, 640.5], [0, 300.2, 400.25], [0, 0, 1]], width=1280, height=800,
                          D=[0.01, -0.002, 0.0003, -1e-5], distortion_model="equidistant")
    return [
        CameraCalibration("front", fisheye, T1, "front_optical", "os_lidar", time_offset_ns=-35_491_000),
        CameraCalibration("rear", None, T2, "rear_optical", "base_lidar", time_offset_ns=1),
    ]


def test_static_extrinsics_round_trip_is_exact(tmp_path):
    path = tmp_path / "sub" / "extrinsics.yaml"
    write_static_extrinsics(path, _calibs(), lidar_frame_id="os_lidar")
    assert [p.name for p in path.parent.iterdir()] == ["extrinsics.yaml"]  # no temp file left behind
    back = read_static_extrinsics(path)
    assert list(back) == ["front", "rear"]
    for orig in _calibs():
        got = back[orig.name]
        np.testing.assert_array_equal(got.T_cam_lidar, orig.T_cam_lidar)
        assert (got.frame_id, got.lidar_frame_id, got.time_offset_ns) == (
            orig.frame_id, orig.lidar_frame_id, orig.time_offset_ns)
    front = back["front"].camera
    np.testing.assert_array_equal(front.K, _calibs()[0].camera.K)
    np.testing.assert_array_equal(front.D, _calibs()[0].camera.D)
    assert (front.width, front.height, front.distortion_model) == (1280, 800, "equidistant")
    assert back["rear"].camera is None
    raw = yaml.safe_load(path.read_text())
    assert raw["lidar_frame_id"] == "os_lidar" and "lidar_frame_id" not in raw["cameras"][0]
    assert raw["cameras"][1]["lidar_frame_id"] == "base_lidar"
    write_static_extrinsics(path, {c.name: c for c in _calibs()[:1]}, lidar_frame_id="os_lidar")  # overwrite
    assert list(read_static_extrinsics(path)) == ["front"]


def test_dataset_calibration_round_trips_through_yaml(tmp_path):
    calibs = read_nuscenes_calib(require_data("nuscenes_mini", "calib.json"))
    write_static_extrinsics(tmp_path / "nus.yaml", calibs, lidar_frame_id="LIDAR_TOP")
    back = read_static_extrinsics(tmp_path / "nus.yaml")
    for name, c in calibs.items():
        np.testing.assert_array_equal(back[name].T_cam_lidar, c.T_cam_lidar)
        np.testing.assert_array_equal(back[name].camera.K, c.camera.K)
        assert back[name].time_offset_ns == c.time_offset_ns


def _entry(**over):
    entry = {"name": "cam", "frame_id": "cam_optical", "T_cam_lidar": np.eye(4).tolist()}
    entry.update(over)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize("doc,match", [
    ({"lidar_frame_id": "l"}, "non-empty 'cameras'"),
    ({"lidar_frame_id": "l", "cameras": []}, "non-empty 'cameras'"),
    ({"lidar_frame_id": "l", "cameras": [_entry(T_cam_lidar=None)]}, "missing 'T_cam_lidar'"),
    ({"lidar_frame_id": "l", "cameras": [_entry(frame_id=None)]}, "missing 'frame_id'"),
    ({"lidar_frame_id": "l", "cameras": [_entry(name=None)]}, "missing 'name'"),
    ({"cameras": [_entry()]}, "lidar_frame_id"),
    ({"lidar_frame_id": "l", "cameras": [_entry(T_cam_lidar=np.eye(4)[:3].tolist())]}, r"shape \(3, 4\)"),
    ({"lidar_frame_id": "l", "cameras": [_entry(T_cam_lidar=(np.eye(4) * 2).tolist())]}, "not a rigid"),
    ({"lidar_frame_id": "l", "cameras": [_entry(T_cam_lidar=np.diag([1.0, 1, -1, 1]).tolist())]}, "not a rigid"),
    ({"lidar_frame_id": "l", "cameras": [_entry(T_cam_lidar=[["a"] * 4] * 4)]}, "numeric"),
    ({"lidar_frame_id": "l", "cameras": [_entry(), _entry()]}, "twice"),
    ({"lidar_frame_id": "l", "cameras": [_entry(time_ofset=0.1)]}, "unknown key"),
    ({"lidar_frame_id": "l", "cameras": [_entry(time_offset="soon")]}, "time_offset"),
    ({"lidar_frame_id": "l", "cameras": [_entry(intrinsics={"width": 10, "height": 10})]}, "missing 'K'"),
    ({"lidar_frame_id": "l", "cameras": [_entry(intrinsics={"width": 10, "height": 10, "K": [[0] * 3] * 3})]},
     "focal"),
    ({"lidar_frame_id": "l", "cameras": [_entry(intrinsics={"width": 10, "height": 10, "K": np.eye(3).tolist(),
                                                             "distortion_model": "plumb_bob", "D": [0.1]})]},
     "needs 5"),
])
def test_static_extrinsics_errors(tmp_path, doc, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(CalibrationError, match=match):
        read_static_extrinsics(path)


def test_static_extrinsics_unreadable(tmp_path):
    with pytest.raises(CalibrationError, match="cannot read"):
        read_static_extrinsics(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("cameras: [\n")
    with pytest.raises(CalibrationError, match="cannot read"):
        read_static_extrinsics(tmp_path / "broken.yaml")


def test_hand_written_yaml_with_rounded_rotation(tmp_path):
    """What a user types: six-decimal rotation, per-camera lidar frame, time offset in seconds."""
    (tmp_path / "rig.yaml").write_text(
        "cameras:\n"
        "  - name: front\n"
        "    frame_id: front_optical\n"
        "    lidar_frame_id: velodyne\n"
        "    time_offset: -0.0125\n"
        "    T_cam_lidar: [[0.000428, -0.999967, -0.008084, -0.011985], [-0.007211, 0.008081, -0.999941, -0.054040],"
        " [0.999974, 0.000486, -0.007207, -0.292197], [0, 0, 0, 1]]\n")
    c = read_static_extrinsics(tmp_path / "rig.yaml")["front"]
    assert c.time_offset_ns == -12_500_000 and c.lidar_frame_id == "velodyne" and c.camera is None
