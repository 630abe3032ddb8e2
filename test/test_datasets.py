"""Dataset readers end to end: files -> Frame -> project_points, checked against direct numpy math."""
import json

import numpy as np
import pytest
import yaml
from conftest import require_data

from sal_ros.core.camera import project_points
from sal_ros.core.errors import SensorDataError
from sal_ros.data.datasets import (
    iter_semantickitti,
    load_kitti_frustum,
    load_kitti_object,
    load_nuscenes,
    load_semantickitti,
    read_semantickitti_config,
)
from sal_ros.data.sources import iter_source_frames, source_kind


def _kitti_txt(path):
    return {k: np.array(v.split(), float) for k, v in (line.split(":", 1) for line in open(path) if ":" in line)}


def test_semantickitti_scan0_projects_into_image0_as_p0_tr(semantickitti_dir):
    seq = semantickitti_dir / "sequences" / "00"
    frame = load_semantickitti(seq, scans=[0])[0]
    view = frame.cameras["image_0"]
    proj = project_points(frame.points, view.T_cam_lidar, view.camera)

    # independent: pixel ~ P0 @ Tr @ [x y z 1] from the raw files
    raw = _kitti_txt(seq / "calib.txt")
    Tr = np.vstack([raw["Tr"].reshape(3, 4), [0, 0, 0, 1]])
    xyz = np.fromfile(seq / "velodyne" / "000000.bin", np.float32).reshape(-1, 4)[:, :3].astype(np.float64)
    h = (raw["P0"].reshape(3, 4) @ Tr @ np.column_stack([xyz, np.ones(len(xyz))]).T).T
    depth = h[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = h[:, :2] / depth[:, None]
    mask = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < 1241) & (uv[:, 1] >= 0) & (uv[:, 1] < 376)

    assert len(xyz) == 124_668 and mask.sum() == 19_362
    np.testing.assert_array_equal(proj.valid, mask)
    np.testing.assert_allclose(proj.uv[mask], uv[mask], rtol=0, atol=1e-9)
    np.testing.assert_allclose(proj.depth, depth, rtol=0, atol=1e-9)
    pix = proj.pixels()
    assert view.image[pix[:, 1], pix[:, 0]].shape == (19_362,)  # indexes the mono image directly


