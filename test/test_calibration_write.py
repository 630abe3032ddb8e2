"""Static-extrinsics files are written with ordinary permissions (0666 minus the umask), atomically."""
import os
import stat

import numpy as np
import pytest

from sal_ros.core.calibration import CameraCalibration, read_static_extrinsics, write_static_extrinsics


def _calib():
    T = np.eye(4)
    T[:3, 3] = [0.1, -0.2, 0.3]
    return CameraCalibration(name="front", camera=None, T_cam_lidar=T, frame_id="front_optical",
                             lidar_frame_id="lidar")


@pytest.fixture
def umask():
    def set_mask(mask):
        state["old"] = os.umask(mask)
        return mask

    state = {}
    yield set_mask
    if "old" in state:
        os.umask(state["old"])


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_file_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "sub" / "extrinsics.yaml"
    write_static_extrinsics(path, [_calib()], lidar_frame_id="lidar")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    np.testing.assert_array_equal(read_static_extrinsics(path)["front"].T_cam_lidar, _calib().T_cam_lidar)


def test_overwrite_leaves_no_temp_files(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "extrinsics.yaml"
    for _ in range(3):
        write_static_extrinsics(path, [_calib()], lidar_frame_id="lidar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extrinsics.yaml"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_removes_its_temp_file(tmp_path):
    path = tmp_path / "extrinsics.yaml"
    path.mkdir()  # os.replace onto a directory fails after the temp file was written
    with pytest.raises(OSError):
        write_static_extrinsics(path, [_calib()], lidar_frame_id="lidar")
    assert [p.name for p in tmp_path.iterdir()] == ["extrinsics.yaml"]
