"""`sal-ros convert` carries a SemanticKITTI sequence's motion into the bag as /tf (pose frame -> lidar at each
cloud stamp), so Seal's temporal term reads a converted bag's poses as it reads a robot's."""
import numpy as np

from conftest import require_data
from sal_ros.data.bag import bag_poses
from sal_ros.data.convert import convert
from sal_ros.data.datasets import semantickitti_poses

NS = 1_000_000_000


def test_converted_bag_carries_poses_txt_on_tf(tmp_path):
    seq = require_data("semantickitti", "sequences", "00")
    summary = convert(seq, tmp_path / "bag", progress=False)
    assert (summary.frames, summary.posed) == (2, 2)
    expected = semantickitti_poses(seq)
    times = np.loadtxt(seq / "times.txt", ndmin=1)
    # a cloud's stamp is its times.txt time shifted by --time-base (1 s)
    by_stamp = {str(int(round(times[int(k[-6:])] * NS)) + NS): T for k, T in expected.items()}
    got, why = bag_poses(tmp_path / "bag", "odom")
    assert why is None and got.keys() == by_stamp.keys()
    for stamp, T in by_stamp.items():
        # poses.txt rotations are orthonormal to ~1e-7 only; /tf carries them as quaternions
        np.testing.assert_allclose(got[stamp], T, rtol=0, atol=1e-6)
    assert not np.allclose(*(T[:3, 3] for T in by_stamp.values()), atol=0.3)  # the car moved

    assert convert(seq, tmp_path / "map", pose_frame="map", progress=False).posed == 2
    assert bag_poses(tmp_path / "map", "map")[0].keys() == by_stamp.keys()
    assert convert(seq, tmp_path / "none", pose_frame="", progress=False).posed == 0
    assert "the bag has no /tf" in bag_poses(tmp_path / "none", "odom")[1]
