"""The semantickitti_mini layout: eight sequences under one root, the colour camera image_2 (P2), poses and times per
scan number, and the selection syntax (``00,05:0-4``) every frame source, the pseudo-label engine and the
experiment use."""
import shutil

import numpy as np
import pytest
from conftest import require_data

from sal_ros.core.camera import project_points
from sal_ros.core.errors import SensorDataError
from sal_ros.data.datasets import SemanticKittiScans, iter_semantickitti, semantickitti_poses
from sal_ros.data.layouts import Selection
from sal_ros.data.sources import iter_source_frames, keyed_frames
from sal_ros.data.sources import FrameSource


@pytest.fixture
def mini():
    return require_data("semantickitti_mini")


def _kitti_txt(path):
    return {k: np.array(v.split(), float) for k, v in (line.split(":", 1) for line in open(path) if ":" in line)}


def test_a_selection_picks_sequences_and_scan_ranges_of_one_root(mini):
    frames = list(iter_source_frames(mini, select="00,05:0-4"))
    assert [f.key for f in frames] == [f"{s}_{i:06d}" for s in ("00", "05") for i in range(5)]
    assert set(SemanticKittiScans(mini, "00;05:8-9").keys()) == {f"00_{i:06d}" for i in range(10)} | {
        "05_000008", "05_000009"}
    firsts = SemanticKittiScans(mini, "*:0").keys()
    assert firsts == [f"{s}_000000" for s in ("00", "01", "02", "03", "05", "07", "09", "10")]
    assert keyed_frames(mini, "7:2-3").keys() == ["07_000002", "07_000003"]  # 7 names sequence 07
    assert FrameSource(mini, "10:9").keys() == ["10_000009"]  # the pseudo-label engine's frames
    assert Selection.parse("00,05:0-2,7").matches("05", 7) and not Selection.parse("00,05:0-2,7").matches("05", 5)


def test_a_bad_selection_is_a_clear_error(mini):
    with pytest.raises(SensorDataError, match=r"no sequence\(s\) \['04'\]"):
        SemanticKittiScans(mini, "00,04")
    with pytest.raises(ValueError, match="not a scan number or range"):
        Selection.parse("00:a-b")
    with pytest.raises(ValueError, match="names no sequence"):
        Selection.parse(":0-4")
    with pytest.raises(ValueError, match="empty or negative"):
        Selection.parse("00:5-2")
    with pytest.raises(SensorDataError, match="does not apply to kitti_object"):
        list(iter_source_frames(require_data("kitti_object"), select="00"))
    with pytest.raises(SensorDataError, match="does not name sequence 05"):
        list(iter_semantickitti(mini / "sequences" / "05", select="00"))


def test_the_colour_camera_projects_as_p2_tr_for_every_sequence(mini):
    for seq in ("00", "03", "07"):  # three recording days, three Tr
        frame = next(iter_source_frames(mini, select=f"{seq}:4"))
        assert list(frame.cameras) == ["image_2"] and frame.cameras["image_2"].image.ndim == 3  # colour
        calib = _kitti_txt(mini / "sequences" / seq / "calib.txt")
        tr = np.vstack([calib["Tr"].reshape(3, 4), [0, 0, 0, 1]])
        pts = frame.points.astype(np.float64)
        hom = (calib["P2"].reshape(3, 4) @ tr @ np.c_[pts, np.ones(len(pts))].T).T
        front = hom[:, 2] > 1.0
        expected = hom[front, :2] / hom[front, 2:3]
        view = frame.cameras["image_2"]
        proj = project_points(pts[front], view.T_cam_lidar, view.camera)
        assert proj.valid.sum() > 1000
        np.testing.assert_allclose(proj.uv[proj.valid], expected[proj.valid], atol=1e-3)
        assert frame.gt_labels is not None


def _trimmed_copy(mini, tmp_path, first: int) -> tuple:
    """Sequence 07's scans 0-2 renamed to first..first+2, with poses.txt / times.txt holding only those three."""
    src, seq = mini / "sequences" / "07", tmp_path / "sequences" / "07"
    for sub in ("velodyne", "labels"):
        (seq / sub).mkdir(parents=True)
        for i in range(3):
            ext = ".bin" if sub == "velodyne" else ".label"
            shutil.copy(src / sub / f"{i:06d}{ext}", seq / sub / f"{first + i:06d}{ext}")
    shutil.copy(src / "calib.txt", seq / "calib.txt")
    poses = (src / "poses.txt").read_text().splitlines()[:3]
    times = (src / "times.txt").read_text().splitlines()[:3]
    (seq / "poses.txt").write_text("\n".join(poses) + "\n")
    (seq / "times.txt").write_text("\n".join(times) + "\n")
    return seq, poses, times


def test_poses_and_times_follow_the_scan_number_or_a_trimmed_list(mini, tmp_path):
    full = semantickitti_poses(mini / "sequences" / "07")
    seq, _, times = _trimmed_copy(mini, tmp_path, first=100)
    trimmed = semantickitti_poses(tmp_path)
    assert sorted(trimmed) == ["07_000100", "07_000101", "07_000102"]
    for i in range(3):  # the list holds exactly these scans: line i is the i-th scan present
        np.testing.assert_array_equal(trimmed[f"07_{100 + i:06d}"], full[f"07_{i:06d}"])
    frames = list(iter_semantickitti(seq, images=False, select="07:101-102"))
    assert [f.stamp_ns for f in frames] == [round(float(t) * 1e9) for t in times[1:]]
    # the full dataset's files: line = scan number (scan 000005 takes line 5, not line 0)
    five = next(iter_semantickitti(mini, images=False, select="07:5"))
    assert five.stamp_ns == round(float((mini / "sequences/07/times.txt").read_text().split()[5]) * 1e9)
    # neither form: two lines for three scans is named, not guessed
    (seq / "times.txt").write_text("\n".join(times[:2]) + "\n")
    with pytest.raises(SensorDataError, match="times.txt: 2 lines, but scans run to 000102"):
        list(iter_semantickitti(seq, images=False))