def test_semantickitti_frames(semantickitti_dir):
    seq = semantickitti_dir / "sequences" / "00"
    frames = load_semantickitti(seq)
    assert [f.key for f in frames] == ["00_000000", "00_000001"]
    times = np.loadtxt(seq / "times.txt")
    assert [f.stamp_ns for f in frames] == [round(t * 1e9) for t in times] == [0, 103_735_900]
    f = frames[1]
    raw = np.fromfile(seq / "velodyne" / "000001.bin", np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(f.points, raw[:, :3])
    np.testing.assert_array_equal(f.intensity, raw[:, 3])
    np.testing.assert_array_equal(f.gt_labels, np.fromfile(seq / "labels" / "000001.label", np.uint32))
    assert f.points.dtype == np.float32 and f.gt_labels.dtype == np.uint32 and f.frame_id == "velodyne"
    view = f.cameras["image_0"]
    assert view.image.shape == (376, 1241) and view.image.dtype == np.uint8 and view.stamp_ns == f.stamp_ns
    assert view.frame_id == "cam0" and not f.is_partial
    # whole dataset root, scan selection, lidar only
    assert [g.key for g in load_semantickitti(semantickitti_dir, scans=["000001"], images=False)] == ["00_000001"]
    assert load_semantickitti(seq, scans=[1], images=False)[0].cameras == {}
    with pytest.raises(SensorDataError, match="000007"):
        load_semantickitti(seq, scans=[7])


def test_semantickitti_config(semantickitti_dir):
    cfg = read_semantickitti_config(semantickitti_dir / "semantic-kitti.yaml")
    raw = yaml.safe_load(open(semantickitti_dir / "semantic-kitti.yaml"))
    assert len(cfg.class_names) == 19 and cfg.class_names[0] == "car" and cfg.class_names[-1] == "traffic-sign"
    assert cfg.things == cfg.class_names[:8]
    assert cfg.labels[252] == "moving-car" and cfg.learning_map[252] == 1 and cfg.learning_map_inv[9] == 40
    assert cfg.colors[10] == tuple(raw["color_map"][10][::-1])  # BGR in the file, RGB here
    labels = np.fromfile(semantickitti_dir / "sequences/00/labels/000000.label", np.uint32)
    classes = cfg.learning_lut()[labels & 0xFFFF]
    expected = np.array([raw["learning_map"][int(s)] for s in labels & 0xFFFF])
    np.testing.assert_array_equal(classes, expected)
    assert set(np.unique(classes)) <= set(range(20)) and (classes == 1).any()  # scan 0 has cars


def test_nuscenes_six_cameras_match_direct_math(nuscenes_dir):
    frame = load_nuscenes(nuscenes_dir)[0]
    data = json.load(open(nuscenes_dir / "calib.json"))
    lidar_file = next(nuscenes_dir.glob("*LIDAR_TOP*.bin"))
    assert frame.stamp_ns == int(lidar_file.name.split("__")[-1].split(".")[0]) * 1000
    raw = np.fromfile(lidar_file, np.float32).reshape(-1, 5)
    assert frame.num_points == 34_688
    np.testing.assert_array_equal(frame.intensity, raw[:, 3])
    assert set(frame.cameras) == set(data["cams"]) and len(frame.cameras) == 6
    counts = {}
    xyz1 = np.column_stack([raw[:, :3].astype(np.float64), np.ones(len(raw))])
    for name, cam in data["cams"].items():
        view = frame.cameras[name]
        assert view.image.shape == (900, 1600, 3) and view.image.dtype == np.uint8
        assert view.stamp_ns == int(cam["img_path"].split("__")[-1].split(".")[0]) * 1000
        pc = (np.array(cam["lidar2cam"]) @ xyz1.T).T[:, :3]
        uvw = (np.array(cam["cam2img"]) @ pc.T).T
        uv = uvw[:, :2] / uvw[:, 2:3]
        mask = (pc[:, 2] > 1.0) & (uv[:, 0] >= 0) & (uv[:, 0] < 1600) & (uv[:, 1] >= 0) & (uv[:, 1] < 900)
        proj = project_points(frame.points, view.T_cam_lidar, view.camera, min_depth=1.0)
        np.testing.assert_array_equal(proj.valid, mask)
        np.testing.assert_allclose(proj.uv[mask], uv[mask], rtol=0, atol=1e-9)
        counts[name] = int(mask.sum())
    print("nuScenes points per camera (depth > 1 m, inside 1600x900):", counts)
    assert all(c > 1000 for c in counts.values())
    assert sum(counts.values()) < frame.num_points  # the cameras see part of the sweep


def test_kitti_object_frames_project_as_p2_r0_tr():
    root = require_data("kitti_object")
    frames = load_kitti_object(root)
    assert [f.key for f in frames] == ["000000", "000001"]
    assert frames[1].stamp_ns - frames[0].stamp_ns == 100_000_000
    for f in frames:
        raw = _kitti_txt(root / "training" / "calib" / f"{f.key}.txt")
        R0 = np.eye(4)
        R0[:3, :3] = raw["R0_rect"].reshape(3, 3)
        P = raw["P2"].reshape(3, 4) @ R0 @ np.vstack([raw["Tr_velo_to_cam"].reshape(3, 4), [0, 0, 0, 1]])
        h = (P @ np.column_stack([f.points.astype(np.float64), np.ones(f.num_points)]).T).T
        view = f.cameras["image_2"]
        H, W, _ = view.image.shape
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = h[:, :2] / h[:, 2:3]
        mask = (h[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
        proj = project_points(f.points, view.T_cam_lidar, view.camera)
        assert (view.camera.width, view.camera.height) == (W, H)
        np.testing.assert_array_equal(proj.valid, mask)
        np.testing.assert_allclose(proj.uv[mask], uv[mask], rtol=0, atol=1e-9)


def test_kitti_frustum_frame():
    frame = load_kitti_frustum(require_data("kitti_frustum_000008"))[0]
    assert frame.num_points == 17_238 and frame.key == "000008"
    view = frame.cameras["image_2"]
    assert view.image.shape == (375, 1242, 3)
    assert project_points(frame.points, view.T_cam_lidar, view.camera).valid.mean() > 0.9


def test_dataset_layouts_are_recognised_and_read_lazily(data_dir, tmp_path):
    cases = {"semantickitti": "semantickitti", "semantickitti/sequences/00": "semantickitti",
             "kitti_object": "kitti_object", "kitti_object/training": "kitti_object",
             "nuscenes_mini": "nuscenes", "kitti_frustum_000008": "kitti_frustum"}
    for folder, kind in cases.items():
        assert source_kind(data_dir / folder) == kind, folder
    assert [f.key for f in iter_source_frames(data_dir / "kitti_object")] == ["000000", "000001"]
    it = iter_semantickitti(data_dir / "semantickitti", images=False)
    assert next(it).key == "00_000000"  # lazy: one frame at a time
    with pytest.raises(SensorDataError, match="not a dataset folder"):
        source_kind(tmp_path)


def test_malformed_files_raise(tmp_path):
    seq = tmp_path / "sequences" / "00"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    (seq / "calib.txt").write_text("")
    np.zeros(10, np.float32).tofile(seq / "velodyne" / "000000.bin")
    with pytest.raises(SensorDataError, match="multiple of 4"):
        load_semantickitti(seq)
    np.zeros(12, np.float32).tofile(seq / "velodyne" / "000000.bin")
    np.zeros(2, np.uint32).tofile(seq / "labels" / "000000.label")
    with pytest.raises(SensorDataError, match="2 labels for 3 points"):
        load_semantickitti(seq)
    (seq / "times.txt").write_text("zero\n")
    (seq / "labels" / "000000.label").unlink()
    with pytest.raises(SensorDataError, match="times.txt"):
        load_semantickitti(seq)
